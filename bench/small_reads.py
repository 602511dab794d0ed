"""The cost of one small-blob Read over loopback gRPC, client and daemon (issue 15).

    .venv/bin/python bench/small_reads.py [--blobs N] [--rounds R] [--concurrency C]

Puts N small blobs (2-24 KiB, like `.pyc` files) into a `local://` store, serves it with a
real `tvixfs daemon` on loopback, and reads every blob through the gRPC client the mount uses
(`blobs.read`, verified), one after the other (what a program's cold opens look like) and
C at a time (the mount's prefetch). Reports per call: wall time, and the CPU time of this
process and of the daemon (utime+stime from /proc). Whatever `tvixfs` PYTHONPATH selects runs
on both sides, so two checkouts compare by running this under each, alternately;
$GRPC_EXPERIMENTS in the environment reaches both sides too.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from grpcserver import running_daemon  # noqa: E402

from tvixfs.services.backends.grpc import open_grpc_store  # noqa: E402
from tvixfs.services.url import open_store  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def profilers(profile: Path | None, perf: Path | None, daemon: int) -> list[subprocess.Popen[bytes]]:
    """py-spy (raw, 1 kHz) into ``profile``, `perf record` (2 kHz) into ``perf``, of this process
    and the daemon; stopped with SIGINT."""
    spies = []
    for out, argv in (
        (profile, ["py-spy", "record", "-r", "1000", "-f", "raw"]),
        (perf, ["perf", "record", "-F", "2000"]),
    ):
        if out is None:
            continue
        out.mkdir(parents=True, exist_ok=True)
        for name, pid in (("client", os.getpid()), ("daemon", daemon)):
            cmd = [*argv, "-p", str(pid), "-o", str(out / f"{name}.{'txt' if out is profile else 'data'}")]
            spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)
    return spies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blobs", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--profile", type=Path, help="py-spy both processes (raw, 1 kHz) into DIR")
    p.add_argument("--perf", type=Path, help="perf record both processes into DIR")
    args = p.parse_args()
    rng = random.Random(15)
    tmp = Path(tempfile.mkdtemp(prefix="tvxsmall", dir="/dev/shm"))
    try:
        url = f"local://{tmp / 'store'}"
        embedded = open_store(url)
        digests = [embedded.blobs.put([rng.randbytes(rng.randint(2048, 24576))]) for _ in range(args.blobs)]
        embedded.close()
        tvixfs = [str(Path(sys.executable).parent / "tvixfs")]
        with running_daemon(tvixfs, tmp, store=url, listen=("127.0.0.1:0",)) as daemon:
            remote = open_grpc_store(daemon.tcp)
            b"".join(remote.blobs.read(digests[0]))  # connect
            rows: dict[str, list[tuple[float, float, float]]] = {"serial": [], "concurrent": []}
            pool = ThreadPoolExecutor(args.concurrency)
            spies = profilers(args.profile, args.perf, daemon.proc.pid)
            for _ in range(args.rounds):
                for mode, samples in rows.items():
                    c0, d0, t0 = cpu_seconds("self"), cpu_seconds(daemon.proc.pid), time.perf_counter()
                    if mode == "serial":
                        for d in digests:
                            b"".join(remote.blobs.read(d))
                    else:
                        list(pool.map(lambda d: b"".join(remote.blobs.read(d)), digests))
                    t1, c1, d1 = time.perf_counter(), cpu_seconds("self"), cpu_seconds(daemon.proc.pid)
                    n = len(digests)
                    samples.append(((t1 - t0) / n * 1e6, (c1 - c0) / n * 1e6, (d1 - d0) / n * 1e6))
            pool.shutdown()
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait()
            remote.close()
        med = statistics.median
        for mode, samples in rows.items():
            wall, client, server = (med(s[i] for s in samples) for i in range(3))
            cpu = f"CPU client {client:5.0f} us, daemon {server:5.0f} us"
            print(f"{mode:10s} per call: wall {wall:6.0f} us, {cpu}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
