"""A store path, once stored, is never replaced (issue 11): through the CLI, through the daemon,
for content addresses Nix made, and an export that notices a damaged store."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpcserver import running_daemon
from nixchroot import chroot_uri, nix_dump, run

from tvixfs.importers.ingest import ingest_path
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.errors import InvalidArgumentError
from tvixfs.store.storepath import StorePath

pytestmark = pytest.mark.nix


class CLI:
    """The installed CLI against one store URL."""

    def __init__(self, cmd: list[str], store: str) -> None:
        self.cmd, self.store = cmd, store

    def run(self, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        argv = [*self.cmd, str(args[0]), "--store", self.store, *map(str, args[1:])]
        return subprocess.run(argv, capture_output=True, timeout=300, check=False)

    def ok(self, *args: str | Path) -> str:
        done = self.run(*args)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    def fails(self, *args: str | Path) -> str:
        done = self.run(*args)
        assert done.returncode == 1, done.stdout
        (line,) = done.stderr.decode().splitlines()
        assert line.startswith("tvixfs: error: ")
        return line


def _other_tree(base: Path) -> Path:
    other = base / "other"
    other.mkdir()
    (other / "not-the-docs").write_text("something else entirely\n")
    return other


@pytest.fixture(params=["local", "daemon"])
def cli(
    request: pytest.FixtureRequest, tvixfs_cmd: list[str], tmp_path: Path, short_tmp: Path
) -> Iterator[CLI]:
    local = f"local://{tmp_path / 'store'}"
    if request.param == "local":
        yield CLI(tvixfs_cmd, local)
        return
    with running_daemon(tvixfs_cmd, short_tmp, store=local) as daemon:
        yield CLI(tvixfs_cmd, daemon.url)


def test_a_store_path_cannot_be_overwritten(cli: CLI, sample_tree: Path, tmp_path: Path) -> None:
    """The hostile trial's steps: import a tree, then import-nar other content under its path."""
    path = cli.ok("import", sample_tree, "--name", "python3-doc").strip()
    before = cli.ok("info", path)
    other_nar = tmp_path / "other.nar"
    other_nar.write_bytes(nix_dump(_other_tree(tmp_path)))
    assert "never replaced" in cli.fails("import-nar", other_nar, "--path", path)
    assert cli.ok("info", path) == before, "narHash, ca and all: unchanged"
    assert cli.run("export-nar", path).stdout == nix_dump(sample_tree)
    assert cli.ok("import", sample_tree, "--name", "python3-doc").strip() == path, "the same again: a no-op"
    own_nar = tmp_path / "own.nar"
    own_nar.write_bytes(nix_dump(sample_tree))
    assert cli.ok("import-nar", own_nar, "--path", path).strip() == path, "identical content: a no-op"
    assert cli.ok("info", path) == before


@pytest.fixture(scope="module")
def fixed_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """Paths whose content address is not ``fixed:r:sha256``: Nix names them ``output:out``."""
    base = tmp_path_factory.mktemp("ca")
    root = base / "store"
    tree = base / "tree"
    tree.mkdir()
    (tree / "f").write_text("recursive but sha1\n")
    flat = base / "flat"
    flat.write_text("flat sha512\n")
    uri = chroot_uri(root)
    paths = [
        run("nix-store", "--store", uri, "--add-fixed", "--recursive", "sha1", tree).strip(),
        run("nix-store", "--store", uri, "--add-fixed", "sha512", flat).strip(),
        run("nix-store", "--store", uri, "--add-fixed", "--recursive", "sha256", tree).strip(),
    ]
    return uri, paths


def test_content_addresses_made_by_nix_are_accepted(
    tvixfs_cmd: list[str], tmp_path: Path, fixed_paths: tuple[str, list[str]]
) -> None:
    uri, paths = fixed_paths
    cli = CLI(tvixfs_cmd, f"local://{tmp_path / 'store'}")
    assert cli.ok("import-nix", "--nix-store", uri, *paths).split() == paths


def test_a_content_address_that_does_not_give_the_path_is_refused(sample_tree: Path) -> None:
    """The tree's true ``fixed:r:sha256`` and NAR facts, claimed under another name: refused."""
    store = open_memory_store()
    info = ingest_path(store, sample_tree, "docs")
    path = StorePath.from_basename(info.node.directory.name)
    forged = pathinfo_pb2.PathInfo()
    forged.CopyFrom(info)
    forged.node.directory.name = StorePath(path.digest, "forged").basename.encode()
    with pytest.raises(InvalidArgumentError, match=r"gives /nix/store/.*-forged, not"):
        store.pathinfos.put(forged)
    assert list(store.pathinfos.list()) == [info]


def test_export_nar_of_a_damaged_path_fails_after_writing(
    tvixfs_cmd: list[str], tmp_path: Path, sample_tree: Path
) -> None:
    store = tmp_path / "store"
    cli = CLI(tvixfs_cmd, f"local://{store}")
    path = cli.ok("import", sample_tree).strip()
    with sqlite3.connect(store / "db.sqlite") as db:
        (data,) = db.execute("SELECT data FROM pathinfos").fetchone()
        info = pathinfo_pb2.PathInfo.FromString(data)
        info.narinfo.ClearField("ca")  # else the record itself no longer validates
        info.narinfo.nar_sha256 = bytes(32)
        db.execute("UPDATE pathinfos SET data = ?", (info.SerializeToString(deterministic=True),))
    done = cli.run("export-nar", path)
    assert done.returncode == 1
    assert done.stdout == nix_dump(sample_tree), "the bytes were written before the end told"
    (line,) = done.stderr.decode().splitlines()
    assert "is not the one recorded" in line and "already written" in line
