"""Commands that fill and inspect a store: import, import-nar, import-nix, export-nar, info, ls, cat."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Annotated, Any, cast

import typer

from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvixfs.cli.app import StoreOptions, app, fail, log, store_options
from tvixfs.cli.progress import CountingReader, Progress
from tvixfs.importers.ingest import ingest_nar, ingest_path
from tvixfs.services.base import Store
from tvixfs.services.errors import NotFoundError
from tvixfs.store.nar import file_contents
from tvixfs.store.nixtext import format_hash, signatures_narinfo
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.pathinfojson import pathinfo_json
from tvixfs.store.storepath import STORE_DIR, StorePath, check_name

if TYPE_CHECKING:
    from tvixfs.services.rootnodes import StorePathRoot

# Modules only some commands need are imported in those commands: `import` starts without
# them (cryptography for signatures, the NAR renderer, the Nix reader).

# Symlinks followed while resolving one path, as Linux allows (ELOOP beyond).
MAX_SYMLINKS = 40
SignKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--sign-key", help="Sign what is imported with this Nix secret key file.", show_default=False
    ),
]
TrustedKeyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--trusted-public-key",
        help="Refuse paths without a valid Nix signature of this key (NAME:BASE64, repeatable).",
        show_default=False,
    ),
]


@contextmanager
def _opened(
    where: StoreOptions, *, sign_key: str | None = None, trusted: list[str] | None = None
) -> Iterator[Store]:
    """The store, signing what is put into it (``--sign-key``) and refusing what no trusted key
    signed (``--trusted-public-key``)."""
    if sign_key is None and not trusted:
        with where.open() as opened:
            yield opened
        return
    from tvixfs.services.trust import load_public_keys, load_secret_key, with_trust

    key = load_secret_key(sign_key) if sign_key is not None else None
    keys = load_public_keys(trusted)
    with where.open() as opened:
        yield with_trust(opened, key, keys)


@app.command("import")
@store_options()
def import_(
    paths: Annotated[list[str], typer.Argument(help="Files, directories or symlinks to import.")],
    *,
    name: Annotated[
        str | None, typer.Option("--name", help="Store path name (default: the basename).")
    ] = None,
    where: StoreOptions,
    sign_key: SignKeyOpt = None,
) -> None:
    """Import trees as `nix-store --add` does; prints each resulting store path."""
    if name is not None and len(paths) > 1:
        fail("--name applies to a single path")
    with _opened(where, sign_key=sign_key) as opened:
        for path in paths:
            if not os.path.lexists(path):
                fail(f"{path}: no such file or directory")
            path_name = os.path.basename(os.path.abspath(path)) if name is None else name
            try:
                check_name(path_name)
            except ValidationError as e:
                fail(f"{path}: {e} (choose another with --name)")
            progress = Progress.on_terminal(path)
            try:
                info = ingest_path(opened, path, path_name, progress)
            finally:
                if progress is not None:
                    progress.clear()
            print(validate_pathinfo(info)[0])


@app.command("import-nar")
@store_options()
def import_nar(
    file: Annotated[str, typer.Argument(help="The NAR file, or - for standard input.")],
    *,
    path: Annotated[str, typer.Option("--path", help="The store path it becomes (/nix/store/…).")],
    reference: Annotated[
        list[str] | None, typer.Option("--reference", help="A store path it refers to (repeatable).")
    ] = None,
    where: StoreOptions,
    signature: Annotated[
        list[str] | None,
        typer.Option(
            "--signature", help="A Nix signature of the path, NAME:BASE64 (repeatable).", show_default=False
        ),
    ] = None,
    sign_key: SignKeyOpt = None,
    trusted_public_key: TrustedKeyOpt = None,
) -> None:
    """Import a NAR as the store path given by --path; prints it."""
    with _opened(where, sign_key=sign_key, trusted=trusted_public_key) as opened:
        store_path = StorePath.from_absolute(path)
        references = [StorePath.from_absolute(r) for r in reference or []]
        narinfo = signatures_narinfo(signature or [])
        with _input(file) as stream:
            progress = Progress.on_terminal(file)
            counted = stream if progress is None else cast(IO[bytes], CountingReader(stream, progress))
            try:
                info = ingest_nar(opened, counted, store_path, references, narinfo)
            finally:
                if progress is not None:
                    progress.clear()
        print(validate_pathinfo(info)[0])


@contextmanager
def _input(file: str) -> Iterator[IO[bytes]]:
    if file == "-":
        if sys.stdin is None:  # started with stdin closed (<&-)
            fail("standard input is closed")
        yield sys.stdin.buffer
    else:
        with open(file, "rb") as stream:
            yield stream


@app.command("import-nix")
@store_options()
def import_nix(
    paths: Annotated[list[str], typer.Argument(help="Store paths (or symlinks to them) in Nix's store.")],
    *,
    nix_store: Annotated[
        str | None, typer.Option("--nix-store", help="Nix store URI to read from (default: Nix's own).")
    ] = None,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Also import everything they refer to.")
    ] = False,
    where: StoreOptions,
    sign_key: SignKeyOpt = None,
    trusted_public_key: TrustedKeyOpt = None,
) -> None:
    """Copy store paths from a Nix store, verified against Nix's narHash; prints each one."""
    from tvixfs.importers.nixsource import NixSource, import_from_nix, parse_nix_path

    with _opened(where, sign_key=sign_key, trusted=trusted_public_key) as opened:
        wanted = [parse_nix_path(p) for p in paths]
        import_from_nix(
            opened,
            NixSource(nix_store),
            wanted,
            recursive=recursive,
            imported=lambda p: log.info("imported %s", p),
        )
        for store_path in dict.fromkeys(wanted):
            print(store_path)


