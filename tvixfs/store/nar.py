"""NAR, Nix's archive format: render castore trees to it and parse it back into castore.

A NAR is a sequence of strings, each an 8-byte little-endian length, the bytes, and zero padding
to a multiple of 8. The grammar (``nix-store --dump``)::

    nar       = "nix-archive-1" node
    node      = "(" "type" ( regular | symlink | directory ) ")"
    regular   = "regular" [ "executable" "" ] "contents" <contents>
    symlink   = "symlink" "target" <target>
    directory = "directory" { "entry" "(" "name" <name> "node" node ")" }

Directory entries are sorted bytewise by name. Nothing here performs I/O except through the
callbacks and streams a caller hands in; file contents flow through in pieces, never whole.
The framing helpers are public so that an importer reading a real tree can hash the exact NAR
bytes while it reads each file once.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from tvixfs.castore.digest import EMPTY_DIGEST
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import (
    MAX_NAME,
    MAX_TARGET,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    check_name,
    check_target,
)

# Pieces handed out by write_nar are at least this big (except the last), so that a consumer
# pays its per-piece cost (a syscall, a gRPC message) rarely even for trees of tiny files.
PIECE = 1 << 17
# Reads from a NAR stream: big enough that token parsing rarely crosses a refill.
READ_SIZE = 1 << 20
# The longest keyword of the grammar is "nix-archive-1"; a longer one cannot be valid.
MAX_KEYWORD = 13
# File sizes are u64 in the format; above 2^63 no file system can hold them.
MAX_FILE_SIZE = 1 << 63

GetDirectory = Callable[[bytes], Directory]
ReadBlob = Callable[[bytes], Iterable[bytes]]
PutBlob = Callable[[Iterable[bytes]], bytes]


class NARError(ValidationError):
    """A NAR that breaks the format, or a tree that cannot be rendered to the NAR it claims."""


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def padding(size: int) -> bytes:
    """The zero bytes that follow ``size`` bytes of string or contents."""
    return b"\0" * (-size % 8)


def _str(data: bytes) -> bytes:
    return _u64(len(data)) + data + padding(len(data))


MAGIC = _str(b"nix-archive-1")
_OPEN = _str(b"(")
_CLOSE = _str(b")")
DIRECTORY_OPEN = _OPEN + _str(b"type") + _str(b"directory")
DIRECTORY_CLOSE = _CLOSE
ENTRY_CLOSE = _CLOSE
_REGULAR = _OPEN + _str(b"type") + _str(b"regular")
_EXECUTABLE = _str(b"executable") + _str(b"")
_CONTENTS = _str(b"contents")
_SYMLINK = _OPEN + _str(b"type") + _str(b"symlink") + _str(b"target")
_ENTRY = _str(b"entry") + _OPEN + _str(b"name")
_NODE = _str(b"node")


def file_open(size: int, executable: bool) -> bytes:
    """Everything of a regular file node before its contents."""
    return _REGULAR + (_EXECUTABLE if executable else b"") + _CONTENTS + _u64(size)


def file_close(size: int) -> bytes:
    """Everything of a regular file node after its ``size`` bytes of contents."""
    return padding(size) + _CLOSE


def symlink(target: bytes) -> bytes:
    """A whole symlink node."""
    return _SYMLINK + _str(target) + _CLOSE


def entry_open(name: bytes) -> bytes:
    """A directory entry up to its node; ENTRY_CLOSE follows the node."""
    return _ENTRY + _str(name) + _NODE


# --- rendering -------------------------------------------------------------------------------


def write_nar(node: Node, get_directory: GetDirectory, read_blob: ReadBlob) -> Iterator[bytes]:
    """The NAR of ``node`` (its name is not part of a NAR), streamed in pieces.

    Small tokens and files are gathered into pieces of PIECE bytes or more; large blob
    pieces pass through uncopied.

    Every file's blob must yield exactly ``FileNode.size`` bytes; otherwise NARError is raised
    before any byte beyond the declared size leaves, so a consumer never sees a wrong NAR, only
    a short one followed by the error. Iterative, so any depth renders.
    """
    out = bytearray(MAGIC)
    stack: list[Iterator[Node]] = []
    current: Node | None = node
    while True:
        if current is not None:
            if isinstance(current, DirectoryNode):
                out += DIRECTORY_OPEN
                stack.append(iter(get_directory(current.digest).entries()))
            elif isinstance(current, FileNode):
                out += file_open(current.size, current.executable)
                for piece in file_contents(current, read_blob):
                    if len(piece) >= PIECE:
                        if out:
                            yield bytes(out)
                            out.clear()
                        yield piece
                    else:
                        out += piece
                        if len(out) >= PIECE:
                            yield bytes(out)
                            out.clear()
                out += file_close(current.size)
            else:
                out += symlink(current.target)
            if not isinstance(current, DirectoryNode) and stack:
                out += ENTRY_CLOSE
        if not stack:
            break
        current = next(stack[-1], None)
        if current is None:
            stack.pop()
            out += DIRECTORY_CLOSE
            if stack:
                out += ENTRY_CLOSE
        else:
            out += entry_open(current.name)
        if len(out) >= PIECE:
            yield bytes(out)
            out.clear()
    if out:
        yield bytes(out)


def file_contents(node: FileNode, read_blob: ReadBlob) -> Iterator[bytes]:
    """The bytes of a file node; NARError before any byte beyond its size, or if short."""
    if node.size == 0 and node.digest == EMPTY_DIGEST:
        return
    seen = 0
    for piece in read_blob(node.digest):
        seen += len(piece)
        if seen > node.size:
            raise NARError(
                f"file {node.name!r}: blob {node.digest.hex()} is longer than its size {node.size}"
            )
        yield piece
    if seen != node.size:
        raise NARError(
            f"file {node.name!r}: blob {node.digest.hex()} has {seen} bytes, the node says {node.size}"
        )


def files_in_order(node: Node, get_directory: GetDirectory) -> Iterator[FileNode]:
    """The file nodes under ``node`` in the order ``write_nar`` reads them."""
    stack: list[Iterator[Node]] = [iter([node])]
    while stack:
        current = next(stack[-1], None)
        if current is None:
            stack.pop()
        elif isinstance(current, DirectoryNode):
            stack.append(iter(get_directory(current.digest).entries()))
        elif isinstance(current, FileNode):
            yield current


def nar_hash(node: Node, get_directory: GetDirectory, read_blob: ReadBlob) -> tuple[int, bytes]:
    """(size, sha256) of the NAR of ``node``, without holding it."""
    hasher = hashlib.sha256()
    size = 0
    for piece in write_nar(node, get_directory, read_blob):
        hasher.update(piece)
        size += len(piece)
    return size, hasher.digest()


# --- building castore trees from a depth-first walk ------------------------------------------


class TreeBuilder:
    """Turns a depth-first walk (a NAR, a real directory) into castore Directories.

    Directories are recorded as they close, so ``directories`` is leaves first, each digest
    once: the order DirectoryService.put_many wants.
    """

    def __init__(self) -> None:
        self.directories: dict[bytes, Directory] = {}
        self._stack: list[tuple[bytes, list[Node]]] = []

    @property
    def depth(self) -> int:
        return len(self._stack)

    def open_directory(self, name: bytes) -> None:
        self._stack.append((name, []))

    def add(self, node: Node) -> None:
        """Add an entry to the innermost open directory."""
        self._stack[-1][1].append(node)

    def close_directory(self) -> DirectoryNode:
        """Close the innermost directory; its node still has to be ``add``-ed (unless root)."""
        name, entries = self._stack.pop()
        directory = Directory.of(entries)
        digest = directory.digest()
        self.directories.setdefault(digest, directory)
        return DirectoryNode(name, digest, directory.size())


# --- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NarContents:
    """What a parsed NAR became: blobs are already put; directories still have to be."""

    root: Node
    directories: list[Directory]  # leaves first, each once; empty unless root is a directory
    nar_size: int
    nar_sha256: bytes


class _Reader:
    """Buffered token reader that hashes and counts every byte it takes from the stream."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._buf = b""
        self._pos = 0
        self.hasher = hashlib.sha256()
        self.size = 0

    def _refill(self) -> bool:
        data = self._stream.read(READ_SIZE)
        if not data:
            return False
        data = bytes(data)
        self.hasher.update(data)
        self.size += len(data)
        self._buf = self._buf[self._pos :] + data if self._pos < len(self._buf) else data
        self._pos = 0
        return True

    def take(self, n: int, what: str) -> bytes:
        while len(self._buf) - self._pos < n:
            if not self._refill():
                raise NARError(f"NAR truncated: stream ended inside {what}")
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def pieces(self, n: int) -> Iterator[bytes]:
        """``n`` bytes in the pieces they arrive in (file contents)."""
        while n:
            if self._pos == len(self._buf) and not self._refill():
                raise NARError(f"NAR truncated: stream ended with {n} bytes of file contents missing")
            piece = self._buf[self._pos : self._pos + n]
            self._pos += len(piece)
            n -= len(piece)
            yield piece

    def u64(self, what: str) -> int:
        value: int = struct.unpack("<Q", self.take(8, what))[0]
        return value

    def padding(self, size: int, what: str) -> None:
        if self.take(-size % 8, f"padding of {what}").strip(b"\0"):
            raise NARError(f"non-zero padding after {what}")

    def string(self, limit: int, what: str) -> bytes:
        n = self.u64(what)
        if n > limit:
            raise NARError(f"{what} is {n} bytes long, at most {limit} allowed")
        data = self.take(n, what)
        self.padding(n, what)
        return data

    def keyword(self) -> bytes:
        n = self.u64("a keyword")
        if n > MAX_KEYWORD:
            raise NARError(f"expected a keyword, got a string of {n} bytes")
        data = self.take(n, "a keyword")
        self.padding(n, f"keyword {data!r}")
        return data

    def expect(self, *keywords: bytes) -> bytes:
        got = self.keyword()
        if got not in keywords:
            wanted = " or ".join(repr(k.decode()) for k in keywords)
            raise NARError(f"expected {wanted}, got {got!r}")
        return got

    def at_end(self) -> bool:
        return self._pos == len(self._buf) and not self._refill()


