"""Log hygiene: a test fails on an ERROR it did not expect, in process or in a daemon.

In process: a log record at ERROR or above, emitted while a test is set up or run, fails it
(at teardown), unless the test is marked ``@pytest.mark.expect_errors`` or declares what it
expects through the ``expected_errors`` fixture: ``expected_errors("CorruptDataError")`` lets
records whose message contains one of the given strings pass.

Daemons in subprocesses (``tests/mounting.py``, ``tests/grpcserver.py``) log ERROR lines by
design when a store fails; what must never appear in their stderr is a Python traceback (an
exception nobody handled). Those helpers call ``check_daemon_stderr`` once a daemon is gone;
a traceback fails the test the same way, under the same declarations. Outside a pytest run
(bench/ uses the helpers too) nothing is checked.

Registered from tests/conftest.py (``pytest_plugins``); the marker in pyproject.toml.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest

MARKER = "expect_errors"
# A traceback and its indented lines, up to the exception line that ends it.
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n|\n)*.*$", re.MULTILINE)


class ExpectedErrors:
    """What the running test declared it expects."""

    def __init__(self, anything: bool) -> None:
        self.anything = anything
        self.patterns: list[str] = []

    def __call__(self, *patterns: str) -> None:
        """Expect ERROR records (or daemon tracebacks) containing any of ``patterns``."""
        self.patterns.extend(patterns)

    def allows(self, text: str) -> bool:
        return self.anything or any(pattern in text for pattern in self.patterns)


_current: ExpectedErrors | None = None  # the running test's declarations


@pytest.fixture(autouse=True)
def _log_hygiene(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[ExpectedErrors]:
    global _current  # noqa: PLW0603  (one test runs at a time; daemon helpers read it)
    expected = ExpectedErrors(request.node.get_closest_marker(MARKER) is not None)
    _current = expected
    yield expected
    records = [*caplog.get_records("setup"), *caplog.get_records("call")]
    unexpected = [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in records
        if r.levelno >= logging.ERROR and not expected.allows(r.getMessage())
    ]
    if unexpected:
        pytest.fail(
            "unexpected ERROR log records (mark the test expect_errors, or use expected_errors):\n"
            + "\n".join(unexpected),
            pytrace=False,
        )


@pytest.fixture
def expected_errors(_log_hygiene: ExpectedErrors) -> ExpectedErrors:
    """Declare the ERROR messages a test expects: ``expected_errors("text", ...)``."""
    return _log_hygiene


def check_daemon_stderr(stderr: str, what: str) -> None:
    """AssertionError if ``stderr`` holds a traceback the running test did not expect."""
    if _current is None:
        return
    for match in _TRACEBACK.finditer(stderr):
        if not _current.allows(match.group(0)):
            raise AssertionError(f"{what} printed a traceback:\n{match.group(0)}")