@app.command("export-nar")
@store_options()
def export_nar(
    path: Annotated[str, typer.Argument(help="A store path, or a path inside one.")],
    *,
    where: StoreOptions,
) -> None:
    """Write the NAR of a path to standard output, byte for byte what `nix-store --dump` gives."""
    from tvixfs.services.narrender import rendered_nar

    with where.open(create="never") as opened:
        node = _resolve(opened, path, follow_last=False)
        recorded = _recorded_nar(opened, path)
        rendered = _NarCheck()
        with rendered_nar(opened, node) as pieces:
            _write_stdout(rendered.count(pieces))
        if recorded is not None and rendered.facts() != recorded:
            size, sha256 = rendered.facts()
            fail(
                f"{path}: the NAR written ({size} bytes, {format_hash(sha256)}) is not the one recorded "
                f"({recorded[0]} bytes, {format_hash(recorded[1])}): the store is damaged and the bytes "
                "already written are wrong; run `tvixfs fsck --check-contents`"
            )


class _NarCheck:
    """Size and sha256 of what is written, to compare with the recorded narHash at the end."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._size = 0

    def count(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        for piece in pieces:
            self._sha.update(piece)
            self._size += len(piece)
            yield piece

    def facts(self) -> tuple[int, bytes]:
        return self._size, self._sha.digest()


def _recorded_nar(store: Store, path: str) -> tuple[int, bytes] | None:
    """The recorded (narSize, narHash) when ``path`` is a whole store path that has them."""
    try:
        store_path = StorePath.from_absolute(path) if path.startswith("/") else StorePath.from_basename(path)
    except ValidationError:
        return None  # a path inside a store path: Nix records no hash for it
    root = _stored(store, store_path)
    if root.nar_size is None or root.nar_sha256 is None:
        return None
    return root.nar_size, root.nar_sha256


def _write_stdout(pieces: Iterable[bytes]) -> None:
    """Copy to stdout; a reader that went away (``| head``) ends the command quietly, with
    status 0, as a program killed by SIGPIPE in a pipeline (``cat | head``) does."""
    if sys.stdout is None:  # started with stdout closed (>&-)
        fail("standard output is closed")
    out = sys.stdout.buffer
    try:
        for piece in pieces:
            out.write(piece)
        out.flush()
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


@app.command("info")
@store_options()
def info(
    paths: Annotated[list[str], typer.Argument(help="Store paths.")],
    *,
    where: StoreOptions,
) -> None:
    """Print path infos as JSON, shaped like `nix path-info --json`."""
    with where.open(create="never") as opened:
        found = [_info_json(opened, StorePath.from_absolute(p)) for p in paths]
        print(json.dumps(found, indent=2))


def _info_json(store: Store, store_path: StorePath) -> dict[str, Any]:
    """``store_path``'s path info as ``nix path-info --json`` shows it."""
    info = store.pathinfos.get(store_path.digest)
    if info is None or validate_pathinfo(info)[0] != store_path:
        raise NotFoundError(f"{store_path} is not in the store")
    return pathinfo_json(info)


