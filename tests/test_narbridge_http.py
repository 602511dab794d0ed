"""nar-bridge over plain HTTP: the two-step upload (across a restart), Range, and hostile input.

Every refusal is checked the way a user would: the status code, then ``tvixfs ls`` (no path
appeared) and ``tvixfs fsck`` (the store is consistent).
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import http.client
import lzma
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from bridgeserver import b32, request, running_bridge
from grpcserver import Daemon


def _s(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def nar_file(data: bytes) -> bytes:
    return b"".join(_s(t) for t in (b"(", b"type", b"regular", b"contents", data, b")"))


def nar_dir(entries: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A directory node; entries in the order given (a valid NAR sorts them)."""
    out = [_s(b"("), _s(b"type"), _s(b"directory")]
    for name, node in entries:
        out += [_s(b"entry"), _s(b"("), _s(b"name"), _s(name), _s(b"node"), node, _s(b")")]
    return b"".join([*out, _s(b")")])


def nar(node: bytes) -> bytes:
    return _s(b"nix-archive-1") + node


def store_path(name: str) -> str:
    return f"/nix/store/{b32(hashlib.sha256(name.encode()).digest()[:20])}-{name}"


COMPRESS = {
    "none": ("", lambda b: b),
    "xz": (".xz", lzma.compress),
    "zstd": (".zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    "bzip2": (".bz2", bz2.compress),
}


@dataclass
class Upload:
    path: str
    nar: bytes
    file: bytes
    url: str
    compression: str
    references: tuple[str, ...] = ()

    def narinfo(self, **override: str) -> bytes:
        fields = {
            "StorePath": self.path,
            "URL": self.url,
            "Compression": self.compression,
            "FileHash": "sha256:" + b32(hashlib.sha256(self.file).digest()),
            "FileSize": str(len(self.file)),
            "NarHash": "sha256:" + b32(hashlib.sha256(self.nar).digest()),
            "NarSize": str(len(self.nar)),
            "References": " ".join(r.removeprefix("/nix/store/") for r in self.references),
        }
        fields.update(override)
        return "".join(f"{k}: {v}\n" for k, v in fields.items() if v != "<drop>").encode()

    @property
    def hash_part(self) -> str:
        return self.path.removeprefix("/nix/store/")[:32]


def upload(name: str, nar_bytes: bytes, compression: str = "xz", references: tuple[str, ...] = ()) -> Upload:
    ext, compress = COMPRESS[compression]
    file = compress(nar_bytes)
    url = f"nar/{b32(hashlib.sha256(file).digest())}.nar{ext}"
    return Upload(store_path(name), nar_bytes, file, url, compression, references)


def put_nar(bridge: Daemon, up: Upload) -> int:
    return request(bridge, "PUT", "/" + up.url, up.file, {"Content-Type": "application/x-nix-nar"})[0]


def put_narinfo(bridge: Daemon, up: Upload, text: bytes | None = None) -> tuple[int, bytes]:
    status, _, body = request(
        bridge, "PUT", f"/{up.hash_part}.narinfo", up.narinfo() if text is None else text,
        {"Content-Type": "text/x-nix-narinfo"},
    )  # fmt: skip
    return status, body


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"local://{tmp_path / 'store'}"


@pytest.fixture
def bridge(tvixfs_cmd: list[str], tmp_path: Path, store: str) -> Iterator[Daemon]:
    with running_bridge(tvixfs_cmd, tmp_path, store, ["--allow-upload", "--max-nar-size", str(1 << 20)]) as b:
        yield b


def ls(tvixfs_cmd: list[str], store: str) -> list[str]:
    out = subprocess.run([*tvixfs_cmd, "ls", "--store", store], check=True, capture_output=True, text=True)
    return out.stdout.split()


def fsck_clean(tvixfs_cmd: list[str], store: str) -> None:
    run = subprocess.run([*tvixfs_cmd, "fsck", "--store", store], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 problems" in run.stdout + run.stderr


@pytest.mark.parametrize("compression", ["none", "xz", "zstd", "bzip2"])
def test_upload_then_serve(tvixfs_cmd: list[str], bridge: Daemon, store: str, compression: str) -> None:
    tree = nar(nar_dir([(b"a", nar_file(b"hello\n")), (b"b", nar_file(b"x" * 5000))]))
    up = upload("tree", tree, compression)
    assert request(bridge, "HEAD", "/" + up.url)[0] == 404
    assert put_nar(bridge, up) == 201
    assert request(bridge, "HEAD", "/" + up.url)[0] == 200
    assert put_narinfo(bridge, up)[0] == 201
    assert ls(tvixfs_cmd, store) == [up.path]
    status, headers, text = request(bridge, "GET", f"/{up.hash_part}.narinfo")
    assert status == 200
    assert headers["Content-Type"] == "text/x-nix-narinfo"
    served = dict(line.split(": ", 1) for line in text.decode().splitlines())
    assert served["Compression"] == "none"
    assert served["NarHash"] == "sha256:" + b32(hashlib.sha256(tree).digest())
    status, headers, body = request(bridge, "GET", "/" + served["URL"])
    assert (status, body) == (200, tree)
    assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert int(headers["Content-Length"]) == len(tree)
    status, headers, body = request(bridge, "GET", "/" + served["URL"], headers={"Range": "bytes=100-199"})
    assert (status, body) == (206, tree[100:200])
    assert headers["Content-Range"] == f"bytes 100-199/{len(tree)}"
    assert request(bridge, "GET", "/" + served["URL"], headers={"Range": "bytes=-16"})[2] == tree[-16:]
    assert request(bridge, "GET", "/" + served["URL"], headers={"Range": f"bytes={len(tree)}-"})[0] == 416
    assert request(bridge, "HEAD", f"/{up.hash_part}.narinfo")[0] == 200
    # The same path again is accepted (idempotent); nothing changes.
    assert put_narinfo(bridge, up)[0] == 201
    fsck_clean(tvixfs_cmd, store)


def test_restart_between_nar_and_narinfo(tvixfs_cmd: list[str], tmp_path: Path, store: str) -> None:
    up = upload("across-restart", nar(nar_file(b"survives a restart\n")))
    with running_bridge(tvixfs_cmd, tmp_path, store, ["--allow-upload"]) as first:
        assert put_nar(first, up) == 201
    with running_bridge(tvixfs_cmd, tmp_path, store, ["--allow-upload"]) as second:
        assert put_narinfo(second, up)[0] == 201
        served = request(second, "GET", f"/{up.hash_part}.narinfo")[2].decode()
        nar_url = next(v for k, _, v in (line.partition(": ") for line in served.splitlines()) if k == "URL")
        assert request(second, "GET", "/" + nar_url)[2] == up.nar
    assert ls(tvixfs_cmd, store) == [up.path]


def test_read_only_by_default(tvixfs_cmd: list[str], tmp_path: Path, store: str) -> None:
    up = upload("read-only", nar(nar_file(b"no\n")))
    with running_bridge(tvixfs_cmd, tmp_path, store) as bridge:
        assert put_nar(bridge, up) == 403
        assert request(bridge, "GET", "/nix-cache-info")[2].decode().splitlines() == [
            "StoreDir: /nix/store",
            "WantMassQuery: 1",
            "Priority: 40",
        ]
    assert ls(tvixfs_cmd, store) == []


BAD_NARS = {
    "dotdot": nar(nar_dir([(b"..", nar_file(b"x"))])),
    "slash": nar(nar_dir([(b"a/b", nar_file(b"x"))])),
    "nul": nar(nar_dir([(b"a\0b", nar_file(b"x"))])),
    "duplicate": nar(nar_dir([(b"a", nar_file(b"x")), (b"a", nar_file(b"y"))])),
    "unsorted": nar(nar_dir([(b"b", nar_file(b"x")), (b"a", nar_file(b"y"))])),
    "truncated": nar(nar_file(b"truncated contents"))[:-20],
    "trailing": nar(nar_file(b"x")) + b"\0" * 8,
    "not a nar": b"this is not a NAR at all",
}


@pytest.mark.parametrize("kind", sorted(BAD_NARS))
def test_bad_nar_refused(tvixfs_cmd: list[str], bridge: Daemon, store: str, kind: str) -> None:
    up = upload(f"bad-{kind.replace(' ', '-')}", BAD_NARS[kind])
    assert put_nar(bridge, up) == 400
    assert request(bridge, "HEAD", "/" + up.url)[0] == 404
    assert put_narinfo(bridge, up)[0] == 400
    assert ls(tvixfs_cmd, store) == []
    fsck_clean(tvixfs_cmd, store)


def test_file_hash_differs_from_name(tvixfs_cmd: list[str], bridge: Daemon, store: str) -> None:
    up = upload("misnamed", nar(nar_file(b"real\n")))
    other = upload("other", nar(nar_file(b"other\n")))
    status, _, body = request(bridge, "PUT", "/" + other.url, up.file)
    assert status == 400
    assert b"its name says" in body
    assert ls(tvixfs_cmd, store) == []


def test_oversized_and_bomb(tvixfs_cmd: list[str], bridge: Daemon, store: str) -> None:
    big = upload("big", nar(nar_file(bytes(range(256)) * 8192)), "none")  # 2 MiB > the 1 MiB limit
    assert put_nar(bridge, big) == 413
    bomb = upload("bomb", nar(nar_file(b"\0" * (64 << 20))), "xz")  # 64 MiB of zeros in ~10 KiB
    assert len(bomb.file) < 1 << 20
    status, _, body = request(bridge, "PUT", "/" + bomb.url, bomb.file)
    assert status == 413, body
    assert ls(tvixfs_cmd, store) == []
    fsck_clean(tvixfs_cmd, store)


def test_truncated_body(bridge: Daemon, store: str, tvixfs_cmd: list[str]) -> None:
    up = upload("short", nar(nar_file(b"y" * 4096)), "none")
    host, _, port = bridge.addresses[0].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"PUT /{up.url} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(up.file)}\r\n\r\n"
        sock.sendall(head.encode() + up.file[:1000])
        sock.shutdown(socket.SHUT_WR)
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert put_narinfo(bridge, up)[0] == 400
    assert ls(tvixfs_cmd, store) == []


def _bad_narinfos(up: Upload, other: Upload) -> dict[str, bytes]:
    missing = store_path("never-uploaded")
    return {
        "store path differs from URL": up.narinfo(StorePath=store_path("somewhere-else")),
        "no NarHash": up.narinfo(NarHash="<drop>"),
        "no StorePath": up.narinfo(StorePath="<drop>"),
        "bad NarSize": up.narinfo(NarSize="12x"),
        "bad hash": up.narinfo(NarHash="sha256:zzzz"),
        "garbage line": up.narinfo() + b"no colon here\n",
        "not utf-8": up.narinfo() + b"Deriver: \xff\n",
        "NarHash differs": up.narinfo(NarHash=other.narinfo().decode().split("NarHash: ")[1].split("\n")[0]),
        "NarSize differs": up.narinfo(NarSize=str(len(up.nar) + 8)),
        "FileHash differs": up.narinfo(FileHash="sha256:" + b32(hashlib.sha256(b"x").digest())),
        "compression differs": up.narinfo(Compression="bzip2"),
        "URL elsewhere": up.narinfo(URL="https://example.invalid/x.nar"),
        "missing reference": up.narinfo(References=missing.removeprefix("/nix/store/")),
        "bad reference": up.narinfo(References="not-a-store-path"),
        "bad signature": up.narinfo() + b"Sig: key:bm90IGEgc2lnbmF0dXJl\n",
    }


@pytest.mark.parametrize(
    "kind",
    sorted(_bad_narinfos(upload("a", nar(nar_file(b"a"))), upload("b", nar(nar_file(b"b")))).keys()),
)
def test_bad_narinfo_refused(tvixfs_cmd: list[str], bridge: Daemon, store: str, kind: str) -> None:
    up = upload("good-nar", nar(nar_file(b"good contents\n")))
    other = upload("other-nar", nar(nar_file(b"other contents\n")))
    assert put_nar(bridge, up) == 201
    status, body = put_narinfo(bridge, up, _bad_narinfos(up, other)[kind])
    assert status == 400, body
    assert ls(tvixfs_cmd, store) == []
    fsck_clean(tvixfs_cmd, store)


def test_unsigned_upload_forbidden(tvixfs_cmd: list[str], tmp_path: Path, store: str) -> None:
    subprocess.run(
        ["nix-store", "--generate-binary-cache-key", "trusted-1", tmp_path / "sk", tmp_path / "pk"],
        check=True,
    )
    key = (tmp_path / "pk").read_text().strip()
    up = upload("unsigned", nar(nar_file(b"unsigned\n")))
    with running_bridge(
        tvixfs_cmd, tmp_path, store, ["--allow-upload", "--trusted-public-key", key]
    ) as bridge:
        assert put_nar(bridge, up) == 201
        assert put_narinfo(bridge, up)[0] == 403
        forged = up.narinfo() + b"Sig: trusted-1:" + base64.b64encode(b"\1" * 64) + b"\n"
        assert put_narinfo(bridge, up, forged)[0] == 403
    assert ls(tvixfs_cmd, store) == []


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(self._path))


def test_unix_socket(tvixfs_cmd: list[str], short_tmp: Path, store: str) -> None:
    sock = short_tmp / "bridge.sock"
    with running_bridge(tvixfs_cmd, short_tmp, store, ["--listen", f"unix:{sock}"]) as bridge:
        assert bridge.addresses == [f"unix:{sock}"]
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        conn = _UnixHTTPConnection(sock)
        try:
            for _ in range(2):  # one keep-alive connection, two requests
                conn.request("GET", "/nix-cache-info")
                resp = conn.getresponse()
                assert (resp.status, resp.read().splitlines()[0]) == (200, b"StoreDir: /nix/store")
        finally:
            conn.close()


def test_connections_bounded_and_stop_when_full(tvixfs_cmd: list[str], tmp_path: Path, store: str) -> None:
    """With every slot held by an idle client a new one waits; SIGTERM still stops at once."""
    with running_bridge(tvixfs_cmd, tmp_path, store, ["--max-connections", "1"]) as bridge:
        host, _, port = bridge.addresses[0].rpartition(":")
        with socket.create_connection((host, int(port)), timeout=30) as idle:
            idle.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(4096).startswith(b"HTTP/1.1 200")  # kept alive, holding the slot
            with socket.create_connection((host, int(port)), timeout=2) as waiting:
                waiting.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
                with pytest.raises(TimeoutError):
                    waiting.recv(4096)
                start = time.monotonic()
                assert bridge.stop() == 0
                assert time.monotonic() - start < 5
