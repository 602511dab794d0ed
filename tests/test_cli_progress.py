"""Issue 11 item 8: long imports show files, bytes and rate on a terminal, nothing otherwise."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

import pytest

WAIT = 300


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough to take well over the one second before progress shows, even on a fast machine."""
    root = tmp_path_factory.mktemp("big") / "tree"
    root.mkdir()
    for i in range(3000):
        (root / f"f{i}").write_bytes(os.urandom(64) + str(i).encode())
    (root / "large").write_bytes(os.urandom(96 << 20))
    return root


def _import_on_terminal(tvixfs_cmd: list[str], store: Path, source: Path) -> tuple[int, str]:
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*tvixfs_cmd, "import", "--store", f"local://{store}", str(source)],
            stdout=subprocess.PIPE,
            stderr=terminal,
        )
        os.close(terminal)
        shown = b""
        while True:
            try:
                data = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not data:
                break
            shown += data
        proc.communicate(timeout=WAIT)
        return proc.returncode, shown.decode(errors="replace")
    finally:
        os.close(controller)


def test_progress_on_a_terminal(tvixfs_cmd: list[str], big_tree: Path, tmp_path: Path) -> None:
    code, shown = _import_on_terminal(tvixfs_cmd, tmp_path / "store", big_tree)
    assert code == 0
    assert "3001 files" in shown or "files, " in shown, shown
    assert "MiB/s" in shown
    assert shown.endswith("\r\x1b[K")  # the line is cleared when the import ends


def test_no_progress_when_not_a_terminal(tvixfs_cmd: list[str], big_tree: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [*tvixfs_cmd, "import", "--store", f"local://{tmp_path / 'store'}", str(big_tree)],
        capture_output=True,
        timeout=WAIT,
        check=True,
    )
    assert done.stderr == b""