@app.command("ls")
@store_options()
def ls(
    path: Annotated[
        str | None, typer.Argument(help="A store path or a path inside one (default: list store paths).")
    ] = None,
    *,
    long: Annotated[bool, typer.Option("--long", "-l", help="Show type, size and link targets.")] = False,
    where: StoreOptions,
) -> None:
    """List the store paths, or a directory inside one."""
    with where.open(create="never") as opened:
        if path is None or path.rstrip("/") == STORE_DIR:
            for store_path in sorted(str(validate_pathinfo(i)[0]) for i in opened.pathinfos.list()):
                print(store_path)
            return
        node = _resolve(opened, path, follow_last=False)
        if isinstance(node, SymlinkNode):  # like ls: a link to a directory lists the directory
            try:
                target = _resolve(opened, path, follow_last=True)
            except (NotFoundError, ValidationError):
                target = node
            if isinstance(target, DirectoryNode):
                node = target
        entries: list[Node] = [node]
        if isinstance(node, DirectoryNode):
            entries = _directory(opened, node).entries()
        sys.stdout.buffer.write(b"".join(_ls_line(e, long) for e in entries))


def _ls_line(node: Node, long: bool) -> bytes:
    if not long:
        return node.name + b"\n"
    if isinstance(node, DirectoryNode):
        return b"dr-xr-xr-x %12d %s\n" % (0, node.name)
    if isinstance(node, FileNode):
        return b"%s %12d %s\n" % (b"-r-xr-xr-x" if node.executable else b"-r--r--r--", node.size, node.name)
    return b"lrwxrwxrwx %12d %s -> %s\n" % (0, node.name, node.target)


@app.command("cat")
@store_options()
def cat(
    path: Annotated[str, typer.Argument(help="A file inside a store path.")],
    *,
    where: StoreOptions,
) -> None:
    """Write a file of a store path to standard output (symlinks are followed)."""
    with where.open(create="never") as opened:
        node = _resolve(opened, path, follow_last=True)
        if not isinstance(node, FileNode):
            fail(f"{path}: not a regular file")
        _write_stdout(file_contents(node, opened.blobs.read))


# --- reading paths out of a store ------------------------------------------------------------


def _stored(store: Store, store_path: StorePath) -> StorePathRoot:
    """``store_path``'s validated root; its root node must carry the name asked for."""
    from tvixfs.services.rootnodes import RootNodes

    root, _ = RootNodes(store.pathinfos).get(store_path.digest)
    if root is None or root.store_path != store_path:
        raise NotFoundError(f"{store_path} is not in the store")
    return root


def _directory(store: Store, node: DirectoryNode) -> Directory:
    found = store.directories.get(node.digest)
    if found is None:
        raise NotFoundError(f"directory {node.digest.hex()} ({_text(node.name)}) is missing from the store")
    return found


def _resolve(store: Store, path: str, follow_last: bool) -> Node:
    """The node at ``/nix/store/<hash>-<name>/sub/path``, walking symlinks as the kernel would.

    Symlinks inside a path are always followed, the last one only with ``follow_last``;
    targets may be relative or point into another store path, but not outside the store.
    """
    prefix = STORE_DIR.encode() + b"/"
    pending = deque(os.fsencode(path).removeprefix(prefix).split(b"/"))
    trail: list[Node] = []  # from the store path root down to the current node
    followed = 0
    while pending:
        part = pending.popleft()
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not trail:
                raise ValidationError(f"{path}: leads out of {STORE_DIR}")
            trail.pop()
            continue
        node = _child(store, trail[-1], part, path) if trail else _root(store, part)
        if isinstance(node, SymlinkNode) and (pending or follow_last):
            followed += 1
            if followed > MAX_SYMLINKS:
                raise ValidationError(f"{path}: too many levels of symbolic links")
            target = node.target
            if target.startswith(b"/"):
                if not target.startswith(prefix):
                    raise ValidationError(f"{path}: symlink {_text(node.name)} points outside {STORE_DIR}")
                trail.clear()
                target = target.removeprefix(prefix)
            pending.extendleft(reversed(target.split(b"/")))
            continue
        trail.append(node)
    if not trail:
        raise ValidationError(f"{path}: not a path inside a store path")
    return trail[-1]


def _root(store: Store, basename: bytes) -> Node:
    return _stored(store, StorePath.from_basename(basename)).node


def _child(store: Store, parent: Node, name: bytes, path: str) -> Node:
    if not isinstance(parent, DirectoryNode):
        raise NotFoundError(f"{path}: {_text(parent.name)} is not a directory")
    for entry in _directory(store, parent):
        if entry.name == name:
            return entry
    raise NotFoundError(f"{path}: no such file or directory")


def _text(name: bytes) -> str:
    """A node name for a message: as the shell would show it, never a ``b'...'`` repr."""
    return os.fsdecode(name)
