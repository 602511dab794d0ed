"""Regrouping a stream of byte pieces into pieces of given sizes: one implementation for all.

Blobs arrive in whatever pieces their source yields (chunk files, gRPC messages of the
sender's choosing) and are wanted in others: a chunk list's sizes, message sizes, a reader's
buffers. ``regroup`` does that cut once, as views, copying nothing; ``exact_pieces`` joins each
group (one copy per byte at most, none for a piece that already has its size) and is strict
about the total, since a blob longer or shorter than its chunk list is corrupt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat
from typing import TypeVar

from tvixfs.services.errors import CorruptDataError

T = TypeVar("T")


class LengthMismatchError(CorruptDataError):
    """The pieces add up to more or fewer bytes than the sizes asked for."""


def regroup(
    pieces: Iterable[bytes | bytearray | memoryview], sizes: Iterable[int], *, exact: bool = True
) -> Iterator[list[memoryview]]:
    """The bytes of ``pieces`` as groups of views, one group per size of ``sizes``, in order.

    With ``exact`` a stream that ends early or has bytes left once ``sizes`` ran out raises
    LengthMismatchError (only after every complete group was yielded); without it the last group
    may be short (for an endless ``sizes``, as message sizes are) and is yielded if not empty.
    """
    wanted = iter(sizes)
    size = next(wanted, None)
    parts: list[memoryview] = []
    held = 0
    for piece in pieces:
        view = memoryview(piece)
        while size is not None and held + len(view) >= size:
            take = size - held
            parts.append(view[:take])
            yield parts
            parts, held = [], 0
            view = view[take:]
            size = next(wanted, None)
        if view:
            if size is None:
                raise LengthMismatchError("more bytes than expected")
            parts.append(view)
            held += len(view)
    if not exact:
        if parts:
            yield parts
    else:
        while size == 0:  # empty groups at the end need no bytes
            yield []
            size = next(wanted, None)
        if size is not None:
            raise LengthMismatchError("fewer bytes than expected")


def in_messages(pieces: Iterable[bytes], size: int) -> Iterator[list[memoryview]]:
    """The bytes grouped into messages of ``size`` (the last may be shorter), uncopied."""
    return regroup(pieces, repeat(size), exact=False)


def joined(views: list[memoryview]) -> bytes:
    """One group as bytes: a view of a whole ``bytes`` object is that object, uncopied."""
    if len(views) == 1:
        view = views[0]
        if isinstance(view.obj, bytes) and view.nbytes == len(view.obj):
            return view.obj
    return b"".join(views)


def exact_pieces(pieces: Iterable[bytes | memoryview], sizes: Sequence[int], what: str) -> Iterator[bytes]:
    """The bytes of ``pieces`` in pieces of ``sizes``; CorruptDataError naming ``what`` if the
    total differs from theirs."""
    try:
        for group in regroup(pieces, sizes):
            yield joined(group)
    except LengthMismatchError as e:
        raise LengthMismatchError(f"{what}: {e} (its chunk list says {sum(sizes)})") from None


def fill(pieces: Iterable[bytes], views: Sequence[memoryview], what: str) -> None:
    """Copy the bytes of ``pieces`` into ``views`` in order; CorruptDataError naming ``what``
    if they do not fill the views exactly."""
    try:
        for group, target in zip(regroup(pieces, [len(v) for v in views]), views, strict=False):
            at = 0
            for part in group:
                target[at : at + len(part)] = part
                at += len(part)
    except LengthMismatchError as e:
        raise LengthMismatchError(f"{what}: {e}") from None


def grouped_by_size(items: Iterable[T], size: int, size_of: Callable[[T], int]) -> Iterator[list[T]]:
    """Consecutive items in groups of at least ``size`` bytes (the last may be smaller): one
    hand-over per group rather than per item."""
    batch: list[T] = []
    held = 0
    for item in items:
        batch.append(item)
        held += size_of(item)
        if held >= size:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch
