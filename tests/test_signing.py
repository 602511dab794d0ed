"""Signatures against Debian's Nix 2.8: its keys parse, its signatures verify, ours equal its own,
and the importers sign and check as ``--sign-key`` and ``--trusted-public-key`` say."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nixchroot import NIX_COMMAND, Closure, make_closure, nix_dump_path, nix_path_info, run

from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import FileNode, node_to_proto
from tvixfs.protos import pathinfo_pb2
from tvixfs.store import nixsig
from tvixfs.store.nixtext import parse_signature
from tvixfs.store.signing import (
    ROOT_PREFIX,
    check_nix_signature,
    check_root_signature,
    root_fingerprint,
    sign_pathinfo,
)
from tvixfs.store.storepath import StorePath


@pytest.fixture(scope="module")
def closure(tmp_path_factory: pytest.TempPathFactory) -> Closure:
    return make_closure(tmp_path_factory.mktemp("nix"))


def keypair(base: Path, name: str) -> tuple[Path, str]:
    """A key pair made by Nix: the secret key file and the public key text."""
    secret, public = base / f"{name}.sec", base / f"{name}.pub"
    run("nix-store", "--generate-binary-cache-key", name, secret, public)
    return secret, public.read_text().strip()


def nix_fingerprint_of(entry: dict[str, Any]) -> bytes:
    algo, _, b64 = entry["narHash"].partition("-")
    assert algo == "sha256"
    return nixsig.fingerprint(entry["path"], base64.b64decode(b64), entry["narSize"], entry["references"])


def test_nix_signatures_verify_and_ours_are_identical(closure: Closure) -> None:
    work = closure.root.parent / "work"
    public = nixsig.parse_public_key((work / "key.pub").read_text())
    secret = nixsig.parse_secret_key((work / "key.sec").read_text())
    assert secret.public == public
    entry = nix_path_info(closure.root, [closure.built])[closure.built]
    (text,) = entry["signatures"]
    sig = parse_signature(text)
    message = nix_fingerprint_of(entry)
    assert nixsig.verify({public.name: public}, [(sig.name, sig.data)], message) == public.name
    # ed25519 is deterministic: the same key over the same fingerprint gives Nix's own bytes.
    assert secret.sign(message) == sig.data
    assert nixsig.verify({public.name: public}, [(sig.name, sig.data)], message + b"x") is None
    other = nixsig.PublicKey("other-1", public.key)
    assert nixsig.verify({other.name: other}, [(sig.name, sig.data)], message) is None


@pytest.mark.parametrize(
    "text",
    ["", "name", "name:", ":AAAA", "k:" + base64.b64encode(bytes(31)).decode(), "k:not base64!"],
)
def test_bad_public_keys_are_one_clear_error(text: str) -> None:
    with pytest.raises(ValidationError, match="invalid public key"):
        nixsig.parse_public_key(text)


def test_a_secret_key_whose_halves_disagree_is_refused(tmp_path: Path) -> None:
    secret, _ = keypair(tmp_path, "k-1")
    name, raw = secret.read_text().split(":")
    data = base64.b64decode(raw)
    broken = f"{name}:{base64.b64encode(data[:32] + bytes(32)).decode()}"
    with pytest.raises(ValidationError, match="does not match its seed"):
        nixsig.parse_secret_key(broken)


def _file_info(name: str, content_digest: bytes, size: int = 5) -> pathinfo_pb2.PathInfo:
    path = StorePath(bytes(range(20)), name)
    node = FileNode(path.basename.encode(), content_digest, size)
    narinfo = pathinfo_pb2.NARInfo(nar_size=120, nar_sha256=bytes(32))
    return pathinfo_pb2.PathInfo(node=node_to_proto(node), narinfo=narinfo)


def test_the_root_signature_binds_the_root_node(tmp_path: Path) -> None:
    secret, public_text = keypair(tmp_path, "k-1")
    key = nixsig.parse_secret_key(secret.read_text())
    keys = {key.name: nixsig.parse_public_key(public_text)}
    signed = sign_pathinfo(_file_info("a", bytes(32)), key)
    assert [s.name for s in signed.narinfo.signatures] == ["k-1", ROOT_PREFIX + "k-1"]
    assert check_root_signature(signed, keys) is None
    assert check_nix_signature(signed, keys) is None
    assert root_fingerprint(signed).startswith(b"tvixfs-root-1;1;/nix/store/")
    # Every property of the root node is covered.
    for field, value in (("digest", b"\x01" * 32), ("size", 6), ("executable", True)):
        tampered = pathinfo_pb2.PathInfo()
        tampered.CopyFrom(signed)
        setattr(tampered.node.file, field, value)
        why = check_root_signature(tampered, keys)
        assert why == "the tvixfs root signature by k-1 does not match this path info", field
        # Nix's own signature does not see the root node: that is why the second one exists.
        assert check_nix_signature(tampered, keys) is None
    assert check_root_signature(signed, {}) == "no tvixfs root signature by a trusted key (signed by k-1)"
    unsigned = _file_info("a", bytes(32))
    assert check_root_signature(unsigned, keys) == "no tvixfs root signature"


class CLI:
    def __init__(self, cmd: list[str], store: Path) -> None:
        self.cmd = cmd
        self.store = f"local://{store}"

    def run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        argv = [*self.cmd, args[0], "--store", self.store, *map(str, args[1:])]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)

    def ok(self, *args: str | Path) -> str:
        done = self.run(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def fails(self, *args: str | Path) -> str:
        done = self.run(*args)
        assert done.returncode != 0
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("tvixfs: error: "), lines
        return lines[0]

    def signatures(self, path: str) -> list[str]:
        found: list[str] = json.loads(self.ok("info", path))[0].get("signatures", [])
        return found


@pytest.fixture
def cli(tvixfs_cmd: list[str], tmp_path: Path) -> CLI:
    return CLI(tvixfs_cmd, tmp_path / "tvixfs")


def test_import_nix_requires_a_trusted_signature(cli: CLI, closure: Closure, tmp_path: Path) -> None:
    trusted = (closure.root.parent / "work" / "key.pub").read_text().strip()
    _, stranger = keypair(tmp_path, "stranger-1")
    # The source tree carries no signature, but is content-addressed: its name follows from its
    # content, which the import hashed. Nix needs no signature for such a path, and neither do we.
    out = cli.ok("import-nix", "--nix-store", closure.uri, "--trusted-public-key", trusted, closure.source)
    assert out.split() == [closure.source]
    assert cli.signatures(closure.source) == []
    deps = [
        p
        for p in run("nix-store", "--store", closure.uri, "-qR", closure.built).split()
        if p != closure.built
    ]
    cli.ok("import-nix", "--nix-store", closure.uri, *deps)  # the references, unchecked
    line = cli.fails(
        "import-nix", "--nix-store", closure.uri, "--trusted-public-key", stranger, closure.built
    )
    assert "no signature by a trusted key (signed by tvixfs-test-1); not imported" in line
    # Signed by Nix with the trusted key: imported, Nix's signature kept.
    out = cli.ok("import-nix", "--nix-store", closure.uri, "--trusted-public-key", trusted, closure.built)
    assert out.split() == [closure.built]
    assert (
        cli.signatures(closure.built)
        == nix_path_info(closure.root, [closure.built])[closure.built]["signatures"]
    )


def test_import_nar_checks_the_signatures_given(cli: CLI, closure: Closure, tmp_path: Path) -> None:
    trusted = (closure.root.parent / "work" / "key.pub").read_text().strip()
    entry = nix_path_info(closure.root, [closure.built])[closure.built]
    nar = tmp_path / "built.nar"
    nar.write_bytes(nix_dump_path(closure.root, closure.built))
    refs = [a for r in entry["references"] for a in ("--reference", r)]
    cli.ok("import-nix", "--nix-store", closure.uri, "--recursive", *entry["references"])
    base = ["import-nar", nar, "--path", closure.built, "--trusted-public-key", trusted]
    assert "no signature; not imported" in cli.fails(*base, *refs)
    wrong_refs = refs[:-2]
    sig = ["--signature", entry["signatures"][0]]
    assert "does not match this path info" in cli.fails(*base, *sig, *wrong_refs)
    assert cli.ok(*base, *sig, *refs).strip() == closure.built


def test_sign_key_signs_imports_so_nix_accepts_them(cli: CLI, tmp_path: Path) -> None:
    secret, public = keypair(tmp_path, "ours-1")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("signed\n")
    path = cli.ok("import", "--sign-key", secret, tree).strip()
    sigs = cli.signatures(path)
    assert [s.split(":")[0] for s in sigs] == ["ours-1", "tvixfs-root.ours-1"]
    # Nix itself checks the Nix signature: the same path added to a chroot store, verified.
    nix_root = tmp_path / "nix"
    assert run("nix-store", "--store", f"local?root={nix_root}", "--add", tree).strip() == path
    nix_sig = subprocess.run(
        [
            "nix",
            *NIX_COMMAND,
            "store",
            "sign",
            "--store",
            f"local?root={nix_root}",
            "--key-file",
            secret,
            path,
        ],
        check=True,
    )
    assert nix_sig.returncode == 0
    assert nix_path_info(nix_root, [path])[path]["signatures"] == [sigs[0]]
    run(
        "nix",
        *NIX_COMMAND,
        "store",
        "verify",
        "--store",
        f"local?root={nix_root}",
        "--trusted-public-keys",
        public,
        "--sigs-needed",
        "1",
        "--no-contents",
        path,
    )
    assert "cannot read secret key" in cli.fails("import", "--sign-key", tmp_path / "absent", tree)
    (tmp_path / "bad.sec").write_text("k:AAAA")
    assert "invalid secret key" in cli.fails("import", "--sign-key", tmp_path / "bad.sec", tree)


def test_nixos_module_passes_trusted_public_keys() -> None:
    from test_systemd_units_and_nixos_module import evaluate, systemd_argv

    keys = ["one-1:" + base64.b64encode(bytes(32)).decode(), "two-1:" + base64.b64encode(bytes(32)).decode()]
    result = evaluate(enable=True, trustedPublicKeys=keys)
    assert result["failedAssertions"] == []
    argv = systemd_argv(result["config"]["systemd"]["services"]["tvixfs"]["serviceConfig"]["ExecStart"])
    assert argv[-5:] == ["--trusted-public-key", keys[0], "--trusted-public-key", keys[1], "/nix/store"]


def test_daemon_signs_what_its_clients_put(tvixfs_cmd: list[str], tmp_path: Path) -> None:
    from grpcserver import running_daemon

    secret, public = keypair(tmp_path, "daemon-1")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("through the daemon\n")
    store = tmp_path / "served"
    with running_daemon(
        tvixfs_cmd, tmp_path, f"local://{store}", extra=["--sign-key", str(secret)]
    ) as daemon:
        remote = CLI(tvixfs_cmd, store)
        remote.store = daemon.url
        path = remote.ok("import", tree).strip()
    local = CLI(tvixfs_cmd, store)
    opened_info = json.loads(local.ok("info", path))[0]
    sigs = [parse_signature(s) for s in opened_info["signatures"]]
    assert [s.name for s in sigs] == ["daemon-1", ROOT_PREFIX + "daemon-1"]
    key = nixsig.parse_public_key(public)
    entry = {**opened_info, "narHash": opened_info["narHash"]}
    assert (
        nixsig.verify({key.name: key}, [(sigs[0].name, sigs[0].data)], nix_fingerprint_of(entry)) == key.name
    )


def test_the_documented_example_fingerprint_is_what_the_code_signs(tmp_path: Path) -> None:
    from tvixfs.importers.ingest import ingest_path
    from tvixfs.services.backends.memory import open_memory_store

    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "a").write_text("hi\n")
    info = ingest_path(open_memory_store(), tree, "t")
    doc = (Path(__file__).parent.parent / "docs" / "SIGNATURES.md").read_text()
    documented = next(line.strip() for line in doc.splitlines() if line.startswith("    tvixfs-root-1;1;"))
    assert root_fingerprint(info).decode() == documented
