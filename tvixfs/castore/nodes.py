"""Directory, file and symlink nodes: the entries of a Directory and the root of a store path.

Frozen, slotted dataclasses rather than protobuf messages, because the FUSE inode table holds
many of them and hashes them as keys. Conversion to and from the wire form validates every rule
of the protocol, so a node that exists is a valid node.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvixfs.castore.digest import DIGEST_SIZE, check_digest
from tvixfs.castore.errors import ValidationError
from tvixfs.protos import castore_pb2

MAX_NAME = 255
MAX_TARGET = 4095


def check_name(name: bytes) -> bytes:
    """Return ``name`` if it may name a directory entry, else raise saying why."""
    # The common case in one test: a recursive Get converts every entry of a tree.
    if 0 < len(name) <= MAX_NAME and b"/" not in name and b"\0" not in name and name not in (b".", b".."):
        return name
    if not name:
        raise ValidationError("empty name")
    if len(name) > MAX_NAME:
        raise ValidationError(f"name longer than {MAX_NAME} bytes: {name[:40]!r}...")
    if name in (b".", b".."):
        raise ValidationError(f"invalid name {name!r}")
    if b"/" in name or b"\0" in name:
        raise ValidationError(f"name contains '/' or NUL: {name!r}")
    return name


def check_target(target: bytes) -> bytes:
    """Return ``target`` if it may be a symlink target, else raise saying why."""
    if not target:
        raise ValidationError("empty symlink target")
    if len(target) > MAX_TARGET:
        raise ValidationError(f"symlink target longer than {MAX_TARGET} bytes")
    if b"\0" in target:
        raise ValidationError(f"symlink target contains NUL: {target!r}")
    return target


@dataclass(frozen=True, slots=True)
class DirectoryNode:
    name: bytes
    digest: bytes
    size: int

    def to_proto(self) -> castore_pb2.DirectoryNode:
        return castore_pb2.DirectoryNode(name=self.name, digest=self.digest, size=self.size)


@dataclass(frozen=True, slots=True)
class FileNode:
    name: bytes
    digest: bytes
    size: int
    executable: bool = False

    def to_proto(self) -> castore_pb2.FileNode:
        return castore_pb2.FileNode(
            name=self.name, digest=self.digest, size=self.size, executable=self.executable
        )


@dataclass(frozen=True, slots=True)
class SymlinkNode:
    name: bytes
    target: bytes

    def to_proto(self) -> castore_pb2.SymlinkNode:
        return castore_pb2.SymlinkNode(name=self.name, target=self.target)


Node = DirectoryNode | FileNode | SymlinkNode


# The digest checks below name the entry only once they fail: a recursive Get converts every
# entry of a tree, and formatting the name each time cost a fifth of it.


def directory_node_from_proto(msg: castore_pb2.DirectoryNode) -> DirectoryNode:
    name = check_name(msg.name)
    digest = msg.digest
    if len(digest) != DIGEST_SIZE:
        check_digest(digest, f"directory {name!r}")
    return DirectoryNode(name, digest, msg.size)


def file_node_from_proto(msg: castore_pb2.FileNode) -> FileNode:
    name = check_name(msg.name)
    digest = msg.digest
    if len(digest) != DIGEST_SIZE:
        check_digest(digest, f"file {name!r}")
    return FileNode(name, digest, msg.size, msg.executable)


def symlink_node_from_proto(msg: castore_pb2.SymlinkNode) -> SymlinkNode:
    name = check_name(msg.name)
    try:
        return SymlinkNode(name, check_target(msg.target))
    except ValidationError as e:
        raise ValidationError(f"symlink {name!r}: {e}") from None


def node_from_proto(msg: castore_pb2.Node) -> Node:
    """Validate a wire Node (exactly one kind set) and convert it."""
    kind = msg.WhichOneof("node")
    if kind == "directory":
        return directory_node_from_proto(msg.directory)
    if kind == "file":
        return file_node_from_proto(msg.file)
    if kind == "symlink":
        return symlink_node_from_proto(msg.symlink)
    raise ValidationError("node has none of directory, file, symlink set")


def node_to_proto(node: Node) -> castore_pb2.Node:
    if isinstance(node, DirectoryNode):
        return castore_pb2.Node(directory=node.to_proto())
    if isinstance(node, FileNode):
        return castore_pb2.Node(file=node.to_proto())
    return castore_pb2.Node(symlink=node.to_proto())


def rename(node: Node, name: bytes) -> Node:
    """The same node under another name (a store path root is named by its basename)."""
    check_name(name)
    if isinstance(node, DirectoryNode):
        return DirectoryNode(name, node.digest, node.size)
    if isinstance(node, FileNode):
        return FileNode(name, node.digest, node.size, node.executable)
    return SymlinkNode(name, node.target)
