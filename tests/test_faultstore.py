"""The fault store itself, spoken to with the bare generated stubs: honest by default, each
fault visible on the wire exactly as documented, and honest again after clear()."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from faultstore import (
    ABSURD_SIZE,
    Fault,
    FaultStore,
    Sample,
    put_raw_path,
    put_sample,
    serve_faults,
    spawn_faultstore,
)

from tvixfs.castore.digest import b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.protos import (
    castore_pb2,
    pathinfo_pb2,
    rpc_blobstore_pb2,
    rpc_blobstore_pb2_grpc,
    rpc_directory_pb2,
    rpc_directory_pb2_grpc,
    rpc_pathinfo_pb2,
    rpc_pathinfo_pb2_grpc,
)
from tvixfs.store.storepath import StorePath

DEADLINE = 5  # seconds; every call below has one, so a broken fault store fails instead of hanging


class Wire:
    """The three stubs on one channel to a fault store."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.blobs = rpc_blobstore_pb2_grpc.BlobServiceStub(self.channel)
        self.dirs = rpc_directory_pb2_grpc.DirectoryServiceStub(self.channel)
        self.infos = rpc_pathinfo_pb2_grpc.PathInfoServiceStub(self.channel)

    def read(self, digest: bytes, timeout: float = DEADLINE) -> list[bytes]:
        call = self.blobs.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=digest), timeout=timeout)
        return [m.data for m in call]

    def chunks(self, digest: bytes) -> list[tuple[bytes, int]]:
        request = rpc_blobstore_pb2.StatBlobRequest(digest=digest, send_chunks=True)
        return [(c.digest, c.size) for c in self.blobs.Stat(request, timeout=DEADLINE).chunks]

    def get(self, digest: bytes, recursive: bool = True) -> list[castore_pb2.Directory]:
        request = rpc_directory_pb2.GetDirectoryRequest(digest=digest, recursive=recursive)
        return list(self.dirs.Get(request, timeout=DEADLINE))

    def info(self, path: StorePath) -> pathinfo_pb2.PathInfo:
        request = rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=path.digest)
        return self.infos.Get(request, timeout=DEADLINE)


@pytest.fixture
def faults() -> Iterator[FaultStore]:
    with serve_faults(chunk_size=100_000) as store:
        yield store


@pytest.fixture
def sample(faults: FaultStore) -> Sample:
    return put_sample(faults.store)


@pytest.fixture
def wire(faults: FaultStore) -> Iterator[Wire]:
    w = Wire(faults.target)
    yield w
    w.channel.close()


def digests(messages: list[castore_pb2.Directory]) -> list[bytes]:
    return [b3digest(m.SerializeToString(deterministic=True)) for m in messages]


