"""Store path basename -> root node, the entries of the mount root.

The kernel serializes lookups within one directory, and the mount root holds every store path,
so this is the hottest and most serialized path of the daemon: answers are cached (positive
ones for long, since a store path never changes; negative ones briefly, since a path may be
imported at any moment) and concurrent identical lookups share one PathInfoService call. A
failing store is never cached: the next lookup asks again.

A program started from one store path soon opens files of the paths it refers to (its
libraries, its interpreter), each a root lookup that waits for the store. So when the kernel
first looks a store path up, the path infos of its references are fetched in the background
(a few at a time, a bounded number queued) into the same cache; a lookup that arrives while
one is on its way waits for it instead of asking again. A reference that is itself looked up
later has its own references fetched then, so the prefetch stays one step ahead of what is
used rather than fetching whole closures nobody opens. Prefetch failures are not errors:
the lookup that needs the path asks again.

With trusted keys, a path info counts only if one of them signed its store path together with
its root node (store/signing.py): one signature check per store path, in the worker thread that
fetched it; everything below the root is covered by the digests the reader already checks.
A path that carries only Nix's signature (say, from cache.nixos.org) has no signed root node;
with ``nar_check`` it is admitted once the NAR its tree renders to has the signed hash and
size (reading the whole path once, at its first lookup; remembered with the positive cache).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import trio
from cachetools import LRUCache, TTLCache

from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import Node
from tvixfs.fs.bridge import Bridge
from tvixfs.fs.inflight import InFlight
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.base import PathInfoService
from tvixfs.services.errors import CorruptDataError
from tvixfs.store.nixsig import PublicKey
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.signing import check_nix_signature, check_root_signature
from tvixfs.store.storepath import StorePath

log = logging.getLogger(__name__)

POSITIVE_ENTRIES = 65536
NEGATIVE_ENTRIES = 65536
NEGATIVE_TTL = 1.0
# Path info fetches for references: at most this many at once, this many queued or running.
PREFETCH_CONCURRENCY = 4
PREFETCH_QUEUE = 256
# Fetched paths whose references are not fetched yet (they wait for a lookup of their own).
UNEXPANDED_ENTRIES = 4096
# Store paths refused for their signature and already logged (each is logged once).
REFUSED_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class StorePathRoot:
    """One store path as the mount shows it: its root node is named by the basename."""

    store_path: StorePath
    node: Node
    nar_size: int | None
    nar_sha256: bytes | None

    @property
    def name(self) -> bytes:
        return self.node.name


def root_from_pathinfo(info: pathinfo_pb2.PathInfo) -> StorePathRoot:
    """Validate a PathInfo from the store; CorruptDataError if it breaks a rule."""
    try:
        store_path, node = validate_pathinfo(info)
    except ValidationError as e:
        raise CorruptDataError(f"store returned an invalid PathInfo: {e}") from None
    narinfo = info.narinfo if info.HasField("narinfo") else None
    return StorePathRoot(
        store_path,
        node,
        narinfo.nar_size if narinfo is not None else None,
        narinfo.nar_sha256 if narinfo is not None else None,
    )


def _reference_names(info: pathinfo_pb2.PathInfo) -> tuple[bytes, ...]:
    """The basenames of the paths ``info`` refers to (validated), if the store named them."""
    if not info.HasField("narinfo"):
        return ()
    return tuple(name.encode("ascii") for name in info.narinfo.reference_names)


class Roots:
    def __init__(
        self,
        bridge: Bridge,
        pathinfos: PathInfoService,
        negative_ttl: float = NEGATIVE_TTL,
        prefetch: trio.Nursery | None = None,
        *,
        trusted_keys: Mapping[str, PublicKey] | None = None,
        nar_check: Callable[[Node], tuple[int, bytes]] | None = None,
    ) -> None:
        """``prefetch``: where reference prefetches run; None turns prefetching off.

        ``trusted_keys``: if any, only store paths signed by one of them are shown.
        ``nar_check``: (size, sha256) of a root node's NAR, rendered here, not by the store;
        given, paths with only a Nix signature are shown once their NAR matches it.
        """
        self._bridge = bridge
        self._pathinfos = pathinfos
        self._positive: LRUCache[bytes, StorePathRoot] = LRUCache(POSITIVE_ENTRIES)
        self._negative: TTLCache[bytes, bool] = TTLCache(NEGATIVE_ENTRIES, negative_ttl)
        self._inflight: InFlight[bytes, StorePathRoot | None] = InFlight()
        self._prefetch = prefetch
        self._prefetch_limiter = trio.CapacityLimiter(PREFETCH_CONCURRENCY)
        self._prefetches = 0
        self._unexpanded: LRUCache[bytes, tuple[bytes, ...]] = LRUCache(UNEXPANDED_ENTRIES)
        self._trusted = dict(trusted_keys or {})
        self._refused: LRUCache[bytes, bool] = LRUCache(REFUSED_ENTRIES)
        self._nar_check = nar_check

    async def lookup(self, name: bytes) -> StorePathRoot | None:
        """The store path named ``name``, or None if it is not a store path or not in the store."""
        found = self._positive.get(name)
        if found is None:
            if name in self._negative:
                return None
            try:
                store_path = StorePath.from_basename(name)
            except ValidationError:
                return None
            found = await self._inflight.run(name, lambda: self._fetch(name, store_path))
        if found is not None:
            self._prefetch_references(name)
        return found

    async def _fetch(self, name: bytes, store_path: StorePath) -> StorePathRoot | None:
        info, untrusted = await self._bridge.call(self._get_checked, store_path.digest)
        root = None if info is None else root_from_pathinfo(info)
        if root is not None and root.name != name:
            # Same hash, other name: the requested path does not exist. tvix-store does not
            # check this; without the check ``<hash>-anything`` would show the content.
            log.debug("%r: the store has %r under this hash", name, root.name)
            root = None
        if root is not None and untrusted is not None:
            self._refuse(root, untrusted)
            root = None
        if root is None:
            self._negative[name] = True
        else:
            self._positive[name] = root
            if self._prefetch is not None and info is not None:
                self._unexpanded[name] = _reference_names(info)
        return root

    def _get_checked(self, digest: bytes) -> tuple[pathinfo_pb2.PathInfo | None, str | None]:
        """The path info (in a worker thread) and, with trusted keys, why it is not trusted."""
        info = self._pathinfos.get(digest)
        why = self._untrusted(info)
        if why is not None and info is not None and self._nar_check is not None:
            why = self._nar_matches(info, why, self._nar_check)
        return info, why

    def _nar_matches(
        self, info: pathinfo_pb2.PathInfo, why: str, nar_check: Callable[[Node], tuple[int, bytes]]
    ) -> str | None:
        """For a path without a trusted root signature: None if a trusted key signed it the
        Nix way and its tree renders to the NAR signed for; else why not."""
        if check_nix_signature(info, self._trusted) is not None:
            return why
        try:
            _, node = validate_pathinfo(info)
        except ValidationError as e:
            return str(e)
        size, sha256 = nar_check(node)
        if (size, sha256) != (info.narinfo.nar_size, info.narinfo.nar_sha256):
            return "its tree does not render to the NAR hash and size its Nix signature covers"
        log.info("%s: NAR hash verified against its Nix signature", node.name.decode(errors="replace"))
        return None

    def _list_checked(self) -> Iterator[tuple[pathinfo_pb2.PathInfo, str | None]]:
        for info in self._pathinfos.list():
            yield info, self._untrusted(info)

    def _untrusted(self, info: pathinfo_pb2.PathInfo | None) -> str | None:
        if info is None or not self._trusted:
            return None
        return check_root_signature(info, self._trusted)

    def _refuse(self, root: StorePathRoot, why: str) -> None:
        if root.name not in self._refused:
            self._refused[root.name] = True
            log.warning("not showing %s: %s", root.store_path, why)

    def _prefetch_references(self, name: bytes) -> None:
        """Start fetching what ``name`` refers to, once per path (never waits)."""
        references = self._unexpanded.pop(name, None)
        if references is None or self._prefetch is None:
            return
        for reference in references:
            if reference in self._positive or reference in self._negative or reference in self._inflight:
                continue
            if self._prefetches >= PREFETCH_QUEUE:
                log.debug("prefetch queue full: not prefetching the rest of %r's references", name)
                return
            self._prefetches += 1
            self._prefetch.start_soon(self._prefetch_one, reference)

    async def _prefetch_one(self, name: bytes) -> None:
        try:
            async with self._prefetch_limiter:
                # A lookup may have fetched it while this waited for its turn.
                if name in self._positive or name in self._negative:
                    return
                store_path = StorePath.from_basename(name)
                await self._inflight.run(name, lambda: self._fetch(name, store_path))
        except Exception as e:  # an exception here would end the mount's background nursery
            log.debug("prefetching %r: %s: %s", name, type(e).__name__, e)
        finally:
            self._prefetches -= 1

    async def list(self) -> list[StorePathRoot]:
        """Every store path, sorted by name (one snapshot, for one listing of the root)."""
        roots: dict[bytes, StorePathRoot] = {}
        async with self._bridge.stream(self._list_checked) as infos:
            async for info, untrusted in infos:
                try:
                    root = root_from_pathinfo(info)
                except CorruptDataError as e:
                    log.warning("listing the root: skipping %s", e)
                    continue
                if untrusted is not None:
                    # A path a lookup admitted (its NAR verified) is listed as it was admitted.
                    admitted = self._positive.get(root.name)
                    if admitted is None:
                        if self._nar_check is None:  # else a lookup may still verify its NAR
                            self._refuse(root, untrusted)
                        continue
                    root = admitted
                roots[root.name] = root
        for root in roots.values():
            self._negative.pop(root.name, None)
        return [roots[name] for name in sorted(roots)]
