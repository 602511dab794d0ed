"""``tvixfs fsck --store s3://…``: leftovers of a killed import counted and removed, damage found."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import obstore
import zstandard
from conftest import make_sample_tree
from mounting import TVIXFS
from s3server import shared_moto
from test_s3 import PREFIX, import_tree, put_raw, raw

from tvixfs.services import s3layout
from tvixfs.services.s3 import open_s3_store
from tvixfs.services.s3url import parse_s3_url
from tvixfs.store.storepath import StorePath


def fsck(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TVIXFS, "fsck", "--store", url, *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_fsck_counts_and_removes_leftovers_and_finds_damage(tmp_path: Path) -> None:
    moto = shared_moto()
    url = moto.url(moto.new_bucket(), PREFIX)
    sample = make_sample_tree(tmp_path / "sample")
    basename = import_tree(url, sample, "sample")
    done = fsck(url, "--check-contents")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("1 path infos: 0 problems; 0 unreferenced objects")

    # A killed import: a blob and a directory tree written, never a path info.
    store = open_s3_store(parse_s3_url(url))
    try:
        store.blobs.put([os.urandom(700 * 1024)])  # two or more chunks and a blob object
        info = store.pathinfos.get(StorePath.from_basename(basename).digest)
        assert info is not None
        top = store.directories.get(info.node.directory.digest)
        assert top is not None
        large = next(f for f in top.files if f.name == b"large.bin")
        chunks = store.blobs.stat(large.digest, send_chunks=True)
        assert chunks
    finally:
        store.close()
    done = fsck(url)
    assert done.returncode == 0
    leftovers = int(done.stdout.split("; ")[-1].split()[0])
    assert leftovers >= 3
    done = fsck(url, "--repair")
    assert done.returncode == 0
    assert f"{leftovers} unreferenced objects (removed)" in done.stdout
    assert fsck(url).stdout.strip().endswith("0 problems; 0 unreferenced objects")

    # A chunk whose bytes are wrong: only --check-contents downloads and finds it.
    wrong = os.urandom(chunks[0].size)
    put_raw(moto, url, s3layout.chunk_key(chunks[0].digest), zstandard.ZstdCompressor().compress(wrong))
    assert fsck(url).returncode == 0
    done = fsck(url, "--check-contents")
    assert done.returncode == 1
    assert f"path info pathinfos/{basename.split('-')[0]}" in done.stdout
    assert "does not match its digest" in done.stdout

    # A chunk gone: found without downloading; repair drops the path info and what only it reached.
    obstore.delete(raw(moto, url), s3layout.chunk_key(chunks[0].digest))
    done = fsck(url)
    assert done.returncode == 1
    assert "is missing" in done.stdout
    done = fsck(url, "--repair")
    assert done.returncode == 0
    assert "1 problem (repaired)" in done.stdout
    assert fsck(url).stdout.strip().endswith("0 path infos: 0 problems; 0 unreferenced objects")
