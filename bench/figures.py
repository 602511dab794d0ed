"""The figures of issue #6: each measures tvixfs and its baseline in the same run, interleaved.

Repetitions alternate which side goes first, so a burst of load from other processes on the
shared machine hits both sides alike. "Cold" means a freshly started mount daemon (and, over
gRPC, a freshly started store daemon) plus dropped page cache; "warm" means a second pass
through the same mount.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from baselines import full_export, nix_store_add
from context import WORK, Context, cached_store, import_tree
from measure import Samples, cpu_seconds, drop_caches, read_ahead_kb, read_file, run_quiet, timed, vm_rss
from metrics_figure import metrics_cost
from procs import Daemon, passthrough_mount, tvixfs_daemon, tvixfs_mount
from report import Figure
from startup import elf_start, program_start, small_files
from trees import count_entries, many_tree

PROGRAM = "import json, email, http.client"
RSS_TARGET_HALF = 100_000


def _rotate(reps: int, actions: list[Callable[[], None]]) -> None:
    for i in range(reps):
        k = i % len(actions)
        for action in actions[k:] + actions[:k]:
            action()


def _pairs(reps: int, first: Callable[[], None], second: Callable[[], None]) -> None:
    _rotate(reps, [first, second])


@contextmanager
def _mounted(ctx: Context, daemon: Daemon | None = None) -> Iterator[tuple[Path, int]]:
    """A fresh tvixfs mount of the run's store (directly, or through a daemon's URL)."""
    mnt = ctx.mountpoint()
    url = daemon.url if daemon else ctx.store_url
    with tvixfs_mount(url, mnt, ctx.log("mount"), daemon) as proc:
        yield mnt, proc.pid


@contextmanager
def _passthrough(ctx: Context, source: Path, cache: str = "auto") -> Iterator[Path]:
    mnt = ctx.mountpoint()
    with passthrough_mount(ctx.passthrough, source, mnt, ctx.log("passthrough"), cache):
        yield mnt


def _walk(*roots: Path) -> None:
    for root in roots:
        run_quiet(["find", root, "-ls"])


def _check_walk(mounted: Path, source: Path) -> None:
    """A walk that saw fewer entries than the tree has would time the wrong thing: fail."""
    listed = subprocess.run(["find", mounted], capture_output=True, check=True).stdout.count(b"\n")
    if listed != count_entries(source) + 1:
        raise RuntimeError(
            f"find {mounted} listed {listed} entries, {source} has {count_entries(source) + 1}"
        )


def warm_read(ctx: Context) -> list[Figure]:
    fig = Figure(f"warm sequential read, {ctx.config.big_mib} MiB", "tmpfs", "s", "higher", 0.8)
    with _mounted(ctx) as (mnt, _):
        ours = mnt / ctx.paths["big"] / "big.bin"
        theirs = ctx.sources["big"] / "big.bin"
        read_file(ours)  # into the page cache; keep_cache must keep it there across opens
        _pairs(
            ctx.config.warm_reps,
            lambda: fig.tvixfs.add(timed(lambda: read_file(ours))),
            lambda: fig.baseline.add(timed(lambda: read_file(theirs))),
        )
    return [fig]


def _cold_read_tvixfs(ctx: Context, samples: Samples, over_grpc: bool, readahead: set[int]) -> None:
    with ExitStack() as stack:
        daemon = stack.enter_context(tvixfs_daemon(ctx.store_url, ctx.log("daemon"))) if over_grpc else None
        mnt, _ = stack.enter_context(_mounted(ctx, daemon))
        readahead.add(read_ahead_kb(mnt))
        drop_caches()
        samples.add(timed(lambda: read_file(mnt / ctx.paths["big"] / "big.bin")))


def _readahead_note(sides: dict[str, set[int]]) -> str:
    return "read_ahead_kb: " + ", ".join(f"{k} {'/'.join(map(str, sorted(v)))}" for k, v in sides.items())


def _cat_cold(samples: Samples, cpu: Samples, path: Path, pid: int) -> None:
    """The plain harness of issue 18: the file looked up untimed, then `cat` timed (128 KiB
    reads and posix_fadvise(SEQUENTIAL): a doubled readahead window, its reads 512 KiB off
    the 1 MiB grid and out of order; bench/ANALYSIS.md), and the daemon's CPU."""
    os.stat(path)
    before = cpu_seconds(pid)
    samples.add(timed(lambda: run_quiet(["cat", path])))
    cpu.add(cpu_seconds(pid) - before)


