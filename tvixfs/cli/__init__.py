"""Command line: one module of commands per area, all registered on one typer app.

``mount`` and ``daemon`` need trio, pyfuse3 and grpc, ~0.15 s to import: their modules are
registered only when one of them (or no command, as for ``--help``) is asked for, so that
the store commands, which scripts run often (``import``, ``cat``, ...), start without them.
"""

import sys

from tvixfs.cli import cache_cmds, fsck_cmd, status_cmd, store_cmds  # noqa: F401  (register commands)
from tvixfs.cli.app import app

_SERVING_COMMANDS = {"mount", "daemon"}


def main() -> None:
    # The app's own options (-v, -q) take no value: the first other word is the command.
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command is None or command in _SERVING_COMMANDS:
        from tvixfs.cli import daemon_cmd, mount_cmd  # noqa: F401  (register commands)
    app()
