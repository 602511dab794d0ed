"""Which S3 client for the ``s3://`` store: obstore vs boto3, GET of 256 KiB objects.

    .venv/bin/python bench/s3_clients.py [--objects 256] [--rounds 3]

Starts a moto S3 server on 127.0.0.1 (``python -m moto.server``), puts OBJECTS objects of
256 KiB (the average chunk), then GETs all of them with 1, 16 and 64 threads, per client,
and prints objects/s, MiB/s and the client's CPU time per GET (best of ROUNDS). Threads,
not asyncio, because the store services are synchronous and called from worker threads
(the gRPC server, the FUSE bridge).
moto is a Python server on the same 2 cores: it is the bottleneck well before a real S3 is,
so the figures compare the clients' own costs under one server, not S3 speeds.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

SIZE = 256 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto server did not start")


def boto3_getter(endpoint: str, bucket: str) -> Callable[[str], bytes]:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
        config=Config(max_pool_connections=64),
    )

    def get(key: str) -> bytes:
        body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    return get


def obstore_getter(endpoint: str, bucket: str) -> Callable[[str], bytes]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        bucket,
        endpoint=endpoint,
        region="us-east-1",
        access_key_id="k",
        secret_access_key="s",
        client_options={"allow_http": True},
    )

    def get(key: str) -> bytes:
        return obstore.get(store, key).bytes().to_bytes()

    return get


def run(get: Callable[[str], bytes], keys: list[str], threads: int) -> tuple[float, float]:
    """(wall seconds, client CPU seconds) to GET every key."""
    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        for data in pool.map(get, keys):
            assert len(data) == SIZE
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
        endpoint = f"http://127.0.0.1:{port}"
        import boto3

        setup = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="k",
            aws_secret_access_key="s",
        )
        setup.create_bucket(Bucket="bench")
        keys = [f"obj/{i:05d}" for i in range(args.objects)]
        for key in keys:
            setup.put_object(Bucket="bench", Key=key, Body=os.urandom(SIZE))
        print(f"{args.objects} GETs of 256 KiB against moto on 127.0.0.1 (best of {args.rounds})")
        print(f"{'client':8} {'threads':>7} {'objects/s':>10} {'MiB/s':>8} {'client CPU us/GET':>18}")
        for name, make in (("obstore", obstore_getter), ("boto3", boto3_getter)):
            get = make(endpoint, "bench")
            get(keys[0])  # connect, load what loads lazily
            for threads in (1, 16, 64):
                wall, cpu = min(run(get, keys, threads) for _ in range(args.rounds))
                rate = args.objects / wall
                per_get = cpu / args.objects * 1e6
                print(f"{name:8} {threads:7} {rate:10.0f} {rate * SIZE / 2**20:8.1f} {per_get:18.0f}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
