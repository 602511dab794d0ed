"""The life of one mount: init, READY once it answers, serve, stop on a signal or an unmount.

``pyfuse3.init`` mounts; ``pyfuse3.main`` serves until the kernel ends the session (an external
``umount``) or ``pyfuse3.terminate`` is called (SIGINT/SIGTERM). READY=1 is sent only once a
``stat`` of the mount point, from a thread, has been answered by this daemon, so systemd units
ordered after this one find a working mount. ``auto_unmount`` makes fusermount3 unmount if
the daemon dies without cleaning up, so a crash leaves no dead mount behind.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from tvixfs.fs.inodes import ROOT_INODE
from tvixfs.fs.mountmetrics import watch_mount
from tvixfs.fs.ops import EntryInvalidator, FsOptions, TvixOperations
from tvixfs.fs.preflight import FS_TYPE, MountError
from tvixfs.fs.statusreport import StatusReport
from tvixfs.fs.tuning import tune_connection
from tvixfs.services.base import Store
from tvixfs.services.breaker import CircuitBreaker
from tvixfs.services.metrics import Metrics
from tvixfs.systemd import Notifier, watchdog_interval

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
STATUS_INTERVAL = 30.0
# After SIGTERM, requests in flight may finish for this long before they are abandoned.
STOP_GRACE = 5.0
MAX_TASKS = 64


@dataclass(frozen=True, slots=True)
class MountConfig:
    mountpoint: Path
    fs: FsOptions
    allow_other: bool = False
    debug_fuse: bool = False
    # A line put in front of STATUS= (the disk cache's online or offline state).
    status_note: Callable[[], str] | None = None
    # --metrics-listen: count and time the mount's requests into these.
    metrics: Metrics | None = None

    def status(self, line: str) -> str:
        return line if self.status_note is None else f"{self.status_note()}; {line}"


def fuse_options(config: MountConfig) -> set[str]:
    options = {"ro", "default_permissions", f"fsname={FS_TYPE}", f"subtype={FS_TYPE}", "auto_unmount"}
    if config.allow_other:
        options.add("allow_other")
    if config.debug_fuse:
        options.add("debug")
    return options


def run_mount(store: Store, config: MountConfig, description: str) -> None:
    """Mount and serve until stopped. MountError if the mount never came up."""
    trio.run(_serve, store, config, description)


def reachability(target: str, reachable: bool) -> str:
    """STATUS= when a remote store goes away or comes back."""
    return f"store {target} reachable again" if reachable else f"store {target} unreachable: failing fast"


def _report_reachability(notifier: Notifier, target: str, reachable: bool) -> None:
    notifier.status(reachability(target, reachable))


def _answering(mountpoint: Path) -> os.stat_result:
    """Runs in a thread: blocks until the daemon answers (the kernel waits for FUSE_INIT)."""
    st = os.stat(mountpoint)
    if st.st_ino != ROOT_INODE:
        raise MountError(f"{mountpoint} does not show the tvixfs root after mounting")
    tune_connection(st.st_dev)
    return st


class _Mount:
    def __init__(
        self,
        ops: TvixOperations,
        config: MountConfig,
        notifier: Notifier,
        breakers: tuple[CircuitBreaker, ...],
    ) -> None:
        self.ops = ops
        self.breakers = breakers
        self.config = config
        self.notifier = notifier
        self.terminated = False  # we ended the session (a signal, a failure), not the kernel
        self.main_done = trio.Event()

    async def fuse_main(self, nursery: trio.Nursery) -> None:
        try:
            await pyfuse3.main(max_tasks=MAX_TASKS)
        finally:
            self.main_done.set()
            nursery.cancel_scope.cancel()

    def terminate(self) -> None:
        if not self.terminated:
            self.terminated = True
            pyfuse3.terminate()

    async def until_answering(self) -> str | None:
        """None once the mount answers, else why it does not."""
        mountpoint = self.config.mountpoint
        with trio.move_on_after(READY_TIMEOUT):
            try:
                await trio.to_thread.run_sync(_answering, mountpoint, abandon_on_cancel=True)
            except OSError as e:
                return f"{mountpoint} does not answer after mounting: {e.strerror}"
            except MountError as e:
                return str(e)
            return None
        return f"{mountpoint} did not answer within {READY_TIMEOUT:g} s of mounting"

    async def stop_on_signal(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            self.notifier.stopping()
            self.terminate()
            break
        with trio.move_on_after(STOP_GRACE):
            await self.main_done.wait()
            return
        log.warning("requests still running after %g s; abandoning them", STOP_GRACE)
        nursery.cancel_scope.cancel()

    async def report_status(self) -> None:
        while True:
            await trio.sleep(STATUS_INTERVAL)
            down = [reachability(b.target, False) + "; " for b in self.breakers if not b.reachable]
            self.notifier.status(self.config.status("".join(down) + self.ops.status()))

    async def ping_watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)


async def _serve(store: Store, config: MountConfig, description: str) -> None:
    # Raised out here: inside a nursery it would arrive wrapped in an exception group.
    failure = await _mount_and_serve(store, config, description)
    if failure is not None:
        raise MountError(failure)
    log.info("unmounted %s", config.mountpoint)


async def _mount_and_serve(store: Store, config: MountConfig, description: str) -> str | None:
    """Serve until stopped; returns why the mount did not come up, if it did not."""
    notifier = Notifier()
    mountpoint = config.mountpoint
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as background:
            invalidator = EntryInvalidator()
            ops = TvixOperations(store, background, config.fs, invalidate=invalidator.request)
            if config.metrics is not None:
                watch_mount(ops, config.metrics)
            ops.root_status = StatusReport(
                ops,
                description,
                mountpoint,
                note=config.status_note,
                metrics=config.metrics,
                breakers=store.breakers,
            )
            try:
                pyfuse3.init(ops, str(mountpoint), fuse_options(config))
            except RuntimeError as e:
                invalidator.stop()
                background.cancel_scope.cancel()
                return f"cannot mount on {mountpoint}: {e}"
            mount = _Mount(ops, config, notifier, store.breakers)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(mount.fuse_main, nursery)
                    failure = await mount.until_answering()
                    if failure is not None:
                        mount.terminate()
                        return failure
                    log.info("mounted %s on %s", description, mountpoint)
                    notifier.ready(config.status(f"serving {description} on {mountpoint}"))
                    for breaker in store.breakers:
                        breaker.watch(functools.partial(_report_reachability, notifier, breaker.target))
                    nursery.start_soon(mount.stop_on_signal, signals, nursery)
                    if notifier.enabled:
                        nursery.start_soon(mount.report_status)
                    interval = watchdog_interval()
                    if interval is not None:
                        nursery.start_soon(mount.ping_watchdog, interval)
            finally:
                if not mount.terminated:  # an external umount: systemd sees the stop begin too
                    notifier.stopping()
                invalidator.stop()
                # After an external umount the kernel has already let go of the mount.
                pyfuse3.close(unmount=mount.terminated or not mount.main_done.is_set())
                background.cancel_scope.cancel()
    return None
