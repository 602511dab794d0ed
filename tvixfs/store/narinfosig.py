"""Nix signatures on narinfos: the fingerprint of a ``NarInfo``, signing it and checking it.

The keys, the fingerprint and the ed25519 work are ``nixsig``'s; this only applies them to the
narinfo model the binary-cache bridge reads and writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tvixfs.protos import pathinfo_pb2
from tvixfs.store import nixsig
from tvixfs.store.narinfo import NarInfo


def narinfo_fingerprint(info: NarInfo) -> bytes:
    """What Nix signs for this narinfo; ValidationError if its NAR hash or size cannot be signed."""
    references = (r.absolute for r in info.references)
    return nixsig.fingerprint(info.store_path.absolute, info.nar_sha256, info.nar_size, references)


def add_signatures(info: NarInfo, keys: Iterable[nixsig.SecretKey]) -> None:
    """Sign ``info`` with each key whose name has no signature on it yet."""
    names = {s.name for s in info.signatures}
    missing = [key for key in keys if key.name not in names]
    if not missing:
        return
    message = narinfo_fingerprint(info)
    info.signatures += [pathinfo_pb2.NARInfo.Signature(name=k.name, data=k.sign(message)) for k in missing]


def signed_by(info: NarInfo, keys: Mapping[str, nixsig.PublicKey]) -> str | None:
    """The name of a trusted key with a valid signature on ``info``, or None."""
    signatures = [(s.name, s.data) for s in info.signatures]
    return nixsig.verify(keys, signatures, narinfo_fingerprint(info))
