"""A hostile tvix gRPC store for tests: correct by default, lying or stalling on demand.

It is built on the generated stubs alone (not on ``tvixfs.server``), so that a bug in the real
server cannot hide the same bug in the client, and it serves any ``Store`` (a memory store by
default). Faults are switched at runtime, each either for every request or only for one blob /
directory digest or store path hash, optionally only for some methods or a number of times;
``clear()`` makes the store honest again (hung calls resume, a refused listener listens again),
so a test can check that its client recovers without reconnecting.

Use it in process::

    with serve_faults(store, "127.0.0.1:0") as faults:
        client = open_grpc_store(faults.target)
        faults.set(Fault("hang", methods=("blob.read",)))
        ...
        faults.clear()

or as a separate process (for a FUSE daemon under test), controlled over a second, always
listening endpoint::

    with spawn_faultstore(short_tmp, nars=[(nar_file, "hello")]) as faults:
        subprocess.Popen([..., "mount", "--store", faults.url, mountpoint])
        faults.set(Fault("corrupt", digest=blob_digest))

Command line: ``python tests/faultstore.py --listen unix:/tmp/x/store.sock --control
unix:/tmp/x/control.sock [--chunk-size N] [--nar FILE=NAME ...]`` prints one JSON line
``{"target": ..., "url": ..., "control": ..., "paths": [basenames]}`` once both endpoints listen.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol, TypeVar, get_args

import grpc

from tvixfs.castore.digest import b3digest, check_digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import DirectoryNode, FileNode, SymlinkNode, node_from_proto, node_to_proto, rename
from tvixfs.importers.ingest import ingest_nar
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
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.base import ChunkMeta, Store
from tvixfs.services.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    StoreError,
)
from tvixfs.store import nixbase32
from tvixfs.store.storepath import HASH_CHARS, HASH_SIZE, StorePath, source_store_path

Kind = Literal[
    # any method
    "refuse",  # stop listening (connections refused); clear() listens again on the same address
    "blackhole",  # listen, accept connections, never speak (a hung handshake); clear() as refuse
    "hang",  # accept, then answer nothing (streams: after `after` bytes/messages) until clear()
    "slow",  # `delay` seconds before each message; blob streams in `piece`-byte messages
    "reset",  # abort with UNAVAILABLE (streams: after `after` bytes/messages)
    "error",  # abort with status `code`
    # blobs
    "corrupt",  # flip the byte at offset `after` of blob data; flip a byte of a Put/NAR digest
    "truncate",  # end a blob stream cleanly after `after` bytes (directory streams: messages)
    "extra_bytes",  # append a byte to a blob stream
    "chunk_sizes",  # Stat: every chunk one byte larger than it is (sizes don't add up)
    "chunk_digests",  # Stat: chunk digests of data that exists nowhere
    "chunk_swap",  # Stat: genuine chunks in reverse order (only a whole-blob check sees it)
    "absurd_size",  # chunk sizes, FileNode/DirectoryNode sizes of 2**63
    # directories (data faults hit the message at position `after`, or the scoped digest)
    "wrong_directory",  # a valid directory other than the one asked for
    "dir_unreferenced",  # an extra directory nobody referred to, after message `after`
    "dir_order",  # recursive Get: root first, then the rest in reverse (children before parents)
    "dir_duplicate",  # message `after` sent twice
    "bad_name",  # an entry named `name` (default "..") added
    "duplicate_name",  # an entry added under the name of an existing one
    "unsorted",  # entries of one list in reverse order
    "roots_only",  # Get of a directory that is no path info's root: NOT_FOUND (tvix's object-store layout)
    # path infos
    "pathinfo_name",  # root node named `<same hash>-tvixfs-fault`
    "pathinfo_hash",  # root node named with another hash and the same name
    "pathinfo_no_node",  # PathInfo without a root node
]
Method = Literal[
    "blob.stat",
    "blob.read",
    "blob.put",
    "directory.get",
    "directory.put",
    "pathinfo.get",
    "pathinfo.put",
    "pathinfo.calculate_nar",
    "pathinfo.list",
]
KINDS: tuple[Kind, ...] = get_args(Kind)
_LISTENER_FAULTS = ("refuse", "blackhole")
METHODS: tuple[Method, ...] = get_args(Method)
ABSURD_SIZE = 2**63
READ_PIECE = 64 * 1024


@dataclass(frozen=True)
class Fault:
    kind: Kind
    digest: bytes | None = None  # only requests for (or streams reaching) this digest / store path hash
    methods: tuple[Method, ...] = ()  # only these RPCs; empty: all
    after: int = 0  # bytes or messages into a stream before the fault strikes
    delay: float = 0.001  # slow: seconds before each message
    piece: int = 1  # slow: bytes per blob message
    name: bytes = b".."  # bad_name: the entry name
    code: str = "INTERNAL"  # error: a grpc.StatusCode name
    times: int | None = None  # strike this many requests, then stay quiet; None: until cleared

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if unknown := set(self.methods) - set(METHODS):
            raise ValueError(f"unknown methods {sorted(unknown)}")
        if self.kind in _LISTENER_FAULTS and (self.digest is not None or self.methods or self.times):
            raise ValueError(f"{self.kind} applies to the whole listener: no scope")
        grpc.StatusCode[self.code]  # fail early on a misspelled code

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["digest"] = None if self.digest is None else self.digest.hex()
        out["name"] = self.name.hex()
        out["methods"] = list(self.methods)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        digest = data.get("digest")
        return cls(
            **{
                **data,
                "digest": None if digest is None else bytes.fromhex(digest),
                "name": bytes.fromhex(data.get("name", b"..".hex())),
                "methods": tuple(data.get("methods", ())),
            }
        )


class Faults(Protocol):
    """What a test drives, in process or across processes."""

    target: str  # for grpc.insecure_channel and open_grpc_store
    url: str  # for --store

    def set(self, *faults: Fault) -> None: ...
    def clear(self) -> None: ...
    def stats(self) -> dict[str, dict[str, int]]: ...
    def put_raw_directory(self, message: castore_pb2.Directory) -> bytes: ...
    def put_raw_pathinfo(self, output_hash: bytes, info: pathinfo_pb2.PathInfo) -> None: ...


class _Call:
    """One RPC in flight; ``released`` ends its waits on clear(), stop() or cancellation."""

    def __init__(self, method: Method, context: grpc.ServicerContext, released: threading.Event) -> None:
        self.method = method
        self.context = context
        self.released = released

    def wait(self, seconds: float | None) -> None:
        self.released.wait(seconds)
        if not self.context.is_active():
            self.context.abort(grpc.StatusCode.CANCELLED, "cancelled by the client")


class FaultPlan:
    """The active faults and the bookkeeping every servicer shares; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._remaining: dict[int, int] = {}
        self._released: set[threading.Event] = set()
        self.calls: Counter[str] = Counter()
        self.fired: Counter[str] = Counter()
        self._active: Counter[str] = Counter()
        self.most: Counter[str] = Counter()  # calls of a method in flight at once, at most

    def set(self, faults: Iterable[Fault]) -> None:
        with self._lock:
            self._faults = list(faults)
            self._remaining = {i: f.times for i, f in enumerate(self._faults) if f.times is not None}

    def clear(self) -> None:
        with self._lock:
            self._faults = []
            waiting, self._released = self._released, set()
        for event in waiting:
            event.set()

    @property
    def listener(self) -> Kind | None:
        """A fault that replaces the listener: refuse or blackhole, else None."""
        with self._lock:
            return next((f.kind for f in self._faults if f.kind in _LISTENER_FAULTS), None)

    def begin(self, method: Method, context: grpc.ServicerContext) -> _Call:
        released = threading.Event()
        with self._lock:
            self.calls[method] += 1
            self._active[method] += 1
            self.most[method] = max(self.most[method], self._active[method])
            self._released.add(released)
        context.add_callback(released.set)
        return _Call(method, context, released)

    def end(self, call: _Call) -> None:
        with self._lock:
            self._active[call.method] -= 1
            self._released.discard(call.released)

    def strike(self, method: Method, digests: Iterable[bytes | None]) -> list[Fault]:
        """Faults for this request: unscoped ones, or scoped to one of ``digests``."""
        wanted = set(digests)
        out = []
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.kind in _LISTENER_FAULTS or (fault.methods and method not in fault.methods):
                    continue
                if fault.digest is not None and fault.digest not in wanted:
                    continue
                if i in self._remaining:
                    if self._remaining[i] <= 0:
                        continue
                    self._remaining[i] -= 1
                self.fired[fault.kind] += 1
                out.append(fault)
        return out

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"calls": dict(self.calls), "fired": dict(self.fired), "most": dict(self.most)}