def test_honest_by_default(faults: FaultStore, sample: Sample, wire: Wire) -> None:
    assert b"".join(wire.read(sample.big)) == sample.blobs[sample.big]
    chunks = wire.chunks(sample.big)
    assert [size for _, size in chunks] == [100_000] * 3
    assert b"".join(b"".join(wire.read(d)) for d, _ in chunks) == sample.blobs[sample.big]
    assert digests(wire.get(sample.directories[0])) == sample.directories
    assert digests(wire.get(sample.directories[1], recursive=False)) == sample.directories[1:2]
    assert wire.info(sample.path).node.directory.name == sample.path.basename.encode()
    with pytest.raises(grpc.RpcError) as e:
        wire.read(b3digest(b"absent"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    put = wire.blobs.Put(iter([rpc_blobstore_pb2.BlobChunk(data=b"new")]), timeout=DEADLINE)
    assert put.digest == b3digest(b"new")
    assert faults.stats()["fired"] == {}


def test_blob_data_faults(faults: FaultStore, sample: Sample, wire: Wire) -> None:
    data = sample.blobs[sample.big]
    faults.set(Fault("corrupt", digest=sample.big, after=1234))
    got = b"".join(wire.read(sample.big))
    assert len(got) == len(data) and got != data and got[1234] != data[1234]
    faults.set(Fault("truncate", after=10))
    assert b"".join(wire.read(sample.big)) == data[:10]
    faults.set(Fault("extra_bytes"))
    assert b"".join(wire.read(sample.big)) == data + b"\0"
    faults.set(Fault("slow", piece=1000, delay=0))
    assert {len(p) for p in wire.read(sample.big)} == {1000}
    faults.set(Fault("reset", after=5000))
    with pytest.raises(grpc.RpcError) as e:
        wire.read(sample.big)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    faults.set(Fault("error", code="DATA_LOSS"))
    with pytest.raises(grpc.RpcError) as e:
        wire.read(sample.big)
    assert e.value.code() == grpc.StatusCode.DATA_LOSS
    faults.clear()
    assert b"".join(wire.read(sample.big)) == data


def test_chunk_list_lies(faults: FaultStore, sample: Sample, wire: Wire) -> None:
    honest = wire.chunks(sample.big)
    faults.set(Fault("chunk_sizes"))
    assert [s for _, s in wire.chunks(sample.big)] == [s + 1 for _, s in honest]
    faults.set(Fault("chunk_swap"))
    assert wire.chunks(sample.big) == honest[::-1]
    faults.set(Fault("absurd_size"))
    assert {s for _, s in wire.chunks(sample.big)} == {ABSURD_SIZE}
    faults.set(Fault("chunk_digests"))
    for digest, _ in wire.chunks(sample.big):
        with pytest.raises(grpc.RpcError) as e:
            wire.read(digest)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # A blob kept whole has no chunk list; a lie about it still needs one.
    faults.clear()
    hello = next(d for d, data in sample.blobs.items() if data.startswith(b"hello"))
    assert wire.chunks(hello) == []
    faults.set(Fault("chunk_swap", digest=hello))
    swapped = wire.chunks(hello)
    assert len(swapped) == 2
    assert b"".join(b"".join(wire.read(d)) for d, _ in swapped) != sample.blobs[hello]


def test_hang_is_released_by_clear_and_by_deadline(faults: FaultStore, sample: Sample, wire: Wire) -> None:
    faults.set(Fault("hang", methods=("blob.read",), after=70_000))
    pieces: list[bytes] = []
    request = rpc_blobstore_pb2.ReadBlobRequest(digest=sample.big)
    with pytest.raises(grpc.RpcError) as e:
        pieces.extend(m.data for m in wire.blobs.Read(request, timeout=0.5))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(b"".join(pieces)) == 70_000  # everything before the stall arrived
    assert wire.chunks(sample.big)  # other methods are not affected
    # A call hung now resumes and completes correctly once the fault is cleared.
    stream = iter(wire.blobs.Read(request, timeout=DEADLINE))
    first = next(stream)
    faults.clear()
    assert first.data + b"".join(m.data for m in stream) == sample.blobs[sample.big]


def test_scope_and_times(faults: FaultStore, sample: Sample, wire: Wire) -> None:
    faults.set(Fault("error", code="UNAVAILABLE", digest=sample.big, times=2))
    hello = next(d for d, data in sample.blobs.items() if data.startswith(b"hello"))
    assert b"".join(wire.read(hello)) == sample.blobs[hello]
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            wire.read(sample.big)
    assert b"".join(wire.read(sample.big)) == sample.blobs[sample.big]
    assert faults.stats()["fired"] == {"error": 2}


@pytest.mark.parametrize(
    ("kind", "broken"),
    [
        ("wrong_directory", "digest"),
        ("bad_name", "invalid"),
        ("duplicate_name", "invalid"),
        ("unsorted", "invalid"),
        ("absurd_size", "digest"),
        ("dir_order", "order"),
        ("dir_duplicate", "duplicate"),
        ("dir_unreferenced", "unreferenced"),
    ],
)
def test_directory_faults(faults: FaultStore, sample: Sample, wire: Wire, kind: str, broken: str) -> None:
    faults.set(Fault(kind, after=1))  # type: ignore[arg-type]
    got = wire.get(sample.directories[0])
    assert got[0] == wire_root(faults, sample)  # the root itself is untouched (position 1)
    if broken == "invalid":
        with pytest.raises(ValidationError):
            Directory.from_proto(got[1])
    elif broken == "digest":
        assert digests(got)[1] != sample.directories[1]
    elif broken == "order":
        assert digests(got) == [sample.directories[0], *sample.directories[:0:-1]]
    elif broken == "duplicate":
        assert digests(got) == [sample.directories[0], sample.directories[1], *sample.directories[1:]]
    else:
        assert len(got) == 4 and digests(got)[2] not in sample.directories
    faults.clear()
    assert digests(wire.get(sample.directories[0])) == sample.directories


def wire_root(faults: FaultStore, sample: Sample) -> castore_pb2.Directory:
    root = faults.store.directories.get(sample.directories[0])
    assert root is not None
    return root.to_proto()


def test_directory_fault_scoped_to_a_subdirectory(faults: FaultStore, sample: Sample, wire: Wire) -> None:
    leaf = sample.directories[2]
    faults.set(Fault("reset", digest=leaf))
    with pytest.raises(grpc.RpcError) as e:
        wire.get(sample.directories[0])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert digests(wire.get(sample.directories[1], recursive=False)) == [sample.directories[1]]


def test_raw_directories_are_served_under_their_digest(faults: FaultStore, wire: Wire) -> None:
    evil = castore_pb2.Directory(symlinks=[castore_pb2.SymlinkNode(name=b"..", target=b"/etc")])
    digest = faults.put_raw_directory(evil)
    parent = castore_pb2.Directory(
        directories=[castore_pb2.DirectoryNode(name=b"sub", digest=digest, size=1)]
    )
    assert digests(wire.get(faults.put_raw_directory(parent))) == [
        b3digest(parent.SerializeToString()),
        digest,
    ]


def test_raw_store_path(faults: FaultStore, wire: Wire) -> None:
    huge = castore_pb2.FileNode(name=b"huge", digest=b3digest(b"tiny"), size=ABSURD_SIZE)
    path = put_raw_path(faults, "hostile", castore_pb2.Directory(files=[huge]))
    info = wire.info(path)
    assert info.node.directory.name == path.basename.encode()
    assert wire.get(info.node.directory.digest) == [castore_pb2.Directory(files=[huge])]


@pytest.mark.parametrize("kind", ["pathinfo_name", "pathinfo_hash", "pathinfo_no_node", "absurd_size"])
def test_pathinfo_faults(faults: FaultStore, sample: Sample, wire: Wire, kind: str) -> None:
    faults.set(Fault(kind, digest=sample.file_path.digest))  # type: ignore[arg-type]
    assert wire.info(sample.path).node.directory.name == sample.path.basename.encode()
    info = wire.info(sample.file_path)
    if kind == "pathinfo_no_node":
        assert not info.HasField("node")
        return
    if kind == "absurd_size":
        assert info.node.file.size == ABSURD_SIZE
        return
    got = StorePath.from_basename(info.node.file.name)
    assert got != sample.file_path
    assert (got.digest == sample.file_path.digest) == (kind == "pathinfo_name")


def test_refuse_then_listen_again_on_the_same_address(faults: FaultStore, sample: Sample, wire: Wire) -> None:
    target = faults.target
    faults.set(Fault("refuse"))
    with pytest.raises(grpc.RpcError) as e:
        wire.read(sample.big)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    faults.clear()
    assert faults.target == target
    request = rpc_blobstore_pb2.ReadBlobRequest(digest=sample.big)
    got = b"".join(m.data for m in wire.blobs.Read(request, timeout=DEADLINE, wait_for_ready=True))
    assert got == sample.blobs[sample.big]


@pytest.mark.parametrize("unix", [False, True])
def test_blackhole_accepts_and_never_answers(short_tmp: Path, unix: bool) -> None:
    address = f"unix:{short_tmp / 'b.sock'}" if unix else "127.0.0.1:0"
    with serve_faults(address=address) as faults:
        sample = put_sample(faults.store)
        wire = Wire(faults.target)
        faults.set(Fault("blackhole"))
        with pytest.raises(grpc.RpcError) as e:
            wire.infos.Get(
                rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=sample.path.digest), timeout=0.5
            )
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        faults.clear()
        request = rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=sample.path.digest)
        assert wire.infos.Get(request, timeout=DEADLINE, wait_for_ready=True).HasField("node")
        wire.channel.close()


