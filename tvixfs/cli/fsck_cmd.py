"""``tvixfs fsck``: check (and repair) the embedded store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tvixfs.cli.app import StoreOpt, app, describe, fail, refuse_empty_store_variable
from tvixfs.errors import UserError
from tvixfs.services.fsck import fsck_local_store
from tvixfs.services.s3url import SCHEMES as S3_SCHEMES
from tvixfs.services.url import StoreURL, default_store_url


@app.command()
def fsck(
    store: StoreOpt = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Remove damaged and incomplete entries, path infos whose content is gone, "
            "temporary and unreferenced chunk files, so that re-importing completes. "
            "Run it while nothing else writes to the store.",
        ),
    ] = False,
    check_contents: Annotated[
        bool,
        typer.Option(
            "--check-contents",
            help="Also render every path's NAR and compare its size and sha256 with the path "
            "info (reads all content twice).",
        ),
    ] = False,
) -> None:
    """Verify every chunk, blob, directory and path info of a local:// or s3:// store.

    On s3://, objects no path info reaches (left by a killed import) are counted and --repair
    removes them: never run it on a bucket shared with tvix-store.

    Prints one line per problem, then a summary.

    Exit status: 0 consistent (or all repaired), 1 problems remain, 2 store not checkable.
    """
    refuse_empty_store_variable(store, code=2)
    try:
        url = StoreURL.parse(default_store_url() if store is None else store)
    except UserError as e:
        fail(str(e), code=2)
    if url.scheme in S3_SCHEMES:
        _fsck_s3(url, repair, check_contents)
        return
    if url.scheme != "local":
        fail(f"fsck checks the embedded store only (local:///path), not {url.scheme}://", code=2)
    try:
        result = fsck_local_store(Path(url.path), report=print, repair=repair, check_contents=check_contents)
    except (UserError, OSError) as e:
        fail(f"cannot check {url.path}: {describe(e)}", code=2)
    print(result.summary())
    if result.problems and not result.repaired:
        raise typer.Exit(1)


def _fsck_s3(url: StoreURL, repair: bool, check_contents: bool) -> None:
    from tvixfs.services.s3 import S3Objects
    from tvixfs.services.s3fsck import fsck_s3_store
    from tvixfs.services.s3url import parse_s3_url

    location = parse_s3_url(url.path)
    try:
        objects = S3Objects(location)
        result = fsck_s3_store(objects, report=print, repair=repair, check_contents=check_contents)
    except (UserError, OSError) as e:
        fail(f"cannot check {location.describe()}: {describe(e)}", code=2)
    print(result.summary())
    if result.problems and not result.repaired:
        raise typer.Exit(1)