_STATUS_OF: list[tuple[type[Exception], grpc.StatusCode]] = [
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
]


@contextlib.contextmanager
def _serving(plan: FaultPlan, method: Method, context: grpc.ServicerContext) -> Iterator[_Call]:
    """Count the call, make it releasable, and turn store errors into their status codes."""
    call = plan.begin(method, context)
    try:
        yield call
    except StoreError as e:
        for error_type, code in _STATUS_OF:
            if isinstance(e, error_type):
                context.abort(code, str(e))
        raise
    except ValidationError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    finally:
        plan.end(call)


def _abort_on_call_faults(call: _Call, faults: list[Fault], *, stream: bool) -> None:
    """The faults that strike before any answer: error, reset/hang of unary calls, slow start."""
    for fault in faults:
        if fault.kind == "error":
            call.context.abort(grpc.StatusCode[fault.code], f"injected {fault.code}")
        if fault.kind == "hang" and not stream:
            call.wait(None)
        if fault.kind == "reset" and not stream:
            call.context.abort(grpc.StatusCode.UNAVAILABLE, "injected reset")
        if fault.kind == "slow" and not stream:
            call.wait(fault.delay)


def _first(faults: list[Fault], kind: Kind) -> Fault | None:
    return next((f for f in faults if f.kind == kind), None)


