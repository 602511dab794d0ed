"""Issue 11 items 5, 6 and 8: what the command line refuses, each as one line and no traceback,
and that the commands which only read or serve never create a store."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
from grpcserver import running_daemon
from mounting import TVIXFS, mounted

from tvixfs.fs.preflight import check_mountpoint
from tvixfs.services.url import StoreURL, StoreURLError

WAIT = 60


def run(
    cmd: list[str], *args: str, env: dict[str, str] | None = None, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
        env={**os.environ, **(env or {})},
        **kwargs,  # type: ignore[arg-type]
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The failure's stderr, which must be exactly one ``tvixfs: error:`` line."""
    assert done.returncode != 0, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvixfs: error: "), lines
    return lines[0]


@pytest.fixture
def store(tvixfs_cmd: list[str], tmp_path: Path) -> str:
    """A local store holding one file, /nix/store/...-hello."""
    (tmp_path / "hello").write_text("hello\n")
    url = f"local://{tmp_path / 'store'}"
    assert run(tvixfs_cmd, "import", "--store", url, str(tmp_path / "hello")).returncode == 0
    return url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty store URL"),
        ("grpc+http://127.0.0.1:99999", "out of range"),
        ("grpc+http://[::1:8000", "malformed store URL"),
        ("memory:///foo", "takes no host or path"),
        ("local:///srv/x?cache=1", "unknown parameters"),
        ("grpc+http://[::1]:8000?timeout=3", "unknown parameters"),
    ],
)
def test_bad_urls_are_refused(tvixfs_cmd: list[str], url: str, message: str) -> None:
    with pytest.raises(StoreURLError, match=message):
        StoreURL.parse(url)
    assert message in one_line(run(tvixfs_cmd, "ls", "--store", url))


def test_empty_store_variable_is_an_error(tvixfs_cmd: list[str]) -> None:
    for command in ("ls", "fsck"):
        assert "TVIXFS_STORE is set but empty" in one_line(run(tvixfs_cmd, command, env={"TVIXFS_STORE": ""}))


@pytest.mark.parametrize(
    "command", [["ls"], ["info", "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x"], ["mount"]]
)
def test_reading_commands_never_create_a_store(
    tvixfs_cmd: list[str], tmp_path: Path, command: list[str]
) -> None:
    typo = tmp_path / "tvixfs-typo"
    extra = [str(tmp_path)] if command == ["mount"] else []
    line = one_line(run(tvixfs_cmd, *command, "--store", f"local://{typo}", *extra))
    assert "no tvixfs store here" in line
    assert not typo.exists()


def test_daemon_creates_a_store_only_in_an_existing_directory(tvixfs_cmd: list[str], short_tmp: Path) -> None:
    typo = short_tmp / "typo"
    line = one_line(run(tvixfs_cmd, "daemon", "--store", f"local://{typo}", "--listen", "[::1]:0"))
    assert "no tvixfs store here" in line
    assert not typo.exists()
    state = short_tmp / "state"  # as systemd's StateDirectory= makes it: empty
    state.mkdir()
    with running_daemon(tvixfs_cmd, short_tmp, f"local://{state}") as daemon:
        assert run(tvixfs_cmd, "ls", "--store", daemon.url).returncode == 0
    assert (state / "db.sqlite").exists()


def test_a_store_on_read_only_media_is_readable(tvixfs_cmd: list[str], short_tmp: Path) -> None:
    media = short_tmp / "media"
    media.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(media)], check=True)
    try:
        (short_tmp / "hello").write_text("hello\n")
        url = f"local://{media / 'store'}"
        path = run(tvixfs_cmd, "import", "--store", url, str(short_tmp / "hello")).stdout.strip()
        subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        assert run(tvixfs_cmd, "ls", "--store", url).stdout == path + "\n"
        assert run(tvixfs_cmd, "cat", "--store", url, path).stdout == "hello\n"
        assert '"narHash"' in run(tvixfs_cmd, "info", "--store", url, path).stdout
        nar = subprocess.run(
            [*tvixfs_cmd, "export-nar", "--store", url, path], capture_output=True, check=True
        )
        assert nar.stdout.startswith(b"\r\x00\x00\x00\x00\x00\x00\x00nix-archive-1")
        # Importing is what needs a writable store, and says so in one line.
        assert "not writable" in one_line(run(tvixfs_cmd, "import", "--store", url, str(short_tmp / "hello")))
        # A daemon serves it, and refuses puts in one line; a mount serves it too.
        with running_daemon(tvixfs_cmd, short_tmp, url) as daemon:
            assert run(tvixfs_cmd, "cat", "--store", daemon.url, path).stdout == "hello\n"
            line = one_line(run(tvixfs_cmd, "import", "--store", daemon.url, str(short_tmp / "hello")))
            assert "is read-only" in line
        with mounted(TVIXFS, short_tmp, url) as mount:
            assert mount.path(Path(path).name).read_text() == "hello\n"
        assert sorted(os.listdir(media / "store")) == [
            "chunks",
            "db.sqlite",
            "gc.lock",
        ]  # nothing left behind
    finally:
        subprocess.run(["umount", str(media)], check=False)


