"""What keeps garbage collection of the embedded store away from writes in progress.

Two things protect a writer's data until a path info refers to it:

- The *gc lock* (``gc.lock`` in the store, ``flock``): a writer holds it shared from the start
  of a put until everything it put is committed; ``tvixfs gc`` holds it exclusively while it
  marks and sweeps. So gc never sees a chunk file written, or found present and relied on,
  whose blob row is not committed yet, and no write starts while gc sweeps. Holding it costs
  a writer one ``flock`` call when it goes from idle to busy.
- *Pins*: every blob and directory a writer commits is also recorded as a pin row of its
  *session* (this process, identified by pid, start time and boot id, so a reused pid is not
  taken for it). gc treats the pins of live sessions as roots, so what a client uploaded
  between two calls (blobs, then directories, then the path info, as a client of the daemon
  does) survives although the lock was released in between. A session's pins go when it
  closes; those of dead sessions (a killed import) are ignored and removed by gc; a pin older
  than ``PIN_LEASE`` is ignored too, so a long-running daemon does not keep what a vanished
  client left behind forever.

Both tables are created by the first write that pins, so stores made before them need no
migration and read-only stores are never written to.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = "gc.lock"
WAITING_NAME = "gc.waiting"  # holds the waiting gc's process, so a dead one's is ignored
# How long a writer that made way waits for gc to take the lock before it goes on.
YIELD_WAIT = 5.0
# How long a new write waits for those running to end so that a waiting gc can go first;
# past it, it goes on: a slow upload may delay gc, never stall the store's other writers.
MAKE_WAY_WAIT = 2.0
# How long a live session's pins count: far longer than any sequence of uploads that makes
# one path, short enough that a daemon's abandoned uploads are freed by the next day's gc.
PIN_LEASE = 24 * 3600.0

PIN_TABLES = """
CREATE TABLE IF NOT EXISTS gc_sessions (id INTEGER PRIMARY KEY, owner TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS gc_pins (
    session INTEGER NOT NULL, digest BLOB NOT NULL, time REAL NOT NULL,
    PRIMARY KEY (session, digest)
) WITHOUT ROWID;
"""


def create_pin_tables(conn: sqlite3.Connection) -> None:
    for statement in PIN_TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)


def has_pin_tables(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE name IN ('gc_sessions', 'gc_pins')"
    ).fetchone()
    return bool(row[0] == 2)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of its stat), or None if
    it is gone or a zombie (killed, not yet reaped: it writes nothing more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields follow the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def this_process() -> str:
    """This process as a session owner: ``boot id:pid:start time``."""
    pid = os.getpid()
    return f"{_boot_id()}:{pid}:{_start_time(pid) or ''}"


def owner_alive(owner: str) -> bool:
    """Whether the process that ``this_process`` described then still runs."""
    boot, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if boot != _boot_id() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    found = _start_time(pid)
    if found is not None or os.path.isdir("/proc/self"):
        return found is not None and found == start
    try:  # no /proc: the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriteGuard:
    """This process's shared hold on the gc lock: taken when a write starts, dropped when idle.

    ``enter``/``leave`` bracket each write; the hold is dropped once no write is running and
    ``idle()`` (nothing put but uncommitted) says so, checked again after every commit. A gc
    waiting for the lock is let in as soon as no write runs: new writes wait (a while), and
    the last one to leave commits (``commit``), drops the hold and waits until gc has it.
    """

    def __init__(self, store: Path, idle: Callable[[], bool], commit: Callable[[], None]) -> None:
        self._path = store / LOCK_NAME
        self._waiting_path = store / WAITING_NAME
        self._idle = idle
        self._commit = commit
        # Reentrant: ``commit`` ends in ``release_if_idle`` on the same thread.
        self._cond = threading.Condition(threading.RLock())
        self._writers = 0
        self._depth = threading.local()  # this thread's nested writes: those never wait
        self._yielding = False
        self._fd: int | None = None

    def gc_waiting(self) -> bool:
        """Whether a live gc waits for the lock (its marker names it)."""
        try:
            owner = self._waiting_path.read_text()
        except OSError:
            return False
        return owner_alive(owner)

    def enter(self) -> None:
        depth: int = getattr(self._depth, "value", 0)
        with self._cond:
            if depth == 0:
                self._cond.wait_for(lambda: not self._yielding)
                if (
                    self._fd is not None
                    and self.gc_waiting()
                    and self._cond.wait_for(lambda: self._writers == 0 and not self._yielding, MAKE_WAY_WAIT)
                    and self._fd is not None
                ):
                    self._yield_to_gc()
            if self._fd is None:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH)  # waits while gc sweeps
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._writers += 1
        self._depth.value = depth + 1

    def leave(self) -> None:
        self._depth.value -= 1
        with self._cond:
            self._writers -= 1
            if self._writers == 0 and self._fd is not None and self.gc_waiting():
                self._yield_to_gc()
            self._cond.notify_all()
        self.release_if_idle()

    def _yield_to_gc(self) -> None:
        """With no write running: commit, drop the hold, and wait (a while) until gc has the lock."""
        self._yielding = True
        try:
            self._commit()  # its release_if_idle drops the hold, once nothing is pending
            deadline = time.monotonic() + YIELD_WAIT
            while self._fd is None and self.gc_waiting() and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            self._yielding = False
            self._cond.notify_all()

    def release_if_idle(self) -> None:
        with self._cond:
            if self._fd is not None and self._writers == 0 and self._idle():
                # Unlocked explicitly: forked children (chunk workers) may share the descriptor.
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None


def lock_exclusive(store: Path, waiting: Callable[[], None]) -> int:
    """Take the gc lock exclusively; its fd. If writers hold it, ``waiting`` is called and a
    marker asks them to make way (they do between two writes: ``WriteGuard``)."""
    fd = os.open(store / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            marker = store / WAITING_NAME
            marker.write_text(this_process())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            finally:
                marker.unlink(missing_ok=True)
    except BaseException:
        os.close(fd)
        raise
    return fd
