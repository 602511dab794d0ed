"""``tvixfs mount`` and ``tvixfs daemon`` under a service manager, as systemd runs them.

No systemd runs here, so the test plays its part: a bound datagram socket in ``NOTIFY_SOCKET``,
``WATCHDOG_USEC``, stdin from /dev/null, cwd ``/``, a service's PATH, and those restrictions of
the shipped unit that a process can put on itself before exec: the capability bounding set,
NoNewPrivileges, and MemoryDenyWriteExecute (as PR_SET_MDWE). Then SIGTERM, as
``systemctl stop`` sends it, and the exit code systemd judges.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpcserver import Daemon
from mounting import Mount, import_tree, mounted, teardown
from test_systemd_units_and_nixos_module import evaluate, systemd_argv

from tvixfs.services.url import open_store

UNITS = Path(__file__).resolve().parent.parent / "systemd"
WATCHDOG_USEC = 400_000  # a ping every 0.2 s
PING_INTERVAL = WATCHDOG_USEC / 2e6
WAIT = 60.0  # for any one message or exit: only a hang runs into it
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # systemd's default

CAPABILITIES = {"CAP_DAC_OVERRIDE": 1, "CAP_NET_BIND_SERVICE": 10, "CAP_SYS_ADMIN": 21}

# Run by the service's own process before it becomes tvixfs (a wrapper, not preexec_fn, which
# is unsafe in a test process that may have threads). argv: keep-mask program args...
# prctl 24 = PR_CAPBSET_DROP, 38 = PR_SET_NO_NEW_PRIVS, 65 = PR_SET_MDWE (1: refuse exec gain).
CONFINE = """
import ctypes, os, sys
prctl = ctypes.CDLL(None, use_errno=True).prctl
keep = int(sys.argv[1])
for cap in range(int(open("/proc/sys/kernel/cap_last_cap").read()) + 1):
    if not keep >> cap & 1 and prctl(24, cap, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"PR_CAPBSET_DROP {cap}")
for option, value in ((38, 1), (65, 1)):
    if prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl {option}")
os.execv(sys.argv[2], sys.argv[2:])
"""


def unit_setting(unit: str, key: str) -> str:
    """The value of ``key`` in a shipped unit file (the last one, as systemd reads it)."""
    values = re.findall(rf"^{key}=(.*)$", (UNITS / unit).read_text(), re.M)
    assert values, f"{unit} has no {key}="
    return str(values[-1]).strip()


def capability_mask(unit: str) -> int:
    return sum(1 << CAPABILITIES[name] for name in unit_setting(unit, "CapabilityBoundingSet").split())


def run_as_unit(argv: list[str], unit: str, tmp: Path) -> Daemon:
    """Start ``argv`` the way systemd starts ``unit``: environment, cwd, stdin, confinement."""
    assert unit_setting(unit, "Type") == "notify"
    assert unit_setting(unit, "NoNewPrivileges") == "yes"
    assert unit_setting(unit, "MemoryDenyWriteExecute") == "yes"
    notify_path = tmp / "service.notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    stderr_path = tmp / "service.stderr"
    env = {
        "PATH": SERVICE_PATH,
        "LANG": "C.UTF-8",
        "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
    }
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", CONFINE, str(capability_mask(unit)), *argv],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            cwd="/",
            env=env,
        )
    return Daemon(proc, notify, stderr_path)


def check_ready(service: Daemon, unit: str) -> float:
    """READY=1 arrived; the process runs with exactly the unit's capabilities. Returns when."""
    service.wait_message("READY=1", WAIT)
    status = Path(f"/proc/{service.proc.pid}/status").read_text()
    assert int(status.split("CapEff:")[1].split()[0], 16) == capability_mask(unit)
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    return time.monotonic()


def stop_as_systemd(service: Daemon, ready_at: float) -> None:
    """``systemctl stop`` after a few watchdog pings: SIGTERM, STOPPING=1, exit code 0; then
    the whole message sequence: READY=1 first (STATUS= alone may precede it), STOPPING=1 last.

    The pings counted between READY and STOPPING bound their rate from above: a watchdog
    pinging much more often than every WATCHDOG_USEC/2 would be busy-looping.
    """
    for _ in range(3):
        service.wait_message("WATCHDOG=1", WAIT)
    service.proc.send_signal(signal.SIGTERM)
    service.wait_message("STOPPING=1", WAIT)
    assert service.proc.wait(WAIT) == 0, service.stderr()
    elapsed = time.monotonic() - ready_at
    kinds = [
        next(k for k in ("READY", "STOPPING", "WATCHDOG", "STATUS") if f"{k}=" in m) for m in service.messages
    ]
    first = kinds.index("READY")
    assert set(kinds[:first]) <= {"STATUS"}, kinds
    assert "READY=1" in service.messages[first].splitlines()
    assert kinds.count("READY") == 1
    assert kinds[-1] == "STOPPING", kinds
    assert kinds.count("STOPPING") == 1, kinds
    assert kinds.count("WATCHDOG") <= elapsed / PING_INTERVAL + 3, kinds


@pytest.fixture
def mountpoint(short_tmp: Path) -> Iterator[Path]:
    path = short_tmp / "mnt"
    path.mkdir()
    yield path
    if os.path.ismount(path):
        subprocess.run(["umount", "--lazy", str(path)], check=False, timeout=WAIT)


