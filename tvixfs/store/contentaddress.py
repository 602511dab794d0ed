"""The store path a content address gives, so that a content-addressed PathInfo can be checked.

A content-addressed path is named by its content: whoever presents one whose name does not follow
from its ``ca`` (and, for NAR hashes, from its ``narHash``) presents a lie that no other check would
see, since the mount serves a tree by its castore digests, not by its name. Nix's rules
(``makeFixedOutputPath``, ``makeTextPath``):

- ``fixed:r:sha256`` (what ``nix-store --add`` makes): type ``source``, followed by the absolute
  references (sorted) and ``:self`` if the path refers to itself, over the NAR hash;
- ``text:sha256``: type ``text`` with the references, over the file's hash;
- any other fixed-output address: ``output:out`` over the sha256 of
  ``fixed:out:[r:]<algo>:<hex>:``, and no references.
"""

from __future__ import annotations

import hashlib

from tvixfs.castore.errors import ValidationError
from tvixfs.protos import pathinfo_pb2
from tvixfs.store.nixtext import HASH_SIZES, ca_method
from tvixfs.store.storepath import STORE_DIR, StorePath, make_store_path


def content_address_path(
    ca: pathinfo_pb2.NARInfo.CA, name: str, reference_names: list[str], self_basename: str
) -> StorePath:
    """The store path named ``name`` that ``ca`` and its references give.

    ``reference_names`` are basenames; one equal to ``self_basename`` is a self-reference.
    """
    method, algo = ca_method(ca)
    if len(ca.digest) != HASH_SIZES[algo]:
        raise ValidationError(
            f"content address: a {algo} digest has {HASH_SIZES[algo]} bytes, not {len(ca.digest)}"
        )
    others = sorted(f"{STORE_DIR}/{r}" for r in reference_names if r != self_basename)
    refers_to_self = len(others) != len(reference_names)
    if method == "fixed:r" and algo == "sha256":
        kind = ":".join(["source", *others] + (["self"] if refers_to_self else []))
        return make_store_path(kind, ca.digest.hex(), name)
    if method == "text":
        if refers_to_self:
            raise ValidationError("a text content-addressed path cannot refer to itself")
        return make_store_path(":".join(["text", *others]), ca.digest.hex(), name)
    if reference_names:
        raise ValidationError(f"a {method}:{algo} content-addressed path cannot have references")
    recursive = "r:" if method == "fixed:r" else ""
    inner = f"fixed:out:{recursive}{algo}:{ca.digest.hex()}:"
    return make_store_path("output:out", hashlib.sha256(inner.encode()).hexdigest(), name)