def cold_read(ctx: Context) -> list[Figure]:
    """Two harnesses, interleaved: the bench's reader (1 MiB reads, dropped caches, lookup
    timed, passthrough_ll as shipped) and the plain one (stat untimed, `cat`, passthrough_ll
    with cache=always), which once disagreed (bench/ANALYSIS.md)."""
    fig = Figure(
        f"cold sequential read, {ctx.config.big_mib} MiB, embedded store",
        "passthrough_ll/tmpfs", "s", "higher", 1.0,
    )  # fmt: skip
    plain = Figure(
        f"cold sequential read, {ctx.config.big_mib} MiB, embedded store, cat, stat untimed",
        "passthrough_ll cache=always", "s", "higher", 1.0,
    )  # fmt: skip

    ours: set[int] = set()
    theirs: set[int] = set()
    cpu = {"tvixfs": Samples(), "passthrough_ll": Samples()}

    def baseline() -> None:
        with _passthrough(ctx, ctx.sources["big"]) as mnt:
            theirs.add(read_ahead_kb(mnt))
            drop_caches()
            fig.baseline.add(timed(lambda: read_file(mnt / "big.bin")))

    def plain_ours() -> None:
        with _mounted(ctx) as (mnt, pid):
            _cat_cold(plain.tvixfs, cpu["tvixfs"], mnt / ctx.paths["big"] / "big.bin", pid)

    def plain_theirs() -> None:
        mnt = ctx.mountpoint()
        source = ctx.sources["big"]
        with passthrough_mount(ctx.passthrough, source, mnt, ctx.log("passthrough"), "always") as proc:
            _cat_cold(plain.baseline, cpu["passthrough_ll"], mnt / "big.bin", proc.pid)

    _rotate(
        ctx.config.cold_reps,
        [lambda: _cold_read_tvixfs(ctx, fig.tvixfs, False, ours), baseline, plain_ours, plain_theirs],
    )
    fig.note = _readahead_note({"tvixfs": ours, "passthrough_ll": theirs})
    plain.note = "daemon CPU, median: " + ", ".join(f"{k} {v.median * 1000:.0f} ms" for k, v in cpu.items())
    return [fig, plain]


def grpc_read(ctx: Context) -> list[Figure]:
    fig = Figure(
        f"cold sequential read, {ctx.config.big_mib} MiB, via tvixfs daemon (gRPC, loopback)",
        "same, embedded store", "s", "higher", 0.6,
    )  # fmt: skip
    over_grpc: set[int] = set()
    direct: set[int] = set()
    _pairs(
        ctx.config.cold_reps,
        lambda: _cold_read_tvixfs(ctx, fig.tvixfs, True, over_grpc),
        lambda: _cold_read_tvixfs(ctx, fig.baseline, False, direct),
    )
    fig.note = _readahead_note({"over gRPC": over_grpc, "embedded": direct})
    return [fig]


