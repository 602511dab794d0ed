"""Store path basename -> validated root node: the one seam between the filesystem and path infos.

The mount needs little of a PathInfo: the root node a store path's basename names, the NAR hash
and size it shows as extended attributes, and the names of the paths it refers to (to fetch
those ahead). ``RootNodes`` hands it exactly that, validated once, and applies the signature
policy (``trusted_keys``, ``nar_check``) while it still holds the raw record, so nothing under
``tvixfs/fs/`` sees protobuf or Nix signatures (tvix's ``RootNodes`` trait is the same cut).
Its methods block: the mount calls them through its bridge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import Node
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.base import PathInfoService
from tvixfs.services.errors import CorruptDataError
from tvixfs.store.nixsig import PublicKey
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.signing import check_nix_signature, check_root_signature
from tvixfs.store.storepath import StorePath

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StorePathRoot:
    """One store path as the mount shows it: its root node is named by the basename."""

    store_path: StorePath
    node: Node
    nar_size: int | None
    nar_sha256: bytes | None
    references: tuple[bytes, ...] = ()  # basenames of the paths it refers to, if the store named them

    @property
    def name(self) -> bytes:
        return self.node.name


def root_from_pathinfo(info: pathinfo_pb2.PathInfo) -> StorePathRoot:
    """Validate a PathInfo from the store; CorruptDataError if it breaks a rule."""
    try:
        store_path, node = validate_pathinfo(info)
    except ValidationError as e:
        raise CorruptDataError(f"store returned an invalid PathInfo: {e}") from None
    if not info.HasField("narinfo"):
        return StorePathRoot(store_path, node, None, None)
    narinfo = info.narinfo
    references = tuple(name.encode("ascii") for name in narinfo.reference_names)
    return StorePathRoot(store_path, node, narinfo.nar_size, narinfo.nar_sha256, references)


class RootNodes:
    """The store paths of a PathInfoService, validated, each with why it is not trusted (or None).

    ``trusted_keys``: if any, a path counts as trusted only if one of them signed its store path
    together with its root node. ``nar_check``: (size, sha256) of a root node's NAR, rendered
    by the caller; given, a path with only a trusted Nix signature is trusted once its tree
    renders to the NAR that signature covers.
    """

    def __init__(
        self,
        pathinfos: PathInfoService,
        *,
        trusted_keys: Mapping[str, PublicKey] | None = None,
        nar_check: Callable[[Node], tuple[int, bytes]] | None = None,
    ) -> None:
        self._pathinfos = pathinfos
        self._trusted = dict(trusted_keys or {})
        self._nar_check = nar_check

    def get(self, digest: bytes) -> tuple[StorePathRoot | None, str | None]:
        """(the root stored under this output hash or None, why it is not trusted or None).

        CorruptDataError if the store's record breaks a rule."""
        info = self._pathinfos.get(digest)
        if info is None:
            return None, None
        root = root_from_pathinfo(info)
        why = self._untrusted(info)
        if why is not None and self._nar_check is not None:
            why = self._nar_matches(info, root, why, self._nar_check)
        return root, why

    def list(self) -> Iterator[tuple[StorePathRoot | CorruptDataError, str | None]]:
        """Every stored path (or why its record is invalid) with why it is not trusted.

        No NAR is rendered here: a listing would read every path in the store."""
        for info in self._pathinfos.list():
            try:
                yield root_from_pathinfo(info), self._untrusted(info)
            except CorruptDataError as e:
                yield e, None

    def _untrusted(self, info: pathinfo_pb2.PathInfo) -> str | None:
        if not self._trusted:
            return None
        return check_root_signature(info, self._trusted)

    def _nar_matches(
        self,
        info: pathinfo_pb2.PathInfo,
        root: StorePathRoot,
        why: str,
        nar_check: Callable[[Node], tuple[int, bytes]],
    ) -> str | None:
        """For a path without a trusted root signature: None if a trusted key signed it the
        Nix way and its tree renders to the NAR signed for; else why not."""
        if check_nix_signature(info, self._trusted) is not None:
            return why
        if nar_check(root.node) != (root.nar_size, root.nar_sha256):
            return "its tree does not render to the NAR hash and size its Nix signature covers"
        log.info("%s: NAR hash verified against its Nix signature", root.name.decode(errors="replace"))
        return None