def _stops(faults: list[Fault], position: Callable[[Fault], int]) -> dict[int, Fault]:
    """Where in a stream each hang or reset strikes (the first fault at a position wins)."""
    stops: dict[int, Fault] = {}
    for fault in faults:
        if fault.kind in ("hang", "reset"):
            stops.setdefault(position(fault), fault)
    return stops


def _stop_stream(call: _Call, fault: Fault) -> None:
    if fault.kind == "reset":
        call.context.abort(grpc.StatusCode.UNAVAILABLE, "injected reset mid-stream")
    call.wait(None)


M = TypeVar("M")


def _send(call: _Call, messages: list[M], faults: list[Fault], stops: dict[int, Fault]) -> Iterator[M]:
    """Stream ``messages`` slowly, stalling or breaking at ``stops`` as the faults say."""
    slow = _first(faults, "slow")
    for i, message in enumerate(messages):
        if i in stops:
            _stop_stream(call, stops[i])
        if slow:
            call.wait(slow.delay)
        yield message
    if len(messages) in stops:
        _stop_stream(call, stops[len(messages)])


def _flip(data: bytes, at: int) -> bytes:
    if not data:
        return b"\xff"
    at = min(at, len(data) - 1)
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


class BlobServicer(rpc_blobstore_pb2_grpc.BlobServiceServicer):
    def __init__(self, store: Store, plan: FaultPlan, chunk_size: int | None) -> None:
        self._store = store
        self._plan = plan
        self._chunk_size = chunk_size
        self._chunk_lists: dict[bytes, list[ChunkMeta]] = {}
        self._lock = threading.Lock()

    def Stat(  # noqa: N802  (gRPC method name)
        self, request: rpc_blobstore_pb2.StatBlobRequest, context: grpc.ServicerContext
    ) -> rpc_blobstore_pb2.StatBlobResponse:
        with _serving(self._plan, "blob.stat", context) as call:
            faults = self._plan.strike("blob.stat", [request.digest])
            _abort_on_call_faults(call, faults, stream=False)
            digest = check_digest(request.digest)
            honest = self._store.blobs.stat(digest, request.send_chunks)
            if honest is None:
                raise NotFoundError(f"blob {digest.hex()} not found")
            chunks = self._lied_chunks(digest, honest, faults) if request.send_chunks else []
            return rpc_blobstore_pb2.StatBlobResponse(
                chunks=[
                    rpc_blobstore_pb2.StatBlobResponse.ChunkMeta(digest=c.digest, size=c.size) for c in chunks
                ]
            )

    def _lied_chunks(self, digest: bytes, honest: list[ChunkMeta], faults: list[Fault]) -> list[ChunkMeta]:
        lies = {f.kind for f in faults} & {"chunk_sizes", "chunk_digests", "chunk_swap", "absurd_size"}
        chunks = honest or self._chunks(digest, None)
        if lies and not chunks:
            chunks = self._chunks(digest, 2)
        if "chunk_swap" in lies:
            chunks = chunks[::-1]
        if "chunk_sizes" in lies:
            chunks = [ChunkMeta(c.digest, c.size + 1) for c in chunks]
        if "chunk_digests" in lies:
            chunks = [ChunkMeta(b3digest(b"nowhere" + c.digest), c.size) for c in chunks]
        if "absurd_size" in lies:
            chunks = [ChunkMeta(c.digest, ABSURD_SIZE) for c in chunks]
        return chunks

    def _chunks(self, digest: bytes, parts: int | None) -> list[ChunkMeta]:
        """A chunk list for a blob the store keeps whole: fixed-size pieces, each stored.

        ``parts`` splits into that many pieces instead (a lie needs a chunk list; a blob too
        small to split is then its own single chunk).
        """
        if parts is None and self._chunk_size is None:
            return []
        with self._lock:
            if parts is None and digest in self._chunk_lists:
                return self._chunk_lists[digest]
        data = b"".join(self._store.blobs.read(digest))
        size = self._chunk_size if parts is None else max(1, -(-len(data) // parts))
        assert size is not None
        if len(data) <= size:
            return [] if parts is None else [ChunkMeta(digest, len(data))]
        chunks = []
        for i in range(0, len(data), size):
            piece = data[i : i + size]
            chunks.append(ChunkMeta(self._store.blobs.put([piece]), len(piece)))
        if parts is None:
            with self._lock:
                self._chunk_lists[digest] = chunks
        return chunks

    def Read(  # noqa: N802
        self, request: rpc_blobstore_pb2.ReadBlobRequest, context: grpc.ServicerContext
    ) -> Iterator[rpc_blobstore_pb2.BlobChunk]:
        with _serving(self._plan, "blob.read", context) as call:
            faults = self._plan.strike("blob.read", [request.digest])
            _abort_on_call_faults(call, faults, stream=True)
            data = b"".join(self._store.blobs.read(check_digest(request.digest)))
            yield from self._stream(call, data, faults)

    def _stream(self, call: _Call, data: bytes, faults: list[Fault]) -> Iterator[rpc_blobstore_pb2.BlobChunk]:
        if corrupt := _first(faults, "corrupt"):
            data = _flip(data, corrupt.after)
        if _first(faults, "extra_bytes"):
            data += b"\0"
        end = len(data)
        if truncate := _first(faults, "truncate"):
            end = min(end, truncate.after)
        slow = _first(faults, "slow")
        piece = slow.piece if slow else READ_PIECE
        # Where the stream stalls or breaks (at the latest, before it would end).
        stops = _stops(faults, lambda f: min(f.after, end))
        offset = 0
        while True:
            if offset in stops:
                _stop_stream(call, stops.pop(offset))
            if offset >= end:
                return
            upto = min([end, offset + piece, *(s for s in stops if s > offset)])
            if slow:
                call.wait(slow.delay)
            yield rpc_blobstore_pb2.BlobChunk(data=data[offset:upto])
            offset = upto

    def Put(  # noqa: N802
        self, request_iterator: Iterator[rpc_blobstore_pb2.BlobChunk], context: grpc.ServicerContext
    ) -> rpc_blobstore_pb2.PutBlobResponse:
        with _serving(self._plan, "blob.put", context) as call:
            faults = self._plan.strike("blob.put", [None])
            _abort_on_call_faults(call, faults, stream=False)
            digest = self._store.blobs.put(_whole_stream(request_iterator, context))
            if _first(faults, "corrupt"):
                digest = _flip(digest, 0)
            return rpc_blobstore_pb2.PutBlobResponse(digest=digest)


def _whole_stream(
    requests: Iterator[rpc_blobstore_pb2.BlobChunk], context: grpc.ServicerContext
) -> Iterator[bytes]:
    """The data of a Put's stream, which fails if grpcio ended it at a message it could not parse.

    grpcio then ends the request iterator as if the stream had ended, having answered INTERNAL
    itself; only the context tells. A client whose source fails sends such a message (UNDECODABLE).
    """
    for chunk in requests:
        yield chunk.data
    if not context.is_active():
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request stream did not end well")


class DirectoryServicer(rpc_directory_pb2_grpc.DirectoryServiceServicer):
    def __init__(
        self,
        store: Store,
        plan: FaultPlan,
        raw: dict[bytes, castore_pb2.Directory],
        raw_pathinfos: dict[bytes, pathinfo_pb2.PathInfo],
    ) -> None:
        self._store = store
        self._plan = plan
        self._raw = raw
        self._raw_pathinfos = raw_pathinfos

    def _is_root(self, digest: bytes) -> bool:
        """Whether ``digest`` is the root directory of a stored path info."""
        infos = [*self._store.pathinfos.list(), *self._raw_pathinfos.values()]
        return any(
            i.node.WhichOneof("node") == "directory" and i.node.directory.digest == digest for i in infos
        )

    def _lookup(self, digest: bytes) -> castore_pb2.Directory | None:
        raw = self._raw.get(digest)
        if raw is not None:
            return raw
        found = self._store.directories.get(digest)
        return None if found is None else found.to_proto()

    def _walk(self, root: bytes, recursive: bool) -> list[tuple[bytes, castore_pb2.Directory]]:
        """The honest answer, over raw protos so that hostile stored trees are served too."""
        first = self._lookup(root)
        if first is None:
            raise NotFoundError(f"directory {root.hex()} not found")
        out = [(root, first)]
        seen = {root}
        i = 0
        while recursive and i < len(out):
            for child in out[i][1].directories:
                if child.digest not in seen:
                    seen.add(child.digest)
                    found = self._lookup(child.digest)
                    if found is None:
                        raise NotFoundError(f"directory {child.digest.hex()} not found")
                    out.append((child.digest, found))
            i += 1
        return out

    def Get(  # noqa: N802
        self, request: rpc_directory_pb2.GetDirectoryRequest, context: grpc.ServicerContext
    ) -> Iterator[castore_pb2.Directory]:
        with _serving(self._plan, "directory.get", context) as call:
            if request.WhichOneof("by_what") is None:
                raise InvalidArgumentError("GetDirectoryRequest without a digest")
            root = check_digest(request.digest)
            # Directories other than the root are only known once walked; a fault scoped to
            # any of them must strike, so walk first (a missing directory still strikes).
            missing: NotFoundError | None = None
            try:
                walk = self._walk(root, request.recursive)
            except NotFoundError as e:
                walk, missing = [], e
            faults = self._plan.strike("directory.get", [root, *(d for d, _ in walk)])
            _abort_on_call_faults(call, faults, stream=True)
            if _first(faults, "roots_only") and not self._is_root(root):
                raise NotFoundError(f"directory {root.hex()} is not a root (roots only)")
            if missing is not None:
                raise missing
            yield from self._lie(call, walk, faults, root)

    @staticmethod
    def _lie(
        call: _Call, walk: list[tuple[bytes, castore_pb2.Directory]], faults: list[Fault], root: bytes
    ) -> Iterator[castore_pb2.Directory]:
        digests = [d for d, _ in walk]

        def position(fault: Fault) -> int:
            """The message a fault hits: the scoped directory's, else number ``after``."""
            if fault.digest is None or fault.digest == root or fault.digest not in digests:
                return fault.after
            return digests.index(fault.digest)

        messages = [_copy(m) for _, m in walk]
        for fault in faults:
            if fault.kind in _DIRECTORY_LIES and position(fault) < len(messages):
                _DIRECTORY_LIES[fault.kind](messages[position(fault)], fault)
        if _first(faults, "dir_order"):
            messages = messages[:1] + messages[:0:-1]
        if dup := _first(faults, "dir_duplicate"):
            at = min(position(dup), len(messages) - 1)
            messages.insert(at, messages[at])
        if stray := _first(faults, "dir_unreferenced"):
            messages.insert(min(position(stray), len(messages) - 1) + 1, _STRAY.to_proto())
        if truncate := _first(faults, "truncate"):
            del messages[position(truncate) :]
        yield from _send(call, messages, faults, _stops(faults, lambda f: min(position(f), len(messages))))

    def Put(  # noqa: N802
        self, request_iterator: Iterator[castore_pb2.Directory], context: grpc.ServicerContext
    ) -> rpc_directory_pb2.PutDirectoryResponse:
        with _serving(self._plan, "directory.put", context) as call:
            faults = self._plan.strike("directory.put", [None])
            _abort_on_call_faults(call, faults, stream=False)
            root = self._store.directories.put_many(Directory.from_proto(m) for m in request_iterator)
            if _first(faults, "corrupt"):
                root = _flip(root, 0)
            return rpc_directory_pb2.PutDirectoryResponse(root_digest=root)


def _copy(message: castore_pb2.Directory) -> castore_pb2.Directory:
    out = castore_pb2.Directory()
    out.CopyFrom(message)
    return out


_STRAY = Directory(symlinks=(SymlinkNode(b"stray", b"nowhere"),))


def _add_intruder(message: castore_pb2.Directory, fault: Fault) -> None:
    message.symlinks.append(castore_pb2.SymlinkNode(name=b"~intruder", target=b"elsewhere"))


def _add_bad_name(message: castore_pb2.Directory, fault: Fault) -> None:
    message.symlinks.append(castore_pb2.SymlinkNode(name=fault.name, target=b"x"))


def _add_duplicate_name(message: castore_pb2.Directory, fault: Fault) -> None:
    existing = [
        *(n.name for n in message.directories),
        *(n.name for n in message.files),
        *(n.name for n in message.symlinks),
    ]
    message.symlinks.append(castore_pb2.SymlinkNode(name=existing[0] if existing else b"twin", target=b"x"))
    if not existing:
        message.symlinks.append(castore_pb2.SymlinkNode(name=b"twin", target=b"x"))


def _unsort(message: castore_pb2.Directory, fault: Fault) -> None:
    for kind in ("directories", "files", "symlinks"):
        nodes: Any = getattr(message, kind)
        if len(nodes) > 1:
            reordered = list(nodes)[::-1]
            del nodes[:]
            nodes.extend(reordered)
            return
    message.symlinks.extend(
        [castore_pb2.SymlinkNode(name=b"zz", target=b"x"), castore_pb2.SymlinkNode(name=b"aa", target=b"x")]
    )


def _absurd_sizes(message: castore_pb2.Directory, fault: Fault) -> None:
    for directory in message.directories:
        directory.size = ABSURD_SIZE
    for file in message.files:
        file.size = ABSURD_SIZE
    if not message.files and not message.directories:
        message.files.append(castore_pb2.FileNode(name=b"huge", digest=b3digest(b""), size=ABSURD_SIZE))


_DIRECTORY_LIES: dict[str, Callable[[castore_pb2.Directory, Fault], None]] = {
    "wrong_directory": _add_intruder,
    "bad_name": _add_bad_name,
    "duplicate_name": _add_duplicate_name,
    "unsorted": _unsort,
    "absurd_size": _absurd_sizes,
}


class PathInfoServicer(rpc_pathinfo_pb2_grpc.PathInfoServiceServicer):
    def __init__(self, store: Store, plan: FaultPlan, raw: dict[bytes, pathinfo_pb2.PathInfo]) -> None:
        self._store = store
        self._plan = plan
        self._raw = raw

    def Get(  # noqa: N802
        self, request: rpc_pathinfo_pb2.GetPathInfoRequest, context: grpc.ServicerContext
    ) -> pathinfo_pb2.PathInfo:
        with _serving(self._plan, "pathinfo.get", context) as call:
            output_hash = request.by_output_hash
            faults = self._plan.strike("pathinfo.get", [output_hash])
            _abort_on_call_faults(call, faults, stream=False)
            if request.WhichOneof("by_what") is None or len(output_hash) != HASH_SIZE:
                raise InvalidArgumentError(f"by_output_hash must be {HASH_SIZE} bytes")
            found = self._raw.get(output_hash)
            if found is None:
                found = self._store.pathinfos.get(output_hash)
            if found is None:
                raise NotFoundError(f"no path info for {nixbase32.encode(output_hash)}")
            info = pathinfo_pb2.PathInfo()
            info.CopyFrom(found)
            _lie_pathinfo(info, faults)
            return info

    def Put(  # noqa: N802
        self, request: pathinfo_pb2.PathInfo, context: grpc.ServicerContext
    ) -> pathinfo_pb2.PathInfo:
        with _serving(self._plan, "pathinfo.put", context) as call:
            _abort_on_call_faults(call, self._plan.strike("pathinfo.put", [None]), stream=False)
            return self._store.pathinfos.put(request)

    def CalculateNAR(  # noqa: N802
        self, request: castore_pb2.Node, context: grpc.ServicerContext
    ) -> rpc_pathinfo_pb2.CalculateNARResponse:
        with _serving(self._plan, "pathinfo.calculate_nar", context) as call:
            faults = self._plan.strike("pathinfo.calculate_nar", [None])
            _abort_on_call_faults(call, faults, stream=False)
            size, sha256 = self._store.pathinfos.calculate_nar(node_from_proto(request))
            if _first(faults, "corrupt"):
                sha256 = _flip(sha256, 0)
            return rpc_pathinfo_pb2.CalculateNARResponse(nar_size=size, nar_sha256=sha256)

    def List(  # noqa: N802
        self, request: rpc_pathinfo_pb2.ListPathInfoRequest, context: grpc.ServicerContext
    ) -> Iterator[pathinfo_pb2.PathInfo]:
        with _serving(self._plan, "pathinfo.list", context) as call:
            faults = self._plan.strike("pathinfo.list", [None])
            _abort_on_call_faults(call, faults, stream=True)
            infos = [*self._raw.values(), *self._store.pathinfos.list()]
            yield from _send(call, infos, faults, _stops(faults, lambda f: min(f.after, len(infos))))


def _lie_pathinfo(info: pathinfo_pb2.PathInfo, faults: list[Fault]) -> None:
    kind = info.node.WhichOneof("node")
    node: Any = getattr(info.node, kind) if kind else None
    for fault in faults:
        if fault.kind == "pathinfo_no_node":
            info.ClearField("node")
            return
        if node is None:
            continue
        hash_part, name = node.name[:HASH_CHARS], node.name[HASH_CHARS + 1 :]
        if fault.kind == "pathinfo_name":
            node.name = hash_part + b"-tvixfs-fault"
        elif fault.kind == "pathinfo_hash":
            other = _flip(nixbase32.decode(hash_part.decode()), 0)
            node.name = nixbase32.encode(other).encode() + b"-" + name
        elif fault.kind == "absurd_size" and kind in ("file", "directory"):
            node.size = ABSURD_SIZE


class _Blackhole:
    """A listener that accepts connections and never says a word: no HTTP/2 handshake."""

    def __init__(self, address: str) -> None:
        if address.startswith("unix:"):
            path = address.removeprefix("unix:")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._socket.bind(path)
        else:
            host, port = address.rsplit(":", 1)
            host = host.strip("[]")
            self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, int(port)))
        self._socket.listen(64)
        self._socket.settimeout(0.05)
        self._held: list[socket.socket] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="faultstore-blackhole", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                self._held.append(self._socket.accept()[0])

    def stop(self) -> None:
        self._closing.set()
        self._thread.join()
        for conn in [*self._held, self._socket]:
            conn.close()


