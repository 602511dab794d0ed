"""sd_notify for ``Type=notify`` services: readiness, status, stopping and the watchdog.

Silent when ``NOTIFY_SOCKET`` is unset, so the daemons run the same with and without systemd.
"""

from __future__ import annotations

import logging
import os

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        if self._notifier is not None and self._notifier.socket is not None:
            # Never wait for the manager: when nobody reads the notify socket, its queue (10
            # datagrams by default) fills up and a blocking send would freeze the daemon, the
            # mount's event loop included. A message that does not fit is dropped instead.
            self._notifier.socket.setblocking(False)

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            # sdnotify swallows socket errors unless asked; a lost message must not kill a daemon.
            self._notifier.notify(message)

    def ready(self, status: str = "") -> None:
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None if not asked for.

    ``WATCHDOG_PID``, when set, must name this process: a watchdog meant for a parent is not ours.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
    return value / 2e6 if value > 0 else None
