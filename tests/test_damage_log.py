"""The server's log of damaged data: each damage told once a while, however often it is met."""

from __future__ import annotations

import logging

import pytest

from tvixfs.server.damage import DamageLog
from tvixfs.services.errors import CorruptDataError


def test_a_damage_met_again_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    damage = DamageLog(repeat_after=60, clock=lambda: now[0])
    one, other = CorruptDataError("chunk file /a is damaged"), CorruptDataError("chunk file /b is damaged")
    with caplog.at_level(logging.WARNING, logger="tvixfs.server.damage"):
        for _ in range(1000):
            damage.report("Read", one)
        damage.report("ReadMany", other)
        now[0] += 59
        damage.report("Read", one)
        now[0] += 2
        damage.report("Read", one)
        damage.report("Read", one)
    assert [r.getMessage() for r in caplog.records] == [
        "Read: chunk file /a is damaged",
        "ReadMany: chunk file /b is damaged",
        "Read: chunk file /a is damaged (met 1000 times more since it was last logged)",
    ]


def test_the_damages_remembered_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    damage = DamageLog(remembered=2, clock=lambda: 0.0)
    with caplog.at_level(logging.WARNING, logger="tvixfs.server.damage"):
        for name in ("a", "b", "c", "a"):
            damage.report("Read", CorruptDataError(name))
    # "a" was pushed out by "c": told again rather than kept forever.
    assert [r.getMessage() for r in caplog.records] == ["Read: a", "Read: b", "Read: c", "Read: a"]
