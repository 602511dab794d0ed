"""``tvixfs gc`` and ``tvixfs delete``: free what no path needs in the embedded store."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tvixfs.castore.errors import ValidationError
from tvixfs.cli.app import StoreOpt, app, fail
from tvixfs.services.errors import StoreError
from tvixfs.services.gc import DeleteRefusedError, collect_garbage, delete_paths
from tvixfs.services.url import StoreURL, default_store_url
from tvixfs.store.storepath import StorePath


def _local_path(store: str | None, command: str) -> Path:
    """The directory of the embedded store ``--store`` names; other stores end the command."""
    try:
        url = StoreURL.parse(store or default_store_url())
    except (StoreError, ValidationError) as e:
        fail(str(e))
    if url.scheme != "local":
        fail(f"{command} works on the embedded store only (local:///path), not {url.scheme}://")
    return Path(url.path)


@app.command()
def gc(
    store: StoreOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be freed; remove nothing.")
    ] = False,
) -> None:
    """Free the blobs, directories and chunk files no path info refers to (local:// stores).

    Keeps what imports in progress wrote (they pause while gc sweeps); mounts read on.

    Prints one summary line.
    """
    path = _local_path(store, "gc")
    try:
        plan = collect_garbage(
            path,
            dry_run,
            waiting=lambda: print("gc: waiting for writes in progress to finish", file=sys.stderr),
        )
    except (StoreError, ValidationError, OSError) as e:
        fail(f"cannot collect garbage in {path}: {e}")
    print(f"{'would free' if dry_run else 'freed'} {plan.counts()}")


@app.command()
def delete(
    paths: Annotated[list[str], typer.Argument(help="Store paths (/nix/store/…) to delete.")],
    *,
    store: StoreOpt = None,
) -> None:
    """Delete store paths that no other path refers to; `tvixfs gc` then frees their data.

    All or nothing: if any path is still referenced (or absent), nothing is deleted.
    """
    path = _local_path(store, "delete")
    try:
        wanted = [StorePath.from_absolute(p) for p in paths]
        deleted = delete_paths(path, wanted)
    except DeleteRefusedError as e:
        for reason in e.reasons[:-1]:
            print(f"tvixfs: error: {reason}", file=sys.stderr)
        fail(e.reasons[-1])
    except (StoreError, ValidationError, OSError) as e:
        fail(str(e))
    for store_path in deleted:
        print(f"deleted {store_path}")
