"""TLS and mutual TLS between a mount (or a store command) and ``tvixfs daemon``, with
certificates made by openssl: what works is read byte for byte through a real mount, what is
refused is refused at mount preflight, in one line, before READY, with nothing mounted."""

from __future__ import annotations

import filecmp
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_sample_tree
from grpcserver import Daemon, running_daemon
from mounting import TVIXFS, mounted, needs_fuse
from tlscerts import Certs, make_certs

from tvixfs.services.tls import ClientTLS
from tvixfs.services.url import StoreURL, StoreURLError
from tvixfs.store.storepath import StorePath


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A local store holding the sample tree: (store dir, tree, store path basename)."""
    base = tmp_path_factory.mktemp("tls-store")
    tree = make_sample_tree(base / "sample")
    store = base / "store"
    args = [*TVIXFS, "import", "--store", f"local://{store}", str(tree)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return store, tree, StorePath.from_absolute(out.strip()).basename


def _tls_args(certs: Certs, cert: Path, key: Path, client_ca: Path | None) -> list[str]:
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    return [*args, "--tls-client-ca", str(client_ca)] if client_ca else args


@pytest.fixture
def mtls_daemon(
    certs: Certs, filled: tuple[Path, Path, str], tvixfs_cmd: list[str], tmp_path: Path
) -> Iterator[Daemon]:
    extra = _tls_args(certs, certs.server_cert, certs.server_key, certs.ca)
    with running_daemon(tvixfs_cmd, tmp_path, f"local://{filled[0]}", ["127.0.0.1:0"], extra) as daemon:
        yield daemon


def _url(daemon: Daemon, **options: Path) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"grpc+https://{daemon.tcp}" + (f"?{query}" if query else "")


def _client(certs: Certs) -> dict[str, Path]:
    return {"ca": certs.ca, "cert": certs.client_cert, "key": certs.client_key}


def test_store_commands_over_tls(
    certs: Certs, filled: tuple[Path, Path, str], tvixfs_cmd: list[str], tmp_path: Path
) -> None:
    store, tree, name = filled
    extra = _tls_args(certs, certs.server_cert, certs.server_key, None)
    with running_daemon(tvixfs_cmd, tmp_path, f"local://{store}", ["127.0.0.1:0"], extra) as daemon:
        url = _url(daemon, ca=certs.ca)
        cat = [*tvixfs_cmd, "cat", "--store", url, f"/nix/store/{name}/large.bin"]
        assert (
            subprocess.run(cat, check=True, capture_output=True).stdout == (tree / "large.bin").read_bytes()
        )
        # Plaintext to a TLS port: refused, one line.
        plain = subprocess.run(
            [*tvixfs_cmd, "ls", "--store", f"grpc+http://{daemon.tcp}"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert plain.returncode == 1 and len(plain.stderr.splitlines()) == 1
    # No loud warning about serving unencrypted: it is not.
    assert "NOT A LOOPBACK" not in daemon.stderr()


def _walk_equal(left: Path, right: Path) -> None:
    compared = filecmp.dircmp(left, right)
    assert not compared.left_only and not compared.right_only and not compared.funny_files
    for name in compared.common_files:
        a, b = left / name, right / name
        if a.is_symlink():
            assert os.readlink(a) == os.readlink(b)
        else:
            assert a.read_bytes() == b.read_bytes(), a
    for name in compared.common_dirs:
        _walk_equal(left / name, right / name)


@needs_fuse
def test_mount_over_mutual_tls_reads_the_tree_and_runs_programs(
    certs: Certs, filled: tuple[Path, Path, str], mtls_daemon: Daemon, short_tmp: Path
) -> None:
    _, tree, name = filled
    with mounted(TVIXFS, short_tmp, _url(mtls_daemon, **_client(certs))) as mount:
        _walk_equal(mount.path(name), tree)
        ran = subprocess.run([mount.path(name, "bin", "hello")], capture_output=True, text=True, check=True)
        assert ran.stdout == "hello from tvixfs\n"


def _refused(store: str, short_tmp: Path) -> str:
    """Mount ``store``: must fail before READY, with one line on stderr, nothing mounted."""
    mountpoint = short_tmp / "refused"
    mountpoint.mkdir(exist_ok=True)
    env = {**os.environ, "TVIXFS_GRPC_ATTEMPTS": "1"}
    done = subprocess.run(
        [*TVIXFS, "mount", "--store", store, str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvixfs: error: cannot reach the store: "), lines
    assert not os.path.ismount(mountpoint)
    return lines[0]


@needs_fuse
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ca": "ca"}, "the server requires a client certificate (add ?cert=FILE&key=FILE)"),
        ({}, "the server's certificate is not trusted: unknown CA (a private CA? add ?ca=FILE)"),
        ({"ca": "other_ca", "cert": "client_cert", "key": "client_key"}, "not signed by the CA in"),
        ({"ca": "ca", "cert": "expired_cert", "key": "expired_key"}, "expired.crt: it expired on 2001-01-01"),
        ({"ca": "ca", "cert": "stranger_cert", "key": "stranger_key"}, "refused the client certificate"),
    ],
)
def test_mtls_refusals_are_one_line_at_preflight(
    certs: Certs, mtls_daemon: Daemon, short_tmp: Path, options: dict[str, str], message: str
) -> None:
    url = _url(mtls_daemon, **{k: getattr(certs, v) for k, v in options.items()})
    assert message in _refused(url, short_tmp)


@needs_fuse
def test_hostname_mismatch_and_plaintext_server_at_preflight(
    certs: Certs, filled: tuple[Path, Path, str], tvixfs_cmd: list[str], tmp_path: Path, short_tmp: Path
) -> None:
    extra = _tls_args(certs, certs.wrong_host_cert, certs.wrong_host_key, None)
    with running_daemon(tvixfs_cmd, tmp_path, f"local://{filled[0]}", ["127.0.0.1:0"], extra) as daemon:
        line = _refused(_url(daemon, ca=certs.ca), short_tmp)
        assert "hostname mismatch: the server's certificate is not valid for '127.0.0.1'" in line
    with running_daemon(tvixfs_cmd, tmp_path, f"local://{filled[0]}", ["127.0.0.1:0"]) as plain:
        assert "the server does not speak TLS" in _refused(_url(plain, ca=certs.ca), short_tmp)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tls-cert", "/x.crt"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "/ca.crt"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (
            ["--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key"],
            "cannot read TLS key /nonexistent.key",
        ),
    ],
)
def test_daemon_tls_flag_errors_are_one_line(tvixfs_cmd: list[str], extra: list[str], message: str) -> None:
    args = [*tvixfs_cmd, "daemon", "--store", "memory://", "--listen", "127.0.0.1:0", *extra]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert (
        done.stderr.splitlines() == [f"tvixfs: error: {message}"] or message in done.stderr.splitlines()[-1]
    )
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_https_urls_parse() -> None:
    url = StoreURL.parse("grpc+https://store.example:443?ca=/ca.pem&cert=/c.pem&key=/k.pem")
    assert (url.scheme, url.host, url.tls) == (
        "grpc+https",
        "store.example:443",
        ClientTLS("/ca.pem", "/c.pem", "/k.pem"),
    )
    assert StoreURL.parse("grpc+https://[::1]:8443").tls == ClientTLS()
    for bad, message in (
        ("grpc+https://store.example", "needs host:port"),
        ("grpc+https://h:1?cert=/c.pem", "needs both cert= and key="),
        ("grpc+https://h:1?ca=", "needs exactly one file"),
        ("grpc+https://h:1?ca=/a&ca=/b", "needs exactly one file"),
        ("grpc+https://h:1?verify=no", "unknown option 'verify'"),
        ("grpc+http://h:1?ca=/a", "need TLS: grpc+https://"),
    ):
        with pytest.raises(StoreURLError, match=message.replace("+", r"\+").replace("?", r"\?")):
            StoreURL.parse(bad)
