"""Issue 12 item 7: the mount's defaults live in tvixfs/defaults.py; --help and README show them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tvixfs import defaults
from tvixfs.cli.mount_cmd import parse_size
from tvixfs.fs.ops import FsOptions

README = Path(__file__).resolve().parent.parent / "README.md"

SHOWN = {
    "--cache-size": defaults.CACHE_SIZE,
    "--threads": str(defaults.THREADS),
    "--max-inodes": str(defaults.MAX_INODES),
    "--directory-cache": str(defaults.DIRECTORY_CACHE_ENTRIES),
    "--deadline": f"{defaults.DEADLINE:g}",
}


def test_one_home_for_the_defaults() -> None:
    assert parse_size(defaults.CACHE_SIZE) == defaults.CACHE_BYTES
    options = FsOptions()
    assert (options.cache_bytes, options.threads, options.max_inodes) == (
        defaults.CACHE_BYTES,
        defaults.THREADS,
        defaults.MAX_INODES,
    )
    assert (options.directory_cache_entries, options.deadline) == (
        defaults.DIRECTORY_CACHE_ENTRIES,
        defaults.DEADLINE,
    )


def test_readme_and_help_show_them(tvixfs_cmd: list[str]) -> None:
    readme = README.read_text()
    shown = subprocess.run(
        [*tvixfs_cmd, "mount", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    for option, value in SHOWN.items():
        assert f"| `{option} {value}` |" in readme, option
        after = " ".join(shown.split(option + " ", 1)[1].split())  # the option's help, on one line
        default = after.split("[default: ", 1)[1].split("]")[0].split(";")[0]
        assert default in (value, str(defaults.DEADLINE)), (option, default)
