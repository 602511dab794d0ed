"""Per-call cost of small blobs over loopback gRPC (issue 15): A/B of code versions.

`.venv/bin/python bench/grpc_small.py --variant before=/tmp/old-checkout --variant after=. [--reps N]`
(as root). Each variant is a checkout whose `tvixfs` runs both the mount and the `tvixfs daemon`
(through PYTHONPATH). Samples alternate between the variants, each on a fresh daemon and mount
with dropped caches, for the program-start workloads of bench/startup.py (a cold Python start,
`cat` of 300 `.pyc`) and, as the reference, the same through the embedded store (`--links`
also takes `wan`: the daemon behind bench/latency.py's 20 ms round trip). Besides wall
time it reports the CPU both processes spent on the workload (utime+stime from /proc) and,
with `--count`, the store calls the mount made (its metrics endpoint).

`--profile DIR` records py-spy (raw, 1 kHz) of the mount and the daemon for one sample of each.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trees
from context import WORK, cached_store
from measure import drop_caches, timed
from procs import Daemon, Proc, tmpfs, tvixfs_daemon, tvixfs_mount
from startup import RTT_MS, _cat, _start_python, latency_proxy, small_file_list

METRICS_PORT = 9464
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def store_calls(daemon: Daemon) -> dict[str, int]:
    """Calls per store method the mount made, from its metrics endpoint in the daemon's namespace."""
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    code = f"import urllib.request;print(urllib.request.urlopen({url!r}).read().decode())"
    text = subprocess.run(
        [*daemon.netns(), sys.executable, "-c", code], capture_output=True, text=True, check=False
    ).stdout
    calls: dict[str, int] = {}
    for m in re.finditer(r"^tvixfs_store_call_seconds_count\{([^}]*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = f"{labels.get('service', '?')}.{labels.get('method', '?')}"
        calls[key] = calls.get(key, 0) + int(float(m.group(2)))
    return calls


@dataclass
class Result:
    wall: list[float] = field(default_factory=list)
    mount_cpu: list[float] = field(default_factory=list)
    daemon_cpu: list[float] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)


