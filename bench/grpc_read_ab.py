"""A/B of the cold sequential read through `tvixfs daemon` over loopback gRPC (issue 18).

    .venv/bin/python bench/grpc_read_ab.py [--mib N] [--reps N] [--variants NAME=DIR ...]
        [--embedded]

Each variant is a tree holding a ``tvixfs`` package (``git archive`` of a commit, unpacked):
its code runs both the daemon and the mount (through PYTHONPATH). A sample is the
`grpc-read` figure's: a fresh daemon in its own network namespace over an embedded store on
tmpfs, a fresh mount through it, page cache dropped, the file looked up untimed, then read
front to back in 1 MiB blocks, timed. Besides the wall time it records, from /proc, the CPU
(utime + stime) of the mount and of the daemon during the read, and the context switches of
their threads. ``--embedded`` adds the `cold-read` sample of the first variant (the mount
reading the store directly), the figure's denominator. Variants alternate in rotating order,
so load from others on the shared machine hits each alike. A variant's ``AB_UNIX=1`` serves
over a unix socket instead of TCP; ``AB_TRACE``, ``AB_THREADS``, ``AB_PERF`` print when each
MiB arrived, CPU (or ``switches``) per thread, and record a perf profile; ``AB_PYSPY=FILE``
records py-spy's raw stacks of the mount (of the daemon with ``AB_PYSPY_OF=daemon``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from measure import drop_caches, read_file
from procs import TVIXFS, tvixfs_daemon, tvixfs_mount

MIB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")
_SET: set[str] = set()  # environment variables a variant set


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, the exited ones included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def switches(pid: int) -> int:
    """Voluntary + involuntary context switches of the process's live threads."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def threads(pid: int) -> dict[str, float]:
    """CPU seconds per live thread (named by tid and comm)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[f"{task.name}:{comm}"] = (int(fields[11]) + int(fields[12])) / TICK
        if os.environ.get("AB_THREADS") == "switches":
            status = (task / "status").read_text().splitlines()
            out[f"{task.name}:{comm}"] = sum(int(x.split()[1]) for x in status if "ctxt_switches:" in x)
    return out


def profiler(pids: list[int]) -> subprocess.Popen[bytes] | None:
    """A profiler recording the mount (``pids[0]``) and daemon, as the environment asks."""
    if os.environ.get("AB_PERF"):
        perf = subprocess.Popen(["perf", "record", "-q", "-F", "2000", "-o", os.environ["AB_PERF"],
                                 "-p", ",".join(map(str, pids))], stderr=subprocess.DEVNULL)  # fmt: skip
    elif os.environ.get("AB_PYSPY"):
        target = pids[0] if os.environ.get("AB_PYSPY_OF", "mount") == "mount" else pids[-1]
        spy = [str(Path(sys.executable).parent / "py-spy"), "record", "-r", "1000", "-f", "raw",
               "-o", os.environ["AB_PYSPY"], "--threads", "--nonblocking", "-p", str(target)]  # fmt: skip
        perf = subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        return None
    time.sleep(1.0)  # until it is attached
    return perf


def sample(code: str, store_url: str, file: str, work: Path, over_grpc: bool) -> dict[str, float]:
    """One cold read; ``code`` is DIR[ KEY=VALUE...]: the tree on PYTHONPATH, and environment."""
    path_entry, *env = code.split()
    os.environ["PYTHONPATH"] = path_entry
    for key in _SET:
        os.environ.pop(key, None)
    for key, _, value in (e.partition("=") for e in env):
        os.environ[key] = value
        _SET.add(key)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    with ExitStack() as stack:
        unix = work / "daemon.sock" if os.environ.get("AB_UNIX") else None
        daemon = None
        if over_grpc:
            daemon = stack.enter_context(tvixfs_daemon(store_url, logs / "daemon.log", unix))
        mnt = Path(tempfile.mkdtemp(prefix="grpcab-mnt", dir="/tmp"))
        stack.callback(mnt.rmdir)
        mount = stack.enter_context(tvixfs_mount(store_url if daemon is None else daemon.url, mnt,
                                                 logs / "mount.log", daemon))  # fmt: skip
        path = mnt / file
        drop_caches()
        os.stat(path)
        pids = [mount.pid] + ([] if daemon is None else [daemon.pid])
        cpu0 = [cpu_seconds(p) for p in pids]
        th0 = [threads(p) for p in pids]
        sw0 = [switches(p) for p in pids]
        perf = profiler(pids)
        start = time.perf_counter()
        if os.environ.get("AB_TRACE"):
            marks = []
            with path.open("rb", buffering=0) as f:
                while f.read(MIB):
                    marks.append(time.perf_counter() - start)
            print(" ".join(f"{i + 1}:{marks[i] * 1000:.0f}" for i in (0, 1, 3, 7, 15, 31, 63, 127, 255)
                           if i < len(marks)), file=sys.stderr)  # fmt: skip
        else:
            read_file(path)
        wall = time.perf_counter() - start
        if perf is not None:
            perf.send_signal(2)
            perf.wait()
        cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
        sw = sum(switches(p) for p in pids) - sum(sw0)
        if os.environ.get("AB_THREADS"):
            for p, before in zip(pids, th0, strict=True):
                after = threads(p)
                busy = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
                print(p, sorted(busy.items(), key=lambda kv: -kv[1]), file=sys.stderr)
    return {"wall": wall, "mount": cpu[0], "daemon": cpu[1] if len(cpu) > 1 else 0.0, "switches": sw}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    here = Path(__file__).resolve().parent.parent
    p.add_argument("--variants", nargs="+", default=[f"here={here}"], help="NAME=DIR[ KEY=VALUE...]")
    p.add_argument("--embedded", action="store_true")
    args = p.parse_args()
    variants = [(v.partition("=")[0], v.partition("=")[2]) for v in args.variants]
    with tempfile.TemporaryDirectory(prefix="grpcab", dir="/dev/shm") as tmp:
        work = Path(tmp)
        big = work / "src" / "big.bin"
        big.parent.mkdir()
        with big.open("wb") as f:
            for _ in range(args.mib):
                f.write(secrets.token_bytes(MIB))
        store_url = f"local://{work / 'store'}"
        os.environ["PYTHONPATH"] = variants[0][1].split()[0]
        out = subprocess.run([str(TVIXFS), "import", "--store", store_url, str(big.parent)],
                             check=True, capture_output=True, text=True).stdout.split()[-1]  # fmt: skip
        big.unlink()
        file = f"{Path(out).name}/big.bin"
        runs: list[tuple[str, str, bool]] = [(name, code, True) for name, code in variants]
        if args.embedded:
            runs.append(("embedded", variants[0][1], False))
        results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in runs}
        for rep in range(args.reps):
            k = rep % len(runs)
            for name, code, grpc in runs[k:] + runs[:k]:
                s = sample(code, store_url, file, work, grpc)
                results[name].append(s)
                print(f"{name}: {s['wall']:.3f} s, mount {s['mount']:.2f} s, daemon {s['daemon']:.2f} s, "
                      f"{s['switches']:.0f} switches", file=sys.stderr, flush=True)  # fmt: skip
        head = f"variant ({args.mib} MiB, {args.reps} reps, medians)"
        print(f"| {head} | wall | mount CPU | daemon CPU | switches |")
        print("| --- | --- | --- | --- | --- |")
        for name, samples in results.items():
            med = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
            print(f"| {name} | {med['wall']:.3f} s | {med['mount']:.2f} s | {med['daemon']:.2f} s | "
                  f"{med['switches']:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
