"""``s3://`` stores against a real S3 API (moto's server on 127.0.0.1, tests/s3server.py).

The object layout is checked byte for byte against tvix-store's (keys, zstd chunk objects,
StatBlobResponse blob objects, length-prefixed directory streams); real mounts read a tree
from a bucket; damage in the bucket (a corrupt chunk, a zstd bomb, a truncated directory
stream) fails reads with EIO and never yields wrong bytes; a stopped S3 endpoint costs a read
EIO in bounded time and the same mount recovers; two daemons front one bucket.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import obstore
import pytest
import zstandard
from conftest import make_sample_tree
from grpcserver import running_daemon
from mounting import TVIXFS, mounted, needs_fuse
from s3server import Gate, MotoServer, shared_moto
from test_mount import assert_same_tree

from tvixfs.castore.digest import b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvixfs.protos import pathinfo_pb2, rpc_blobstore_pb2
from tvixfs.services import s3layout
from tvixfs.services.base import Store
from tvixfs.services.errors import CorruptDataError
from tvixfs.services.s3 import open_s3_store
from tvixfs.services.s3url import parse_s3_url
from tvixfs.store import nixbase32
from tvixfs.store.storepath import StorePath

PREFIX = "store"


@pytest.fixture
def moto() -> MotoServer:
    return shared_moto()


@pytest.fixture
def bucket_url(moto: MotoServer) -> str:
    return moto.url(moto.new_bucket(), PREFIX)


@pytest.fixture
def store(bucket_url: str) -> Iterator[Store]:
    opened = open_s3_store(parse_s3_url(bucket_url))
    try:
        yield opened
    finally:
        opened.close()


def raw(moto: MotoServer, url: str, prefix: str | None = PREFIX) -> obstore.store.S3Store:
    """Another client of the same bucket and prefix: reads and overwrites objects as they are."""
    location = parse_s3_url(url)
    return obstore.store.S3Store(
        location.bucket,
        prefix=prefix,
        endpoint=moto.endpoint,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
        client_options={"allow_http": True},
    )


def get_raw(moto: MotoServer, url: str, key: str) -> bytes:
    return obstore.get(raw(moto, url), key).bytes().to_bytes()


def put_raw(moto: MotoServer, url: str, key: str, data: bytes) -> None:
    obstore.put(raw(moto, url), key, data)


# --- layout, byte for byte ---------------------------------------------------------------------


def test_chunk_and_blob_objects_are_tvix_store_s(moto: MotoServer, bucket_url: str, store: Store) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    digest = store.blobs.put([data])
    assert digest == b3digest(data)
    listed = store.blobs.stat(digest, send_chunks=True)
    assert listed is not None and len(listed) > 1
    assert all(s3layout.MIN_CHUNK <= c.size <= s3layout.MAX_CHUNK for c in listed[:-1])
    # The blob object: a StatBlobResponse listing the chunks, not compressed, empty bao.
    blob = get_raw(moto, bucket_url, f"blobs/b3/{digest[:2].hex()}/{digest.hex()}")
    expected = rpc_blobstore_pb2.StatBlobResponse(
        chunks=[rpc_blobstore_pb2.StatBlobResponse.ChunkMeta(digest=c.digest, size=c.size) for c in listed]
    )
    assert blob == expected.SerializeToString()
    # Each chunk object: zstd at the default level of the chunk's bytes, under its own digest.
    at = 0
    for chunk in listed:
        plain = data[at : at + chunk.size]
        at += chunk.size
        assert chunk.digest == b3digest(plain)
        obj = get_raw(moto, bucket_url, f"chunks/b3/{chunk.digest[:2].hex()}/{chunk.digest.hex()}")
        assert obj == zstandard.ZstdCompressor(level=3).compress(plain)
    assert at == len(data)
    # The whole key, prefix included, as any S3 client sees it.
    first = listed[0].digest
    whole_key = f"{PREFIX}/chunks/b3/{first[:2].hex()}/{first.hex()}"
    obj = obstore.get(raw(moto, bucket_url, None), whole_key).bytes().to_bytes()
    assert obj[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    assert b"".join(store.blobs.read(digest)) == data


def test_a_single_chunk_blob_is_stored_once_under_chunks(
    moto: MotoServer, bucket_url: str, store: Store
) -> None:
    data = b"Hello World!"
    digest = store.blobs.put([data])
    key = f"{digest[:2].hex()}/{digest.hex()}"
    assert get_raw(moto, bucket_url, f"chunks/b3/{key}") == zstandard.ZstdCompressor().compress(data)
    assert get_raw(moto, bucket_url, f"blobs/b3/{key}") == b""  # StatBlobResponse with no chunks
    assert store.blobs.stat(digest) == []
    assert b"".join(store.blobs.read(digest)) == data


def test_a_directory_tree_is_one_length_prefixed_zstd_stream(
    moto: MotoServer, bucket_url: str, store: Store
) -> None:
    blob = store.blobs.put([b"x"])
    leaf = Directory(files=(FileNode(b"f", blob, 1),))
    mid = Directory(directories=(DirectoryNode(b"leaf", leaf.digest(), leaf.size()),))
    root = Directory(
        directories=(
            DirectoryNode(b"a", mid.digest(), mid.size()),
            DirectoryNode(b"b", leaf.digest(), leaf.size()),
        ),
        symlinks=(SymlinkNode(b"l", b"a"),),
    )
    assert store.directories.put_many([leaf, mid, root]) == root.digest()
    obj = get_raw(moto, bucket_url, f"dirs/b3/{root.digest()[:2].hex()}/{root.digest().hex()}")
    assert obj[:4] == b"\x28\xb5\x2f\xfd"
    frames = b"".join(struct.pack(">I", len(d.to_bytes())) + d.to_bytes() for d in (root, mid, leaf))
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(obj)).read() == frames
    # Only the root is addressable, as in tvix; a subdirectory comes with its root's tree.
    for sub in (mid, leaf):
        key = f"dirs/b3/{sub.digest()[:2].hex()}/{sub.digest().hex()}"
        with pytest.raises(FileNotFoundError):
            get_raw(moto, bucket_url, key)
    assert list(store.directories.get_recursive(root.digest())) == [root, mid, leaf]


def test_a_path_info_is_one_protobuf_per_store_path_hash(
    moto: MotoServer, bucket_url: str, store: Store
) -> None:
    path = StorePath(b"\x01" * 20, "link")
    info = pathinfo_pb2.PathInfo(
        node={"symlink": {"name": path.basename.encode(), "target": b"/nix/store/elsewhere"}},
        narinfo=pathinfo_pb2.NARInfo(nar_size=120, nar_sha256=bytes(32)),
    )
    store.pathinfos.put(info)
    obj = get_raw(moto, bucket_url, f"pathinfos/{nixbase32.encode(path.digest)}")
    assert obj == info.SerializeToString(deterministic=True)
    store.pathinfos.put(info)  # identical: a no-op


# --- damage in the bucket ----------------------------------------------------------------------


def _chunks_of(store: Store, data: bytes) -> tuple[bytes, list[tuple[bytes, int]]]:
    digest = store.blobs.put([data])
    listed = store.blobs.stat(digest, send_chunks=True)
    assert listed
    return digest, [(c.digest, c.size) for c in listed]


def test_a_zstd_bomb_fails_the_read(moto: MotoServer, bucket_url: str, store: Store) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest, chunks = _chunks_of(store, data)
    last, size = chunks[-1]
    bomb = zstandard.ZstdCompressor().compress(bytes(size + 64 * 1024 * 1024))
    put_raw(moto, bucket_url, s3layout.chunk_key(last), bomb)
    fresh = open_s3_store(parse_s3_url(bucket_url))
    try:
        got = bytearray()
        with pytest.raises(CorruptDataError, match="inflates past"):
            for piece in fresh.blobs.read(digest):
                got += piece
        assert data.startswith(got) and len(got) < len(data)  # nothing wrong was yielded
        with pytest.raises(CorruptDataError, match="inflates past"):
            b"".join(fresh.blobs.read(last))
    finally:
        fresh.close()


def test_a_corrupt_chunk_object_is_refused(moto: MotoServer, bucket_url: str, store: Store) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest, chunks = _chunks_of(store, data)
    first, size = chunks[0]
    wrong = bytearray(data[:size])
    wrong[100] ^= 1
    put_raw(moto, bucket_url, s3layout.chunk_key(first), zstandard.ZstdCompressor().compress(bytes(wrong)))
    with pytest.raises(CorruptDataError, match="does not match its digest"):
        next(iter(store.blobs.read(digest)))


def import_tree(url: str, path: Path, name: str) -> str:
    args = [*TVIXFS, "import", "--store", url, "--name", name, str(path)]
    printed = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return StorePath.from_absolute(printed.strip()).basename


@needs_fuse
def test_a_mount_reads_a_tree_from_s3(bucket_url: str, short_tmp: Path, tmp_path: Path) -> None:
    sample = make_sample_tree(tmp_path / "sample")
    basename = import_tree(bucket_url, sample, "sample")
    with mounted(TVIXFS, short_tmp, bucket_url, ["--list-root"]) as m:
        assert os.listdir(m.mountpoint) == [basename]
        assert assert_same_tree(bytes(sample), bytes(m.path(basename))) > 30


@needs_fuse
@pytest.mark.expect_errors
def test_damage_in_the_bucket_fails_reads_with_eio(
    moto: MotoServer, bucket_url: str, short_tmp: Path, tmp_path: Path
) -> None:
    sample = make_sample_tree(tmp_path / "sample")
    (sample / "sub").mkdir()
    (sample / "sub" / "file").write_bytes(b"in a subdirectory\n")
    basename = import_tree(bucket_url, sample, "sample")
    other = make_sample_tree(tmp_path / "other")
    other_base = import_tree(bucket_url, other, "other")
    with mounted(TVIXFS, short_tmp, bucket_url) as m:
        store = open_s3_store(parse_s3_url(bucket_url))
        try:
            info = store.pathinfos.get(StorePath.from_basename(basename).digest)
            other_info = store.pathinfos.get(StorePath.from_basename(other_base).digest)
            assert info is not None and other_info is not None
            top = store.directories.get(info.node.directory.digest)
            assert top is not None
            large = next(f for f in top.files if f.name == b"large.bin")
            chunks = store.blobs.stat(large.digest, send_chunks=True)
            assert chunks
        finally:
            store.close()
        # A chunk whose bytes are not those of its digest: EIO, never wrong bytes.
        first = chunks[0]
        plain = (sample / "large.bin").read_bytes()[: first.size]
        wrong = bytes([plain[0] ^ 1]) + plain[1:]
        put_raw(
            moto, bucket_url, s3layout.chunk_key(first.digest), zstandard.ZstdCompressor().compress(wrong)
        )
        with pytest.raises(OSError) as caught:
            m.path(basename, "large.bin").read_bytes()
        assert caught.value.errno == errno.EIO
        # A directory stream cut short, before the mount saw it: the tree is refused (EIO).
        root = other_info.node.directory.digest
        key = s3layout.dir_key(root)
        frames = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(get_raw(moto, bucket_url, key))).read()
        put_raw(moto, bucket_url, key, zstandard.ZstdCompressor().compress(frames[: len(frames) - 7]))
        with pytest.raises(OSError) as caught:
            os.listdir(m.path(other_base))
        assert caught.value.errno == errno.EIO
        assert "truncated" in m.stderr()
        # The undamaged parts still read.
        assert m.path(basename, "sub", "file").read_bytes() == b"in a subdirectory\n"


@needs_fuse
@pytest.mark.expect_errors
def test_a_stopped_endpoint_fails_reads_in_bounded_time_and_the_mount_recovers(
    moto: MotoServer, short_tmp: Path, tmp_path: Path
) -> None:
    bucket = moto.new_bucket()
    sample = make_sample_tree(tmp_path / "sample")
    basename = import_tree(moto.url(bucket, PREFIX), sample, "sample")
    gate = Gate(moto.port)
    try:
        url = f"s3://{bucket}/{PREFIX}?endpoint={gate.endpoint}"
        with mounted(TVIXFS, short_tmp, url) as m:
            assert m.path(basename, "share", "doc", "README").read_bytes() == b"read me\n" * 100
            gate.close()
            start = time.monotonic()
            with pytest.raises(OSError) as caught:
                m.path(basename, "large.bin").read_bytes()
            assert caught.value.errno == errno.EIO
            assert time.monotonic() - start < 60
            gate.open()
            time.sleep(1.5)  # the mount remembers a failed fetch for a second
            assert m.path(basename, "large.bin").read_bytes() == (sample / "large.bin").read_bytes()
    finally:
        gate.close()


@needs_fuse
def test_two_daemons_front_one_bucket(bucket_url: str, short_tmp: Path, tmp_path: Path) -> None:
    sample = make_sample_tree(tmp_path / "sample")
    (short_tmp / "a").mkdir()
    (short_tmp / "b").mkdir()
    with (
        running_daemon(TVIXFS, short_tmp / "a", store=bucket_url) as first,
        running_daemon(TVIXFS, short_tmp / "b", store=bucket_url) as second,
    ):
        basename = import_tree(first.url, sample, "sample")
        with mounted(TVIXFS, short_tmp, second.url) as m:
            assert assert_same_tree(bytes(sample), bytes(m.path(basename))) > 30
