"""The store commands as a user runs them, in a subprocess on an embedded (local://) store,
checked against what Nix 2.8 prints for the same trees and paths."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nixchroot import Closure, make_closure, nix_add, nix_dump, nix_path_info, run


@pytest.fixture(scope="module")
def closure(tmp_path_factory: pytest.TempPathFactory) -> Closure:
    return make_closure(tmp_path_factory.mktemp("nix"))


class CLI:
    def __init__(self, cmd: list[str], store: Path) -> None:
        self.cmd = cmd
        self.store = f"local://{store}"

    def run(self, *args: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        argv = [*self.cmd, args[0], "--store", self.store, *map(str, args[1:])]
        return subprocess.run(argv, capture_output=True, input=input, timeout=300, check=False)

    def ok(self, *args: str | Path, input: bytes | None = None) -> bytes:
        done = self.run(*args, input=input)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout

    def fails(self, *args: str | Path, input: bytes | None = None) -> str:
        """Runs a command that must fail with exactly one clear line on stderr."""
        done = self.run(*args, input=input)
        assert done.returncode != 0
        lines = done.stderr.decode().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("tvixfs: error: "), lines
        return lines[0]

    def info(self, *paths: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(self.ok("info", *paths))
        return found


@pytest.fixture
def cli(tvixfs_cmd: list[str], tmp_path: Path) -> CLI:
    return CLI(tvixfs_cmd, tmp_path / "tvixfs")


def nix_info_as_tvixfs(nix: dict[str, Any]) -> dict[str, Any]:
    """What tvixfs info shows for a path: Nix's fields, less local bookkeeping."""
    dropped = ("registrationTime", "ultimate", "valid")
    return {k: v for k, v in nix.items() if k not in dropped}


@pytest.mark.nix
def test_import_export_info_as_nix(cli: CLI, sample_tree: Path, tmp_path: Path) -> None:
    out = cli.ok("import", sample_tree).decode()
    path = nix_add(tmp_path / "nix", sample_tree)
    assert out == path + "\n"
    assert cli.info(path) == [nix_info_as_tvixfs(nix_path_info(tmp_path / "nix", [path])[path])]
    assert cli.ok("export-nar", path) == nix_dump(sample_tree)
    assert cli.ok("export-nar", f"{path}/share") == nix_dump(sample_tree / "share")
    assert cli.ok("import", sample_tree).decode() == out  # idempotent
    assert cli.ok("ls").decode() == out


@pytest.mark.nix
def test_import_several_and_named(cli: CLI, sample_tree: Path, tmp_path: Path) -> None:
    hello, readme = sample_tree / "bin" / "hello", sample_tree / "share" / "doc" / "README"
    out = cli.ok("import", hello, readme).decode().split()
    assert out == [nix_add(tmp_path / "nix", hello), nix_add(tmp_path / "nix", readme)]
    named = cli.ok("import", "--name", "hello-2.12", hello).decode().strip()
    assert named.endswith("-hello-2.12")
    assert cli.ok("cat", named) == hello.read_bytes()
    assert "--name applies to a single path" in cli.fails("import", "--name", "x", hello, readme)


def test_ls_and_cat(cli: CLI, sample_tree: Path) -> None:
    path = cli.ok("import", sample_tree).decode().strip()
    listing = cli.ok("ls", path).splitlines()
    assert listing == sorted(os.fsencode(p.name) for p in sample_tree.iterdir())
    long = {
        line.split()[-1] if b" -> " not in line else line.split()[2]: line
        for line in cli.ok("ls", "-l", path).splitlines()
    }
    assert long[b"bin"].startswith(b"dr-xr-xr-x")
    assert long[b"link-to-readme"].endswith(b"link-to-readme -> share/doc/README")
    assert long[b"large.bin"].split()[:2] == [
        b"-r--r--r--",
        str((sample_tree / "large.bin").stat().st_size).encode(),
    ]
    hello_size = str((sample_tree / "bin" / "hello").stat().st_size).encode()
    assert cli.ok("ls", "-l", f"{path}/bin").split() == [b"-r-xr-xr-x", hello_size, b"hello"]
    assert cli.ok("ls", f"{path}/share/doc") == b"README\n"
    for sub in (
        "large.bin",
        "share/doc/README",
        "link-to-readme",
        "deep/" + "/".join(f"level{i}" for i in range(20)) + "/bottom.txt",
    ):
        assert cli.ok("cat", f"{path}/{sub}") == (sample_tree / sub).read_bytes(), sub
    assert (
        cli.ok("cat", f"{path}/bin/../share/./doc/README") == (sample_tree / "share/doc/README").read_bytes()
    )
    assert "no such file or directory" in cli.fails("cat", f"{path}/nope")
    assert "no such file or directory" in cli.fails("cat", f"{path}/dangling")
    assert "not a regular file" in cli.fails("cat", f"{path}/share")
    assert "points outside /nix/store" in cli.fails("cat", f"{path}/abs-link")