def walks(ctx: Context) -> list[Figure]:
    """`find -ls` over every part of the walk tree: tvixfs, passthrough_ll as shipped, and
    passthrough_ll with cache=always (context: kernel-cached listings pyfuse3 cannot have)."""
    n = count_entries(ctx.trees["walk"])  # each part root is walked, the tree root is not
    cold = Figure(f"cold metadata walk, find -ls, {n} entries", "passthrough_ll", "s", "higher", 0.7)
    warm = Figure(f"warm metadata walk, find -ls, {n} entries", "passthrough_ll", "s", "higher", 1.0)
    always = Figure(
        f"warm metadata walk, {n} entries (context)", "passthrough_ll cache=always", "s", "higher", None
    )
    parts = sorted(p.name for p in ctx.trees["walk"].iterdir())

    def walk_all(roots: list[Path], cold_s: Samples, warm_s: Samples) -> None:
        drop_caches()
        cold_s.add(timed(lambda: _walk(*roots)))
        for _ in range(2):
            warm_s.add(timed(lambda: _walk(*roots)))
        for root, part in zip(roots, parts, strict=True):
            _check_walk(root, ctx.trees["walk"] / part)

    def ours() -> None:
        with _mounted(ctx) as (mnt, _):
            walk_all([mnt / ctx.paths["walk"] / p for p in parts], cold.tvixfs, warm.tvixfs)

    def theirs(cache: str, warm_s: Samples) -> None:
        with ExitStack() as stack:
            roots = [stack.enter_context(_passthrough(ctx, ctx.sources["walk"] / p, cache)) for p in parts]
            walk_all(roots, cold.baseline if cache == "auto" else Samples(), warm_s)

    _rotate(
        ctx.config.walk_reps,
        [ours, lambda: theirs("auto", warm.baseline), lambda: theirs("always", always.baseline)],
    )
    always.tvixfs = warm.tvixfs
    note = f"the tree has {len(parts)} parts, one passthrough_ll each (see trees.walk_tree)"
    cold.note = note
    warm.note = note + "; two warm walks per mount"
    return [cold, warm, always]


def _python_env(root: Path) -> dict[str, str]:
    """The interpreter was built with an absolute RUNPATH: point the loader at the mount's lib."""
    return {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(root / "lib"), "PYTHONNOUSERSITE": "1"}


def first_run(ctx: Context) -> list[Figure]:
    """A program's first run from a lazy mount against fetching and unpacking the whole tree."""
    entries = ctx.entries("python")
    export = "full export + nix-store --restore"
    times = Figure(
        f"first program run over gRPC, time ({entries}-entry Python tree)", export, "s", "lower", 0.3
    )
    fetched = Figure("first program run over gRPC, bytes fetched", export, "B", "lower", 0.2)
    local = Figure(
        "first program run over gRPC, time, vs local export (context)",
        "same export, embedded store",
        "s",
        "lower",
        None,
    )
    store_path = f"/nix/store/{ctx.paths['python']}"
    dest = ctx.ram / "export"

    def ours() -> None:
        with tvixfs_daemon(ctx.store_url, ctx.log("daemon")) as daemon, _mounted(ctx, daemon) as (mnt, _):
            root = mnt / ctx.paths["python"]
            python = root / "bin" / "python3"
            drop_caches()
            before = daemon.loopback_bytes()
            times.tvixfs.add(timed(lambda: run_quiet([python, "-I", "-c", PROGRAM], env=_python_env(root))))
            fetched.tvixfs.add(daemon.loopback_bytes() - before)

    def theirs() -> None:
        with tvixfs_daemon(ctx.store_url, ctx.log("daemon")) as daemon:
            drop_caches()
            before = daemon.loopback_bytes()
            times.baseline.add(timed(lambda: full_export(daemon.url, store_path, dest, daemon)))
            fetched.baseline.add(daemon.loopback_bytes() - before)
        shutil.rmtree(dest)

    def theirs_local() -> None:
        drop_caches()
        local.baseline.add(timed(lambda: full_export(ctx.store_url, store_path, dest)))
        shutil.rmtree(dest)

    _rotate(ctx.config.program_reps, [ours, theirs, theirs_local])
    local.tvixfs = times.tvixfs
    times.note = f"program: python3 -I -c '{PROGRAM}'; the mount is ready before the clock starts"
    fetched.note = (
        "bytes = transmit counter of the loopback device in the daemon's private network "
        "namespace (both directions, all TCP/IP and HTTP/2 framing)"
    )
    local.note = "the export without gRPC: how much of the baseline's time is the gRPC client"
    return [times, fetched, local]