class FaultStore:
    """The servicers, the listener (swapped for ``refuse`` and ``blackhole``) and the fault plan."""

    def __init__(
        self, store: Store | None = None, address: str = "127.0.0.1:0", chunk_size: int | None = None
    ):
        self.store = store or open_memory_store()
        self.plan = FaultPlan()
        self.raw_directories: dict[bytes, castore_pb2.Directory] = {}
        self.raw_pathinfos: dict[bytes, pathinfo_pb2.PathInfo] = {}
        self._blobs = BlobServicer(self.store, self.plan, chunk_size)
        self._directories = DirectoryServicer(self.store, self.plan, self.raw_directories, self.raw_pathinfos)
        self._pathinfos = PathInfoServicer(self.store, self.plan, self.raw_pathinfos)
        self._address = address
        self._listener: grpc.Server | _Blackhole | None = None
        self._lock = threading.Lock()
        self.target = ""
        self.url = ""

    def start(self) -> FaultStore:
        self._sync_listener(stopping=False)
        return self

    def _sync_listener(self, stopping: bool) -> None:
        """Make the listener what the faults say: the store, a blackhole, or nothing."""
        want = None if stopping else self.plan.listener
        with self._lock:
            current = self._listener
            if not stopping and (
                (want == "blackhole" and isinstance(current, _Blackhole))
                or (want is None and isinstance(current, grpc.Server))
                or (want == "refuse" and current is None)
            ):
                return
            if isinstance(current, grpc.Server):
                current.stop(grace=None).wait()
            elif current is not None:
                current.stop()
            self._listener = None
            if stopping or want == "refuse":
                return
            self._listener = _Blackhole(self._address) if want == "blackhole" else self._serve()

    def _serve(self) -> grpc.Server:
        server = grpc.server(ThreadPoolExecutor(max_workers=64, thread_name_prefix="faultstore"))
        rpc_blobstore_pb2_grpc.add_BlobServiceServicer_to_server(self._blobs, server)
        rpc_directory_pb2_grpc.add_DirectoryServiceServicer_to_server(self._directories, server)
        rpc_pathinfo_pb2_grpc.add_PathInfoServiceServicer_to_server(self._pathinfos, server)
        port = server.add_insecure_port(self._address)
        if not self._address.startswith("unix:"):
            # Listen again on the same port after a refuse, so clients need not be told anew.
            self._address = f"{self._address.rsplit(':', 1)[0]}:{port}"
        server.start()
        self.target = self._address
        self.url = (
            f"grpc+unix://{self._address.removeprefix('unix:')}"
            if self._address.startswith("unix:")
            else f"grpc+http://{self._address}"
        )
        return server

    def stop(self) -> None:
        self.plan.clear()
        self._sync_listener(stopping=True)

    def set(self, *faults: Fault) -> None:
        """Replace the active faults. Calls already hung stay hung until clear()."""
        self.plan.set(faults)
        self._sync_listener(stopping=False)

    def clear(self) -> None:
        """Honest again: no faults, hung calls answer, a refused listener listens again."""
        self.plan.clear()
        self._sync_listener(stopping=False)

    def stats(self) -> dict[str, dict[str, int]]:
        """Calls per method and strikes per fault kind since start: did the fault fire?"""
        return self.plan.stats()

    def put_raw_directory(self, message: castore_pb2.Directory) -> bytes:
        """Serve a Directory as given, valid or not, under the digest of its canonical bytes.

        Hostile content with matching digests: the client can only catch it by validating.
        """
        digest = b3digest(message.SerializeToString(deterministic=True))
        self.raw_directories[digest] = message
        return digest

    def put_raw_pathinfo(self, output_hash: bytes, info: pathinfo_pb2.PathInfo) -> None:
        """Serve ``info`` for ``output_hash`` as given, without any check."""
        self.raw_pathinfos[output_hash] = info

    def __enter__(self) -> FaultStore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_faults(
    store: Store | None = None, address: str = "127.0.0.1:0", chunk_size: int | None = None
) -> FaultStore:
    """A fault store listening in this process: ``with serve_faults(...) as faults:``."""
    return FaultStore(store, address, chunk_size)