def test_export_to_a_closed_pipe_is_quiet(cli: CLI, sample_tree: Path, tvixfs_cmd: list[str]) -> None:
    path = cli.ok("import", sample_tree).decode().strip()
    pipeline = f"{' '.join(tvixfs_cmd)} export-nar --store {cli.store} {path} | head -c 100 | wc -c"
    done = subprocess.run(["sh", "-c", pipeline], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "100"
    assert done.stderr == ""


def test_import_nar_round_trip(cli: CLI, sample_tree: Path, tvixfs_cmd: list[str], tmp_path: Path) -> None:
    path = cli.ok("import", sample_tree).decode().strip()
    nar = tmp_path / "sample.nar"
    nar.write_bytes(cli.ok("export-nar", path))
    other = CLI(tvixfs_cmd, tmp_path / "other")
    target = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-imported"
    refs = [path, "/nix/store/11bgd045z0d4icpbc2yyz4gx48ak44la-dep"]
    args = ["--reference", refs[1], "--reference", refs[0]]
    assert "is not in the store" in other.fails("import-nar", nar, "--path", target, *args), "Nix: refs valid"
    assert other.ok("import", sample_tree).decode().strip() == path
    other.ok("import-nar", nar, "--path", refs[1])
    assert other.ok("import-nar", nar, "--path", target, *args) == (target + "\n").encode()
    (info,) = other.info(target)
    assert info["references"] == sorted(refs)
    assert info["narHash"] == cli.info(path)[0]["narHash"]
    assert info["narSize"] == nar.stat().st_size
    assert other.ok("export-nar", target) == nar.read_bytes()
    from_stdin = "/nix/store/22bgd045z0d4icpbc2yyz4gx48ak44la-stdin"
    other.ok("import-nar", "-", "--path", from_stdin, input=nar.read_bytes())
    assert other.ok("export-nar", from_stdin) == nar.read_bytes()


@pytest.mark.nix
def test_malformed_nar_is_refused_and_stores_nothing(cli: CLI, sample_tree: Path, tmp_path: Path) -> None:
    dump = nix_dump(sample_tree)
    target = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-broken"
    for bad, reason in ((dump[:-8], "truncated"), (dump + dump[:8], "trailing data"), (b"x" * 64, "NAR")):
        nar = tmp_path / "bad.nar"
        nar.write_bytes(bad)
        assert reason in cli.fails("import-nar", nar, "--path", target)
    assert cli.ok("ls") == b""
    assert "is not in the store" in cli.fails("info", target)


@pytest.mark.nix
def test_import_nix_recursive_keeps_metadata(cli: CLI, closure: Closure) -> None:
    out = cli.ok("import-nix", "--nix-store", closure.uri, "--recursive", closure.built, closure.drv)
    assert out.decode().split() == [closure.built, closure.drv]
    everything = sorted(
        {*run("nix-store", "--store", closure.uri, "-qR", closure.built, closure.drv).split()}
    )
    assert cli.ok("ls").decode().split() == everything
    nix = nix_path_info(closure.root, everything)
    assert cli.info(*everything) == [nix_info_as_tvixfs(nix[p]) for p in everything]
    (built,) = cli.info(closure.built)
    assert built["deriver"] == closure.drv and built["signatures"]
    assert {cli.info(p)[0]["ca"].split(":")[0] for p in (closure.text, closure.source, closure.flat)} == {
        "text",
        "fixed",
    }
    assert cli.ok("cat", f"{closure.source}/lib/tool") == b"#!/bin/sh\necho tool\n"


@pytest.mark.nix
def test_import_nix_single_path(cli: CLI, closure: Closure) -> None:
    assert "is not in the store" in cli.fails("import-nix", "--nix-store", closure.uri, closure.built)
    assert cli.ok("ls") == b"", "Nix accepts a path only with its references"
    assert cli.ok("import-nix", "--nix-store", closure.uri, closure.source).decode() == closure.source + "\n"
    assert cli.ok("ls").decode() == closure.source + "\n"
    missing = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-missing"
    assert "is not valid" in cli.fails("import-nix", "--nix-store", closure.uri, missing)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import", "/does/not/exist"], "/does/not/exist: no such file or directory"),
        (["info", "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-absent"], "is not in the store"),
        (["info", "/tmp/not-a-store-path"], "not in /nix/store"),
        (["export-nar", "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-absent"], "is not in the store"),
        (["cat", "/nix/store/tooshort-x"], "not a store path basename"),
        (
            ["import-nar", "/does/not/exist", "--path", "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x"],
            "No such file",
        ),
    ],
)
def test_errors_are_one_line(cli: CLI, args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "some").write_text("some")
    cli.ok("import", tmp_path / "some")  # the read-only commands refuse a store that does not exist
    assert message in cli.fails(*args)


def test_bad_store_url(tvixfs_cmd: list[str]) -> None:
    done = subprocess.run(
        [*tvixfs_cmd, "ls", "--store", "nope://x"], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert done.stderr.startswith("tvixfs: error: cannot open store: unknown store URL")
