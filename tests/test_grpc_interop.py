"""``tvixfs daemon`` against clients that share no code with tvixfs.

The clients are generated at test time from protos/ by ``grpc_tools.protoc`` (once as is, once
with the packages renamed to snix) and run in their own process (tests/interop_client.py), so
neither tvixfs's generated modules nor its client can hide a wire-level mistake. Reflection
and health are checked with grpcio's own client-side tools.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import blake3
import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpcserver import running_daemon

from tvixfs.server.servicers import READ_MESSAGE_SIZE

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
CLIENT = Path(__file__).resolve().parent / "interop_client.py"
# Public vectors (PROTOCOL.md): a store path hash and its nixbase32 form.
OUTPUT_HASH = "8a12321522fd91efbd60ebb2481af88580f61600"
BASENAME = "00bgd045z0d4icpbc2yyz4gx48ak44la-keep"
HELLO_DIGEST = "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c"
KEEP_DIGEST = "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e"
BIG = bytes(i % 251 for i in range(3_000_017))  # what the client puts
SERVICES = ("castore.v1.BlobService", "castore.v1.DirectoryService", "store.v1.PathInfoService")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Python modules generated from protos/ under each prefix: prefix -> directory."""
    out = {}
    for prefix in ("tvix", "snix"):
        src = tmp_path_factory.mktemp(f"{prefix}-protos")
        for proto in (ROOT / "protos" / "tvix").rglob("*.proto"):  # the tvix protocol's own
            target = src / prefix / proto.relative_to(ROOT / "protos" / "tvix")
            target.parent.mkdir(parents=True, exist_ok=True)
            text = proto.read_text()
            if prefix != "tvix":
                text = text.replace("tvix.", f"{prefix}.").replace('"tvix/', f'"{prefix}/')
            target.write_text(text)
        gen = tmp_path_factory.mktemp(f"{prefix}-gen")
        protos = sorted(str(p.relative_to(src)) for p in src.rglob("*.proto"))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{src}",
                f"--python_out={gen}",
                f"--grpc_python_out={gen}",
                *protos,
            ],
            check=True,
        )
        out[prefix] = gen
    return out


def keep_nar(tmp: Path) -> list[object]:
    """What Nix says the NAR of a directory holding one empty file ``.keep`` is."""
    tree = tmp / "keep"
    tree.mkdir()
    (tree / ".keep").write_bytes(b"")
    dump = subprocess.run(["nix-store", "--dump", str(tree)], check=True, capture_output=True).stdout
    return [len(dump), hashlib.sha256(dump).hexdigest()]


def run_client(gen: Path, prefix: str, target: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(CLIENT), str(gen), prefix, target, BASENAME, OUTPUT_HASH],
        check=True,
        capture_output=True,
        text=True,
        cwd=gen,
        timeout=60,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize(("prefix", "transport"), [("tvix", "tcp"), ("snix", "unix")])
def test_independent_client(
    generated: dict[str, Path], tvixfs_cmd: list[str], short_tmp: Path, prefix: str, transport: str
) -> None:
    sock = short_tmp / "d.sock"
    with running_daemon(tvixfs_cmd, short_tmp, listen=["[::1]:0", f"unix:{sock}"]) as daemon:
        target = daemon.tcp if transport == "tcp" else f"unix:{sock}"
        seen = run_client(generated[prefix], prefix, target)
    assert seen == {
        "hello_digest": HELLO_DIGEST,
        "hello_read": "Hello World!",
        "hello_chunks": 0,
        "big_digest": blake3.blake3(BIG).hexdigest(),
        "big_equal": True,
        "big_largest_message": READ_MESSAGE_SIZE,  # below a stock client's 4 MiB limit
        "stat_absent": "NOT_FOUND",
        "read_short_digest": "INVALID_ARGUMENT",
        "keep_digest": KEEP_DIGEST,
        "recursive_is_parent_then_keep": True,
        "get_one": True,
        "put_dangling": "FAILED_PRECONDITION",
        "get_absent": "NOT_FOUND",
        "nar": keep_nar(short_tmp),
        "put_echo": True,
        "get_equal": True,
        "list": [BASENAME],
        "get_short_hash": "INVALID_ARGUMENT",
        "get_absent_info": "NOT_FOUND",
    }


def test_reflection_and_health(tvixfs_cmd: list[str], short_tmp: Path) -> None:
    with running_daemon(tvixfs_cmd, short_tmp) as daemon, grpc.insecure_channel(daemon.tcp) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        expected = {f"{prefix}.{service}" for prefix in ("tvix", "snix") for service in SERVICES}
        assert expected | {"grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(database)
        for prefix in ("tvix", "snix"):
            blob = pool.FindServiceByName(f"{prefix}.castore.v1.BlobService")
            assert sorted(blob.methods_by_name) == ["Put", "Read", "Stat"]
            assert blob.methods_by_name["Stat"].input_type.full_name == f"{prefix}.castore.v1.StatBlobRequest"
            nar = pool.FindServiceByName(f"{prefix}.store.v1.PathInfoService").methods_by_name["CalculateNAR"]
            assert nar.input_type.full_name == f"{prefix}.castore.v1.Node"
        # tvixfs's own extension, under its own package only.
        batch = pool.FindServiceByName("tvixfs.ext.v1.BlobBatchService")
        assert sorted(batch.methods_by_name) == ["ReadMany"]
        # The v1 name (what newer grpcurl asks first) answers the same, as raw bytes.
        v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
        ask = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        (raw,) = list(v1(iter([ask]), timeout=10))
        listed = reflection_pb2.ServerReflectionResponse.FromString(raw).list_services_response.service
        assert {s.name for s in listed} == services
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", *sorted(expected)):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