@dataclass(frozen=True)
class Sample:
    """A small store path with every node kind, three directory levels and a multi-piece blob."""

    path: StorePath  # a directory store path
    file_path: StorePath  # a store path whose root is a file (the big blob)
    directories: list[bytes]  # root, middle, leaf: the order of a recursive Get
    blobs: dict[bytes, bytes]  # digest -> content, for comparing what a client got

    @property
    def big(self) -> bytes:
        """The digest of the largest blob (several read messages, several chunks)."""
        return max(self.blobs, key=lambda d: len(self.blobs[d]))


def put_sample(store: Store, big_size: int = 300_000) -> Sample:
    big = random.Random(7).randbytes(big_size)
    hello = b"hello from the fault store\n"
    blobs = {store.blobs.put([data]): data for data in (big, hello, b"")}
    digest = {data: d for d, data in blobs.items()}
    leaf = Directory.of([FileNode(b"big", digest[big], len(big)), SymlinkNode(b"up", b"..")])
    middle = Directory.of(
        [
            DirectoryNode(b"leaf", leaf.digest(), leaf.size()),
            FileNode(b"hello", digest[hello], len(hello), True),
        ]
    )
    root = Directory.of(
        [
            DirectoryNode(b"middle", middle.digest(), middle.size()),
            FileNode(b"empty", digest[b""], 0),
            SymlinkNode(b"link", b"middle/hello"),
        ]
    )
    store.directories.put_many([leaf, middle, root])
    path = StorePath(b3digest(b"sample")[:HASH_SIZE], "sample")
    file_path = StorePath(b3digest(b"sample-file")[:HASH_SIZE], "sample-file")
    for store_path, node in (
        (path, DirectoryNode(b"x", root.digest(), root.size())),
        (file_path, FileNode(b"x", digest[big], len(big))),
    ):
        store.pathinfos.put(
            pathinfo_pb2.PathInfo(node=node_to_proto(rename(node, store_path.basename.encode())))
        )
    return Sample(path, file_path, [root.digest(), middle.digest(), leaf.digest()], blobs)


