"""Readdir in the kernel: listings of store paths cached by the kernel (FOPEN_CACHE_DIR).

A directory inside a store path never changes, so the kernel may keep its listing for the
life of the mount, as CernVM-FS and Nydus let it: a warm walk then sends opendir and
releasedir, but no readdir. Stock pyfuse3 (3.5) cannot ask for this: ``opendir`` returns a
bare handle. ``scripts/pyfuse3-opendir-fileinfo.patch``, applied when ``scripts/install.sh``
builds pyfuse3, lets it return a ``FileInfo`` with ``cache_readdir`` (written to go
upstream). The capability is detected here, so a stock pyfuse3 keeps working, uncached.
The mount root's listing (``--list-root``) changes as paths are added: never cached.
"""

from __future__ import annotations

from typing import cast

import pyfuse3

CACHE_READDIR = "cache_readdir"
# cdef public attributes are descriptors on the class: present only in a patched build.
KERNEL_CACHES_READDIR = hasattr(pyfuse3.FileInfo, CACHE_READDIR)


def cached_listing(fh: int) -> pyfuse3.FileHandleT:
    """What ``opendir`` returns for an immutable directory: its handle, with the kernel told
    to cache the listing (and keep it across opens) where pyfuse3 can say so.

    Typed as stock pyfuse3's stub says; a patched pyfuse3 takes a FileInfo there too.
    """
    if not KERNEL_CACHES_READDIR:
        return pyfuse3.FileHandleT(fh)
    info = pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)
    setattr(info, CACHE_READDIR, True)
    return cast(pyfuse3.FileHandleT, info)
