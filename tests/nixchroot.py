"""Real Nix 2.8 as the reference: chroot stores (``local?root=DIR``) and what Nix says about them.

Nothing here reimplements Nix: paths are added, built and signed by Nix itself, and the
expected hashes are decoded straight from Nix's JSON, independently of tvixfs.store.nixtext.
"""

from __future__ import annotations

import base64
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvixfs.store import nixbase32

NIX_COMMAND = ["--extra-experimental-features", "nix-command"]
# Offline and self-contained: no substituters, and the sandbox sees just enough for /bin/sh.
OFFLINE = ["--option", "substituters", ""]
SANDBOX = ["--option", "sandbox-paths", "/bin/sh=/bin/sh /lib=/lib /lib64=/lib64 /usr=/usr"]

_BUILD = """
{ src, flat }:
let
  leaf = builtins.toFile "leaf" "hello";
  text = builtins.toFile "text" "refers to ${leaf}";
in derivation {
  name = "built";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo ${text} ${src} ${flat} > $out" ];
}
"""


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


def chroot_uri(root: Path) -> str:
    return f"local?root={root}"


def nix_add(root: Path, path: Path) -> str:
    """``nix-store --add`` into the chroot store at ``root``; the store path."""
    return run("nix-store", "--store", chroot_uri(root), "--add", path).strip()


def nix_dump(path: Path) -> bytes:
    return subprocess.run(["nix-store", "--dump", str(path)], check=True, capture_output=True).stdout


def nix_dump_path(root: Path, path: str) -> bytes:
    """The NAR of a path in the chroot store (``nix-store --dump`` cannot read one)."""
    flags = ["--derivation"] if path.endswith(".drv") else []
    argv = ["nix", *NIX_COMMAND, "store", "dump-path", "--store", chroot_uri(root), *flags, path]
    return subprocess.run(argv, check=True, capture_output=True).stdout


def nix_path_info(root: Path, paths: list[str]) -> dict[str, dict[str, Any]]:
    """``nix path-info --json`` per path (``.drv`` files need ``--derivation``)."""
    found: dict[str, dict[str, Any]] = {}
    for drv in (True, False):
        group = [p for p in paths if p.endswith(".drv") == drv]
        if group:
            flags = ["--derivation"] if drv else []
            out = run("nix", *NIX_COMMAND, "path-info", "--store", chroot_uri(root), "--json", *flags, *group)
            found.update({e["path"]: e for e in json.loads(out)})
    return found


def nix_hash_text(sri: str) -> str:
    """Nix's SRI ``sha256-<base64>`` in the ``sha256:<nixbase32>`` form tvixfs prints."""
    algo, _, b64 = sri.partition("-")
    assert algo == "sha256", sri
    return "sha256:" + nixbase32.encode(base64.b64decode(b64))


@dataclass(frozen=True)
class Closure:
    root: Path  # the chroot store
    built: str  # output with a deriver, a signature and references to the three below
    text: str  # text-CA file (builtins.toFile) referring to another one
    source: str  # a directory added with nix-store --add (fixed:r:sha256)
    flat: str  # a file added with nix-store --add-fixed sha256 (fixed:sha256)
    drv: str  # the derivation of `built` (text CA, references)

    @property
    def uri(self) -> str:
        return chroot_uri(self.root)


def make_closure(base: Path) -> Closure:
    """A chroot store under ``base`` holding every kind of path metadata Nix 2.8 makes offline."""
    root, work = base / "store", base / "work"
    source_tree = work / "src"
    (source_tree / "bin").mkdir(parents=True)
    (source_tree / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (source_tree / "bin" / "tool").chmod(0o755)
    (source_tree / "lib").symlink_to("bin")
    uri = chroot_uri(root)
    flat_file = work / "flat.txt"
    flat_file.write_text("a flat fixed-output file\n")
    flat = run("nix-store", "--store", uri, "--add-fixed", "sha256", flat_file).strip()
    source = nix_add(root, source_tree)
    expr = work / "build.nix"
    expr.write_text(_BUILD)
    args = ["--arg", "src", f"builtins.storePath {source}", "--arg", "flat", f"builtins.storePath {flat}"]
    drv = run("nix-instantiate", "--store", uri, *OFFLINE, expr, *args).strip()
    built = run("nix-store", "--store", uri, *OFFLINE, *SANDBOX, "--realise", drv).strip()
    key = work / "key.sec"
    run("nix-store", "--generate-binary-cache-key", "tvixfs-test-1", key, work / "key.pub")
    run("nix", *NIX_COMMAND, "store", "sign", "--store", uri, "--key-file", key, built)
    (text,) = [p for p in run("nix-store", "--store", uri, "-qR", built).split() if p.endswith("-text")]
    return Closure(root, built, text, source, flat, drv)
