"""Directory validation and its canonical digest.

A Directory travels as the protobuf message; this module is the single place that decides
whether one is valid and what its address is. Its three lists are kept as validated tuples of
nodes so that callers never look at an unchecked field.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from dataclasses import dataclass, field

from tvixfs.castore.digest import b3digest
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import (
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    directory_node_from_proto,
    file_node_from_proto,
    symlink_node_from_proto,
)
from tvixfs.protos import castore_pb2


@dataclass(frozen=True, slots=True)
class Directory:
    directories: tuple[DirectoryNode, ...] = ()
    files: tuple[FileNode, ...] = ()
    symlinks: tuple[SymlinkNode, ...] = ()
    # The digest, once known: computed by ``digest`` or taken from the bytes it was read from.
    _digest: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        seen: set[bytes] = set()
        for kind, nodes in (
            ("directories", self.directories),
            ("files", self.files),
            ("symlinks", self.symlinks),
        ):
            previous: bytes | None = None
            for node in nodes:
                if previous is not None and node.name <= previous:
                    raise ValidationError(
                        f"{kind} not sorted by name or duplicated: {node.name!r} after {previous!r}"
                    )
                if node.name in seen:
                    raise ValidationError(f"duplicate name {node.name!r} across node lists")
                seen.add(node.name)
                previous = node.name

    @classmethod
    def from_proto(cls, msg: castore_pb2.Directory) -> Directory:
        """Validate a wire Directory; raises ValidationError naming the first broken rule."""
        return cls(
            tuple(directory_node_from_proto(d) for d in msg.directories),
            tuple(file_node_from_proto(f) for f in msg.files),
            tuple(symlink_node_from_proto(s) for s in msg.symlinks),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Directory:
        msg = castore_pb2.Directory()
        try:
            msg.ParseFromString(data)
        except Exception as e:  # protobuf's DecodeError is not part of its typed API
            raise ValidationError(f"undecodable Directory: {e}") from None
        return cls.from_proto(msg)

    @classmethod
    def from_canonical_bytes(cls, data: bytes) -> Directory:
        """Parse bytes known to be a directory's canonical encoding (``to_bytes``), such as
        a store's own row: its digest is then the hash of ``data``, taken without encoding
        it again (a store path's first directory load re-encoded ~1,300 directories).

        Only for bytes whose writer guarantees the canonical form (the embedded store writes
        ``to_bytes`` and fsck checks it): a non-canonical encoding would get a digest other
        than ``digest`` computes. Bytes from the network go through ``from_bytes``.
        """
        directory = cls.from_bytes(data)
        object.__setattr__(directory, "_digest", b3digest(data))
        return directory

    @classmethod
    def from_named_bytes(cls, data: bytes, names: Container[bytes]) -> Directory:
        """Parse a directory received from elsewhere, where its digest should be one of
        ``names`` (the digests that were asked for, or that a parent names).

        If the hash of ``data`` is one of them, ``data`` is that directory's canonical
        encoding (BLAKE3 is collision resistant), so its digest is known without encoding it
        again; what a recursive Get of a big tree spent most of its client CPU on. Otherwise
        (another encoding of the same directory, or another directory) ``digest`` computes
        it as usual, and the caller finds out which.
        """
        directory = cls.from_bytes(data)
        digest = b3digest(data)
        if digest in names:
            object.__setattr__(directory, "_digest", digest)
        return directory

    @classmethod
    def of(cls, nodes: list[Node]) -> Directory:
        """Build from entries in any order (as a directory walk yields them)."""
        dirs = sorted((n for n in nodes if isinstance(n, DirectoryNode)), key=_name)
        files = sorted((n for n in nodes if isinstance(n, FileNode)), key=_name)
        links = sorted((n for n in nodes if isinstance(n, SymlinkNode)), key=_name)
        return cls(tuple(dirs), tuple(files), tuple(links))

    def to_proto(self) -> castore_pb2.Directory:
        return castore_pb2.Directory(
            directories=[d.to_proto() for d in self.directories],
            files=[f.to_proto() for f in self.files],
            symlinks=[s.to_proto() for s in self.symlinks],
        )

    def to_bytes(self) -> bytes:
        """Canonical encoding: fields in number order, no unknown fields, defaults omitted."""
        return self.to_proto().SerializeToString(deterministic=True)

    def digest(self) -> bytes:
        found = self._digest
        if found is None:
            found = b3digest(self.to_bytes())
            object.__setattr__(self, "_digest", found)  # immutable: computed once
        return found

    def entries(self) -> list[Node]:
        """All entries sorted bytewise by name: the order of a NAR and of a listing."""
        return sorted([*self.directories, *self.files, *self.symlinks], key=_name)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self.directories) + len(self.files) + len(self.symlinks)

    def size(self) -> int:
        """The documented DirectoryNode.size: entries plus, recursively, subdirectory sizes."""
        return len(self) + sum(d.size for d in self.directories)


def _name(node: Node) -> bytes:
    return node.name
