"""The sibling prefetch gate (tvixfs/fs/siblings.py, ``ChunkCache.latency``): nothing is
presumed about a store; files are fetched ahead only once a small file fetched alone was
timed slow. Counted at the store through real mounts (no timed assertions: the far store's
delay is a floor on every fetch)."""

from __future__ import annotations

from pathlib import Path

import pytest
from faultstore import spawn_faultstore
from mounting import TVIXFS, mounted, needs_fuse
from test_sibling_prefetch import FAR, KIND, _tree
from uniquetrees import dump_nar

from tvixfs.fs.chunkcache import Latency
from tvixfs.fs.siblings import BATCH_FILES

pytestmark = [needs_fuse, pytest.mark.fuse]


@pytest.mark.parametrize("far", [False, True])
def test_the_first_cold_open_fetches_nothing_ahead(short_tmp: Path, far: bool) -> None:
    """Near or far, the first cold open is timed, not presumed slow; from a far store the
    next one fetches a batch of its kind."""
    tree = _tree(short_tmp / "src")
    with spawn_faultstore(short_tmp, [(dump_nar(tree), "pyc")]) as store:
        if far:
            store.set(FAR)
        basename = store.paths[0]
        with mounted(TVIXFS, short_tmp, store.url) as mount:

            def read(i: int) -> None:
                name = f"m{i:03}{KIND}"
                assert mount.path(basename, "many", name).read_bytes() == (tree / "many" / name).read_bytes()

            read(0)
            assert store.settled_calls("blob.read") == 1
            if far:
                read(1)
                assert store.settled_calls("blob.read") == 2 + BATCH_FILES


def test_latency_takes_its_first_sample_as_it_is() -> None:
    latency = Latency()
    assert latency.seconds == 0.0
    latency.add(0.02)
    assert latency.seconds == 0.02  # not averaged with a presumed 0
    latency.add(0.0)
    assert latency.seconds == pytest.approx(0.02 * (1 - latency.weight))
    assert latency.samples == 2
