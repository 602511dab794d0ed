"""Consistency check (and repair) of an embedded store, bottom up: chunks, blobs, trees, paths.

Each layer is checked against what survived the layer below, so one damaged chunk is reported
where it is and then again only as the blob and the path infos it takes with it. Repair
removes what cannot be trusted (damaged chunk files, incomplete blobs, broken directories,
path infos whose content is gone) so that re-importing those paths completes; it never
invents data. Temporary files and chunk files no blob refers to are leftovers of killed
writers, not damage: they are counted, and removed by repair. So are blobs and directories
no path info refers to (a killed import's): counted with the bytes ``tvixfs gc`` would free.

Run ``--repair`` while no other process writes to the store: a concurrent put may be
between renaming its chunk files into place and committing the blob that refers to them.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvixfs.castore.digest import new_hasher
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import DirectoryNode, FileNode, Node
from tvixfs.maintenance.gc import plan_collection
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.backends.chunkfiles import TEMP_MARK
from tvixfs.services.backends.local import LocalBlobService, LocalDirectoryService
from tvixfs.services.backends.localdb import LocalBackend, unpack_chunks
from tvixfs.services.errors import StoreError
from tvixfs.services.narhash import store_nar_hash
from tvixfs.store.nixtext import format_hash
from tvixfs.store.pathinfo import validate_pathinfo

_CHUNK_NAME = re.compile(r"[0-9a-f]{64}")
_READ_PIECE = 1 << 20

Report = Callable[[str], None]


@dataclass
class FsckResult:
    chunk_files: int = 0
    blobs: int = 0
    directories: int = 0
    pathinfos: int = 0
    problems: int = 0
    orphan_chunks: int = 0
    temp_files: int = 0
    # What no path info (nor a live import, gcguard.py) refers to: leftovers, for gc to free.
    unreferenced_blobs: int = 0
    unreferenced_directories: int = 0
    gc_bytes: int = 0
    repaired: bool = False

    def summary(self) -> str:
        problems = f"{self.problems} problem{'s' * (self.problems != 1)}"
        if self.problems and self.repaired:
            problems += " (repaired)"
        leftovers = f"{self.orphan_chunks} unreferenced chunk files, {self.temp_files} temporary files"
        if self.repaired and (self.orphan_chunks or self.temp_files):
            leftovers += " (removed)"
        return (
            f"checked {self.chunk_files} chunk files, {self.blobs} blobs, "
            f"{self.directories} directories, {self.pathinfos} path infos: {problems}; {leftovers}; "
            f"{self.unreferenced_blobs} unreferenced blobs, {self.unreferenced_directories} unreferenced "
            f"directories (tvixfs gc would free {self.gc_bytes / 2**20:.1f} MiB)"
        )


@dataclass
class _Findings:
    """What fsck keeps between layers: the digests that passed, and what repair will delete."""

    good_chunks: dict[bytes, int] = field(default_factory=dict)
    good_blobs: set[bytes] = field(default_factory=set)
    good_dirs: dict[bytes, Directory] = field(default_factory=dict)
    bad_files: list[Path] = field(default_factory=list)
    bad_blobs: list[bytes] = field(default_factory=list)
    bad_dirs: list[bytes] = field(default_factory=list)
    bad_pathinfos: list[bytes] = field(default_factory=list)
    layout_broken: bool = False


def fsck_local_store(
    path: Path, report: Report, repair: bool = False, check_contents: bool = False
) -> FsckResult:
    """Check the store at ``path``; ``report`` gets one line per problem found."""
    backend = LocalBackend(path, create=False)
    try:
        return _Fsck(backend, report).run(repair, check_contents)
    finally:
        backend.close()


class _Fsck:
    def __init__(self, backend: LocalBackend, report: Report) -> None:
        self._backend = backend
        self._report = report
        self._result = FsckResult()
        self._found = _Findings()
        self._blobs = LocalBlobService(backend)
        self._directories = LocalDirectoryService(backend)

    def _problem(self, line: str) -> None:
        self._result.problems += 1
        self._report(line)

    def run(self, repair: bool, check_contents: bool) -> FsckResult:
        self._check_database()
        leftovers = self._check_chunk_files()
        referenced = self._check_blobs()
        orphans = [self._backend.chunks.path(d) for d in self._found.good_chunks if d not in referenced]
        self._result.orphan_chunks = len(orphans)
        self._check_directories()
        self._check_pathinfos(check_contents)
        if repair:
            self._repair(leftovers + orphans)
        plan = plan_collection(self._backend)
        self._result.unreferenced_blobs = len(plan.blobs)
        self._result.unreferenced_directories = len(plan.directories)
        self._result.gc_bytes = plan.chunk_bytes
        return self._result

    def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self._backend.connection() as conn:
            return conn.execute(sql).fetchall()

    def _check_database(self) -> None:
        with self._backend.connection() as conn:
            lines = [str(row[0]) for row in conn.execute("PRAGMA quick_check").fetchall()]
        if lines != ["ok"]:
            for line in lines:
                self._problem(f"database: {line}")

    def _check_chunk_files(self) -> list[Path]:
        """Verify every chunk file against its name; returns temporary files (leftovers)."""
        chunks = self._backend.chunks
        # Fan-out directories are made by the first write into them (chunkfiles.py): only a
        # missing root stops writes.
        if not chunks.root.is_dir():
            self._problem(f"chunk directory missing (every write fails): {chunks.root}")
            self._found.layout_broken = True
        temps: list[Path] = []
        for directory in sorted(chunks.root.iterdir()) if chunks.root.is_dir() else []:
            for path in sorted(directory.iterdir()) if directory.is_dir() else [directory]:
                if TEMP_MARK in path.name:
                    temps.append(path)
                elif not (_CHUNK_NAME.fullmatch(path.name) and path.name[:2] == directory.name):
                    self._problem(f"stray file {path}: not a chunk of this store")
                    self._found.bad_files.append(path)
                else:
                    self._check_chunk_file(path)
        self._result.temp_files = len(temps)
        return temps

    def _check_chunk_file(self, path: Path) -> None:
        self._result.chunk_files += 1
        hasher = new_hasher()
        size = 0
        with open(path, "rb") as f:
            while piece := f.read(_READ_PIECE):
                hasher.update(piece)
                size += len(piece)
        digest = bytes.fromhex(path.name)
        if hasher.digest() == digest:
            self._found.good_chunks[digest] = size
        else:
            self._problem(f"chunk {path.name}: damaged (its content does not match its digest)")
            self._found.bad_files.append(path)

    def _check_blobs(self) -> set[bytes]:
        """Every blob's chunk list against the verified chunks; returns the chunks good blobs use."""
        referenced: set[bytes] = set()
        for digest, size, packed in self._rows("SELECT digest, size, chunks FROM blobs"):
            self._result.blobs += 1
            problem = self._blob_problem(digest, size, packed)
            if problem is None:
                self._found.good_blobs.add(digest)
                referenced.update(c.digest for c in unpack_chunks(packed))
            else:
                self._problem(f"blob {digest.hex()}: {problem}")
                self._found.bad_blobs.append(digest)
        return referenced

    def _blob_problem(self, digest: bytes, size: int, packed: bytes) -> str | None:
        try:
            chunks = unpack_chunks(packed)
        except StoreError as e:
            return str(e)
        for chunk in chunks:
            if self._found.good_chunks.get(chunk.digest) != chunk.size:
                return f"chunk {chunk.digest.hex()} is missing or damaged"
        if sum(c.size for c in chunks) != size:
            return f"chunk sizes add up to {sum(c.size for c in chunks)}, not {size}"
        if len(chunks) == 1 and chunks[0].digest == digest:
            return None  # the chunk file was verified against this very digest
        whole = new_hasher()
        for chunk in chunks:
            whole.update(self._backend.chunks.path(chunk.digest).read_bytes())
        if whole.digest() != digest:
            return "its chunks do not add up to its digest"
        return None

    def _check_directories(self) -> None:
        decoded: dict[bytes, Directory] = {}
        for digest, data in self._rows("SELECT digest, data FROM directories"):
            self._result.directories += 1
            try:
                directory = Directory.from_bytes(data)
            except ValidationError as e:
                self._bad_directory(digest, f"invalid: {e}")
                continue
            if directory.digest() != digest or directory.to_bytes() != data:
                self._bad_directory(digest, "does not match its digest (or is not in canonical form)")
                continue
            decoded[digest] = directory
        # A directory is only as good as its subdirectories: drop broken ones until none is left.
        changed = True
        while changed:
            changed = False
            for digest, directory in list(decoded.items()):
                missing = next((c for c in directory.directories if c.digest not in decoded), None)
                if missing is not None:
                    del decoded[digest]
                    self._bad_directory(
                        digest, f"subdirectory {missing.name!r} ({missing.digest.hex()}) is missing or broken"
                    )
                    changed = True
        self._found.good_dirs = decoded

    def _bad_directory(self, digest: bytes, what: str) -> None:
        self._problem(f"directory {digest.hex()}: {what}")
        self._found.bad_dirs.append(digest)

    def _check_pathinfos(self, check_contents: bool) -> None:
        complete: dict[bytes, bool] = {}
        for key, data in self._rows("SELECT hash, data FROM pathinfos"):
            self._result.pathinfos += 1
            problem, name = self._pathinfo_problem(key, data, complete, check_contents)
            if problem is not None:
                self._problem(f"path info {name}: {problem}")
                self._found.bad_pathinfos.append(key)

    def _pathinfo_problem(
        self, key: bytes, data: bytes, complete: dict[bytes, bool], check_contents: bool
    ) -> tuple[str | None, str]:
        info = pathinfo_pb2.PathInfo()
        try:
            info.ParseFromString(data)
            store_path, node = validate_pathinfo(info)
        except Exception as e:  # protobuf's DecodeError is not part of its typed API
            return f"invalid: {e}", key.hex()
        name = store_path.absolute
        if store_path.digest != key:
            return f"stored under the wrong hash {key.hex()}", name
        missing = self._missing_content(node, complete)
        if missing is not None:
            return f"content incomplete: {missing}", name
        if check_contents and info.HasField("narinfo"):
            try:
                size, sha256 = store_nar_hash(node, self._blobs, self._directories)
            except StoreError as e:
                return f"cannot render its NAR: {e}", name
            if (size, sha256) != (info.narinfo.nar_size, info.narinfo.nar_sha256):
                return (
                    f"NAR is {size} bytes with hash {format_hash(sha256)}, path info says "
                    f"{info.narinfo.nar_size} bytes with {format_hash(info.narinfo.nar_sha256)}",
                    name,
                )
        return None, name

    def _missing_content(self, node: Node, complete: dict[bytes, bool]) -> str | None:
        """What of a tree is absent, or None; subtrees already found complete are skipped."""
        if isinstance(node, FileNode):
            return None if node.digest in self._found.good_blobs else f"blob {node.digest.hex()} is absent"
        if not isinstance(node, DirectoryNode):
            return None
        stack = [node.digest]
        while stack:
            digest = stack.pop()
            if complete.get(digest):
                continue
            directory = self._found.good_dirs.get(digest)
            if directory is None:
                return f"directory {digest.hex()} is absent"
            for file in directory.files:
                if file.digest not in self._found.good_blobs:
                    return f"blob {file.digest.hex()} ({file.name!r}) is absent"
            stack.extend(d.digest for d in directory.directories)
            complete[digest] = True
        return None

    def _repair(self, leftovers: list[Path]) -> None:
        found = self._found
        with self._backend.transaction() as conn:
            conn.executemany("DELETE FROM pathinfos WHERE hash = ?", [(k,) for k in found.bad_pathinfos])
            conn.executemany("DELETE FROM directories WHERE digest = ?", [(d,) for d in found.bad_dirs])
            conn.executemany("DELETE FROM blobs WHERE digest = ?", [(d,) for d in found.bad_blobs])
        for path in found.bad_files + leftovers:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if found.layout_broken:
            self._backend.chunks.create_layout()
        self._result.repaired = True