@contextmanager
def env(settings: dict[str, str]) -> Iterator[None]:
    """``settings`` in the environment the daemon and the mount inherit, for one sample."""
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME=CHECKOUT[;VAR=VALUE...]``: the checkout as PYTHONPATH, and more environment
    (MOUNT_ARGS: more `tvixfs mount` options)."""
    name, _, rest = text.partition("=")
    path, *more = rest.split(";")
    settings = {"PYTHONPATH": str(Path(path).resolve())}
    settings.update(item.split("=", 1) for item in more)  # type: ignore[misc]
    return name, settings


@contextmanager
def py_spy(pid: int, out: Path) -> Iterator[None]:
    """py-spy (raw, 1 kHz) of ``pid``; with PROFILER=perf, `perf record` at 2 kHz instead."""
    spy = Path(sys.executable).parent / "py-spy"
    argv = [str(spy), "record", "-p", str(pid), "-r", "1000", "-f", "raw", "--threads", "-o", str(out)]
    if os.environ.get("PROFILER") == "perf":
        argv = ["perf", "record", "-F", "2000", "-p", str(pid), "-o", str(out.with_suffix(".perf"))]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(2)
        proc.wait(60)


@dataclass(frozen=True)
class Workload:
    store_url: str
    run: Path  # scratch directory: mount point and logs
    tree: Path  # the tree the store holds, for the list of small files
    root_name: str  # its name under the mount
    count: bool  # count the mount's store calls


def sample(
    w: Workload, action: str, link: str, profile: Path | None
) -> tuple[float, float, float, dict[str, int]]:
    store_url, run, root_name, count = w.store_url, w.run, w.root_name, w.count
    files = small_file_list(w.tree)
    with ExitStack() as stack:
        daemon: Daemon | None = None
        url = store_url
        extra: list[str] = ["--metrics-listen", str(METRICS_PORT)] if count else []
        extra += os.environ.get("MOUNT_ARGS", "").split()
        if link in {"loopback", "wan"}:
            daemon = stack.enter_context(tvixfs_daemon(store_url, run / "daemon.log"))
            url = daemon.url
            if link == "wan":
                url = stack.enter_context(latency_proxy(daemon, RTT_MS / 2, run / "proxy.log"))
        mnt = run / "mnt"
        mount: Proc = stack.enter_context(tvixfs_mount(url, mnt, run / "mount.log", daemon, extra))
        root = mnt / root_name
        drop_caches()
        if profile is not None:
            stack.enter_context(py_spy(mount.pid, profile.with_suffix(".mount.txt")))
            if daemon is not None:
                stack.enter_context(py_spy(daemon.pid, profile.with_suffix(".daemon.txt")))
        m0 = cpu_seconds(mount.pid)
        d0 = cpu_seconds(daemon.pid) if daemon else 0.0
        wall = timed(lambda: _start_python(root) if action == "python" else _cat(root, files))
        m1 = cpu_seconds(mount.pid)
        d1 = cpu_seconds(daemon.pid) if daemon else 0.0
        calls = store_calls(daemon) if count and daemon is not None else {}
        return wall, m1 - m0, d1 - d0, calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME=CHECKOUT[;VAR=VALUE...] (PYTHONPATH, more environment)",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--actions", nargs="+", default=["cat", "python"])
    p.add_argument(
        "--links", nargs="+", default=["loopback", "embedded"], help="also: wan (bench/latency.py)"
    )
    p.add_argument("--count", action="store_true", help="count the mount's store calls (metrics on)")
    p.add_argument("--profile", type=Path, help="py-spy both processes, one sample each, into DIR")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    tree = trees.python_tree(WORK / "trees")
    store = cached_store("python", {"python": tree})
    run = Path(tempfile.mkdtemp(prefix="tvxgrpc-", dir="/tmp"))
    results: dict[tuple[str, str, str], Result] = {}
    try:
        with tmpfs(run / "ram", "2g") as ram:
            shutil.copytree(store.path, ram / "store", symlinks=True)
            url = f"local://{ram / 'store'}"
            work = Workload(url, run, tree, store.paths["python"], args.count)
            for rep in range(args.reps):
                k = rep % len(variants)
                for action in args.actions:
                    for link in args.links:
                        for name, path in variants[k:] + variants[:k]:
                            if link == "embedded" and name != variants[0][0]:
                                continue  # the reference: no gRPC, the same for every variant
                            profile = None
                            if args.profile is not None and rep == 0:
                                args.profile.mkdir(parents=True, exist_ok=True)
                                profile = args.profile / f"{name}-{action}-{link}"
                            with env(path):
                                wall, mcpu, dcpu, calls = sample(work, action, link, profile)
                            r = results.setdefault((action, link, name), Result())
                            r.wall.append(wall)
                            r.mount_cpu.append(mcpu)
                            r.daemon_cpu.append(dcpu)
                            r.calls = calls or r.calls
                            line = f"{action} {link} {name}: {wall:.3f} s, CPU {mcpu:.2f} + {dcpu:.2f} s"
                            print(
                                line + (f", calls {calls}" if calls else ""),
                                file=sys.stderr,
                                flush=True,
                            )
    finally:
        shutil.rmtree(run, ignore_errors=True)
    med = statistics.median
    print("| workload | link | variant | wall (median, min-max) | CPU mount | CPU daemon | calls |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (action, link, name), r in results.items():
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r.calls.items()))
        print(
            f"| {action} | {link} | {name} | {med(r.wall):.3f} s ({min(r.wall):.3f}-{max(r.wall):.3f}) "
            f"| {med(r.mount_cpu):.2f} s | {med(r.daemon_cpu):.2f} s | {calls} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