def read_nar(stream: IO[bytes], name: bytes, put_blob: PutBlob) -> NarContents:
    """Parse a whole NAR from ``stream`` into castore; the root node is named ``name``.

    File contents go to ``put_blob`` in pieces as they are read (blobs are content-addressed,
    so a NAR rejected later leaves only unreferenced blobs). Directories are returned, not
    stored, so a caller stores them only once the NAR proved complete and valid. The stream
    must end right after the NAR. Raises NARError saying what is wrong and where.
    """
    reader = _Reader(stream)
    if reader.take(len(MAGIC), "the magic") != MAGIC:
        raise NARError("not a NAR: bad magic (expected 'nix-archive-1')")
    tree = TreeBuilder()
    last_names: list[bytes | None] = []
    root = _read_node(reader, name, put_blob, tree)
    if root is not None:
        return _finish(reader, root, tree)
    last_names.append(None)
    while True:
        keyword = reader.expect(b"entry", b")")
        if keyword == b")":
            node = tree.close_directory()
            last_names.pop()
            if not tree.depth:
                return _finish(reader, node, tree)
            reader.expect(b")")
            tree.add(node)
            continue
        reader.expect(b"(")
        reader.expect(b"name")
        entry_name = reader.string(MAX_NAME, "an entry name")
        try:
            check_name(entry_name)
        except ValidationError as e:
            raise NARError(f"invalid entry name: {e}") from None
        previous = last_names[-1]
        if previous is not None and entry_name <= previous:
            raise NARError(f"directory entries not sorted or duplicated: {entry_name!r} after {previous!r}")
        last_names[-1] = entry_name
        reader.expect(b"node")
        child = _read_node(reader, entry_name, put_blob, tree)
        if child is None:
            last_names.append(None)
        else:
            reader.expect(b")")
            tree.add(child)


