"""Issue 11 item 8: long imports show files, bytes and rate on a terminal, nothing otherwise."""

from __future__ import annotations

import os
import pty
import subprocess
import time
from pathlib import Path

import pytest

WAIT = 300


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough to take well over the one second before progress shows, even on a fast machine."""
    root = tmp_path_factory.mktemp("big") / "tree"
    root.mkdir()
    for i in range(40000):  # ~0.1 ms each at least: several seconds of import
        (root / f"f{i}").write_bytes(os.urandom(64) + str(i).encode())
    (root / "large").write_bytes(os.urandom(64 << 20))
    return root


def _on_terminal(args: list[str], feed: list[bytes] | None = None) -> tuple[int, str]:
    """Run ``args`` with stderr on a terminal; ``feed`` is written to its stdin, slowly."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.PIPE if feed else None, stdout=subprocess.PIPE, stderr=terminal
        )
        os.close(terminal)
        if feed:
            assert proc.stdin is not None
            for piece in feed:
                proc.stdin.write(piece)
                proc.stdin.flush()
                time.sleep(0.05)
            proc.stdin.close()
            proc.stdin = None  # closed: communicate() must not flush it
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
    code, shown = _on_terminal(
        [*tvixfs_cmd, "import", "--store", f"local://{tmp_path / 'store'}", str(big_tree)]
    )
    assert code == 0
    assert "files, " in shown, shown
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


def test_import_nar_progress_from_a_slow_pipe(tvixfs_cmd: list[str], tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(os.urandom(4 << 20))
    nar = subprocess.run(
        ["nix-store", "--dump", str(tmp_path / "blob")], capture_output=True, check=True
    ).stdout
    path = "/nix/store/" + "0" * 32 + "-blob"
    pieces = [nar[i : i + (128 << 10)] for i in range(0, len(nar), 128 << 10)]  # 33 pieces, ~1.7 s
    args = [*tvixfs_cmd, "import-nar", "--store", f"local://{tmp_path / 'store'}", "--path", path, "-"]
    code, shown = _on_terminal(args, pieces)
    assert code == 0, shown
    assert "-: " in shown and "MiB/s" in shown and "files" not in shown, shown
