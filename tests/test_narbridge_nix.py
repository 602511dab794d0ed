"""nar-bridge with stock Nix 2.8: ``nix copy --to`` it, substitute from it, verify with Nix."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bridgeserver import running_bridge, url
from grpcserver import running_daemon
from mounting import mounted, needs_fuse
from nixchroot import NIX_COMMAND, Closure, make_closure, nix_dump_path, nix_path_info, run

pytestmark = [pytest.mark.nix, pytest.mark.slow]


@pytest.fixture(scope="module")
def closure(tmp_path_factory: pytest.TempPathFactory) -> Closure:
    return make_closure(tmp_path_factory.mktemp("closure"))


@pytest.fixture(autouse=True)
def nix_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Nix caches narinfo answers (negative ones for an hour) under XDG_CACHE_HOME."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    yield


def fresh_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / name))


def nix(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nix", *NIX_COMMAND, *argv], capture_output=True, text=True, check=False)


def closure_paths(c: Closure) -> list[str]:
    return run("nix-store", "--store", c.uri, "-qR", c.built).split()


def essentials(entry: dict[str, object]) -> tuple[object, object, object]:
    return entry["narHash"], entry["narSize"], sorted(entry["references"])  # type: ignore[type-var, arg-type]


@pytest.mark.parametrize("compression", ["default", "zstd", "none"])
def test_copy_to_bridge_and_back(
    tvixfs_cmd: list[str], tmp_path: Path, closure: Closure, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = f"local://{tmp_path / 'store'}"
    with running_bridge(tvixfs_cmd, tmp_path, store, ["--allow-upload"]) as bridge:
        to = url(bridge) + ("" if compression == "default" else f"?compression={compression}")
        pushed = nix("copy", "--to", to, "--from", closure.uri, closure.built)
        assert pushed.returncode == 0, pushed.stderr + bridge.stderr()

        fresh_cache(
            monkeypatch, tmp_path, "after-push"
        )  # what the bridge says, not what Nix remembers it sent
        paths = closure_paths(closure)
        info = nix("path-info", "--store", url(bridge), "--json", *paths)
        assert info.returncode == 0, info.stderr
        served = {e["path"]: e for e in json.loads(info.stdout)}
        expected = nix_path_info(closure.root, paths)
        assert {p: essentials(e) for p, e in served.items()} == {
            p: essentials(e) for p, e in expected.items()
        }
        assert all(e["url"].endswith(".nar") for e in served.values())

        target = tmp_path / "b"
        pulled = nix(
            "copy", "--no-check-sigs", "--from", url(bridge), "--to", f"local?root={target}", closure.built
        )
        assert pulled.returncode == 0, pulled.stderr + bridge.stderr()
    verify = subprocess.run(
        ["nix-store", "--store", f"local?root={target}", "--verify", "--check-contents"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert "corrupt" not in verify.stderr and "invalid" not in verify.stderr
    copied = nix_path_info(target, paths)
    assert {p: essentials(e) for p, e in copied.items()} == {p: essentials(e) for p, e in expected.items()}
    listed = subprocess.run([*tvixfs_cmd, "ls", "--store", store], capture_output=True, text=True, check=True)
    assert sorted(listed.stdout.split()) == sorted(paths)


def test_substitute_with_signing_key(
    tvixfs_cmd: list[str], tmp_path: Path, closure: Closure, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = f"local://{tmp_path / 'store'}"
    sk, pk = tmp_path / "bridge.sec", tmp_path / "bridge.pub"
    run("nix-store", "--generate-binary-cache-key", "bridge-1", sk, pk)
    other_sk, other_pk = tmp_path / "other.sec", tmp_path / "other.pub"
    run("nix-store", "--generate-binary-cache-key", "other-1", other_sk, other_pk)
    with running_bridge(tvixfs_cmd, tmp_path, store, ["--allow-upload", "--sign-key", str(sk)]) as bridge:
        pushed = nix("copy", "--to", url(bridge), "--from", closure.uri, closure.built)
        assert pushed.returncode == 0, pushed.stderr
        fresh_cache(monkeypatch, tmp_path, "untrusted")
        untrusted = tmp_path / "untrusted"
        refused = nix(
            "copy", "--option", "trusted-public-keys", other_pk.read_text().strip(),
            "--from", url(bridge), "--to", f"local?root={untrusted}", closure.built,
        )  # fmt: skip
        assert refused.returncode != 0
        assert "signature" in refused.stderr
        fresh_cache(monkeypatch, tmp_path, "trusted")
        target = tmp_path / "b"
        pulled = nix(
            "copy", "--option", "trusted-public-keys", pk.read_text().strip(),
            "--from", url(bridge), "--to", f"local?root={target}", closure.built,
        )  # fmt: skip
        assert pulled.returncode == 0, pulled.stderr
    verify = subprocess.run(
        ["nix-store", "--store", f"local?root={target}", "--verify", "--check-contents"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    sigs = nix_path_info(target, [closure.built])[closure.built]["signatures"]
    assert any(s.startswith("bridge-1:") for s in sigs)
    assert any(s.startswith("tvixfs-test-1:") for s in sigs)  # the uploaded Sig: line was kept


def test_uploads_need_a_trusted_signature(tvixfs_cmd: list[str], tmp_path: Path, closure: Closure) -> None:
    sk, pk = tmp_path / "up.sec", tmp_path / "up.pub"
    run("nix-store", "--generate-binary-cache-key", "uploader-1", sk, pk)
    trust = ["--allow-upload", "--trusted-public-key", pk.read_text().strip()]
    unsigned_store = f"local://{tmp_path / 'unsigned'}"
    with running_bridge(tvixfs_cmd, tmp_path, unsigned_store, trust) as bridge:
        refused = nix("copy", "--to", url(bridge), "--from", closure.uri, closure.built)
        assert refused.returncode != 0
    listed = subprocess.run(
        [*tvixfs_cmd, "ls", "--store", unsigned_store], capture_output=True, text=True, check=True
    )
    assert listed.stdout == ""

    # Signed by the trusted key (a copy of the closure, so the module's stays as it was).
    signed = tmp_path / "signed"
    copied = nix(
        "copy", "--no-check-sigs", "--from", closure.uri, "--to", f"local?root={signed}", closure.built
    )
    assert copied.returncode == 0, copied.stderr
    signing = nix(
        "store", "sign", "--store", f"local?root={signed}", "-r", "--key-file", str(sk), closure.built
    )
    assert signing.returncode == 0, signing.stderr
    store = f"local://{tmp_path / 'store'}"
    with running_bridge(tvixfs_cmd, tmp_path, store, trust) as bridge:
        pushed = nix("copy", "--to", url(bridge), "--from", f"local?root={signed}", closure.built)
        assert pushed.returncode == 0, pushed.stderr + bridge.stderr()
    listed = subprocess.run([*tvixfs_cmd, "ls", "--store", store], capture_output=True, text=True, check=True)
    assert sorted(listed.stdout.split()) == sorted(closure_paths(closure))


def test_read_only_bridge_refuses_nix_copy(tvixfs_cmd: list[str], tmp_path: Path, closure: Closure) -> None:
    store = f"local://{tmp_path / 'store'}"
    with running_bridge(tvixfs_cmd, tmp_path, store) as bridge:
        refused = nix("copy", "--to", url(bridge), "--from", closure.uri, closure.built)
        assert refused.returncode != 0
    listed = subprocess.run([*tvixfs_cmd, "ls", "--store", store], capture_output=True, text=True, check=True)
    assert listed.stdout == ""


@needs_fuse
def test_over_grpc_store_and_mounted(
    tvixfs_cmd: list[str], tmp_path: Path, closure: Closure, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any store URL: a bridge in front of a tvixfs daemon; a mount of that store then shows
    every pushed path with exactly the NAR Nix has for it."""
    with running_daemon(tvixfs_cmd, tmp_path, store=f"local://{tmp_path / 'store'}") as daemon:
        flags = ["--allow-upload", "--pending-db", str(tmp_path / "pending.sqlite")]
        with running_bridge(tvixfs_cmd, tmp_path, daemon.url, flags) as bridge:
            pushed = nix("copy", "--to", url(bridge), "--from", closure.uri, closure.built)
            assert pushed.returncode == 0, pushed.stderr + bridge.stderr()
            fresh_cache(monkeypatch, tmp_path, "pull")
            target = tmp_path / "b"
            pulled = nix(
                "copy",
                "--no-check-sigs",
                "--from",
                url(bridge),
                "--to",
                f"local?root={target}",
                closure.built,
            )
            assert pulled.returncode == 0, pulled.stderr + bridge.stderr()
        with mounted(tvixfs_cmd, tmp_path, daemon.url) as mount:
            for path in closure_paths(closure):
                inside = mount.path(path.removeprefix("/nix/store/"))
                dumped = subprocess.run(["nix-store", "--dump", str(inside)], capture_output=True, check=True)
                assert dumped.stdout == nix_dump_path(closure.root, path), path
