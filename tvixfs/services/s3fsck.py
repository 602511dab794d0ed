"""``tvixfs fsck --store s3://…``: check an S3 store top down, count (and remove) leftovers.

Top down, because in a bucket the path infos are what makes everything else reachable: each
PathInfo is decoded and its root looked up; each root directory's stream is decoded and
verified (every directory, the whole tree); each file's blob must be there, as a chunk object
or a blob object whose chunks are all there. ``check_contents`` also downloads every chunk
reached and checks it against its digest (and listed size). What no good path info reaches is
a leftover of an import that was killed (or content another program, such as tvix-store with
its path infos elsewhere, put there): counted, not a problem, and removed by ``repair``.

Repair deletes path infos whose content is damaged or gone, then every object no remaining path
info reaches. Run it while nothing writes to the bucket (an import in progress has written its
chunks but not yet its path info), and never on a bucket shared with tvix-store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tvixfs.castore.digest import EMPTY_DIGEST
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, FileNode, node_from_proto
from tvixfs.protos import pathinfo_pb2
from tvixfs.services import s3layout
from tvixfs.services.errors import CorruptDataError
from tvixfs.services.s3 import S3Objects
from tvixfs.store.pathinfo import validate_pathinfo

Report = Callable[[str], None]


@dataclass
class S3FsckResult:
    objects: int = 0
    pathinfos: int = 0
    problems: int = 0
    unreferenced: int = 0
    repaired: bool = False

    def summary(self) -> str:
        problems = f"{self.problems} problem{'s' * (self.problems != 1)}"
        if self.problems and self.repaired:
            problems += " (repaired)"
        leftovers = f"{self.unreferenced} unreferenced objects"
        if self.repaired and self.unreferenced:
            leftovers += " (removed)"
        return f"checked {self.objects} objects, {self.pathinfos} path infos: {problems}; {leftovers}"


@dataclass
class _Reached:
    """Keys that a good path info reaches, and chunk sizes learnt from blob objects."""

    keys: set[str] = field(default_factory=set)
    trees: dict[bytes, list[Directory]] = field(default_factory=dict)


class _S3Fsck:
    def __init__(self, objects: S3Objects, report: Report, check_contents: bool) -> None:
        self._objects = objects
        self._report = report
        self._check_contents = check_contents
        self._result = S3FsckResult()
        self._reached = _Reached()

    def run(self, repair: bool) -> S3FsckResult:
        keys = {
            kind: set(self._objects.keys(kind))
            for kind in (s3layout.CHUNKS, s3layout.BLOBS, s3layout.DIRS, s3layout.PATHINFOS)
        }
        present = set().union(*keys.values())
        self._result.objects = len(present)
        bad_pathinfos = []
        for key in sorted(keys[s3layout.PATHINFOS]):
            self._result.pathinfos += 1
            reached: set[str] = {key}
            problem = self._check_pathinfo(key, present, reached)
            if problem is None:
                self._reached.keys |= reached
            else:
                self._result.problems += 1
                self._report(f"path info {key}: {problem}")
                bad_pathinfos.append(key)
        leftovers = sorted(present - self._reached.keys - set(bad_pathinfos))
        self._result.unreferenced = len(leftovers)
        if repair:
            for key in [*bad_pathinfos, *leftovers]:
                self._objects.delete(key)
            self._result.repaired = True
        return self._result

    def _check_pathinfo(self, key: str, present: set[str], reached: set[str]) -> str | None:
        """None if the path and everything under it is sound; else what is wrong."""
        data = self._objects.get(key)
        if data is None:
            return "vanished while checked"
        info = pathinfo_pb2.PathInfo()
        try:
            info.ParseFromString(data)
            store_path, _ = validate_pathinfo(info)
            root = node_from_proto(info.node)
        except Exception as e:  # protobuf's DecodeError or a ValidationError
            return f"not a valid PathInfo ({e})"
        if key != s3layout.pathinfo_key(store_path.digest):
            return f"holds the PathInfo of {store_path}"
        files: list[FileNode] = []
        if isinstance(root, FileNode):
            files.append(root)
        elif isinstance(root, DirectoryNode):
            tree_key = s3layout.dir_key(root.digest)
            if tree_key not in present:
                return f"root directory {root.digest.hex()} is missing"
            reached.add(tree_key)
            try:
                tree = self._tree(root.digest)
            except CorruptDataError as e:
                return str(e)
            files.extend(f for d in tree for f in d.files)
        for file in files:
            problem = self._check_blob(file, present, reached)
            if problem is not None:
                return problem
        return None

    def _tree(self, root: bytes) -> list[Directory]:
        found = self._reached.trees.get(root)
        if found is None:
            data = self._objects.get(s3layout.dir_key(root))
            if data is None:
                raise CorruptDataError(f"directory {root.hex()} vanished while checked")
            found = list(s3layout.decode_tree(data, root))
            self._reached.trees[root] = found
        return found

    def _check_blob(self, file: FileNode, present: set[str], reached: set[str]) -> str | None:
        chunk_key = s3layout.chunk_key(file.digest)
        if file.digest == EMPTY_DIGEST:  # needs no object (tvix stores none); ours are kept
            reached.update((chunk_key, s3layout.blob_key(file.digest)))
            return None
        if chunk_key in present:
            reached.add(chunk_key)
            reached.add(s3layout.blob_key(file.digest))  # tvix writes it too; harmless if absent
            return self._check_chunk(file.digest, file.size)
        blob_key = s3layout.blob_key(file.digest)
        if blob_key not in present:
            return f"blob {file.digest.hex()} is missing"
        reached.add(blob_key)
        data = self._objects.get(blob_key)
        if data is None:
            return f"blob {file.digest.hex()} vanished while checked"
        try:
            chunks = s3layout.decode_blob(data, file.digest)
        except CorruptDataError as e:
            return str(e)
        if sum(c.size for c in chunks) != file.size:
            return f"blob {file.digest.hex()}: chunks add up to another size than the file's"
        for chunk in chunks:
            key = s3layout.chunk_key(chunk.digest)
            if key not in present:
                return f"chunk {chunk.digest.hex()} of blob {file.digest.hex()} is missing"
            reached.add(key)
            problem = self._check_chunk(chunk.digest, chunk.size)
            if problem is not None:
                return problem
        return None

    def _check_chunk(self, digest: bytes, size: int) -> str | None:
        if not self._check_contents:
            return None
        data = self._objects.get(s3layout.chunk_key(digest))
        if data is None:
            return f"chunk {digest.hex()} vanished while checked"
        try:
            s3layout.decode_chunk(data, digest, size)
        except CorruptDataError as e:
            return str(e)
        return None


def fsck_s3_store(
    objects: S3Objects, report: Report, repair: bool = False, check_contents: bool = False
) -> S3FsckResult:
    """Check the bucket (under its prefix); ``report`` gets one line per problem found."""
    return _S3Fsck(objects, report, check_contents).run(repair)
