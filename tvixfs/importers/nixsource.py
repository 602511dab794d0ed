"""Store paths read out of a real Nix store through the Nix command line.

The Nix CLI is the one stable interface to every kind of Nix store (the local one, a chroot
``local?root=…``, the daemon, a binary cache), so nothing here reads Nix's database. What
Nix 2.8 offers and how it behaves:

- ``nix-store --store URI --query --requisites``: the closure; fails fast on an invalid path
  (``nix path-info`` and ``nix store dump-path`` would first try substituters for seconds).
- ``nix path-info --json``: metadata. ``nix store dump-path``: the NAR (``nix-store --store
  URI --dump`` ignores ``--store`` and dumps the host's file system path instead). Both
  treat a ``.drv`` path as "its outputs" and try to build them unless given
  ``--derivation``, which in turn fails on any other path.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from tvixfs.castore.errors import ValidationError
from tvixfs.importers.ingest import ingest_nar
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.base import Store
from tvixfs.services.errors import StoreError
from tvixfs.store.nixtext import parse_ca, parse_hash, parse_signature
from tvixfs.store.storepath import STORE_DIR, StorePath

log = logging.getLogger(__name__)

NIX_COMMAND = ("--extra-experimental-features", "nix-command")
# Paths per ``nix path-info`` call: keeps command lines far below ARG_MAX.
_BATCH = 500
# How long a failing ``nix store dump-path`` may take to exit after closing its output.
_EXIT_GRACE = 2.0


class NixError(StoreError):
    """The Nix CLI failed, or answered something this version cannot read."""


@dataclass(frozen=True)
class NixPathInfo:
    path: StorePath
    references: list[StorePath]
    narinfo: pathinfo_pb2.NARInfo  # nar_size, nar_sha256, signatures, deriver, ca


def parse_path_info(entry: dict[str, Any]) -> NixPathInfo:
    """One object of ``nix path-info --json`` (2.4+ list form) as a NixPathInfo."""
    try:
        path = StorePath.from_absolute(entry["path"])
        if entry.get("valid") is False:
            raise NixError(f"{path}: not valid in the Nix store")
        narinfo = pathinfo_pb2.NARInfo(
            nar_size=int(entry["narSize"]),
            nar_sha256=parse_hash(entry["narHash"]),
            signatures=[parse_signature(s) for s in entry.get("signatures", [])],
        )
        if entry.get("deriver"):
            deriver = StorePath.from_absolute(entry["deriver"])
            narinfo.deriver.CopyFrom(pathinfo_pb2.StorePath(name=deriver.name, digest=deriver.digest))
        if entry.get("ca"):
            narinfo.ca.CopyFrom(parse_ca(entry["ca"]))
        references = [StorePath.from_absolute(r) for r in entry.get("references", [])]
    except (KeyError, TypeError, ValueError) as e:  # ValidationError is a ValueError
        raise NixError(f"cannot read nix path-info entry {entry!r:.200}: {e}") from None
    return NixPathInfo(path, references, narinfo)


class NixSource:
    """One Nix store, reached through its CLI; ``uri`` None means Nix's default store."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri

    def _store_args(self) -> list[str]:
        return ["--store", self.uri] if self.uri else []

    def _run(self, argv: list[str]) -> bytes:
        try:
            done = subprocess.run(argv, capture_output=True, check=False)
        except OSError as e:
            raise NixError(f"cannot run {argv[0]}: {e}") from None
        if done.returncode != 0:
            raise NixError(f"{' '.join(argv[:3])}… failed: {_last_line(done.stderr)}")
        return done.stdout

    def closure(self, paths: Sequence[StorePath]) -> list[StorePath]:
        """Every path ``paths`` refer to, transitively, themselves included."""
        out = self._run(
            ["nix-store", *self._store_args(), "--query", "--requisites", *(p.absolute for p in paths)]
        )
        return [StorePath.from_absolute(line) for line in out.decode().split()]

    def path_infos(self, paths: Sequence[StorePath]) -> dict[StorePath, NixPathInfo]:
        """Metadata of valid ``paths`` (check validity first: see the module docstring)."""
        found: dict[StorePath, NixPathInfo] = {}
        derivations = [p for p in paths if _is_derivation(p)]
        others = [p for p in paths if not _is_derivation(p)]
        for group, flags in ((derivations, ["--derivation"]), (others, [])):
            for start in range(0, len(group), _BATCH):
                batch = group[start : start + _BATCH]
                out = self._run(
                    [
                        "nix",
                        *NIX_COMMAND,
                        "path-info",
                        *self._store_args(),
                        "--json",
                        *flags,
                        *(p.absolute for p in batch),
                    ]
                )
                for info in map(parse_path_info, _json_entries(out)):
                    found[info.path] = info
        missing = [p for p in paths if p not in found]
        if missing:
            raise NixError(f"nix path-info said nothing about {missing[0]}")
        return found

    @contextmanager
    def nar(self, path: StorePath) -> Iterator[IO[bytes]]:
        """The NAR of ``path`` as a stream; Nix's failure is raised when the block ends."""
        flags = ["--derivation"] if _is_derivation(path) else []
        argv = ["nix", *NIX_COMMAND, "store", "dump-path", *self._store_args(), *flags, path.absolute]
        with tempfile.TemporaryFile() as errors:
            try:
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
            except OSError as e:
                raise NixError(f"cannot run nix: {e}") from None
            assert proc.stdout is not None
            try:
                yield proc.stdout
            except BaseException as e:
                # A stream cut short is usually Nix failing: then it exits at once, and its
                # error is the one to report. A Nix still writing was stopped by our error.
                try:
                    code = proc.wait(timeout=_EXIT_GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    raise e from None
                if code != 0:
                    raise _dump_failed(path, errors) from e
                raise
            finally:
                proc.stdout.close()
                proc.wait()
            if proc.returncode != 0:
                raise _dump_failed(path, errors)


def _dump_failed(path: StorePath, errors: IO[bytes]) -> NixError:
    errors.seek(0)
    return NixError(f"nix store dump-path {path} failed: {_last_line(errors.read())}")


def _is_derivation(path: StorePath) -> bool:
    return path.name.endswith(".drv")


def _json_entries(out: bytes) -> Iterable[dict[str, Any]]:
    """Nix 2.4-2.18 print a list of objects; later versions an object keyed by path."""
    try:
        data = json.loads(out)
    except ValueError as e:
        raise NixError(f"nix path-info printed invalid JSON: {e}") from None
    if isinstance(data, dict):
        return [{"path": k, **(v or {"valid": False})} for k, v in data.items()]
    if isinstance(data, list):
        return data
    raise NixError("nix path-info printed JSON of an unexpected shape")


def _last_line(stderr: bytes) -> str:
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no error message"


def parse_nix_path(arg: str) -> StorePath:
    """A store path named on the command line: absolute, or a symlink to one (``./result``)."""
    path = arg if arg.startswith(STORE_DIR + "/") else os.path.realpath(arg)
    try:
        return StorePath.from_absolute(path)
    except ValidationError as e:
        raise NixError(f"{arg}: not a Nix store path ({e})") from None


def references_first(infos: dict[StorePath, NixPathInfo]) -> list[StorePath]:
    """``infos`` ordered so that every path comes after the paths it refers to."""
    ordered: list[StorePath] = []
    done: set[StorePath] = set()
    for start in sorted(infos, key=lambda p: p.basename):
        if start in done:
            continue
        done.add(start)
        stack = [(start, iter(infos[start].references))]
        while stack:
            path, refs = stack[-1]
            ref = next(refs, None)
            if ref is None:
                stack.pop()
                ordered.append(path)
            elif ref not in done and ref in infos:
                done.add(ref)
                stack.append((ref, iter(infos[ref].references)))
    return ordered


def import_from_nix(
    store: Store,
    source: NixSource,
    paths: Sequence[StorePath],
    recursive: bool = False,
    imported: Callable[[StorePath], None] | None = None,
) -> None:
    """Copy ``paths`` (with ``recursive``: their whole closure) from Nix into ``store``.

    References are imported before referrers, so a store that has a path has what it refers
    to (when recursive). Paths already in ``store`` are skipped. Each NAR is checked against
    Nix's narHash and narSize; on a mismatch that path gets no PathInfo and the import stops.
    """
    closure = source.closure(paths)  # also fails fast, and clearly, on an invalid path
    wanted = closure if recursive else list(dict.fromkeys(paths))
    missing = [p for p in wanted if store.pathinfos.get(p.digest) is None]
    if not missing:
        return
    infos = source.path_infos(missing)
    for path in references_first(infos):
        info = infos[path]
        with source.nar(path) as stream:
            ingest_nar(store, stream, path, info.references, info.narinfo)
        log.debug("imported %s", path)
        if imported is not None:
            imported(path)
