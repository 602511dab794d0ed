"""``memoryfs``: the file system type of a store's directory, as ``stat -f`` reports it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tvixfs.services.backends.memoryfs import TMPFS_MAGIC, filesystem_type, in_memory


def _stat_f(path: Path) -> int:
    done = subprocess.run(["stat", "-f", "-c", "%t", str(path)], check=True, capture_output=True, text=True)
    return int(done.stdout, 16)


@pytest.mark.parametrize("path", ["/", "/dev/shm", "/proc"])
def test_type_is_what_stat_f_says(path: str) -> None:
    assert filesystem_type(Path(path)) == _stat_f(Path(path))


def test_tmpfs_is_in_memory(tmp_path: Path) -> None:
    if _stat_f(Path("/dev/shm")) != TMPFS_MAGIC:
        pytest.skip("/dev/shm is not tmpfs here")
    assert in_memory(Path("/dev/shm"))
    assert in_memory(tmp_path) == (_stat_f(tmp_path) == TMPFS_MAGIC)


def test_a_missing_path_is_not_in_memory(tmp_path: Path) -> None:
    assert filesystem_type(tmp_path / "absent") is None
    assert not in_memory(tmp_path / "absent")
