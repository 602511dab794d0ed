"""Command line: one module of commands per area, all registered on one typer app."""

from tvixfs.cli import daemon_cmd, fsck_cmd, mount_cmd, store_cmds  # noqa: F401  (register commands)
from tvixfs.cli.app import app


def main() -> None:
    app()
