"""Imports checked against what Nix 2.8 does with the same trees and the same store paths."""

from __future__ import annotations

import errno
import io
import multiprocessing
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastcdc.fastcdc_cy import fastcdc_cy
from nixchroot import (
    Closure,
    make_closure,
    nix_add,
    nix_dump,
    nix_dump_path,
    nix_hash_text,
    nix_path_info,
    run,
)

from tvixfs.castore.chunking import MAX_CHUNK, MIN_CHUNK, chunk_stream
from tvixfs.castore.digest import b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, node_from_proto
from tvixfs.importers.chunkworkers import ChunkWorkers, WorkerError, Written
from tvixfs.importers.ingest import (
    PARALLEL_FILES,
    WHOLE_FILE_MAX,
    IngestError,
    _read_pieces,
    ingest_nar,
    ingest_path,
)
from tvixfs.importers.nixsource import NixError, NixSource, import_from_nix, parse_nix_path
from tvixfs.maintenance.fsck import fsck_local_store
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.base import Store
from tvixfs.services.errors import CorruptDataError, FailedPreconditionError
from tvixfs.store.nar import NARError, write_nar
from tvixfs.store.nixtext import format_ca, format_hash, format_signature
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.storepath import StorePath


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few thousand files of this machine's Python packages, copied so nothing changes them."""
    candidates = [Path("/usr/lib/python3/dist-packages"), *sorted(Path("/usr/lib").glob("python3.*"))]
    source = next(p for p in candidates if p.is_dir())
    target = tmp_path_factory.mktemp("real") / "pylib"
    shutil.copytree(source, target, symlinks=True)
    return target


@pytest.fixture(scope="module")
def closure(tmp_path_factory: pytest.TempPathFactory) -> Closure:
    return make_closure(tmp_path_factory.mktemp("nix"))


def render(store: Store, info: pathinfo_pb2.PathInfo) -> bytes:
    _, node = validate_pathinfo(info)

    def get(digest: bytes) -> Directory:
        found = store.directories.get(digest)
        assert found is not None
        return found

    return b"".join(write_nar(node, get, store.blobs.read))


def assert_same_as_nix(store: Store, info: pathinfo_pb2.PathInfo, nix_root: Path, path: Path) -> None:
    """The store path, NAR hash and size Nix gives ``path``, and the NAR bytes it dumps."""
    expected = nix_add(nix_root, path)
    store_path, _ = validate_pathinfo(info)
    assert str(store_path) == expected
    nix = nix_path_info(nix_root, [expected])[expected]
    assert format_hash(info.narinfo.nar_sha256) == nix_hash_text(nix["narHash"])
    assert info.narinfo.nar_size == nix["narSize"]
    assert format_ca(info.narinfo.ca) == nix["ca"]
    assert not info.references
    assert store.pathinfos.get(store_path.digest) == info
    assert render(store, info) == nix_dump(path)


@pytest.mark.nix
@pytest.mark.parametrize(
    "entry", ["", "bin/hello", "share/doc/README", "link-to-readme", "empty-file", "empty-dir"]
)
def test_ingest_path_as_nix_store_add(sample_tree: Path, tmp_path: Path, entry: str) -> None:
    path = sample_tree / entry if entry else sample_tree
    store = open_memory_store()
    info = ingest_path(store, path, path.name)
    assert_same_as_nix(store, info, tmp_path / "nix", path)


@pytest.mark.nix
@pytest.mark.parametrize("backend", ["memory", "local"])
def test_ingest_real_tree(real_tree: Path, tmp_path: Path, backend: str) -> None:
    store = open_memory_store() if backend == "memory" else open_local_store(tmp_path / "tvixfs")
    seen: list[tuple[int, int]] = []
    try:
        info = ingest_path(store, real_tree, "pylib", lambda files, size: seen.append((files, size)))
        assert_same_as_nix(store, info, tmp_path / "nix", real_tree)
    finally:
        store.close()
    files = [Path(d) / f for d, _, fs in os.walk(real_tree) for f in fs]
    regular = [f for f in files if not f.is_symlink()]
    assert len(regular) > 1000
    assert seen[-1] == (len(regular), sum(f.stat().st_size for f in regular))