def rss(ctx: Context) -> list[Figure]:
    half = ctx.config.many_per_half
    tree = many_tree(WORK / "trees", half)
    store = cached_store(f"many-{half}", {"many": tree})
    ctx.notes.extend(store.notes)
    url = f"local://{store.path}"
    # With fewer entries the interpreter's own ~60 MiB hides any growth: context only.
    target = 1.2 if half >= RSS_TARGET_HALF else None
    fig = Figure(
        f"mount daemon RSS after cold walk of {2 * half} entries, default cache limits",
        f"RSS after {half}", "B", "lower", target,
    )  # fmt: skip
    start = Samples()
    for _ in range(ctx.config.rss_reps):
        mnt = ctx.mountpoint()
        with tvixfs_mount(url, mnt, ctx.log("mount")) as proc:
            root = mnt / store.paths["many"]
            drop_caches()
            start.add(vm_rss(proc.pid))
            _walk(root / "a")
            fig.baseline.add(vm_rss(proc.pid))
            _walk(root / "b")
            fig.tvixfs.add(vm_rss(proc.pid))
            for side in ("a", "b"):
                _check_walk(root / side, tree / side)
    fig.note = f"RSS right after mount: {', '.join(f'{v / (1 << 20):.1f} MiB' for v in start.values)}"
    return [fig]


def import_speed(ctx: Context) -> list[Figure]:
    """Import into fresh stores on disk (bench/work/scratch): where a real store would live."""
    title = f"tvixfs import of a Python install ({ctx.entries('python')} entries)"
    return [_import_figure(ctx, title, ctx.trees["python"], "python")]


def import_big(ctx: Context) -> list[Figure]:
    """The same for a big system tree, imported where it is: `/usr/share` (669 MB, 54k entries
    on the development machine), or a part of it with `--quick`."""
    from context import QUICK  # here, not at the top, keeps this figure's edits in one place

    tree = Path("/usr/share/man" if ctx.config == QUICK else "/usr/share")
    title = f"tvixfs import of {tree} ({count_entries(tree) + 1} entries)"
    return [_import_figure(ctx, title, tree, tree.name)]


def _import_figure(ctx: Context, title: str, tree: Path, name: str) -> Figure:
    fig = Figure(title, "nix-store --add (chroot store)", "s", "higher", 1.0)
    scratch = WORK / "scratch"
    _rmtree_nix(scratch)
    scratch.mkdir(parents=True)
    # Every sample writes a store of its own and all are deleted after the last one: ext4 skips
    # inodes freed in the last 30 s when it allocates new ones, so a store deleted between
    # samples slowed whichever side came next (Nix's samples grew 0.8 -> 2.9 s over a run).
    reps = iter(range(2 * ctx.config.import_reps))

    def ours() -> None:
        dest = scratch / f"tvixfs-store-{next(reps)}"
        fig.tvixfs.add(timed(lambda: import_tree(f"local://{dest}", tree, name)))

    def theirs() -> None:
        dest = scratch / f"nix-root-{next(reps)}"
        fig.baseline.add(timed(lambda: nix_store_add(tree, dest)))

    try:
        read_file_tree(tree)  # both sides read the source from a warm page cache
        _pairs(ctx.config.import_reps, ours, theirs)
    finally:
        _rmtree_nix(scratch)
    return fig


def _rmtree_nix(root: Path) -> None:
    """Nix makes store paths read-only; give write permission back before deleting."""
    if root.exists():
        run_quiet(["chmod", "-R", "u+w", root])
        shutil.rmtree(root)


def read_file_tree(tree: Path) -> None:
    for dirpath, _, files in os.walk(tree):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                read_file(p)


FIGURES: dict[str, Callable[[Context], list[Figure]]] = {
    "warm-read": warm_read,
    "cold-read": cold_read,
    "walk": walks,
    "grpc-read": grpc_read,
    "first-run": first_run,
    "rss": rss,
    "import-big": import_big,
    "import": import_speed,
    "program-start": program_start,
    "elf-start": elf_start,
    "small-files": small_files,
    "metrics-cost": metrics_cost,
}