def put_raw_path(faults: Faults, name: str, root: castore_pb2.Directory) -> StorePath:
    """A store path ``<hash>-name`` whose root is ``root`` as given, valid or not.

    Digests match throughout, so a FUSE daemon gets past every digest check and meets the lie
    itself (an entry named "..", a FileNode of 2**63 bytes, a size its blob does not have).
    """
    path = StorePath(b3digest(name.encode())[:HASH_SIZE], name)
    digest = faults.put_raw_directory(root)
    entries = len(root.directories) + len(root.files) + len(root.symlinks)
    node = castore_pb2.DirectoryNode(name=path.basename.encode(), digest=digest, size=entries)
    faults.put_raw_pathinfo(path.digest, pathinfo_pb2.PathInfo(node=castore_pb2.Node(directory=node)))
    return path


# -- the control endpoint, for a fault store in another process --------------------------------

_CONTROL_METHOD = "/tvixfs.test.FaultControl/Call"


def _control_handler(faults: FaultStore) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        order = json.loads(request)
        if order["op"] == "set":
            faults.set(*(Fault.from_json(f) for f in order["faults"]))
        elif order["op"] == "clear":
            faults.clear()
        elif order["op"] == "raw_directory":
            message = castore_pb2.Directory.FromString(bytes.fromhex(order["message"]))
            return json.dumps({"digest": faults.put_raw_directory(message).hex()}).encode()
        elif order["op"] == "raw_pathinfo":
            info = pathinfo_pb2.PathInfo.FromString(bytes.fromhex(order["message"]))
            faults.put_raw_pathinfo(bytes.fromhex(order["output_hash"]), info)
        return json.dumps(faults.stats()).encode()

    return grpc.method_handlers_generic_handler(
        "tvixfs.test.FaultControl", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )


