"""Certificates for TLS tests, made by ``openssl`` itself: a CA, a server certificate for
localhost and 127.0.0.1, client certificates (valid, expired, from another CA), and a server
certificate for another host name."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_CA_CONFIG = """
[ca]
default_ca = ca_default
[ca_default]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = any
copy_extensions = copy
unique_subject = no
[any]
commonName = supplied
"""


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA the server and the good client certificates come from
    other_ca: Path  # an unrelated CA
    server_cert: Path
    server_key: Path
    wrong_host_cert: Path  # signed by `ca`, for example.invalid only
    wrong_host_key: Path
    client_cert: Path
    client_key: Path
    expired_cert: Path  # signed by `ca`, expired in 2001
    expired_key: Path
    stranger_cert: Path  # signed by `other_ca`
    stranger_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _ca(base: Path, name: str) -> tuple[Path, Path]:
    cert, key = base / f"{name}.crt", base / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "30", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
    )  # fmt: skip
    return cert, key


def _issue(
    base: Path,
    name: str,
    ca: tuple[Path, Path],
    san: str,
    usage: str,
    *,
    dates: tuple[str, str] | None = None,
) -> tuple[Path, Path]:
    """A certificate signed by ``ca``, via ``openssl ca`` (which can back-date one)."""
    cert, key, csr = base / f"{name}.crt", base / f"{name}.key", base / f"{name}.csr"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
        "-addext", f"subjectAltName={san}", "-addext", f"extendedKeyUsage={usage}",
    )  # fmt: skip
    db = base / f"{name}.db"
    db.mkdir()
    (db / "index.txt").write_text("")
    (db / "serial").write_text("01\n")
    config = db / "ca.cnf"
    config.write_text(_CA_CONFIG.format(dir=db))
    when = ["-startdate", dates[0], "-enddate", dates[1]] if dates else ["-days", "30"]
    _openssl(
        "ca", "-batch", "-config", config, "-cert", ca[0], "-keyfile", ca[1], "-in", csr, "-out", cert,
        "-notext", *when,
    )  # fmt: skip
    return cert, key


def make_certs(base: Path) -> Certs:
    base.mkdir(parents=True, exist_ok=True)
    ca = _ca(base, "test-ca")
    other = _ca(base, "other-ca")
    server = _issue(base, "server", ca, "DNS:localhost,IP:127.0.0.1,IP:::1", "serverAuth")
    wrong = _issue(base, "wrong-host", ca, "DNS:example.invalid", "serverAuth")
    client = _issue(base, "client", ca, "DNS:client", "clientAuth")
    expired = _issue(
        base, "expired", ca, "DNS:client", "clientAuth", dates=("20000101000000Z", "20010101000000Z")
    )
    stranger = _issue(base, "stranger", other, "DNS:client", "clientAuth")
    return Certs(ca[0], other[0], *server, *wrong, *client, *expired, *stranger)
