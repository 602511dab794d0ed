"""Program start (issue 15): a Python start, a dynamically linked program's start and a burst
of small-file reads, cold, through tvixfs over the embedded store, over loopback gRPC and over
a 20 ms round-trip link.

What a Nix store mostly does is start programs: many opens, stats and small reads, where each
miss of a remote mount costs a round trip. The link is emulated by bench/latency.py inside the
daemon's network namespace (this kernel has no netem).

Every tvixfs sample is a fresh mount with `--access-profiles` pointing at profiles recorded by
one earlier, untimed start of the same program (fs/accessprofile.py): the case of a machine
that has the profiles (shipped, or kept across a cleared disk cache) but not the blobs. No
disk cache, so every blob still comes over the link.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from context import BENCH, WORK, Context, cached_store
from measure import Samples, drop_caches, run_quiet, timed
from procs import DAEMON_PORT, Daemon, passthrough_mount, tvixfs_daemon, tvixfs_mount
from report import Figure
from trees import count_entries, elf_loader, elf_tree

IMPORTS = "import json, email.parser, http.client, asyncio, decimal, sqlite3, argparse, logging"
SMALL_FILES = 300
RTT_MS = 20.0
PROXY_PORT = DAEMON_PORT + 1
ELF_PROGRAM = Path("/usr/bin/curl")  # 32 shared libraries on this machine
ELF_ARGS = ("--version",)


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


def _start_elf(root: Path) -> None:
    """The program through the tree's own loader, every library from the tree."""
    env = {"PATH": "/usr/bin:/bin", "SASL_PATH": str(root / "lib" / "sasl2")}
    loader = elf_loader(root)
    program = root / "bin" / ELF_PROGRAM.name
    run_quiet([loader, "--library-path", root / "lib", program, *ELF_ARGS], env=env)


def _cat(root: Path, files: list[Path]) -> None:
    run_quiet(["cat", *(root / f for f in files)])


@dataclass(frozen=True)
class Workload:
    """What one sample runs, and where from: a store, its path, the same tree on tmpfs."""

    store_url: str
    basename: str
    source: Path
    run: Callable[[Path], None]


def workload(ctx: Context, action: str) -> Workload:
    """``python``, ``cat`` (the Python tree) or ``elf`` (a program and its libraries, in a
    store of its own, staged on the run's tmpfs on first use)."""
    if action != "elf":
        files = small_file_list(ctx.trees["python"])
        run = _start_python if action == "python" else lambda root: _cat(root, files)
        return Workload(ctx.store_url, ctx.paths["python"], ctx.sources["python"], run)
    tree = elf_tree(WORK / "trees", ELF_PROGRAM)
    staged = ctx.ram / "elf"
    store = cached_store("elf", {"elf": tree})
    if not staged.exists():
        ctx.notes.extend(store.notes)
        shutil.copytree(store.path, staged / "store", symlinks=True)
        shutil.copytree(tree, staged / "src", symlinks=True)
    return Workload(f"local://{staged / 'store'}", store.paths["elf"], staged / "src", _start_elf)


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


@contextmanager
def mount_over(
    ctx: Context, work: Workload, link: str, extra: Sequence[str] = ()
) -> Iterator[tuple[Path, int]]:
    """A fresh tvixfs mount of ``work``'s store reached over ``link`` (``embedded``, ``loopback``
    or ``wan``: the 20 ms link), with ``extra`` `tvixfs mount` options; yields the mounted store
    path and the mount's pid."""
    with ExitStack() as stack:
        daemon = None
        url = work.store_url
        if link != "embedded":
            daemon = stack.enter_context(tvixfs_daemon(work.store_url, ctx.log("daemon")))
            url = daemon.url
            if link == "wan":
                url = stack.enter_context(latency_proxy(daemon, RTT_MS / 2, ctx.log("proxy")))
        mnt = ctx.mountpoint()
        proc = stack.enter_context(tvixfs_mount(url, mnt, ctx.log("mount"), daemon, extra))
        yield mnt / work.basename, proc.pid


def _over(ctx: Context, samples: Samples, action: str, link: str, extra: Sequence[str] = ()) -> None:
    """One cold sample of ``action`` through a fresh tvixfs mount reached over ``link``."""
    work = workload(ctx, action)
    with mount_over(ctx, work, link, extra) as (root, _):
        drop_caches()
        samples.add(timed(lambda: work.run(root)))


def _passthrough(ctx: Context, samples: Samples, action: str) -> None:
    work = workload(ctx, action)
    mnt = ctx.mountpoint()
    with passthrough_mount(ctx.passthrough, work.source, mnt, ctx.log("passthrough"), "always"):
        drop_caches()
        samples.add(timed(lambda: work.run(mnt)))


def recorded_profiles(ctx: Context, action: str) -> tuple[str, ...]:
    """`tvixfs mount` options replaying the profile of one earlier, untimed start over
    loopback (each program's profile recorded once per run)."""
    profiles = ctx.run / "profiles"
    extra = ("--access-profiles", str(profiles))
    marker = profiles / f".recorded-{action}"
    if not marker.exists():
        _over(ctx, Samples(), action, "loopback", extra)
        marker.touch()
    return extra


def _starts(ctx: Context, action: str, what: str, program: str) -> list[Figure]:
    """The three figures of one program start: embedded / passthrough_ll, loopback /
    embedded, 20 ms link / loopback; samples of all four interleaved."""
    local = Figure(f"cold {what} start, embedded store", "passthrough_ll cache=always", "s", "higher", 0.8)
    grpc = Figure(f"cold {what} start over loopback gRPC", "same, embedded store", "s", "lower", 1.3)
    link = f"{RTT_MS:.0f} ms round-trip link"
    wan = Figure(f"cold {what} start over a {link}", "same, loopback", "s", "lower", 2.0)
    extra = recorded_profiles(ctx, action)
    embedded, loopback, far, theirs = Samples(), Samples(), Samples(), Samples()
    actions = [
        lambda: _over(ctx, embedded, action, "embedded", extra),
        lambda: _over(ctx, loopback, action, "loopback", extra),
        lambda: _over(ctx, far, action, "wan", extra),
        lambda: _passthrough(ctx, theirs, action),
    ]
    for i in range(ctx.config.program_reps):
        k = i % len(actions)
        for run in actions[k:] + actions[:k]:
            run()
    local.tvixfs, local.baseline = embedded, theirs
    grpc.tvixfs, grpc.baseline = loopback, embedded
    wan.tvixfs, wan.baseline = far, loopback
    local.note = f"program: {program}; a fresh mount and dropped caches per sample"
    wan.note = (
        "latency added by bench/latency.py, half the round trip in each direction; access "
        "profiles recorded by one earlier start (bench/startup.py)"
    )
    return [local, grpc, wan]


def program_start(ctx: Context) -> list[Figure]:
    what = f"Python ({ctx.entries('python')}-entry tree)"
    return _starts(ctx, "python", what, f"python3 -I -c '{IMPORTS}'")


def elf_start(ctx: Context) -> list[Figure]:
    tree = elf_tree(WORK / "trees", ELF_PROGRAM)
    libs = len([p for p in (tree / "lib").iterdir() if p.is_file()])
    what = f"{ELF_PROGRAM.name} ({libs} shared libraries, {count_entries(tree) + 1} entries)"
    program = f"lib/ld-linux --library-path lib bin/{ELF_PROGRAM.name} {' '.join(ELF_ARGS)}"
    return _starts(ctx, "elf", what, program)


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