def _read_node(reader: _Reader, name: bytes, put_blob: PutBlob, tree: TreeBuilder) -> Node | None:
    """Read one node; a directory is opened in ``tree`` (returns None) and read by the caller."""
    reader.expect(b"(")
    reader.expect(b"type")
    kind = reader.expect(b"regular", b"symlink", b"directory")
    if kind == b"directory":
        tree.open_directory(name)
        return None
    if kind == b"symlink":
        reader.expect(b"target")
        target = reader.string(MAX_TARGET, f"the target of symlink {name!r}")
        try:
            check_target(target)
        except ValidationError as e:
            raise NARError(f"symlink {name!r}: {e}") from None
        reader.expect(b")")
        return SymlinkNode(name, target)
    executable = reader.expect(b"executable", b"contents") == b"executable"
    if executable:
        reader.string(0, "the string after 'executable' (always empty)")
        reader.expect(b"contents")
    size = reader.u64(f"the size of file {name!r}")
    if size >= MAX_FILE_SIZE:
        raise NARError(f"file {name!r} claims an implausible size of {size} bytes")
    contents = reader.pieces(size)
    digest = put_blob(contents)
    if next(contents, None) is not None:
        raise NARError("the blob store stopped reading file contents early")
    reader.padding(size, f"the contents of {name!r}")
    reader.expect(b")")
    return FileNode(name, digest, size, executable)


def _finish(reader: _Reader, root: Node, tree: TreeBuilder) -> NarContents:
    if not reader.at_end():
        raise NARError("trailing data after the end of the NAR")
    return NarContents(root, list(tree.directories.values()), reader.size, reader.hasher.digest())
