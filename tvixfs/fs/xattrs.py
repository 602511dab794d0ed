"""Extended attributes that expose what the store knows about an entry.

- ``user.tvix.castore.blob.digest`` (files) and ``user.tvix.castore.directory.digest``
  (directories), the names tvix-store's FUSE daemon uses. Value: ``b3:`` followed by the
  standard, padded base64 of the 32-byte BLAKE3 digest (``castore.digest.format_digest``),
  e.g. ``b3:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI=`` for the empty file.
- ``user.tvixfs.store_path`` and ``user.tvixfs.nar_hash`` on the root of each store path:
  ``/nix/store/<hash>-<name>`` and the NAR hash in SRI form, ``sha256-<base64>`` (absent when
  the store has no NAR info for the path).
- ``user.tvixfs.status`` on the mount root: what ``tvixfs status`` prints (fs/statusreport.py).
"""

from __future__ import annotations

from tvixfs.castore.digest import format_digest
from tvixfs.castore.nodes import DirectoryNode, FileNode
from tvixfs.fs.inodes import Inode
from tvixfs.store.nixtext import format_sri

BLOB_DIGEST = b"user.tvix.castore.blob.digest"
DIRECTORY_DIGEST = b"user.tvix.castore.directory.digest"
STORE_PATH = b"user.tvixfs.store_path"
NAR_HASH = b"user.tvixfs.nar_hash"
STATUS = b"user.tvixfs.status"


def xattrs_of(inode: Inode) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}
    node = inode.node
    if isinstance(node, FileNode):
        found[BLOB_DIGEST] = format_digest(node.digest).encode()
    elif isinstance(node, DirectoryNode):
        found[DIRECTORY_DIGEST] = format_digest(node.digest).encode()
    if inode.root is not None:
        found[STORE_PATH] = inode.root.store_path.absolute.encode()
        if inode.root.nar_sha256 is not None:
            found[NAR_HASH] = format_sri(inode.root.nar_sha256).encode()
    return found
