"""Command line: one module of commands per area, all registered on one typer app.

A command asked for by name loads only the module that registers it (``COMMAND_MODULES``):
``mount``, ``daemon`` and ``nar-bridge`` need trio, pyfuse3 or grpc, ~0.15 s to import, the
maintenance commands the disk cache and fsck, the signing code cryptography; the store commands,
which scripts run often (``import``, ``cat``, ...), start without any of that. No command (as
for ``--help``) or one not in the table loads every module, so a command missing there still
works, only starts slower.
"""

import os
import sys

# Before grpc is imported: its C core would print each failed TLS handshake on stderr; the
# commands report failures themselves, in one line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import importlib

from tvixfs.cli.app import run

# The modules of tvixfs.cli that register commands, in the order `--help` lists their commands,
# and the module of each command.
MODULES = (
    "cache_cmds", "fsck_cmd", "gc_cmd", "status_cmd", "store_cmds",
    "daemon_cmd", "mount_cmd", "narbridge_cmd",
)  # fmt: skip
_STORE = "store_cmds"
COMMAND_MODULES = {
    "import": _STORE, "import-nar": _STORE, "import-nix": _STORE, "export-nar": _STORE,
    "info": _STORE, "ls": _STORE, "cat": _STORE,
    "cache": "cache_cmds", "fsck": "fsck_cmd", "gc": "gc_cmd", "delete": "gc_cmd",
    "status": "status_cmd", "mount": "mount_cmd", "daemon": "daemon_cmd", "nar-bridge": "narbridge_cmd",
}  # fmt: skip


def register(command: str | None) -> None:
    """Import the module that registers ``command``, or all of them (None, or not known here)."""
    module = COMMAND_MODULES.get(command or "")
    for name in [module] if module else MODULES:
        importlib.import_module(f"tvixfs.cli.{name}")


def main() -> None:
    # The app's own options (-v, -q) take no value: the first other word is the command.
    register(next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None))
    run()
