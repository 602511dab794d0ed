"""The FUSE request handlers called directly under trio, without a kernel: fast coverage of
what the mount answers (names, attributes, listings, bytes, xattrs, errors, forget)."""

from __future__ import annotations

import base64
import copy
import errno
import os
import random
import stat
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from tvixfs.castore.digest import EMPTY_DIGEST, format_digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import FileNode, Node
from tvixfs.cli.mount_cmd import parse_size
from tvixfs.fs.ops import FsOptions, TvixOperations
from tvixfs.importers.ingest import ingest_path
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.base import BlobService, ChunkMeta, DirectoryService, PathInfoService, Store
from tvixfs.services.errors import StoreUnavailableError
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.storepath import STORE_DIR, StorePath, source_store_path

ROOT = pyfuse3.ROOT_INODE
CTX = pyfuse3.RequestContext()
KERNEL_READ = 128 * 1024


class WatchedBlobs(BlobService):
    """A real blob service seen through a window: counts reads, can damage or lose chunks."""

    def __init__(self, inner: BlobService) -> None:
        self.inner = inner
        self.reads: Counter[bytes] = Counter()
        self.damaged: set[bytes] = set()
        self.lost: set[bytes] = set()

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        return self.inner.stat(digest, send_chunks)

    def read(self, digest: bytes) -> Iterator[bytes]:
        self.reads[digest] += 1
        if digest in self.lost:
            return self.inner.read(bytes(32))  # NotFoundError, as for any absent blob
        data = b"".join(self.inner.read(digest))
        if digest in self.damaged:
            data = bytes([data[0] ^ 1]) + data[1:]
        return iter([data[: len(data) // 2], data[len(data) // 2 :]])

    def put(self, data: Iterable[bytes]) -> bytes:
        return self.inner.put(data)


class FlakyPathInfos(PathInfoService):
    """A real path info service that can be switched to 'unreachable' (whole or for some
    paths); counts gets."""

    def __init__(self, inner: PathInfoService) -> None:
        self.inner = inner
        self.down = False
        self.broken: set[bytes] = set()  # output hashes whose gets fail
        self.gets = 0
        self.asked: Counter[bytes] = Counter()

    def get(self, output_hash: bytes) -> pathinfo_pb2.PathInfo | None:
        self.gets += 1
        self.asked[output_hash] += 1
        if self.down or output_hash in self.broken:
            raise StoreUnavailableError("connection refused")
        return self.inner.get(output_hash)

    def put(self, info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        return self.inner.put(info)

    def list(self) -> Iterator[pathinfo_pb2.PathInfo]:
        return self.inner.list()

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return self.inner.calculate_nar(node)


@dataclass
class Buffer:
    """Stands in for the kernel's readdir buffer: takes ``room`` entries, then refuses."""

    room: int
    entries: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = field(default_factory=list)

    def add(self, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if len(self.entries) >= self.room:
            return False
        # A copy, as the kernel's buffer takes one: readdir fills one object for every entry.
        self.entries.append((name, copy.copy(attrs), next_id))
        return True


def _reply(token: Buffer, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
    return token.add(name, attrs, next_id)


class Fs:
    """The operations plus the few request sequences the kernel would send."""

    def __init__(self, store: Store, nursery: trio.Nursery, options: FsOptions) -> None:
        self.invalidated: list[tuple[int, bytes]] = []  # entries the kernel was asked to drop
        self.ops = TvixOperations(
            store,
            nursery,
            options,
            readdir_reply=_reply,  # type: ignore[arg-type]
            invalidate=lambda parent, name: self.invalidated.append((parent, name)),
        )

    async def walk(self, *names: bytes) -> pyfuse3.EntryAttributes:
        attrs = await self.ops.getattr(ROOT, CTX)
        for name in names:
            attrs = await self.ops.lookup(attrs.st_ino, name, CTX)
            assert attrs.st_ino, f"{name!r} not found"
        return attrs

    async def read(self, ino: int, offset: int = 0, size: int | None = None) -> bytes:
        """As the kernel reads a file: opened by request, or by itself (fs/noopen.py), when
        reads name the inode and nothing is released."""
        fh = ino if self.ops.no_open else (await self.ops.open(ino, os.O_RDONLY, CTX)).fh
        try:
            if size is not None:
                return await self.ops.read(fh, offset, size)
            pieces = []
            while piece := await self.ops.read(fh, offset, KERNEL_READ):
                pieces.append(piece)
                offset += len(piece)
            return b"".join(pieces)
        finally:
            if not self.ops.no_open:
                await self.ops.release(fh)

    async def listdir(self, ino: int, room: int) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        opened = await self.ops.opendir(ino, CTX)
        # A FileInfo holding the handle where pyfuse3 takes one (tvixfs/fs/dircache.py).
        fh = getattr(opened, "fh", opened)
        listed: list[tuple[bytes, pyfuse3.EntryAttributes]] = []
        cookie = 0
        try:
            while True:
                buffer = Buffer(room)
                await self.ops.readdir(fh, cookie, buffer)  # type: ignore[arg-type]
                if not buffer.entries:
                    return listed
                listed += [(name, attrs) for name, attrs, _ in buffer.entries]
                cookie = buffer.entries[-1][2]
        finally:
            await self.ops.releasedir(fh)


@pytest.fixture(params=[True, False], ids=["kernel-opens", "open-requests"])
async def make_fs(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Fs]]:
    """Both ways a kernel opens files: by itself (where pyfuse3 offers ``no_open``, as on
    this project's patched build), or by asking (a stock pyfuse3, an older kernel)."""
    async with trio.open_nursery() as nursery:

        def make(store: Store, **options: object) -> Fs:
            fs = Fs(store, nursery, FsOptions(**options))  # type: ignore[arg-type]
            fs.ops.no_open = request.param  # as pyfuse3 sets it at mount
            return fs

        yield make
        nursery.cancel_scope.cancel()


def import_tree(store: Store, path: Path, name: str) -> tuple[bytes, pathinfo_pb2.PathInfo]:
    info = ingest_path(store, path, name)
    store_path, _ = validate_pathinfo(info)
    return store_path.basename.encode(), info


@pytest.fixture
def memory_store() -> Iterator[Store]:
    store = open_memory_store()
    yield store
    store.close()


@pytest.fixture
def local_store(tmp_path: Path) -> Iterator[Store]:
    store = open_local_store(tmp_path / "store")
    yield store
    store.close()


def _expect_errno(code: int) -> Any:
    return pytest.raises(pyfuse3.FUSEError, check=lambda e: e.errno == code)


async def test_attributes_are_those_of_a_nix_store(make_fs, memory_store, sample_tree):
    base, _ = import_tree(memory_store, sample_tree, "sample")
    fs = make_fs(memory_store)

    root = await fs.walk(base)
    assert stat.S_IFMT(root.st_mode) == stat.S_IFDIR and stat.S_IMODE(root.st_mode) == 0o555
    hello = await fs.walk(base, b"bin", b"hello")
    assert stat.S_ISREG(hello.st_mode) and stat.S_IMODE(hello.st_mode) == 0o555
    readme = await fs.walk(base, b"share", b"doc", b"README")
    assert stat.S_IMODE(readme.st_mode) == 0o444
    assert readme.st_size == (sample_tree / "share/doc/README").stat().st_size
    assert readme.st_blocks == (readme.st_size + 511) // 512
    assert (readme.st_uid, readme.st_gid, readme.st_nlink) == (0, 0, 1)
    assert readme.st_mtime_ns == readme.st_ctime_ns == readme.st_atime_ns == 1_000_000_000
    link = await fs.walk(base, b"link-to-readme")
    assert stat.S_ISLNK(link.st_mode) and stat.S_IMODE(link.st_mode) == 0o777
    assert await fs.ops.readlink(link.st_ino, CTX) == b"share/doc/README"
    assert link.st_size == len(b"share/doc/README")
    assert await fs.ops.readlink((await fs.walk(base, b"dangling")).st_ino, CTX) == b"does/not/exist"
    odd = await fs.walk(base, b"non-utf8-\xff\xfe")
    assert await fs.read(odd.st_ino) == b"latin1 name\n"
    # A directory whose listing is known counts its links as a real file system does.
    share = await fs.walk(base, b"share")
    assert (await fs.ops.getattr(share.st_ino, CTX)).st_nlink == 3
    assert (await fs.ops.getattr(hello.st_ino, CTX)).st_size == hello.st_size
    with _expect_errno(errno.EINVAL):
        await fs.ops.readlink(hello.st_ino, CTX)


async def test_missing_names_are_cached_negative_entries(make_fs, memory_store, sample_tree):
    base, _ = import_tree(memory_store, sample_tree, "sample")
    fs = make_fs(memory_store, negative_ttl=1.5)
    other_name = base.split(b"-", 1)[0] + b"-other"
    absent = b"00bgd045z0d4icpbc2yyz4gx48ak44la-absent"
    for name in (absent, other_name, b"e" * 32 + b"-bad-hash", b"not-a-store-path", b".hidden", b"x" * 255):
        attrs = await fs.ops.lookup(ROOT, name, CTX)
        assert attrs.st_ino == 0, name
        assert attrs.entry_timeout == 1.5
    # Inside a store path nothing ever appears: the kernel may remember the absence for good.
    inside = await fs.ops.lookup((await fs.walk(base)).st_ino, b"nope", CTX)
    assert inside.st_ino == 0 and inside.entry_timeout >= 1e8
    with _expect_errno(errno.ENOTDIR):
        await fs.ops.lookup((await fs.walk(base, b"empty-file")).st_ino, b"x", CTX)


async def test_equal_files_share_an_inode_equal_directories_do_not(make_fs, memory_store, tmp_path):
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "b").mkdir()
    for d in ("a", "b"):
        (tree / d / "same").write_bytes(b"same bytes\n")
    (tree / "exe").write_bytes(b"same bytes\n")
    (tree / "exe").chmod(0o755)
    base, _ = import_tree(memory_store, tree, "dedup")
    fs = make_fs(memory_store)
    a = await fs.walk(base, b"a")
    b = await fs.walk(base, b"b")
    # Same digest, but the kernel allows a directory one name only: an inode per place.
    assert a.st_ino != b.st_ino
    assert a.st_ino == (await fs.walk(base, b"a")).st_ino
    listed = dict(await fs.listdir((await fs.walk(base)).st_ino, 1000))
    assert listed[b"a"].st_ino == a.st_ino and listed[b"b"].st_ino == b.st_ino
    assert (await fs.walk(base, b"a", b"same")).st_ino == (await fs.walk(base, b"b", b"same")).st_ino
    exe = await fs.walk(base, b"exe")
    assert exe.st_ino != (await fs.walk(base, b"a", b"same")).st_ino
    assert stat.S_IMODE(exe.st_mode) == 0o555


@pytest.mark.parametrize("room", [1, 2, 7, 1000])
async def test_readdir_in_small_buffers_lists_each_entry_once(make_fs, memory_store, sample_tree, room):
    base, _ = import_tree(memory_store, sample_tree, "sample")
    fs = make_fs(memory_store)
    top = await fs.walk(base)
    before = fs.ops.inode_count
    listed = await fs.listdir(top.st_ino, room)
    names = [name for name, _ in listed]
    assert names == sorted(os.listdir(os.fsencode(sample_tree)))
    by_name = dict(listed)
    assert stat.S_ISLNK(by_name[b"dangling"].st_mode)
    assert by_name[b"large.bin"].st_size == (sample_tree / "large.bin").stat().st_size
    # Each accepted entry was a lookup; forgetting each once drops what the listing added.
    await fs.ops.forget([(attrs.st_ino, 1) for _, attrs in listed])
    assert fs.ops.inode_count == before


async def test_root_listing_needs_list_root(make_fs, memory_store, sample_tree, tmp_path):
    names = sorted(import_tree(memory_store, sample_tree, f"sample-{i}")[0] for i in range(2))
    (tmp_path / "one-file").write_bytes(b"a store path that is a single file\n")
    names = sorted([*names, import_tree(memory_store, tmp_path / "one-file", "one-file")[0]])
    with _expect_errno(errno.EPERM):
        await make_fs(memory_store).listdir(ROOT, 10)
    listed = await make_fs(memory_store, list_root=True).listdir(ROOT, 2)
    assert [name for name, _ in listed] == names
    kinds = {name: stat.S_IFMT(attrs.st_mode) for name, attrs in listed}
    assert sorted(kinds.values()) == [stat.S_IFDIR, stat.S_IFDIR, stat.S_IFREG]


async def test_reads_across_chunk_boundaries(make_fs, local_store, sample_tree):
    base, _ = import_tree(local_store, sample_tree, "sample")
    fs = make_fs(local_store)
    large = (sample_tree / "large.bin").read_bytes()
    attrs = await fs.walk(base, b"large.bin")
    chunks = local_store.blobs.stat(_blob_digest(local_store, base, b"large.bin"), send_chunks=True)
    assert chunks is not None and len(chunks) > 3, "the sample file should span several chunks"
    boundaries = []
    offset = 0
    for chunk in chunks[:-1]:
        offset += chunk.size
        boundaries.append(offset)
    assert await fs.read(attrs.st_ino) == large
    rng = random.Random(4)
    ranges = [(b - 10, 20) for b in boundaries] + [(b - 1, 2 * chunks[1].size + 2) for b in boundaries[:2]]
    ranges += [(rng.randrange(len(large)), rng.randrange(1, 300_000)) for _ in range(30)]
    ranges += [(len(large) - 5, 100), (len(large), 10), (len(large) + 100, 10), (0, 0)]
    for offset, size in ranges:
        assert await fs.read(attrs.st_ino, offset, size) == large[offset : offset + size], (offset, size)
    repetitive = await fs.walk(base, b"repetitive.bin")
    assert await fs.read(repetitive.st_ino) == (sample_tree / "repetitive.bin").read_bytes()
    assert await fs.read((await fs.walk(base, b"empty-file")).st_ino) == b""


def _blob_digest(store: Store, base: bytes, *names: bytes) -> bytes:
    info = store.pathinfos.get(StorePath.from_basename(base).digest)
    assert info is not None
    directory = store.directories.get(info.node.directory.digest)
    for name in names[:-1]:
        assert directory is not None
        (node,) = [d for d in directory.directories if d.name == name]
        directory = store.directories.get(node.digest)
    assert directory is not None
    (file,) = [f for f in directory.files if f.name == names[-1]]
    return file.digest


async def test_parallel_reads_fetch_each_chunk_once(make_fs, local_store, sample_tree):
    base, _ = import_tree(local_store, sample_tree, "sample")
    watched = WatchedBlobs(local_store.blobs)
    fs = make_fs(Store(watched, local_store.directories, local_store.pathinfos))
    attrs = await fs.walk(base, b"large.bin")
    large = (sample_tree / "large.bin").read_bytes()
    results: dict[int, bytes] = {}

    async def read_at(offset: int) -> None:
        results[offset] = await fs.read(attrs.st_ino, offset, KERNEL_READ)

    async with trio.open_nursery() as nursery:
        for offset in range(0, len(large), KERNEL_READ // 2):
            for _ in range(3):
                nursery.start_soon(read_at, offset)
    assert all(data == large[o : o + KERNEL_READ] for o, data in results.items())
    assert watched.reads and max(watched.reads.values()) == 1
    assert f"fetched {len(watched.reads)} chunks" in fs.ops.status()


@pytest.mark.expect_errors  # each EIO is logged as one ERROR line
async def test_a_damaged_or_missing_chunk_fails_only_its_reads(make_fs, local_store, sample_tree):
    base, _ = import_tree(local_store, sample_tree, "sample")
    watched = WatchedBlobs(local_store.blobs)
    fs = make_fs(Store(watched, local_store.directories, local_store.pathinfos), cache_bytes=0)
    large = (sample_tree / "large.bin").read_bytes()
    chunks = local_store.blobs.stat(_blob_digest(local_store, base, b"large.bin"), send_chunks=True)
    assert chunks is not None and len(chunks) > 2
    attrs = await fs.walk(base, b"large.bin")
    second = chunks[0].size
    for broken in (watched.damaged, watched.lost):
        broken.add(chunks[1].digest)
        with _expect_errno(errno.EIO):
            await fs.read(attrs.st_ino, second, 10)
        with _expect_errno(errno.EIO):
            await fs.read(attrs.st_ino)
        # The chunks around it, and other files, still read.
        assert await fs.read(attrs.st_ino, 0, 10) == large[:10]
        assert (
            await fs.read(attrs.st_ino, second + chunks[1].size, 10)
            == large[second + chunks[1].size : second + chunks[1].size + 10]
        )
        readme = await fs.walk(base, b"share", b"doc", b"README")
        assert await fs.read(readme.st_ino) == (sample_tree / "share/doc/README").read_bytes()
        # Nothing bad was kept: once the store is healthy again, so is the file.
        broken.clear()
        assert await fs.read(attrs.st_ino) == large


@pytest.mark.expect_errors  # each EIO is logged as one ERROR line
async def test_an_unchunked_blob_is_verified_as_a_whole(make_fs, memory_store, sample_tree):
    base, _ = import_tree(memory_store, sample_tree, "sample")
    watched = WatchedBlobs(memory_store.blobs)
    fs = make_fs(Store(watched, memory_store.directories, memory_store.pathinfos), cache_bytes=1 << 20)
    large = (sample_tree / "large.bin").read_bytes()
    attrs = await fs.walk(base, b"large.bin")
    digest = _blob_digest(memory_store, base, b"large.bin")
    # Larger than the cache: still fetched once per open, not once per kernel read.
    assert await fs.read(attrs.st_ino) == large
    assert watched.reads[digest] == 1
    watched.damaged.add(digest)
    if fs.ops.no_open:
        # The state of reading a file opened by the kernel itself lasts as long as its inode
        # (fs/noopen.py): the next reader is one that comes after the kernel forgot it.
        await fs.ops.forget([(attrs.st_ino, 1)])
        attrs = await fs.walk(base, b"large.bin")
    with _expect_errno(errno.EIO):
        await fs.read(attrs.st_ino, len(large) - 10, 10)


async def test_extended_attributes(make_fs, memory_store, sample_tree):
    base, info = import_tree(memory_store, sample_tree, "sample")
    fs = make_fs(memory_store)
    top = await fs.walk(base)
    names = set(await fs.ops.listxattr(top.st_ino, CTX))
    assert names == {
        b"user.tvix.castore.directory.digest",
        b"user.tvixfs.store_path",
        b"user.tvixfs.nar_hash",
    }
    assert await fs.ops.getxattr(top.st_ino, b"user.tvixfs.store_path", CTX) == b"/nix/store/" + base
    sri = b"sha256-" + base64.b64encode(info.narinfo.nar_sha256)
    assert await fs.ops.getxattr(top.st_ino, b"user.tvixfs.nar_hash", CTX) == sri
    digest = await fs.ops.getxattr(top.st_ino, b"user.tvix.castore.directory.digest", CTX)
    assert digest == format_digest(info.node.directory.digest).encode()
    readme = await fs.walk(base, b"share", b"doc", b"README")
    assert await fs.ops.listxattr(readme.st_ino, CTX) == [b"user.tvix.castore.blob.digest"]
    value = await fs.ops.getxattr(readme.st_ino, b"user.tvix.castore.blob.digest", CTX)
    assert value == format_digest(_blob_digest(memory_store, base, b"share", b"doc", b"README")).encode()
    assert value.startswith(b"b3:") and len(base64.b64decode(value[3:])) == 32
    with _expect_errno(pyfuse3.ENOATTR):
        await fs.ops.getxattr(readme.st_ino, b"user.tvixfs.store_path", CTX)
    assert await fs.ops.listxattr(ROOT, CTX) == []
    hidden = make_fs(memory_store, show_xattr=False)
    with _expect_errno(errno.ENOSYS):
        await hidden.ops.listxattr((await hidden.walk(base)).st_ino, CTX)


async def test_everything_that_writes_is_refused(make_fs, memory_store, sample_tree):
    base, _ = import_tree(memory_store, sample_tree, "sample")
    fs = make_fs(memory_store)
    top = (await fs.walk(base)).st_ino
    readme = (await fs.walk(base, b"share", b"doc", b"README")).st_ino
    attempts = [
        fs.ops.open(readme, os.O_WRONLY, CTX),
        fs.ops.open(readme, os.O_RDWR, CTX),
        fs.ops.open(readme, os.O_RDONLY | os.O_TRUNC, CTX),
        fs.ops.mkdir(top, b"new", 0o755, CTX),
        fs.ops.mknod(top, b"new", stat.S_IFREG | 0o644, 0, CTX),
        fs.ops.create(top, b"new", 0o644, os.O_WRONLY, CTX),
        fs.ops.unlink(top, b"empty-file", CTX),
        fs.ops.rmdir(top, b"empty-dir", CTX),
        fs.ops.symlink(top, b"new", b"target", CTX),
        fs.ops.rename(top, b"empty-file", top, b"moved", 0, CTX),
        fs.ops.link(readme, top, b"hard", CTX),
        fs.ops.setattr(readme, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, CTX),
        fs.ops.setxattr(readme, b"user.x", b"1", CTX),
        fs.ops.removexattr(readme, b"user.x", CTX),
        fs.ops.write(1, 0, b"x"),
    ]
    for attempt in attempts:
        with _expect_errno(errno.EROFS):
            await attempt
    assert not await fs.ops.access(readme, os.W_OK, CTX)
    assert await fs.ops.access(readme, os.R_OK, CTX)


@pytest.mark.expect_errors  # each EIO is logged as one ERROR line
async def test_store_failures_are_eio_and_not_remembered(make_fs, memory_store, sample_tree):
    base, _ = import_tree(memory_store, sample_tree, "sample")
    flaky = FlakyPathInfos(memory_store.pathinfos)
    fs = make_fs(Store(memory_store.blobs, memory_store.directories, flaky))
    flaky.down = True
    with _expect_errno(errno.EIO):
        await fs.ops.lookup(ROOT, base, CTX)
    flaky.down = False
    assert (await fs.ops.lookup(ROOT, base, CTX)).st_ino
    assert fs.ops.failures == 1


async def test_concurrent_lookups_of_one_store_path_ask_once(make_fs, memory_store, sample_tree):
    base, _ = import_tree(memory_store, sample_tree, "sample")
    flaky = FlakyPathInfos(memory_store.pathinfos)
    fs = make_fs(Store(memory_store.blobs, memory_store.directories, flaky))
    found: list[int] = []

    async def lookup() -> None:
        found.append((await fs.ops.lookup(ROOT, base, CTX)).st_ino)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(lookup)
    assert len(set(found)) == 1 and found[0]
    assert flaky.gets == 1


@pytest.mark.expect_errors  # each EIO is logged as one ERROR line
async def test_forget_drops_inodes_and_numbers_are_never_reused(make_fs, memory_store, sample_tree):
    base, _ = import_tree(memory_store, sample_tree, "sample")
    fs = make_fs(memory_store)
    top = await fs.walk(base)
    first = await fs.ops.lookup(top.st_ino, b"empty-file", CTX)
    again = await fs.ops.lookup(top.st_ino, b"empty-file", CTX)
    assert first.st_ino == again.st_ino
    count = fs.ops.inode_count
    await fs.ops.forget([(first.st_ino, 1)])
    assert fs.ops.inode_count == count
    await fs.ops.forget([(first.st_ino, 1)])
    assert fs.ops.inode_count == count - 1
    with _expect_errno(errno.EIO):  # the kernel never asks for a forgotten inode; if it did
        await fs.ops.getattr(first.st_ino, CTX)
    later = await fs.ops.lookup(top.st_ino, b"empty-file", CTX)
    assert later.st_ino > max(first.st_ino, top.st_ino)


async def test_reading_state_ends_with_the_release_or_with_the_inode(make_fs, memory_store, sample_tree):
    base, _ = import_tree(memory_store, sample_tree, "sample")
    fs = make_fs(memory_store)
    readme = await fs.walk(base, b"share", b"doc", b"README")
    assert await fs.read(readme.st_ino) == (sample_tree / "share/doc/README").read_bytes()
    # Opened by the kernel itself (fs/noopen.py), nothing is released: the state is kept
    # for the next read until the kernel forgets the inode.
    assert fs.ops.open_files == (1 if fs.ops.no_open else 0)
    await fs.ops.forget([(readme.st_ino, 1)])
    assert fs.ops.open_files == 0


async def test_a_store_path_can_be_a_single_file(make_fs, memory_store, tmp_path):
    (tmp_path / "script").write_bytes(b"#!/bin/sh\necho single\n")
    (tmp_path / "script").chmod(0o755)
    base, _ = import_tree(memory_store, tmp_path / "script", "script")
    fs = make_fs(memory_store)
    attrs = await fs.walk(base)
    assert stat.S_ISREG(attrs.st_mode) and stat.S_IMODE(attrs.st_mode) == 0o555
    assert await fs.read(attrs.st_ino) == b"#!/bin/sh\necho single\n"
    assert b"user.tvixfs.store_path" in await fs.ops.listxattr(attrs.st_ino, CTX)


class StrayDirectories(DirectoryService):
    """A real directory service whose recursive answers carry one directory nobody asked for."""

    def __init__(self, inner: DirectoryService) -> None:
        self.inner = inner

    def get(self, digest: bytes) -> Directory | None:
        return self.inner.get(digest)

    def get_recursive(self, digest: bytes) -> Iterator[Directory]:
        yield from self.inner.get_recursive(digest)
        yield Directory(files=(FileNode(b"stray", EMPTY_DIGEST, 0),))

    def put_many(self, directories: Iterable[Directory]) -> bytes:
        return self.inner.put_many(directories)


@pytest.mark.expect_errors  # each EIO is logged as one ERROR line
async def test_a_directory_nobody_referred_to_fails_the_listing(make_fs, memory_store, sample_tree):
    base, _ = import_tree(memory_store, sample_tree, "sample")
    fs = make_fs(
        Store(memory_store.blobs, StrayDirectories(memory_store.directories), memory_store.pathinfos)
    )
    top = await fs.walk(base)
    with _expect_errno(errno.EIO):  # opendir: over a store in this process, what fetches subtrees
        await fs.ops.opendir(top.st_ino, CTX)


def test_cache_size_takes_binary_suffixes() -> None:
    assert parse_size("256M") == 256 << 20
    assert parse_size("1g") == 1 << 30
    assert parse_size("512KiB") == 512 << 10
    assert parse_size("1048576") == 1 << 20
    for bad in ("", "12X", "-1M", "1.5G"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


def _distinct_files(root: Path, count: int) -> Path:
    """A tree ``d/f00 …`` of files with distinct content: one inode each."""
    (root / "tree" / "d").mkdir(parents=True)
    for i in range(count):
        (root / "tree" / "d" / f"f{i:02}").write_text(f"file {i}\n")
    return root / "tree"


async def test_over_the_inode_limit_the_kernel_is_asked_to_drop_the_oldest(make_fs, memory_store, tmp_path):
    base, _ = import_tree(memory_store, _distinct_files(tmp_path, 20), "many")
    fs = make_fs(memory_store, max_inodes=8)
    top = await fs.walk(base)
    d = await fs.ops.lookup(top.st_ino, b"d", CTX)
    assert fs.invalidated == []  # under the limit
    listed = await fs.listdir(d.st_ino, 5)
    files = {name: attrs.st_ino for name, attrs in listed}
    given = {(ROOT, base), (top.st_ino, b"d")} | {(d.st_ino, name) for name in files}
    # The store path was handed out first; dropping it drops d and the files under it in
    # the kernel, so those are not asked for one by one in the same batch.
    assert fs.invalidated[0] == (ROOT, base)
    assert (top.st_ino, b"d") not in fs.invalidated
    assert set(fs.invalidated) <= given
    assert len(set(fs.invalidated)) == len(fs.invalidated)  # nothing asked for twice
    assert (d.st_ino, b"f19") not in fs.invalidated  # the most recent stay
    # Nothing is dropped until the kernel says so: it may still use every one.
    assert fs.ops.inode_count == 2 + len(files)
    assert (await fs.ops.getattr(files[b"f00"], CTX)).st_size == len(b"file 0\n")

    # The kernel looks one up again before it lets go: that reference counts too.
    again = await fs.ops.lookup(d.st_ino, b"f00", CTX)
    assert again.st_ino == files[b"f00"]
    await fs.ops.forget([(top.st_ino, 1), (d.st_ino, 1)] + [(ino, 1) for ino in files.values()])
    assert fs.ops.inode_count == 1
    await fs.ops.forget([(files[b"f00"], 1)])
    assert fs.ops.inode_count == 0
    later = await fs.walk(base, b"d", b"f00")
    assert later.st_ino > max(files.values())


async def test_every_handout_is_invalidated_at_most_once(make_fs, memory_store, tmp_path):
    base, _ = import_tree(memory_store, _distinct_files(tmp_path, 40), "many")
    fs = make_fs(memory_store, max_inodes=16)
    d = await fs.walk(base, b"d")
    for round_ in range(3):  # the kernel drops nothing: requests stop at what was handed out
        await fs.listdir(d.st_ino, 7)
        handouts = 2 + 40 * (round_ + 1)
        assert len(fs.invalidated) <= handouts
        assert fs.ops.inode_count == 42


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for background work to reach ``condition`` (bounded; not a timing assertion)."""
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.005)


def _import_referring(store: Store, path: Path, name: str, references: Iterable[bytes]) -> bytes:
    """Import ``path`` as a store path that refers to ``references`` (basenames)."""
    info = ingest_path(store, path, name)
    refs = sorted(references)
    # Nix names a source path by its references too: the path that content address gives.
    named = source_store_path(info.narinfo.nar_sha256, name, [f"{STORE_DIR}/{r.decode()}" for r in refs])
    kind = info.node.WhichOneof("node")
    assert kind is not None
    getattr(info.node, kind).name = named.basename.encode()
    info.references.extend(StorePath.from_basename(ref).digest for ref in refs)
    info.narinfo.reference_names.extend(ref.decode() for ref in refs)
    store.pathinfos.put(info)
    return validate_pathinfo(info)[0].basename.encode()


@pytest.mark.parametrize("prefetch", [True, False])
async def test_references_are_fetched_when_a_path_is_first_looked_up(
    make_fs, memory_store, tmp_path, prefetch
):
    def path_file(name: str, references: tuple[bytes, ...] = ()) -> bytes:
        (tmp_path / name).write_text(f"{name}\n")
        return _import_referring(memory_store, tmp_path / name, name, references)

    indirect = path_file("indirect")
    deps = [path_file("dep0", (indirect,)), path_file("dep1"), path_file("dep2")]
    missing = StorePath(bytes(range(20)), "missing").basename.encode()
    broken = StorePath(bytes(range(1, 21)), "broken").basename.encode()
    app = path_file("app", (*deps, missing, broken))
    flaky = FlakyPathInfos(memory_store.pathinfos)
    flaky.broken.add(StorePath.from_basename(broken).digest)
    fs = make_fs(
        Store(memory_store.blobs, memory_store.directories, flaky),
        prefetch_references=prefetch,
        negative_ttl=600.0,
    )

    def asked(name: bytes) -> int:
        return flaky.asked[StorePath.from_basename(name).digest]

    assert (await fs.ops.lookup(ROOT, app, CTX)).st_ino  # never held up by its references
    if prefetch:
        await _until(lambda: flaky.gets == 1 + 5)
    for dep in deps:
        assert (await fs.ops.lookup(ROOT, dep, CTX)).st_ino
    assert not (await fs.ops.lookup(ROOT, missing, CTX)).st_ino
    assert [asked(dep) for dep in [*deps, missing]] == [1, 1, 1, 1]  # prefetched, or by the lookup
    # Only what a looked-up path refers to: "indirect" once dep0 was looked up itself.
    if prefetch:
        await _until(lambda: asked(indirect) == 1)
    else:
        assert asked(indirect) == 0
    # A reference that failed to prefetch is asked for again by the lookup that needs it,
    # and the failure never became a failed request.
    assert fs.ops.failures == 0
    flaky.broken.clear()
    assert not (await fs.ops.lookup(ROOT, broken, CTX)).st_ino  # not in the store after all
    assert asked(broken) == (2 if prefetch else 1)
