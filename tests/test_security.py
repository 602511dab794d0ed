"""What the mount and the daemon let other people do: read what they should, nothing else.

The mount is read-only for everybody, root included: every system call that would change
something fails with EROFS (the ones tests/test_mount.py does not try are tried here). Other
users cannot even look into a mount unless it was made with ``--allow-other``; then they can
read, still not write. The gRPC daemon listens on loopback unless told otherwise, says so
loudly when told to listen on every address, and its unix socket keeps other users out.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from grpcserver import Daemon, running_daemon
from mounting import TVIXFS, import_tree, mounted, needs_fuse

pytestmark = needs_fuse

# Run a command as another, unprivileged user with no supplementary groups.
AS_NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--"]
# A command in a network namespace of its own with loopback up: ports cannot collide with
# anything else on the machine and nothing it binds is reachable from outside.
OWN_NETWORK = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


@pytest.fixture
def store(short_tmp: Path) -> tuple[str, str, Path]:
    """(store URL, store path basename, source tree) of a small tree; short_tmp opened up
    to other users, so that only the mount decides what they may do."""
    short_tmp.chmod(0o755)
    tree = short_tmp / "src"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (tree / "bin" / "tool").chmod(0o755)
    (tree / "data").write_bytes(b"some data\n")
    (tree / "dir").mkdir()
    (tree / "dir" / "inner").write_bytes(b"inner\n")
    (tree / "link").symlink_to("data")
    store_dir = short_tmp / "store"
    return f"local://{store_dir}", import_tree(store_dir, tree, "sec"), tree


def _writes(top: Path, root: Path, other: str) -> dict[str, Callable[[], object]]:
    """Every way of changing a store path (or the mount root) test_mount.py does not try."""
    data, inner, link, directory = top / "data", top / "dir" / "inner", top / "link", top / "dir"
    return {
        "open O_WRONLY": lambda: os.open(data, os.O_WRONLY),
        "open O_TRUNC": lambda: os.open(data, os.O_RDONLY | os.O_TRUNC),
        "open O_APPEND": lambda: os.open(data, os.O_WRONLY | os.O_APPEND),
        "open O_CREAT|O_EXCL": lambda: os.open(top / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644),
        "open O_TMPFILE": lambda: os.open(directory, os.O_WRONLY | os.O_TMPFILE, 0o644),
        "truncate": lambda: os.truncate(data, 0),
        "link": lambda: os.link(data, top / "hardlink"),
        "chown": lambda: os.chown(data, 1, 1),
        "lchown symlink": lambda: os.lchown(link, 1, 1),
        "utime": lambda: os.utime(data, (0, 0)),
        "utime now": lambda: os.utime(data),
        "removexattr": lambda: os.removexattr(data, "user.tvix.castore.blob.digest"),
        "setxattr dir": lambda: os.setxattr(directory, "user.x", b"1"),
        "rmdir": lambda: os.rmdir(directory),
        "unlink in subdir": lambda: os.unlink(inner),
        "rename dir": lambda: os.rename(directory, top / "moved"),
        "rename over": lambda: os.replace(data, top / "bin" / "tool"),
        "mkfifo": lambda: os.mkfifo(top / "fifo"),
        "mknod": lambda: os.mknod(top / "node", stat.S_IFREG | 0o644),
        "chmod dir": lambda: os.chmod(directory, 0o777),
        "unlink store path": lambda: os.unlink(top),
        "rmdir store path": lambda: os.rmdir(top),
        "rename store path": lambda: os.rename(top, root / other),
        "symlink in root": lambda: os.symlink("x", root / other),
        "chmod root": lambda: os.chmod(root, 0o777),
        "utime root": lambda: os.utime(root, (0, 0)),
    }


def test_every_write_fails_with_erofs(store: tuple[str, str, Path], short_tmp: Path) -> None:
    url, basename, _ = store
    other = "00bgd045z0d4icpbc2yyz4gx48ak44la-other"
    with mounted(TVIXFS, short_tmp, url) as m:
        got = {}
        for name, attempt in _writes(m.path(basename), m.mountpoint, other).items():
            try:
                fd = attempt()
            except OSError as e:
                got[name] = errno.errorcode.get(e.errno or 0, e.errno)
            else:
                if isinstance(fd, int):
                    os.close(fd)
                got[name] = "allowed"
        assert got == dict.fromkeys(got, "EROFS")
        # Nothing was changed, and the daemon is fine.
        assert m.path(basename, "data").read_bytes() == b"some data\n"
        assert sorted(os.listdir(m.path(basename))) == ["bin", "data", "dir", "link"]
        assert m.process.proc.poll() is None


def _as_nobody(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AS_NOBODY, *map(str, argv)], capture_output=True, text=True, timeout=60, check=False
    )


def test_other_users_cannot_enter_a_mount_without_allow_other(
    store: tuple[str, str, Path], short_tmp: Path
) -> None:
    url, basename, _ = store
    with mounted(TVIXFS, short_tmp, url) as m:
        assert _as_nobody("stat", short_tmp / "store").returncode == 0  # the way there is open
        for argv in (["ls", m.mountpoint], ["stat", m.path(basename)], ["cat", m.path(basename, "data")]):
            denied = _as_nobody(*argv)
            assert denied.returncode != 0
            assert "Permission denied" in denied.stderr, denied.stderr
        assert m.path(basename, "data").read_bytes() == b"some data\n"  # root, who mounted it, can


def test_with_allow_other_other_users_read_but_cannot_write(
    store: tuple[str, str, Path], short_tmp: Path
) -> None:
    url, basename, tree = store
    with mounted(TVIXFS, short_tmp, url, ["--allow-other"]) as m:
        top = m.path(basename)
        cat = _as_nobody("cat", top / "data", top / "dir" / "inner", top / "link")
        assert cat.returncode == 0, cat.stderr
        assert cat.stdout == "some data\ninner\nsome data\n"
        tool = _as_nobody(top / "bin" / "tool")
        assert (tool.returncode, tool.stdout) == (0, "tool\n")
        listing = _as_nobody("ls", "-A", top)
        assert listing.stdout.split() == sorted(os.listdir(tree))
        for argv in (
            ["touch", top / "new"],
            ["touch", top / "data"],
            ["sh", "-c", f"echo x >> {top / 'data'}"],
            ["mkdir", top / "newdir"],
            ["rm", "-f", top / "data"],
            ["mv", top / "dir", top / "moved"],
            ["chmod", "777", top / "data"],
            ["ln", "-s", "x", top / "link2"],
        ):
            refused = _as_nobody(*argv)
            assert refused.returncode != 0, argv
            assert "Read-only file system" in refused.stderr or "Permission denied" in refused.stderr, (
                argv,
                refused.stderr,
            )
        assert m.path(basename, "data").read_bytes() == b"some data\n"


# --- the gRPC daemon ---------------------------------------------------------------------------


@contextmanager
def _isolated_daemon(tmp: Path, listen: Sequence[str]) -> Iterator[Daemon]:
    """``tvixfs daemon`` in a network namespace of its own (same pid: sh and unshare exec)."""
    with running_daemon([*OWN_NETWORK, *TVIXFS], tmp, listen=listen) as daemon:
        yield daemon


def _listening(daemon: Daemon) -> list[str]:
    """The TCP listen addresses in the daemon's network namespace, as ``ss`` shows them."""
    ss = subprocess.run(
        ["nsenter", f"--net=/proc/{daemon.proc.pid}/ns/net", "ss", "-Hltn"],
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(line.split()[3] for line in ss.stdout.splitlines())


def test_daemon_listens_on_loopback_by_default(short_tmp: Path) -> None:
    with _isolated_daemon(short_tmp, listen=()) as daemon:
        assert daemon.addresses == ["[::1]:8000"]
        assert _listening(daemon) == ["[::1]:8000"]
        assert "WARNING" not in daemon.stderr()


@pytest.mark.parametrize("everywhere", ["0.0.0.0", "[::]"])
def test_daemon_listening_everywhere_warns_loudly(short_tmp: Path, everywhere: str) -> None:
    with _isolated_daemon(short_tmp, listen=[f"{everywhere}:8000"]) as daemon:
        assert _listening(daemon) == ["*:8000"]  # ss's way of saying: every address
        warnings = [line for line in daemon.stderr().splitlines() if " WARNING " in line]
        assert len(warnings) == 1
        assert f"LISTENING ON {everywhere}:8000, WHICH IS NOT A LOOPBACK ADDRESS" in warnings[0]
        assert "without authentication or encryption" in warnings[0]


def test_daemon_unix_socket_keeps_other_users_out(short_tmp: Path) -> None:
    short_tmp.chmod(0o755)
    sock = short_tmp / "daemon.sock"
    with running_daemon(TVIXFS, short_tmp, listen=[f"unix:{sock}"]):
        mode = sock.stat()
        assert (stat.S_IMODE(mode.st_mode), mode.st_uid, mode.st_gid) == (0o660, 0, 0)
        probe = f"import socket; socket.socket(socket.AF_UNIX).connect({str(sock)!r})"
        refused = _as_nobody(sys.executable, "-c", probe)
        assert refused.returncode != 0
        assert "PermissionError" in refused.stderr
        with socket.socket(socket.AF_UNIX) as mine:
            mine.connect(str(sock))  # root, in the socket's group, gets in
