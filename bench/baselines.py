"""What tvixfs is compared with: libfuse's passthrough_ll, `nix-store --add`, a full NAR export.

tmpfs itself needs nothing here (procs.tmpfs). passthrough_ll is compiled from the example
Debian ships with libfuse3-dev, so the baseline is the C reference of the same libfuse.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from measure import run_quiet
from procs import TVIXFS, Daemon

PASSTHROUGH_SRC = Path("/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c")


def build_passthrough_ll(bindir: Path) -> Path:
    """Compile passthrough_ll once (-O2); rebuilt only if the source is newer."""
    binary = bindir / "passthrough_ll"
    if binary.exists() and binary.stat().st_mtime >= PASSTHROUGH_SRC.stat().st_mtime:
        return binary
    if not PASSTHROUGH_SRC.exists():
        raise RuntimeError(f"{PASSTHROUGH_SRC} missing: apt-get install libfuse3-dev")
    bindir.mkdir(parents=True, exist_ok=True)
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True, check=True
    ).stdout.split()
    tmp = binary.with_name("passthrough_ll.tmp")
    run_quiet(["gcc", "-O2", "-o", tmp, PASSTHROUGH_SRC, *flags])
    tmp.rename(binary)
    return binary


def nix_store_add(tree: Path, root: Path) -> str:
    """`nix-store --add` into a chroot store at root; returns the store path it printed."""
    out = subprocess.run(
        ["nix-store", "--store", f"local?root={root}", "--add", str(tree)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"nix-store --add exited {out.returncode}: {out.stderr[-500:]}")
    return out.stdout.strip().splitlines()[-1]


def full_export(store_url: str, store_path: str, dest: Path, daemon: Daemon | None = None) -> None:
    """Fetch a whole store path as a NAR and unpack it: the non-lazy alternative to a mount.

    Over gRPC, `tvixfs export-nar` runs inside the daemon's network namespace so that the
    loopback counters see its traffic; `nix-store --restore` writes the tree to dest.
    """
    prefix = daemon.netns() if daemon else []
    export = [*prefix, str(TVIXFS), "export-nar", "--store", store_url, store_path]
    pipeline = f"set -o pipefail; {shlex.join(export)} | nix-store --restore {shlex.quote(str(dest))}"
    run_quiet(["bash", "-c", pipeline], env=dict(os.environ))