@pytest.mark.parametrize(
    "size", [0, 1, MIN_CHUNK - 1, MIN_CHUNK, MIN_CHUNK + 1, 3 * MIN_CHUNK, 6 * MAX_CHUNK + 12345]
)
def test_chunk_cuts_are_fastcdcs_however_the_input_is_split(size: int) -> None:
    """The store format: chunks are FastCDC's cuts of the whole blob (64K/256K/1M), whatever
    pieces the bytes arrive in and whichever shortcut chunk_stream takes."""
    data = os.urandom(size)
    expected = [(c.offset, c.length) for c in fastcdc_cy(data, MIN_CHUNK, 256 * 1024, MAX_CHUNK)]
    for piece in (max(size, 1), 1000, MAX_CHUNK):
        pieces = [data[i : i + piece] for i in range(0, size, piece)]
        chunks = [bytes(c) for c in chunk_stream(pieces)]
        offsets = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
        assert list(zip(offsets, map(len, chunks), strict=True)) == (expected or [(0, 0)])
        assert b3digest(b"".join(chunks)) == b3digest(data)


@pytest.mark.parametrize("actual", [0, 99, 100, 101, 5000])
def test_read_pieces_sees_a_file_that_changed_size(tmp_path: Path, actual: int) -> None:
    """The walk saw 100 bytes; a file now longer or shorter is refused, never cut or padded."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * actual)
    for piece in (1 << 20, 7):
        pieces = _read_pieces(os.fsencode(path), 100, piece)
        if actual == 100:
            assert b"".join(pieces) == b"x" * 100
        else:
            with pytest.raises(IngestError, match="changed while being imported"):
                b"".join(pieces)


def test_unsupported_file_type_stores_no_path(sample_tree: Path) -> None:
    os.mkfifo(sample_tree / "share" / "a-fifo")
    store = open_memory_store()
    with pytest.raises(IngestError, match="a-fifo: unsupported file type"):
        ingest_path(store, sample_tree, "sample")
    assert list(store.pathinfos.list()) == []


def test_invalid_name_rejected_before_any_work(sample_tree: Path) -> None:
    store = open_memory_store()
    with pytest.raises(ValueError, match="characters outside"):
        ingest_path(store, sample_tree, "has space")
    assert list(store.pathinfos.list()) == []


@pytest.mark.nix
def test_import_into_a_local_store_by_chunk_workers(sample_tree: Path, tmp_path: Path) -> None:
    """Enough files to start a chunk writer process, files of every size class (empty, small,
    several chunks, above WHOLE_FILE_MAX): the result is Nix's, every blob is committed with
    its chunk files, and no process is left."""
    big = sample_tree / "share" / "big"
    big.mkdir()
    for i in range(PARALLEL_FILES + 50):
        (big / f"f{i:03d}").write_bytes(os.urandom(i * 97))
    (big / "over-whole-max").write_bytes(os.urandom(WHOLE_FILE_MAX + 3 * MAX_CHUNK + 5))
    (big / "several-chunks").write_bytes(os.urandom(3 * MAX_CHUNK))
    store_dir = tmp_path / "tvixfs"
    store = open_local_store(store_dir)
    try:
        info = ingest_path(store, sample_tree, "sample")
        assert multiprocessing.active_children() == []
        assert_same_as_nix(store, info, tmp_path / "nix", sample_tree)
    finally:
        store.close()
    lines: list[str] = []
    result = fsck_local_store(store_dir, lines.append, check_contents=True)
    assert (result.problems, result.orphan_chunks, result.temp_files, lines) == (0, 0, 0, [])


def _write_elsewhere(path: bytes, size: int) -> Written:
    if path.endswith(b"fails"):
        raise OSError(errno.EIO, "Input/output error", os.fsdecode(path))
    return b3digest(path), size, b""


@pytest.mark.parametrize(
    ("name", "error"),
    [("ok", "changed while being imported"), ("fails", "cannot import /x/fails: Input/output error")],
)
def test_chunk_workers_refuse_what_does_not_match(name: str, error: str) -> None:
    """A worker that read other bytes than the importer (the file changed in between) or could
    not read the file fails the import; the workers are stopped either way."""
    recorded: list[bytes] = []
    workers = ChunkWorkers(1, _write_elsewhere, lambda digest, size, packed: recorded.append(digest))
    try:
        for i in range(3):
            workers.submit(f"/x/{i}".encode(), 5, b3digest(f"/x/{i}".encode()))
        workers.drain()
        workers.submit(f"/x/{name}".encode(), 5, b3digest(b"what the importer read"))
        with pytest.raises(WorkerError, match=re.escape(error)):
            workers.drain()
    finally:
        workers.close()
    assert recorded == [b3digest(f"/x/{i}".encode()) for i in range(3)]
    assert multiprocessing.active_children() == []


# --- NAR streams -----------------------------------------------------------------------------

SOME_PATH = StorePath.from_absolute("/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-some")
REFS = [
    StorePath.from_absolute("/nix/store/zzbgd045z0d4icpbc2yyz4gx48ak44la-zed"),
    StorePath.from_absolute("/nix/store/11bgd045z0d4icpbc2yyz4gx48ak44la-one"),
]


@pytest.mark.nix
def test_ingest_nar_round_trip(sample_tree: Path) -> None:
    dump = nix_dump(sample_tree)
    store = open_memory_store()
    with pytest.raises(FailedPreconditionError, match="is not in the store"):
        ingest_nar(store, io.BytesIO(dump), SOME_PATH, REFS)  # Nix: references must be valid
    for ref in REFS:
        ingest_nar(store, io.BytesIO(dump), ref)
    info = ingest_nar(store, io.BytesIO(dump), SOME_PATH, REFS)
    assert render(store, info) == dump
    assert info.narinfo.nar_size == len(dump)
    assert list(info.narinfo.reference_names) == sorted(r.basename for r in REFS)
    assert list(info.references) == [r.digest for r in sorted(REFS, key=lambda r: r.basename)]
    assert node_from_proto(info.node).name == SOME_PATH.basename.encode()
    assert store.pathinfos.get(SOME_PATH.digest) == info


def _root_digest(dump: bytes) -> bytes:
    store = open_memory_store()
    node = node_from_proto(ingest_nar(store, io.BytesIO(dump), SOME_PATH).node)
    assert isinstance(node, DirectoryNode)
    return node.digest


@pytest.mark.nix
def test_malformed_nar_stores_no_path(sample_tree: Path) -> None:
    dump = nix_dump(sample_tree)
    store = open_memory_store()
    with pytest.raises(NARError, match="trailing data"):
        ingest_nar(store, io.BytesIO(dump + b"\0" * 8), SOME_PATH)
    assert store.pathinfos.get(SOME_PATH.digest) is None
    assert store.directories.get(_root_digest(dump)) is None


@pytest.mark.nix
def test_nar_hash_mismatch_stores_no_path(sample_tree: Path) -> None:
    dump = nix_dump(sample_tree)
    store = open_memory_store()
    expected = pathinfo_pb2.NARInfo(nar_sha256=b"\1" * 32, nar_size=len(dump))
    with pytest.raises(CorruptDataError, match=r"expected sha256:.*not imported"):
        ingest_nar(store, io.BytesIO(dump), SOME_PATH, narinfo=expected)
    assert store.pathinfos.get(SOME_PATH.digest) is None
    assert store.directories.get(_root_digest(dump)) is None


# --- from a real Nix store -------------------------------------------------------------------


def nix_closure(closure: Closure, path: str) -> list[str]:
    out = subprocess.run(
        ["nix-store", "--store", closure.uri, "-qR", path], check=True, capture_output=True, text=True
    ).stdout
    return out.split()


def assert_metadata_as_nix(store: Store, closure: Closure, paths: list[str]) -> None:
    """Every field ``nix path-info --json`` shows, as tvixfs stored it."""
    for path, nix in nix_path_info(closure.root, paths).items():
        info = store.pathinfos.get(StorePath.from_absolute(path).digest)
        assert info is not None, path
        narinfo = info.narinfo
        assert format_hash(narinfo.nar_sha256) == nix_hash_text(nix["narHash"]), path
        assert narinfo.nar_size == nix["narSize"], path
        assert ["/nix/store/" + n for n in narinfo.reference_names] == nix["references"], path
        assert [r.hex() for r in info.references] == [
            StorePath.from_absolute(r).digest.hex() for r in nix["references"]
        ]
        assert [format_signature(s) for s in narinfo.signatures] == nix.get("signatures", []), path
        deriver = (
            str(StorePath(narinfo.deriver.digest, narinfo.deriver.name)) if narinfo.deriver.name else None
        )
        assert deriver == nix.get("deriver"), path
        assert (format_ca(narinfo.ca) if narinfo.HasField("ca") else None) == nix.get("ca"), path


@pytest.mark.nix
def test_import_closure_from_nix(closure: Closure) -> None:
    store = open_memory_store()
    order: list[StorePath] = []
    wanted = [parse_nix_path(closure.built), parse_nix_path(closure.drv)]
    import_from_nix(store, NixSource(closure.uri), wanted, recursive=True, imported=order.append)
    everything = sorted({*nix_closure(closure, closure.built), *nix_closure(closure, closure.drv)})
    assert sorted(str(p) for p in order) == everything
    position = {p: i for i, p in enumerate(order)}
    for path in order:  # references first
        info = store.pathinfos.get(path.digest)
        assert info is not None
        for name in info.narinfo.reference_names:
            assert position[StorePath.from_basename(name)] < position[path]
    assert_metadata_as_nix(store, closure, everything)
    for path in everything:
        dump = nix_dump_path(closure.root, path)
        info = store.pathinfos.get(StorePath.from_absolute(path).digest)
        assert info is not None
        assert render(store, info) == dump, path
    again: list[StorePath] = []  # already present: nothing to do
    import_from_nix(store, NixSource(closure.uri), wanted, recursive=True, imported=again.append)
    assert again == []


@pytest.mark.nix
def test_import_from_nix_without_closure_needs_the_references(closure: Closure) -> None:
    """As in Nix, a path is accepted only once what it refers to is there."""
    store = open_memory_store()
    with pytest.raises(FailedPreconditionError, match="is not in the store"):
        import_from_nix(store, NixSource(closure.uri), [parse_nix_path(closure.built)])
    assert list(store.pathinfos.list()) == []
    deps = [
        p
        for p in run("nix-store", "--store", closure.uri, "-qR", closure.built).split()
        if p != closure.built
    ]
    import_from_nix(store, NixSource(closure.uri), [parse_nix_path(p) for p in deps])
    import_from_nix(store, NixSource(closure.uri), [parse_nix_path(closure.built)])
    assert (
        str(validate_pathinfo(store.pathinfos.get(parse_nix_path(closure.built).digest))[0]) == closure.built
    )
    assert_metadata_as_nix(store, closure, [closure.built])


@pytest.mark.nix
def test_import_from_nix_refuses_content_that_fails_nars_hash(tmp_path: Path) -> None:
    """A store whose file changed behind Nix's back: the NAR no longer has Nix's narHash."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("original\n")
    nix_root = tmp_path / "nix"
    path = nix_add(nix_root, tree)
    stored = nix_root / path.lstrip("/") / "file"
    stored.chmod(0o644)
    stored.write_text("tampered\n")
    store = open_memory_store()
    with pytest.raises(CorruptDataError, match="not imported"):
        import_from_nix(store, NixSource(f"local?root={nix_root}"), [parse_nix_path(path)])
    assert list(store.pathinfos.list()) == []


@pytest.mark.nix
def test_import_from_nix_of_an_invalid_path(closure: Closure) -> None:
    missing = parse_nix_path("/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-missing")
    store = open_memory_store()
    with pytest.raises(NixError, match="is not valid"):
        import_from_nix(store, NixSource(closure.uri), [missing])


@pytest.mark.nix
def test_parse_nix_path_follows_result_links(closure: Closure, tmp_path: Path) -> None:
    (tmp_path / "result").symlink_to(closure.built)
    assert str(parse_nix_path(str(tmp_path / "result"))) == closure.built
    with pytest.raises(NixError, match="not a Nix store path"):
        parse_nix_path(str(tmp_path))


def test_unreadable_tree_is_one_clear_error(tmp_path: Path) -> None:
    store = open_memory_store()
    with pytest.raises(IngestError, match=r"cannot import .*/missing: No such file or directory"):
        ingest_path(store, tmp_path / "missing", "missing")
