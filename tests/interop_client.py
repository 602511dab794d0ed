"""An independent tvix/snix store client, run as a script by tests/test_grpc_interop.py.

It imports nothing from tvixfs: only grpcio and the modules that ``grpc_tools.protoc`` generated
from the .proto files into GEN_DIR, under package PREFIX (``tvix`` or ``snix``). It exercises
every method of the three services and prints one JSON object of what it saw.

    python interop_client.py GEN_DIR PREFIX TARGET BASENAME OUTPUT_HASH_HEX
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc

BIG = bytes(i % 251 for i in range(3_000_017))


def code_of(thunk: Any) -> str:
    try:
        result = thunk()
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as e:
        return str(e.code().name)  # type: ignore[attr-defined]
    return "OK"


def main() -> None:
    gen_dir, prefix, target, basename, output_hash_hex = sys.argv[1:]
    sys.path.insert(0, gen_dir)
    names = {
        "castore": "castore.protos.castore_pb2",
        "blob": "castore.protos.rpc_blobstore_pb2",
        "blob_grpc": "castore.protos.rpc_blobstore_pb2_grpc",
        "dir": "castore.protos.rpc_directory_pb2",
        "dir_grpc": "castore.protos.rpc_directory_pb2_grpc",
        "store": "store.protos.pathinfo_pb2",
        "info": "store.protos.rpc_pathinfo_pb2",
        "info_grpc": "store.protos.rpc_pathinfo_pb2_grpc",
    }
    m = SimpleNamespace(**{k: importlib.import_module(f"{prefix}.{v}") for k, v in names.items()})
    out: dict[str, Any] = {}
    with grpc.insecure_channel(target) as channel:
        empty = blobs(m, channel, out)
        keep = directories(m, channel, out, empty)
        pathinfos(m, channel, out, keep, path=(basename, bytes.fromhex(output_hash_hex)))
    print(json.dumps(out))


def blobs(m: SimpleNamespace, channel: grpc.Channel, out: dict[str, Any]) -> bytes:
    """Put, Read and Stat; returns the digest of the empty blob."""
    stub = m.blob_grpc.BlobServiceStub(channel)
    hello = stub.Put(iter([m.blob.BlobChunk(data=b"Hello "), m.blob.BlobChunk(data=b"World!")])).digest
    out["hello_digest"] = hello.hex()
    out["hello_read"] = b"".join(r.data for r in stub.Read(m.blob.ReadBlobRequest(digest=hello))).decode()
    out["hello_chunks"] = len(stub.Stat(m.blob.StatBlobRequest(digest=hello, send_chunks=True)).chunks)
    big = stub.Put(m.blob.BlobChunk(data=BIG[i : i + 65536]) for i in range(0, len(BIG), 65536)).digest
    messages = [r.data for r in stub.Read(m.blob.ReadBlobRequest(digest=big))]
    out["big_digest"] = big.hex()
    out["big_equal"] = b"".join(messages) == BIG
    out["big_largest_message"] = max(len(data) for data in messages)
    out["stat_absent"] = code_of(lambda: stub.Stat(m.blob.StatBlobRequest(digest=bytes(32))))
    out["read_short_digest"] = code_of(lambda: stub.Read(m.blob.ReadBlobRequest(digest=b"x")))
    digest: bytes = stub.Put(iter([])).digest
    return digest


def directories(m: SimpleNamespace, channel: grpc.Channel, out: dict[str, Any], empty: bytes) -> bytes:
    """Put and Get; returns the digest of a directory holding an empty ``.keep``."""
    stub = m.dir_grpc.DirectoryServiceStub(channel)
    keep = m.castore.Directory(files=[m.castore.FileNode(name=b".keep", digest=empty, size=0)])
    keep_digest: bytes = stub.Put(iter([keep])).root_digest
    out["keep_digest"] = keep_digest.hex()
    parent = m.castore.Directory(
        directories=[m.castore.DirectoryNode(name=b"sub", digest=keep_digest, size=1)]
    )
    stub.Put(iter([keep, parent]))
    parent_digest = stub.Put(iter([parent])).root_digest  # the child is stored: allowed alone
    got = list(stub.Get(m.dir.GetDirectoryRequest(digest=parent_digest, recursive=True)))
    out["recursive_is_parent_then_keep"] = got == [parent, keep]
    out["get_one"] = list(stub.Get(m.dir.GetDirectoryRequest(digest=keep_digest))) == [keep]
    dangling = m.castore.Directory(directories=[m.castore.DirectoryNode(name=b"d", digest=bytes(32), size=1)])
    out["put_dangling"] = code_of(lambda: stub.Put(iter([dangling])))
    out["get_absent"] = code_of(lambda: stub.Get(m.dir.GetDirectoryRequest(digest=bytes(32))))
    return keep_digest


def pathinfos(
    m: SimpleNamespace, channel: grpc.Channel, out: dict[str, Any], keep: bytes, path: tuple[str, bytes]
) -> None:
    basename, output_hash = path
    stub = m.info_grpc.PathInfoServiceStub(channel)
    node = m.castore.Node(directory=m.castore.DirectoryNode(name=basename.encode(), digest=keep, size=1))
    nar = stub.CalculateNAR(node)
    out["nar"] = [nar.nar_size, nar.nar_sha256.hex()]
    info = m.store.PathInfo(
        node=node, narinfo=m.store.NARInfo(nar_size=nar.nar_size, nar_sha256=nar.nar_sha256)
    )
    out["put_echo"] = stub.Put(info) == info
    out["get_equal"] = stub.Get(m.info.GetPathInfoRequest(by_output_hash=output_hash)) == info
    out["list"] = [i.node.directory.name.decode() for i in stub.List(m.info.ListPathInfoRequest())]
    out["get_short_hash"] = code_of(lambda: stub.Get(m.info.GetPathInfoRequest(by_output_hash=bytes(19))))
    out["get_absent_info"] = code_of(lambda: stub.Get(m.info.GetPathInfoRequest(by_output_hash=bytes(20))))


if __name__ == "__main__":
    main()