@pytest.mark.fuse
def test_mount_notify_sequence(
    tvixfs_cmd: list[str], short_tmp: Path, sample_tree: Path, mountpoint: Path
) -> None:
    store = short_tmp / "store"
    name = import_tree(store, sample_tree, "sample")
    unit = "tvixfs.service"
    argv = [*tvixfs_cmd, "mount", "--store", f"local://{store}", "--allow-other", str(mountpoint)]
    service = run_as_unit(argv, unit, short_tmp)
    mount = Mount(service, mountpoint)
    try:
        ready_at = check_ready(service, unit)
        assert mount.is_mounted()
        found = subprocess.run(
            ["findmnt", "--noheadings", "--output", "FSTYPE,OPTIONS", str(mountpoint)],
            capture_output=True,
            text=True,
            check=True,
            timeout=WAIT,
        ).stdout.split()
        assert found[0] == "fuse.tvixfs"
        assert "ro" in found[1].split(",")
        readme = "share/doc/README"
        assert mount.path(name, readme).read_bytes() == (sample_tree / readme).read_bytes()
        stop_as_systemd(service, ready_at)
        assert not mount.is_mounted()
        assert not os.path.ismount(mountpoint)
    finally:
        teardown(mount)


def test_daemon_notify_sequence(tvixfs_cmd: list[str], short_tmp: Path) -> None:
    sock = short_tmp / "daemon.sock"
    argv = [*tvixfs_cmd, "daemon", "--store", "memory://", "--listen", f"unix:{sock}", "--listen", "[::1]:0"]
    unit = "tvixfs-daemon.service"
    service = run_as_unit(argv, unit, short_tmp)
    try:
        ready_at = check_ready(service, unit)
        assert f"unix:{sock}" in service.messages[-1]
        client = open_store(f"grpc+unix://{sock}")
        try:
            digest = client.blobs.put([b"through the daemon"])
            assert b"".join(client.blobs.read(digest)) == b"through the daemon"
        finally:
            client.close()
        stop_as_systemd(service, ready_at)
    finally:
        if service.proc.poll() is None:
            service.proc.kill()
            service.proc.wait()
        service.notify.close()


def fusermount_children(pid: int) -> list[int]:
    """The auto_unmount helpers (fusermount3) that the mount daemon ``pid`` started."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        if fields[0].endswith("(fusermount3") and int(fields[1].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def stop_post(source: str, mountpoint: Path) -> list[str]:
    """The ExecStopPost= command of a shipped unit or of the NixOS module's unit, for
    ``mountpoint``; the module's Nix store paths of util-linux and bash mapped onto the host's."""
    if source == "nixos-module":
        service = evaluate(enable=True, mountPoint=str(mountpoint))["config"]["systemd"]["services"]["tvixfs"]
        command = service["serviceConfig"]["ExecStopPost"]
        command = re.sub(r"/nix/store/[0-9]{32}-util-linux-[^/]*", "/usr", command)
        command = re.sub(r"/nix/store/[0-9]{32}-bash-[^/]*/bin/bash", "/bin/sh", command)
    else:
        command = unit_setting(source, "ExecStopPost").replace("%f", str(mountpoint))
        command = command.replace("/nix/store", str(mountpoint))
    assert command.startswith("-")  # a failure (nothing to detach) must not fail the unit
    return systemd_argv(command)


@pytest.mark.fuse
@pytest.mark.parametrize("source", ["tvixfs.service", "tvixfs@.service", "nixos-module"])
def test_stop_post_detaches_a_dead_mount_and_nothing_else(
    tvixfs_cmd: list[str], short_tmp: Path, mountpoint: Path, source: str
) -> None:
    """After SIGKILL of the daemon and its auto_unmount helper the kernel keeps a dead mount;
    the unit's ExecStopPost= detaches it, and leaves a mount that is not tvixfs' alone."""
    argv = stop_post(source, mountpoint)
    unit = "tvixfs.service"
    service = run_as_unit([*tvixfs_cmd, "mount", "--store", "memory://", str(mountpoint)], unit, short_tmp)
    mount = Mount(service, mountpoint)
    try:
        check_ready(service, unit)
        helpers = fusermount_children(service.proc.pid)
        assert helpers, "no auto_unmount helper found"
        for pid in helpers:
            os.kill(pid, signal.SIGKILL)
        service.proc.kill()
        service.proc.wait(WAIT)
        assert mount.is_mounted()
        with pytest.raises(OSError, match="not connected"):
            os.listdir(mountpoint)
        subprocess.run(argv, check=True, timeout=WAIT)
        assert not mount.is_mounted()
        # A mount that is not tvixfs' (as a bind mount of the real /nix/store would be) stays.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "notours", str(mountpoint)], check=True)
        subprocess.run(argv, check=True, timeout=WAIT)
        assert mount.is_mounted()
    finally:
        teardown(mount)


def test_external_umount_sends_stopping(tvixfs_cmd: list[str], short_tmp: Path) -> None:
    """An administrator's ``umount`` ends the service too: STOPPING=1 first, then exit 0."""
    with mounted(tvixfs_cmd, short_tmp, "memory://") as mount:
        assert mount.unmount() == 0, mount.stderr()
        mount.process.wait_message("STOPPING=1", WAIT)
        assert sum("STOPPING=1" in m for m in mount.process.messages) == 1
