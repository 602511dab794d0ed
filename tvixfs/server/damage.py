"""Damaged data in the store, as the server reports it: to its operator, and to its clients.

The operator is told which chunk file or row is damaged, once a while (repeatedlog.py): a
client asking for a damaged blob in a loop does not write the daemon's log at its request
rate. A client is told only that the server's copy is damaged: it knows what it asked for,
and the error's own text (a path on the server's disk) is the operator's business.
"""

from __future__ import annotations

import logging

from tvixfs.repeatedlog import RepeatedLog

# What a client is told instead of the error's text.
CLIENT_DETAIL = "the server's copy is damaged (its log says where)"

# The server's one log of damage: the same damage met by different handlers is one damage.
DAMAGE = RepeatedLog(logging.getLogger(__name__), logging.WARNING)


def report(where: str, error: Exception) -> None:
    DAMAGE.emit(f"{where}: {error}")
