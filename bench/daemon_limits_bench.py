"""What the daemon's read-ahead costs and buys under its stream limits (issue 11 item 2).

    .venv/bin/python bench/daemon_limits_bench.py [--size MIB] [--reps N] [--streams N]

Against a real ``tvixfs daemon`` over a ``local://`` store on disk, with the default limits and
``--read-ahead-streams`` 0 and 8 in turn (interleaved, twice each):
- a cold read: one client's Read stream of a SIZE MiB blob, its chunk files dropped from the page
  cache first (posix_fadvise, those files only), median and range of REPS;
- the attack: STREAMS Read streams of a 32 MiB blob opened on two connections and never read;
  the daemon's RSS before and at its peak, and how many streams it refused.
The machine is shared: run it twice before believing a digit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from grpcserver import Daemon, running_daemon  # noqa: E402

from tvixfs.protos import rpc_blobstore_pb2, rpc_blobstore_pb2_grpc  # noqa: E402
from tvixfs.services.url import open_store  # noqa: E402

MIB = 1 << 20
ATTACK_BLOB = 32 * MIB


def evict(store: Path) -> None:
    """Drop the store's files (and only them) from the page cache."""
    for dirpath, _, files in os.walk(store):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cold_read(daemon: Daemon, store: Path, digest: bytes, size: int) -> float:
    """MiB/s of one Read stream of the whole blob, from a cold page cache."""
    evict(store)
    with grpc.insecure_channel(daemon.tcp, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = rpc_blobstore_pb2_grpc.BlobServiceStub(channel)
        start = time.perf_counter()
        got = sum(len(m.data) for m in stub.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=digest)))
        elapsed = time.perf_counter() - start
    assert got == size, (got, size)
    return size / MIB / elapsed


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) >> 10
    raise RuntimeError("no VmRSS")


def attack(daemon: Daemon, digest: bytes, streams: int) -> tuple[int, int, int]:
    """(RSS before, peak RSS, streams refused) while ``streams`` Read streams stay unread."""
    before = peak = rss_mib(daemon.proc.pid)
    # Own connections whose receive window stays small, as a client that reads nothing has.
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]
    channels = [grpc.insecure_channel(daemon.tcp, options=options) for _ in range(2)]
    try:
        calls = [
            rpc_blobstore_pb2_grpc.BlobServiceStub(channels[i % 2]).Read(
                rpc_blobstore_pb2.ReadBlobRequest(digest=digest)
            )
            for i in range(streams)
        ]
        for _ in range(20):
            time.sleep(0.5)
            peak = max(peak, rss_mib(daemon.proc.pid))
        refused = sum(1 for call in calls if call.done())  # type: ignore[attr-defined]
        for call in calls:
            call.cancel()  # type: ignore[attr-defined]
    finally:
        for channel in channels:
            channel.close()
    return before, peak, refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="cold-read blob size in MiB")
    parser.add_argument("--reps", type=int, default=6, help="cold reads per daemon")
    parser.add_argument("--streams", type=int, default=70, help="unread streams of the attack")
    args = parser.parse_args()
    size = args.size * MIB
    tmp = Path(tempfile.mkdtemp(prefix="tvxl", dir="/tmp"))
    try:
        store = tmp / "store"
        embedded = open_store(f"local://{store}")
        big = embedded.blobs.put(os.urandom(MIB) for _ in range(args.size))
        small = embedded.blobs.put(os.urandom(MIB) for _ in range(ATTACK_BLOB // MIB))
        embedded.close()
        tvixfs = [str(ROOT / ".venv" / "bin" / "tvixfs")]
        for slots in (0, 8, 0, 8):
            extra = [f"--read-ahead-streams={slots}"]
            with running_daemon(tvixfs, tmp, store=f"local://{store}", extra=extra) as daemon:
                rates = [cold_read(daemon, store, big, size) for _ in range(args.reps)]
                before, peak, refused = attack(daemon, small, args.streams)
            print(
                f"--read-ahead-streams {slots}: cold read {args.size} MiB median "
                f"{statistics.median(rates):4.0f} MiB/s ({min(rates):.0f}-{max(rates):.0f}); "
                f"{args.streams} unread streams: RSS {before} -> {peak} MiB, {refused} refused",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
