"""Program start (issue 15): a Python start and a burst of small-file reads, cold, through
tvixfs over the embedded store, over loopback gRPC and over a 20 ms round-trip link.

What a Nix store mostly does is start programs: many opens, stats and small reads, where each
miss of a remote mount costs a round trip. The link is emulated by bench/latency.py inside the
daemon's network namespace (this kernel has no netem).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from context import BENCH, Context
from measure import Samples, drop_caches, run_quiet, timed
from procs import DAEMON_PORT, Daemon, passthrough_mount, tvixfs_daemon, tvixfs_mount
from report import Figure

IMPORTS = "import json, email.parser, http.client, asyncio, decimal, sqlite3, argparse, logging"
SMALL_FILES = 300
RTT_MS = 20.0
PROXY_PORT = DAEMON_PORT + 1


def _python_env(root: Path) -> dict[str, str]:
    """The interpreter was built with an absolute RUNPATH: point the loader at the mount's lib."""
    return {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(root / "lib"), "PYTHONNOUSERSITE": "1"}


def _start_python(root: Path) -> None:
    run_quiet([root / "bin" / "python3", "-I", "-c", IMPORTS], env=_python_env(root))


def small_file_list(tree: Path, count: int = SMALL_FILES) -> list[Path]:
    """The first ``count`` compiled modules of the tree, relative to it, in a stable order."""
    found = sorted(p.relative_to(tree) for p in tree.glob("lib/python3*/**/__pycache__/*.pyc"))
    if len(found) < count:
        raise RuntimeError(f"{tree} has {len(found)} .pyc files, the workload needs {count}")
    return found[:count]


def _cat(root: Path, files: list[Path]) -> None:
    run_quiet(["cat", *(root / f for f in files)])


@contextmanager
def latency_proxy(daemon: Daemon, delay_ms: float, log: Path) -> Iterator[str]:
    """bench/latency.py in front of the daemon, in its namespace; yields the store URL."""
    argv = [
        *daemon.netns(), sys.executable, str(BENCH / "latency.py"),
        "--listen", f"127.0.0.1:{PROXY_PORT}", "--to", f"127.0.0.1:{DAEMON_PORT}",
        "--delay-ms", str(delay_ms),
    ]  # fmt: skip
    with log.open("ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"latency proxy did not start (exit {proc.poll()})")
        yield f"grpc+http://127.0.0.1:{PROXY_PORT}"
    finally:
        proc.kill()
        proc.wait()


def _over(ctx: Context, samples: Samples, action: str, link: str, extra: Sequence[str] = ()) -> None:
    """One cold sample of ``action`` through a fresh tvixfs mount reached over ``link``
    (``extra``: more `tvixfs mount` options)."""
    files = small_file_list(ctx.trees["python"])
    with ExitStack() as stack:
        daemon = None
        url = ctx.store_url
        if link != "embedded":
            daemon = stack.enter_context(tvixfs_daemon(ctx.store_url, ctx.log("daemon")))
            url = daemon.url
            if link == "wan":
                url = stack.enter_context(latency_proxy(daemon, RTT_MS / 2, ctx.log("proxy")))
        mnt = ctx.mountpoint()
        stack.enter_context(tvixfs_mount(url, mnt, ctx.log("mount"), daemon, extra))
        root = mnt / ctx.paths["python"]
        drop_caches()
        samples.add(timed(lambda: _start_python(root) if action == "python" else _cat(root, files)))


def _passthrough(ctx: Context, samples: Samples, action: str) -> None:
    files = small_file_list(ctx.trees["python"])
    mnt = ctx.mountpoint()
    with passthrough_mount(ctx.passthrough, ctx.sources["python"], mnt, ctx.log("passthrough"), "always"):
        drop_caches()
        samples.add(timed(lambda: _start_python(mnt) if action == "python" else _cat(mnt, files)))


def program_start(ctx: Context) -> list[Figure]:
    entries = ctx.entries("python")
    local = Figure(
        f"cold Python start, embedded store ({entries}-entry tree)",
        "passthrough_ll cache=always", "s", "higher", 0.8,
    )  # fmt: skip
    grpc = Figure("cold Python start over loopback gRPC", "same, embedded store", "s", "lower", 1.3)
    wan = Figure(
        f"cold Python start over a {RTT_MS:.0f} ms round-trip link", "same, loopback", "s", "lower", 2.0
    )
    embedded, loopback, far, theirs = Samples(), Samples(), Samples(), Samples()
    actions = [
        lambda: _over(ctx, embedded, "python", "embedded"),
        lambda: _over(ctx, loopback, "python", "loopback"),
        lambda: _over(ctx, far, "python", "wan"),
        lambda: _passthrough(ctx, theirs, "python"),
    ]
    for i in range(ctx.config.program_reps):
        k = i % len(actions)
        for action in actions[k:] + actions[:k]:
            action()
    local.tvixfs, local.baseline = embedded, theirs
    grpc.tvixfs, grpc.baseline = loopback, embedded
    wan.tvixfs, wan.baseline = far, loopback
    program = f"python3 -I -c '{IMPORTS}'"
    local.note = f"program: {program}; a fresh mount and dropped caches per sample"
    wan.note = "latency added by bench/latency.py, half the round trip in each direction"
    return [local, grpc, wan]


def small_files(ctx: Context) -> list[Figure]:
    fig = Figure(
        f"cold read of {SMALL_FILES} small files (.pyc) in one process, embedded store",
        "passthrough_ll cache=always", "s", "higher", 0.8,
    )  # fmt: skip
    for i in range(ctx.config.program_reps):
        pair = [
            lambda: _over(ctx, fig.tvixfs, "cat", "embedded"),
            lambda: _passthrough(ctx, fig.baseline, "cat"),
        ]
        for action in pair[i % 2 :] + pair[: i % 2]:
            action()
    fig.note = f"cat of the first {SMALL_FILES} .pyc files (sorted by path) of the Python tree"
    return [fig]
