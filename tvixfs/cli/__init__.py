"""Command line: one module of commands per area, all registered on one typer app.

``mount``, ``daemon`` and ``nar-bridge`` need trio, pyfuse3 or grpc, ~0.15 s to import: their
modules are registered only when one of them (or no command, as for ``--help``) is asked for, so that
the store commands, which scripts run often (``import``, ``cat``, ...), start without them.
"""

import os
import sys

# Before grpc is imported: its C core would print each failed TLS handshake on stderr; the
# commands report failures themselves, in one line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from tvixfs.cli import cache_cmds, fsck_cmd, gc_cmd, status_cmd, store_cmds  # noqa: F401  (register commands)
from tvixfs.cli.app import run

_SERVING_COMMANDS = {"mount", "daemon", "nar-bridge"}


def main() -> None:
    # The app's own options (-v, -q) take no value: the first other word is the command.
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command is None or command in _SERVING_COMMANDS:
        from tvixfs.cli import daemon_cmd, mount_cmd, narbridge_cmd  # noqa: F401  (register commands)
    run()