class RemoteFaults:
    """Drives a fault store in another process; same methods as ``FaultStore``."""

    def __init__(self, target: str, url: str, control: str, paths: list[str]) -> None:
        self.target = target
        self.url = url
        self.paths = paths  # basenames of the imported NARs, in order
        self._channel = grpc.insecure_channel(control)
        self._call = self._channel.unary_unary(_CONTROL_METHOD, None, None)

    def _order(self, **order: Any) -> Any:
        return json.loads(self._call(json.dumps(order).encode(), timeout=30))

    def set(self, *faults: Fault) -> None:
        self._order(op="set", faults=[f.to_json() for f in faults])

    def clear(self) -> None:
        self._order(op="clear")

    def stats(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = self._order(op="stats")
        return result

    def settled_calls(self, method: str, settle: float = 1.0) -> int:
        """Calls of ``method`` answered, once background calls have settled: the count no
        longer moves over ``settle`` seconds."""
        last = -1
        while True:
            now = self.stats()["calls"].get(method, 0)
            if now == last:
                return now
            last = now
            time.sleep(settle)

    def put_raw_directory(self, message: castore_pb2.Directory) -> bytes:
        return bytes.fromhex(
            self._order(op="raw_directory", message=message.SerializeToString().hex())["digest"]
        )

    def put_raw_pathinfo(self, output_hash: bytes, info: pathinfo_pb2.PathInfo) -> None:
        self._order(op="raw_pathinfo", output_hash=output_hash.hex(), message=info.SerializeToString().hex())

    def close(self) -> None:
        self._channel.close()


@contextlib.contextmanager
def spawn_faultstore(
    tmp: Path, nars: Iterable[tuple[Path, str]] = (), chunk_size: int | None = None, timeout: float = 30
) -> Iterator[RemoteFaults]:
    """A fault store in a child process listening on unix sockets under ``tmp`` (keep it short).

    ``nars`` are (NAR file, basename or name) pairs imported before it listens (see
    ``import_nar``); their basenames are in ``.paths``.
    """
    cmd = [
        sys.executable,
        __file__,
        "--listen",
        f"unix:{tmp / 'faultstore.sock'}",
        "--control",
        f"unix:{tmp / 'faultctl.sock'}",
    ]
    for nar, basename in nars:
        cmd += ["--nar", f"{nar}={basename}"]
    if chunk_size is not None:
        cmd += ["--chunk-size", str(chunk_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    remote = None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"fault store did not start within {timeout}s (exit {proc.poll()})")
        info = json.loads(line)
        remote = RemoteFaults(info["target"], info["url"], info["control"], info["paths"])
        yield remote
    finally:
        if remote is not None:
            remote.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def import_nar(store: Store, nar: Path, name: str) -> str:
    """Put a NAR file into ``store`` as a store path; returns its basename.

    ``name`` is a whole basename, or just the name part: then the path is the one
    ``nix-store --add`` would give the tree (no references).
    """
    try:
        path = StorePath.from_basename(name)
    except ValidationError:
        with nar.open("rb") as stream:
            path = source_store_path(hashlib.file_digest(stream, "sha256").digest(), name)
    with nar.open("rb") as stream:
        ingest_nar(store, stream, path)
    return path.basename


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port or unix:/path")
    parser.add_argument("--control", default="127.0.0.1:0", help="host:port or unix:/path")
    parser.add_argument("--chunk-size", type=int, help="offer chunk lists of this size in Stat")
    parser.add_argument(
        "--nar", action="append", default=[], metavar="FILE=NAME", help="import (NAME: basename or name)"
    )
    args = parser.parse_args(argv)
    faults = FaultStore(open_memory_store(), args.listen, args.chunk_size)
    paths = [
        import_nar(faults.store, Path(nar), name) for nar, _, name in (s.partition("=") for s in args.nar)
    ]
    faults.start()
    control = grpc.server(ThreadPoolExecutor(max_workers=4))
    control.add_generic_rpc_handlers((_control_handler(faults),))
    port = control.add_insecure_port(args.control)
    control_target = args.control if args.control.startswith("unix:") else f"127.0.0.1:{port}"
    control.start()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    ready = {"target": faults.target, "url": faults.url, "control": control_target, "paths": paths}
    print(json.dumps(ready), flush=True)
    stopping.wait()
    control.stop(grace=None)
    faults.stop()
    os._exit(0)


if __name__ == "__main__":
    main()
