"""The root of the errors a user should see as one line, without a traceback.

Every error raised on purpose for bad input, missing data, an unreachable store or a refused
mount derives from ``UserError`` (as s3ql's ``QuietError``); the command line has one handler for
it (``tvixfs.cli.app.run``). Anything else reaching the top is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error whose message alone tells the user what went wrong."""

    exit_code = 1
