"""The serving commands pick grpc's polling engine before grpc is imported (cli/grpcpoller.py).

Each case runs the real command line in a fresh interpreter, so that what grpc would read at
its import is what the process holds after the command's modules are loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tvixfs.cli.grpcpoller import IOMGR_EXPERIMENTS, poll_in_caller

# Runs `tvixfs ARGS...` (its --help: loads the command's modules, serves nothing) and reports
# the engine setting as it was when grpc was imported (None: not imported at all).
_PROBE = """
import json, os, sys
seen = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc":
            seen["experiments"] = os.environ.get("GRPC_EXPERIMENTS")
        return None

sys.meta_path.insert(0, Watch())
sys.argv = ["tvixfs", *json.loads(sys.argv[1])]
from tvixfs.cli import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(seen.get("experiments")) if seen else "null")
"""


def _probe(args: list[str], environ: dict[str, str] | None = None) -> str | None:
    """GRPC_EXPERIMENTS as grpc saw it at its import in `tvixfs ARGS...` (None: unset or no grpc)."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    env.update(environ or {})
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)], env=env, capture_output=True, text=True, check=True
    ).stdout
    result: str | None = json.loads(out.splitlines()[-1])
    return result


@pytest.mark.parametrize("command", ["daemon", "mount", "nar-bridge"])
def test_serving_commands_poll_in_the_caller(command: str) -> None:
    assert _probe([command, "--help"]) == IOMGR_EXPERIMENTS


def test_store_commands_keep_grpcs_default() -> None:
    # The importers fork workers: they stay on the engine grpc chooses.
    assert _probe(["import", "--help"]) is None


def test_a_users_setting_wins() -> None:
    assert _probe(["daemon", "--help"], {"GRPC_EXPERIMENTS": "event_engine_client"}) == "event_engine_client"


def test_poll_in_caller_only_fills_a_default() -> None:
    environ: dict[str, str] = {}
    poll_in_caller(environ)
    assert environ == {"GRPC_EXPERIMENTS": IOMGR_EXPERIMENTS}
    chosen = {"GRPC_EXPERIMENTS": ""}
    poll_in_caller(chosen)
    assert chosen == {"GRPC_EXPERIMENTS": ""}
