"""daemon_cmd"""

from tvixfs.cli.app import app  # noqa: F401
