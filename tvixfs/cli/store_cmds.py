"""store_cmds"""

from tvixfs.cli.app import app  # noqa: F401
