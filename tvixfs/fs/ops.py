"""The pyfuse3 request handlers: thin, they map kernel requests onto the inode table.

One uncaught exception ends ``pyfuse3.main`` and leaves a dead mount, so every handler runs
inside ``_guarded``: a FUSEError passes through, anything else (a store that fails, data that
does not verify, a bug) becomes EIO for that one request and one log line naming the store
path. Every request that would write answers EROFS (the kernel already refuses most of them on
an ``ro`` mount).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from cachetools import LRUCache

from tvixfs import defaults
from tvixfs.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvixfs.fs.accessprofile import AccessProfiles
from tvixfs.fs.attrs import (
    BLOCK_SIZE,
    FOREVER,
    entry_attributes,
    mount_root_attributes,
    negative_entry,
    node_attributes,
)
from tvixfs.fs.bridge import Bridge
from tvixfs.fs.dircache import cached_listing
from tvixfs.fs.directories import Directories
from tvixfs.fs.inflight import InFlight
from tvixfs.fs.inodes import ROOT_INODE, Inode, InodeTable
from tvixfs.fs.noopen import PYFUSE3_OFFERS_NO_OPEN, STATE_BYTES, state_weight
from tvixfs.fs.reader import BlobReader, OpenFile
from tvixfs.fs.roots import NEGATIVE_TTL, Roots
from tvixfs.fs.siblings import SiblingPrefetch
from tvixfs.fs.xattrs import STATUS, xattrs_of
from tvixfs.repeatedlog import RepeatedLog
from tvixfs.services.base import Store
from tvixfs.services.cache.accessprofiles import ProfileFiles
from tvixfs.services.narhash import store_nar_hash
from tvixfs.services.rootnodes import StorePathRoot
from tvixfs.store.nixsig import PublicKey

log = logging.getLogger(__name__)

ReaddirReply = Callable[[pyfuse3.ReaddirToken, bytes, pyfuse3.EntryAttributes, int], bool]
InvalidateEntry = Callable[[int, bytes], None]
NAME_MAX = 255
INVALIDATE_GRACE = 1.0

P = ParamSpec("P")
R = TypeVar("R")
Handler = Callable[Concatenate["TvixOperations", P], Coroutine[Any, Any, R]]


def _guarded(request: str, origin: Callable[..., bytes | None]) -> Callable[[Handler[P, R]], Handler[P, R]]:
    """Turn what a handler raises, other than FUSEError, into EIO and one log line.

    ``origin(ops, *args)`` names the store path the request was about; it runs only on a
    failure, so a request that succeeds pays for one try block and nothing else (a walk
    sends tens of thousands of requests).
    """

    def decorate(handler: Handler[P, R]) -> Handler[P, R]:
        @functools.wraps(handler)
        async def guarded(ops: TvixOperations, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await handler(ops, *args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except Exception as e:
                raise ops._failed(request, origin(ops, *args), e) from None

        return guarded

    return decorate


def _of_inode(ops: TvixOperations, ino: int, *_: object) -> bytes | None:
    inode = ops._inodes.get(ino)
    return inode.origin if inode is not None else None


def _of_lookup(ops: TvixOperations, parent: int, name: bytes, *_: object) -> bytes | None:
    return name if parent == ROOT_INODE else _of_inode(ops, parent)


def _of_directory(ops: TvixOperations, fh: int, *_: object) -> bytes | None:
    handle = ops._dir_handles.get(fh)
    return handle.origin if handle is not None else None


def _of_file(ops: TvixOperations, fh: int, *_: object) -> bytes | None:
    if ops.no_open:  # the handle is the inode (fs/noopen.py)
        return _of_inode(ops, fh)
    file = ops._files.get(fh)
    return file.origin if file is not None else None


class EntryInvalidator:
    """Asks the kernel to drop directory entries, from a thread of its own.

    The kernel makes such a request wait while it works on a related one (a lookup in the
    same directory), which only this daemon's event loop can answer: so it must never run
    on the loop. pyfuse3's ``invalidate_entry_async`` has a thread for this too, but it
    goes on working through its queue after ``pyfuse3.main`` returns, racing
    ``pyfuse3.close``, which frees the session it writes to; this one is stopped before
    that, dropping what is still queued (the mount is going away).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tvixfs-invalidate", daemon=True)
        self._thread.start()

    def request(self, parent: int, name: bytes) -> None:
        self._queue.put((parent, name))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None and not self._stopping:
            try:
                pyfuse3.invalidate_entry(*item)
            except FileNotFoundError:
                pass  # the kernel had dropped it already
            except OSError as e:
                log.debug("cannot drop entry %r of inode %d: %s", item[1], item[0], e)

    def stop(self, timeout: float = INVALIDATE_GRACE) -> None:
        """Stop before the session is closed; waits a little for a request the kernel holds
        up (until the unmount, if a request the daemon no longer answers blocks it)."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the kernel still holds up a request to drop an entry; closing anyway")


@dataclass(frozen=True, slots=True)
class FsOptions:
    list_root: bool = False
    show_xattr: bool = True
    cache_bytes: int = defaults.CACHE_BYTES
    threads: int = defaults.THREADS
    negative_ttl: float = NEGATIVE_TTL
    max_inodes: int = defaults.MAX_INODES
    directory_cache_entries: int = defaults.DIRECTORY_CACHE_ENTRIES
    prefetch_references: bool = True
    # With keys, only store paths whose root node one of them signed appear (store/signing.py).
    trusted_keys: Mapping[str, PublicKey] = field(default_factory=dict)
    # With trusted keys: also show paths with only a Nix signature, once their NAR checks out.
    verify_nar_hash: bool = False
    deadline: float = defaults.DEADLINE  # seconds a request waits on the store
    prefetch_siblings: bool = True
    # Where store paths' access profiles are kept (fs/accessprofile.py); None: not recorded.
    access_profiles: Path | None = None


@dataclass(slots=True)
class _DirHandle:
    """One open directory: its entries as opendir found them, so that readdir cookies
    (index + 1) stay valid. Not frozen: a frozen dataclass is slower to make, and a walk
    opens every directory."""

    ino: int
    origin: bytes
    entries: Sequence[Node]
    # The mount root's listing (--list-root): the store path of each entry.
    roots: Sequence[StorePathRoot] | None = None
    refused: bool = False  # the mount root without --list-root


class TvixOperations(pyfuse3.Operations):
    # ".." lookups are not answered (a directory's parent may have been forgotten already):
    # do not offer the kernel NFS export (the only user of "." and ".." lookups).
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    # The kernel opens files by itself, where pyfuse3 and the kernel can (fs/noopen.py):
    # pyfuse3 sets it back to False at mount otherwise, before the first request.
    no_open = PYFUSE3_OFFERS_NO_OPEN

    def __init__(
        self,
        store: Store,
        background: trio.Nursery,
        options: FsOptions,
        *,
        invalidate: InvalidateEntry,
        readdir_reply: ReaddirReply = pyfuse3.readdir_reply,
    ) -> None:
        """``invalidate(parent, name)`` asks the kernel to drop an entry, without waiting."""
        super().__init__()
        self._options = options
        prefetch = background if options.prefetch_references else None
        # One bridge (so one thread limit) per service: reads hung on a broken blob service
        # must not take the threads that lookups of other store paths need.
        nar_check = (
            functools.partial(store_nar_hash, blobs=store.blobs, directories=store.directories)
            if options.verify_nar_hash
            else None
        )
        self._roots = Roots(
            Bridge(options.threads, options.deadline),
            store.pathinfos,
            options.negative_ttl,
            prefetch,
            trusted_keys=options.trusted_keys,
            nar_check=nar_check,
        )
        self._directories = Directories(
            Bridge(options.threads, options.deadline), store.directories, options.directory_cache_entries
        )
        # A lookup's miss fetches the subtree too only where each call is a round trip.
        self._lookup_subtrees = store.blobs.capabilities.calls_are_remote
        self._reader = BlobReader(
            Bridge(options.threads, options.deadline),
            store.blobs,
            background,
            options.cache_bytes,
            prove_chunk_lists=bool(options.trusted_keys),
        )
        self._siblings = SiblingPrefetch(self._reader.chunk_cache) if options.prefetch_siblings else None
        self._profiles = (
            None
            if options.access_profiles is None
            else AccessProfiles(ProfileFiles(options.access_profiles), self._reader)
        )
        self._inodes = InodeTable(options.max_inodes)
        self._files: dict[int, OpenFile] = {}  # by handle, until released
        # Files the kernel opened by itself (no_open), by inode: kept for the next read,
        # bounded (fs/noopen.py), and dropped with the inode.
        self._inode_files: LRUCache[int, OpenFile] = LRUCache(STATE_BYTES, getsizeof=state_weight)
        # The kernel's first reads of a file come several at once: one state for all of them.
        self._inode_opening: InFlight[int, OpenFile] = InFlight()
        self._dir_handles: dict[int, _DirHandle] = {}
        self._handles = itertools.count(1)
        self._readdir_reply = readdir_reply
        self._invalidate = invalidate
        self.failures = 0
        # A program retrying a read that fails would otherwise write a line per attempt.
        self._failure_lines = RepeatedLog(log, logging.ERROR)
        # The text of the mount root's ``user.tvixfs.status`` (fs/statusreport.py), if set.
        self.root_status: Callable[[], bytes] | None = None

    @property
    def inode_count(self) -> int:
        return len(self._inodes)

    @property
    def open_files(self) -> int:
        """Open handles; where the kernel opens files by itself, files read lately."""
        return len(self._files) + len(self._inode_files)

    @property
    def reader(self) -> BlobReader:
        return self._reader

    def status(self) -> str:
        """One line for systemd's STATUS=."""
        stats = self._reader.stats
        return (
            f"{len(self._inodes)} inodes ({self._inodes.evicting} being dropped), "
            f"{self.open_files} open files, "
            f"chunk cache {self._reader.cached_bytes >> 20} MiB, "
            f"fetched {stats.chunks_fetched} chunks ({stats.bytes_fetched >> 20} MiB), "
            f"{stats.fetch_failures} failed fetches, {self.failures} failed requests"
        )

    # -- error handling -------------------------------------------------------------------

    def _failed(self, request: str, where: bytes | None, e: Exception) -> pyfuse3.FUSEError:
        self.failures += 1
        place = f"store path {os.fsdecode(where)}" if where else "the mount root"
        # One line per distinct failure and minute; the traceback only at debug level.
        self._failure_lines.emit(f"{request} in {place}: {type(e).__name__}: {e}")
        log.debug("%s failed", request, exc_info=e)
        return pyfuse3.FUSEError(errno.EIO)

    def _inode(self, ino: int) -> Inode:
        inode = self._inodes.get(ino)
        if inode is None:
            raise LookupError(f"the kernel asked for inode {ino}, which the daemon does not know")
        return inode

    def _attributes(
        self, inode: Inode, into: pyfuse3.EntryAttributes | None = None
    ) -> pyfuse3.EntryAttributes:
        node = inode.node
        subdirectories = None
        if isinstance(node, DirectoryNode):
            listing = self._directories.peek(node.digest)
            subdirectories = listing.subdirectories if listing is not None else None
        return node_attributes(inode.ino, node, subdirectories, into)

    def _entry(self, inode: Inode, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        attrs = self._attributes(inode)
        self._inodes.remember(inode, parent, name)
        self._trim_inodes()
        return attrs

    def _trim_inodes(self) -> None:
        """Over the inode limit: ask the kernel to drop the least recently handed out entries.

        The kernel answers with ``forget`` (for a directory, also for whatever below it is
        unused), which is what shrinks the table; an entry it already dropped is ignored.
        """
        victims = self._inodes.overflow()
        if victims:
            log.debug(
                "%d inodes, over the limit: asking the kernel to drop %d entries",
                len(self._inodes),
                len(victims),
            )
        for inode in victims:
            self._invalidate(inode.parent, inode.name)

    # -- names and attributes -------------------------------------------------------------

    @_guarded("lookup", _of_lookup)
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE:
            started = trio.current_time()
            root = await self._roots.lookup(name)
            if root is None:
                return negative_entry(self._options.negative_ttl)
            if self._profiles is not None:
                self._profiles.entered(root.name, trio.current_time() - started)
            return self._entry(self._inodes.for_root(root), ROOT_INODE, root.name)
        parent = self._inode(parent_inode)
        if not isinstance(parent.node, DirectoryNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        listing = await self._directories.get(parent.node, subtree=self._lookup_subtrees)
        child = listing.find(name)
        if child is None:
            return negative_entry(FOREVER)
        # The parent's own number and the listing's name: objects the table shares.
        return self._entry(self._inodes.for_child(child, parent.origin, parent.ino), parent.ino, child.name)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        # pyfuse3 does not let forget report errors; a bug here must not end the main loop.
        try:
            for ino, count in inode_list:
                self._inodes.forget(ino, count)
                if ino in self._inode_files and self._inodes.get(ino) is None:
                    del self._inode_files[ino]
        except Exception:
            log.exception("forget failed")

    @_guarded("getattr", _of_inode)
    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return mount_root_attributes(ROOT_INODE, FOREVER)
        return self._attributes(self._inode(inode))

    @_guarded("readlink", _of_inode)
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode).node if inode != ROOT_INODE else None
        if not isinstance(node, SymlinkNode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    @_guarded("access", _of_inode)
    async def access(self, inode: pyfuse3.InodeT, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Only called without default_permissions: answer as the modes above would.
        if mode & os.W_OK:
            return False
        node = self._inode(inode).node if inode != ROOT_INODE else None
        return not (mode & os.X_OK and isinstance(node, FileNode) and not node.executable)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = BLOCK_SIZE
        stats.f_frsize = BLOCK_SIZE
        stats.f_namemax = NAME_MAX
        return stats

    # -- directories ----------------------------------------------------------------------

    @_guarded("opendir", _of_inode)
    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if inode == ROOT_INODE:
            handle = await self._open_root()
        else:
            directory = self._inode(inode)
            if not isinstance(directory.node, DirectoryNode):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            listing = await self._directories.get(directory.node)
            handle = _DirHandle(inode, directory.origin, listing.entries)
        fh = next(self._handles)
        self._dir_handles[fh] = handle
        return pyfuse3.FileHandleT(fh) if inode == ROOT_INODE else cached_listing(fh)

    async def _open_root(self) -> _DirHandle:
        if not self._options.list_root:
            return _DirHandle(ROOT_INODE, b"", (), refused=True)
        roots = await self._roots.list()
        return _DirHandle(ROOT_INODE, b"", [root.node for root in roots], roots)

    @_guarded("readdir", _of_directory)
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Reply entries from cookie ``start_id`` until the kernel's buffer is full.

        READDIRPLUS: each accepted entry is a lookup (its count goes up); the entry the kernel
        refused is not counted and is asked for again, by its cookie, in the next readdir.
        A walk sends one readdir per few entries, so the loop keeps to the minimum per entry:
        one attributes object for the whole reply, methods looked up once.
        """
        handle = self._dir_handles.get(fh)
        if handle is None:
            raise LookupError(f"unknown directory handle {fh}")
        if handle.refused:
            raise pyfuse3.FUSEError(errno.EPERM)  # listing the root needs --list-root
        inodes = self._inodes
        reply = self._readdir_reply
        attributes = self._attributes
        remember = inodes.remember
        ino = handle.ino
        origin = handle.origin
        roots = handle.roots
        entries = handle.entries
        scratch = entry_attributes()
        try:
            for index in range(start_id, len(entries)):
                node = entries[index]
                inode = (
                    inodes.for_child(node, origin, ino) if roots is None else inodes.for_root(roots[index])
                )
                if not reply(token, node.name, attributes(inode, scratch), index + 1):
                    inodes.discard_unused(inode)
                    return
                remember(inode, ino, node.name)
        finally:
            self._trim_inodes()

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dir_handles.pop(fh, None)

    # -- files ----------------------------------------------------------------------------

    @_guarded("open", _of_inode)
    async def open(self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        file = await self._open_file(inode)
        fh = next(self._handles)
        self._files[fh] = file
        # keep_cache: a store path never changes, so the page cache stays valid across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def _open_file(self, ino: int) -> OpenFile:
        entry = self._inode(ino)
        if not isinstance(entry.node, FileNode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        file = await self._reader.open(entry.node, entry.origin)
        if self._siblings is not None:
            self._prefetch_siblings(entry)
        return file

    def _prefetch_siblings(self, entry: Inode) -> None:
        """Fetch the small files next to this one ahead, if its directory is at hand."""
        parent = self._inodes.get(entry.parent)
        if parent is None or not isinstance(parent.node, DirectoryNode) or self._siblings is None:
            return
        listing = self._directories.peek(parent.node.digest)
        if listing is not None and isinstance(entry.node, FileNode):
            self._siblings.opened(entry.node, parent.node.digest, listing.entries)

    @_guarded("read", _of_file)
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        if self.no_open:  # ``fh`` is the inode (fs/noopen.py)
            return await self._read_inode(fh, off, size)
        file = self._files.get(fh)
        if file is None:
            raise LookupError(f"unknown file handle {fh}")
        return await self._read_file(file, off, size)

    async def _read_inode(self, ino: int, off: int, size: int) -> bytes:
        file = self._inode_files.get(ino)
        if file is None:
            file = await self._inode_opening.run(ino, lambda: self._open_inode(ino))
        try:
            return await self._read_file(file, off, size)
        except Exception:
            # A handle's state ends with its release; this one is kept for later reads, so
            # whatever failed (a bad chunk map, say) is learned again by the next one.
            if self._inode_files.get(ino) is file:
                del self._inode_files[ino]
            raise

    async def _open_inode(self, ino: int) -> OpenFile:
        file = self._inode_files[ino] = await self._open_file(ino)
        return file

    async def _read_file(self, file: OpenFile, off: int, size: int) -> bytes:
        if self._profiles is not None:
            self._profiles.read(file, off, size)
        return await self._reader.read(file, off, size)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self._files.pop(fh, None)

    # -- extended attributes --------------------------------------------------------------

    @_guarded("getxattr", _of_inode)
    async def getxattr(self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not self._options.show_xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel stops asking
        if inode == ROOT_INODE:
            found = self.root_status() if name == STATUS and self.root_status is not None else None
        else:
            found = xattrs_of(self._inode(inode)).get(name)
        if found is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return found

    @_guarded("listxattr", _of_inode)
    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if not self._options.show_xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if inode == ROOT_INODE:
            return [STATUS] if self.root_status is not None else []
        return list(xattrs_of(self._inode(inode)))

    # -- everything that writes -----------------------------------------------------------

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(
        self, parent_inode: pyfuse3.InodeT, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(  # noqa: PLR0917  (pyfuse3's signature)
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(
        self, parent_inode: pyfuse3.InodeT, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(
        self, inode: pyfuse3.InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)