def test_unix_socket(short_tmp: Path) -> None:
    with serve_faults(address=f"unix:{short_tmp / 's.sock'}") as faults:
        sample = put_sample(faults.store)
        assert faults.url == f"grpc+unix://{short_tmp / 's.sock'}"
        wire = Wire(faults.target)
        faults.set(Fault("refuse"))
        faults.clear()
        assert wire.info(sample.path).HasField("node")
        wire.channel.close()


@pytest.mark.nix
def test_subprocess_with_a_nar(short_tmp: Path, sample_tree: Path) -> None:
    nar = short_tmp / "sample.nar"
    with nar.open("wb") as out:
        subprocess.run(["nix-store", "--dump", str(sample_tree)], stdout=out, check=True)
    expected = subprocess.run(
        ["nix-store", "--store", f"local?root={short_tmp / 'nix'}", "--add", str(sample_tree)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with spawn_faultstore(short_tmp, nars=[(nar, "sample")]) as faults:
        assert faults.paths == [expected.removeprefix("/nix/store/")]
        wire = Wire(faults.target)
        info = wire.info(StorePath.from_basename(faults.paths[0]))
        root = info.node.directory.digest
        assert len(wire.get(root)) > 20
        faults.set(Fault("reset", methods=("directory.get",)))
        with pytest.raises(grpc.RpcError) as e:
            wire.get(root)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert faults.stats()["fired"] == {"reset": 1}
        evil = castore_pb2.Directory(symlinks=[castore_pb2.SymlinkNode(name=b"a/b", target=b"x")])
        digest = faults.put_raw_directory(evil)
        faults.clear()
        assert wire.get(digest) == [evil]
        wire.channel.close()
