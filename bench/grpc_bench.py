"""gRPC server and client cost vs the embedded store in process.

    .venv/bin/python bench/grpc_bench.py [--size MIB] [--calls N]

Measures, on loopback against a real ``tvixfs daemon`` over a ``local://`` store:
- blob Read throughput: one raw gRPC Read stream of a SIZE MiB blob, discarded (no verification);
  the gRPC client's verified ``blobs.read`` (chunk list, read-ahead); the same blob read in
  process from the embedded store;
- unary latency: PathInfo Get and (non-recursive) Directory Get through the gRPC client vs in
  process;
- the Read message size: raw Read throughput from an in-process-built server over a memory
  store, per message size (in a child process, so client and server do not share a GIL).
Prints each number and the ratios. The machine is shared: run it twice before believing a digit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from grpcserver import running_daemon  # noqa: E402

from tvixfs.importers.ingest import ingest_path  # noqa: E402
from tvixfs.protos import rpc_blobstore_pb2, rpc_blobstore_pb2_grpc  # noqa: E402
from tvixfs.services.backends.grpc import open_grpc_store  # noqa: E402
from tvixfs.services.base import Store  # noqa: E402
from tvixfs.services.url import open_store  # noqa: E402

MIB = 1 << 20
MESSAGE_SIZES = (64 << 10, 256 << 10, 1 << 20, 2 << 20, 3 << 20)


def throughput(size: int, read: Callable[[], int], reps: int = 3) -> float:
    """Best MiB/s of ``reps`` runs of ``read`` (which returns the byte count it saw)."""
    best = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        got = read()
        elapsed = time.perf_counter() - start
        assert got == size, (got, size)
        best = max(best, size / MIB / elapsed)
    return best


def latency_us(call: Callable[[], object], calls: int) -> float:
    """Median microseconds per call, over batches of 100."""
    for _ in range(50):
        call()
    batches = []
    for _ in range(max(calls // 100, 1)):
        start = time.perf_counter()
        for _ in range(100):
            call()
        batches.append((time.perf_counter() - start) / 100 * 1e6)
    return statistics.median(batches)


def raw_read(target: str, digest: bytes) -> Callable[[], int]:
    def read() -> int:
        with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 * MIB)]) as ch:
            stub = rpc_blobstore_pb2_grpc.BlobServiceStub(ch)
            return sum(len(m.data) for m in stub.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=digest)))

    return read


def store_read(store: Store, digest: bytes) -> Callable[[], int]:
    return lambda: sum(len(piece) for piece in store.blobs.read(digest))


def serve_memory(message_size: int, size: int) -> None:
    """Child mode: serve a memory store holding one SIZE-byte blob; print target and digest."""
    from tvixfs.server.serve import start_server
    from tvixfs.services.backends.memory import open_memory_store

    store = open_memory_store()
    digest = store.blobs.put([os.urandom(size)])
    running = start_server(store, ["[::1]:0"], read_message_size=message_size)
    print(json.dumps({"target": running.addresses[0], "digest": digest.hex()}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    running.stop(None)


def message_sizes(size: int) -> None:
    print("\nRead message size (raw stream, memory store, separate server process):")
    for message_size in MESSAGE_SIZES:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve-memory", str(message_size), "--size", str(size // MIB)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdin is not None
        info = json.loads(child.stdout.readline())
        rate = throughput(size, raw_read(info["target"], bytes.fromhex(info["digest"])))
        print(f"  {message_size >> 10:5d} KiB messages: {rate:7.0f} MiB/s")
        child.stdin.close()
        child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="blob size in MiB")
    parser.add_argument("--calls", type=int, default=2000, help="unary calls per latency figure")
    parser.add_argument("--serve-memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size * MIB
    if args.serve_memory:
        serve_memory(args.serve_memory, size)
        return

    tmp = Path(tempfile.mkdtemp(prefix="tvxb", dir="/tmp"))
    try:
        url = f"local://{tmp / 'store'}"
        embedded = open_store(url)
        digest = embedded.blobs.put(os.urandom(MIB) for _ in range(args.size))
        tree = tmp / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "sub" / "file").write_bytes(b"x" * 100)
        info = ingest_path(embedded, tree, "bench-tree")
        output_hash = _output_hash(info.node.directory.name)
        root = info.node.directory.digest
        tvixfs = [str(ROOT / ".venv" / "bin" / "tvixfs")]
        with running_daemon(tvixfs, tmp, store=url) as daemon:
            remote = open_grpc_store(daemon.tcp)
            raw = throughput(size, raw_read(daemon.tcp, digest))
            client = throughput(size, store_read(remote, digest))
            local = throughput(size, store_read(embedded, digest))
            remote_info = latency_us(lambda: remote.pathinfos.get(output_hash), args.calls)
            local_info = latency_us(lambda: embedded.pathinfos.get(output_hash), args.calls)
            remote_dir = latency_us(lambda: remote.directories.get(root), args.calls)
            local_dir = latency_us(lambda: embedded.directories.get(root), args.calls)
            remote.close()
        embedded.close()
        print(f"Blob read, {args.size} MiB (best of 3), loopback TCP vs embedded local:// in process:")
        print(f"  raw gRPC Read stream:       {raw:7.0f} MiB/s   ratio to in-process {raw / local:5.2f}")
        print(
            f"  gRPC client (verified):     {client:7.0f} MiB/s   ratio to in-process {client / local:5.2f}"
        )
        print(f"  in process (local://):      {local:7.0f} MiB/s")
        print("Unary latency (median of batches):")
        print(
            f"  PathInfo Get:  gRPC {remote_info:7.0f} us   in process {local_info:6.1f} us"
            f"   ratio {remote_info / local_info:6.1f}"
        )
        print(
            f"  Directory Get: gRPC {remote_dir:7.0f} us   in process {local_dir:6.1f} us"
            f"   ratio {remote_dir / local_dir:6.1f}"
        )
        message_sizes(size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _output_hash(basename: bytes) -> bytes:
    from tvixfs.store.storepath import StorePath

    return StorePath.from_basename(basename).digest


if __name__ == "__main__":
    main()
