"""The benchmark harness must keep working: its smallest piece, end to end, in seconds.

Only whether it runs is checked here; speed lives in bench/RESULTS.md, never in a test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mounting import needs_fuse

RUN = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.mark.fuse
@needs_fuse  # the harness mounts, and drops caches: root only
def test_self_check_imports_mounts_and_reads() -> None:
    proc = subprocess.run(
        [sys.executable, str(RUN), "--self-check"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tvixfs: import, mount, walk" in proc.stdout
    assert "passthrough_ll: build, mount, byte-for-byte reads: ok" in proc.stdout
