"""Log lines a client or a program can cause over and over: each told once a while."""

from __future__ import annotations

import logging

import pytest

from tvixfs.repeatedlog import RepeatedLog

LOG = logging.getLogger("tvixfs.test-repeated")


def test_a_line_that_comes_up_again_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    lines = RepeatedLog(LOG, logging.WARNING, repeat_after=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        for _ in range(1000):
            lines.emit("chunk file /a is damaged")
        lines.emit("chunk file /b is damaged")
        now[0] += 59
        lines.emit("chunk file /a is damaged")
        now[0] += 2
        lines.emit("chunk file /a is damaged")
        lines.emit("chunk file /a is damaged")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "chunk file /a is damaged"),
        (logging.WARNING, "chunk file /b is damaged"),
        (logging.WARNING, "chunk file /a is damaged (1000 times more since it was last logged)"),
    ]


def test_the_lines_remembered_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    lines = RepeatedLog(LOG, logging.INFO, remembered=2, clock=lambda: 0.0)
    with caplog.at_level(logging.INFO, logger=LOG.name):
        for text in ("a", "b", "c", "a"):
            lines.emit(text)
    # "a" was pushed out by "c": told again rather than remembered forever.
    assert [r.getMessage() for r in caplog.records] == ["a", "b", "c", "a"]