def test_closed_standard_streams(tvixfs_cmd: list[str], store: str) -> None:
    path = run(tvixfs_cmd, "ls", "--store", store).stdout.strip()
    shell = subprocess.run(
        ["sh", "-c", '"$@" >&-', "sh", *tvixfs_cmd, "export-nar", "--store", store, path],
        capture_output=False,
        stderr=subprocess.PIPE,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert shell.returncode == 1 and shell.stderr == "tvixfs: error: standard output is closed\n"
    nar_in = subprocess.run(
        [
            "sh",
            "-c",
            '"$@" <&-',
            "sh",
            *tvixfs_cmd,
            "import-nar",
            "--store",
            store,
            "--path",
            path + "x",
            "-",
        ],
        stderr=subprocess.PIPE,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert nar_in.returncode == 1 and nar_in.stderr == "tvixfs: error: standard input is closed\n"


def test_export_nar_into_head_exits_0(tvixfs_cmd: list[str], tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(4 << 20))
    url = f"local://{tmp_path / 'store'}"
    path = run(tvixfs_cmd, "import", "--store", url, str(big)).stdout.strip()
    for command in ("export-nar", "cat"):
        done = subprocess.run(
            [
                "bash",
                "-c",
                'set -o pipefail; "$@" | head -c 10 >/dev/null',
                "sh",
                *tvixfs_cmd,
                command,
                "--store",
                url,
                path,
            ],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert (done.returncode, done.stderr) == (0, ""), command


def test_ls_of_the_store_directory_lists_the_store(tvixfs_cmd: list[str], store: str) -> None:
    listed = run(tvixfs_cmd, "ls", "--store", store).stdout
    assert listed.startswith("/nix/store/")
    assert run(tvixfs_cmd, "ls", "--store", store, "/nix/store").stdout == listed
    assert run(tvixfs_cmd, "ls", "--store", store, "/nix/store/").stdout == listed


def test_cat_errors_show_names_not_reprs(tvixfs_cmd: list[str], store: str) -> None:
    path = run(tvixfs_cmd, "ls", "--store", store).stdout.strip()
    line = one_line(run(tvixfs_cmd, "cat", "--store", store, f"{path}/inside"))
    assert "b'" not in line and "hello" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import", "--name", "", "/etc/hostname"], "empty store path name"),
        # Mount points that do not exist: should a refusal regress, nothing gets mounted.
        (["mount", "--cache-size", "0", "/tmp/tvixfs-test-absent"], "--cache-size 0"),
        (["mount", "/proc/tvixfs-test-absent"], "under /proc"),
        (["mount", "/sys/tvixfs-test-absent"], "under /sys"),
        (["daemon", "--store", "grpc+http://localhost:8123", "--listen", "[::1]:8123"], "own --listen"),
        (["daemon", "--store", "grpc+http://127.0.0.1:8123", "--listen", "0.0.0.0:8123"], "own --listen"),
        (["daemon", "--store", "grpc+unix:///run/x.sock", "--listen", "unix:/run/x.sock"], "own --listen"),
    ],
)
def test_refusals(tvixfs_cmd: list[str], store: str, args: list[str], message: str) -> None:
    assert message in one_line(run(tvixfs_cmd, args[0], "--store", store, *args[1:]))


def test_verbose_is_a_counter_and_help_fits_80_columns(tvixfs_cmd: list[str]) -> None:
    assert run(tvixfs_cmd, "-vv", "ls", "--store", "memory://").returncode == 0
    top = run(tvixfs_cmd, "--help", env={"COLUMNS": "80"}).stdout
    assert "<int>" not in top and "--verbose" in top
    mount_help = run(tvixfs_cmd, "mount", "--help", env={"COLUMNS": "80"}).stdout
    for option in (
        "--blob-service-addr",
        "--directory-service-addr",
        "--path-info-service-addr",
        "--cache-size",
    ):
        assert option in mount_help
    assert "…" not in mount_help


def test_a_non_empty_mount_point_is_warned_about(tmp_path: Path) -> None:
    (tmp_path / "left-over").write_text("")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("tvixfs.fs.preflight").addHandler(handler)
    try:
        check_mountpoint(tmp_path)
    finally:
        logging.getLogger("tvixfs.fs.preflight").removeHandler(handler)
    assert any("not empty" in r.getMessage() for r in records)
