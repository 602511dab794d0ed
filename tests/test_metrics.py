"""``--metrics-listen`` and ``tvixfs status``: what a scraper and a person see of a real mount.

The mount tests scrape the endpoint of a real ``tvixfs mount`` while a walk and reads go
through it, and check that each counter moves as the requests that were made say it must:
bytes served equal bytes read, a re-read the kernel answers from its page cache reaches
nobody, one whose pages were dropped is served from the chunk cache without a store call.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpcserver import running_daemon
from mounting import TVIXFS, Mount, import_tree, mounted, needs_fuse
from prometheus_client.parser import text_string_to_metric_families

from tvixfs.services.backends.grpc import open_grpc_store
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.errors import NotFoundError, StoreUnavailableError
from tvixfs.services.meteredstore import metered
from tvixfs.services.metrics import Metrics

Samples = dict[str, float]


def _key(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


def values(metrics: Metrics) -> Samples:
    """Every sample ``metrics`` exports, by name and labels."""
    return {
        _key(sample.name, sample.labels): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
    }


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {
        _key(sample.name, sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metrics_url(stderr: str) -> str:
    found = re.search(r"metrics on (http://\S+)", stderr)
    assert found, stderr
    return found.group(1)


def requests(samples: Samples, op: str) -> float:
    return samples[f"tvixfs_fuse_request_seconds_count{{op={op}}}"]


# -- the store wrapper, in process ----------------------------------------------------------


def test_store_calls_are_counted_with_their_errors_and_bytes() -> None:
    metrics = Metrics()
    inner = open_memory_store()
    digest = inner.blobs.put([b"x" * 1000])
    store = metered(inner, metrics)
    assert b"".join(store.blobs.read(digest)) == b"x" * 1000
    assert store.blobs.stat(b"\0" * 32) is None
    with pytest.raises(NotFoundError):
        b"".join(store.blobs.read(b"\0" * 32))
    found = values(metrics)
    assert found["tvixfs_store_call_seconds_count{method=read,service=blob}"] == 2
    assert found["tvixfs_store_call_seconds_count{method=stat,service=blob}"] == 1
    assert found["tvixfs_store_call_errors_total{error=NotFoundError,method=read,service=blob}"] == 1
    assert found["tvixfs_store_fetched_bytes_total"] == 1000
    assert found["tvixfs_store_calls_in_flight"] == 0
    assert found["tvixfs_store_reachable"] == 1  # an absent blob is an answer


def test_an_unreachable_store_shows_and_an_answer_clears_it(short_tmp: Path) -> None:
    metrics = Metrics()
    store = metered(open_grpc_store(f"grpc+unix://{short_tmp}/nobody.sock"), metrics)
    answering = metered(open_memory_store(), metrics)
    try:
        with pytest.raises(StoreUnavailableError):
            store.pathinfos.get(b"\0" * 20)
        assert values(metrics)["tvixfs_store_reachable"] == 0
        assert (
            values(metrics)[
                "tvixfs_store_call_errors_total{error=StoreUnavailableError,method=get,service=pathinfo}"
            ]
            == 1
        )
        answering.pathinfos.get(b"\0" * 20)  # another service's answer says nothing of this one
        assert values(metrics)["tvixfs_store_reachable"] == 0
    finally:
        store.close()


def test_fuse_latency_buckets_are_cumulative() -> None:
    metrics = Metrics()
    row = metrics.fuse.row("lookup")
    for seconds in (0.00001, 0.0003, 0.0003, 7.0, 100.0):
        row.observe(seconds)
    row.failures += 1
    found = values(metrics)
    assert found["tvixfs_fuse_request_seconds_bucket{le=5e-05,op=lookup}"] == 1
    assert found["tvixfs_fuse_request_seconds_bucket{le=0.0005,op=lookup}"] == 3
    assert found["tvixfs_fuse_request_seconds_bucket{le=10.0,op=lookup}"] == 4
    assert found["tvixfs_fuse_request_seconds_bucket{le=+Inf,op=lookup}"] == 5
    assert found["tvixfs_fuse_request_seconds_count{op=lookup}"] == 5
    assert found["tvixfs_fuse_request_seconds_sum{op=lookup}"] == pytest.approx(107.0006)
    assert found["tvixfs_fuse_request_failures_total{op=lookup}"] == 1


# -- a real mount ---------------------------------------------------------------------------


@pytest.fixture
def sample_store(sample_tree: Path, short_tmp: Path) -> tuple[str, str]:
    store_dir = short_tmp / "store"
    return f"local://{store_dir}", import_tree(store_dir, sample_tree, "sample")


@pytest.fixture
def metered_mount(sample_store: tuple[str, str], short_tmp: Path) -> Iterator[tuple[Mount, str]]:
    url, _ = sample_store
    with mounted(TVIXFS, short_tmp, url, ["--metrics-listen", "127.0.0.1:0"]) as mount:
        yield mount, metrics_url(mount.stderr())


def _walk(root: Path) -> tuple[int, int]:
    """lstat every entry under ``root``; (directories, entries)."""
    directories = entries = 0
    for path, dirnames, filenames in os.walk(root):
        directories += 1
        for name in dirnames + filenames:
            os.lstat(os.path.join(path, name))
            entries += 1
    return directories, entries


def _drop_pages(path: Path) -> None:
    """Drop the kernel's cached pages of one file, so that the next read reaches the mount."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@needs_fuse
def test_counters_follow_a_walk_and_reads(
    metered_mount: tuple[Mount, str], sample_store: tuple[str, str], sample_tree: Path
) -> None:
    mount, url = metered_mount
    root = mount.path(sample_store[1])
    before = scrape(url)
    assert before["tvixfs_fuse_served_bytes_total"] == 0
    assert before["tvixfs_store_reachable"] == 1

    directories, entries = _walk(root)
    walked = scrape(url)
    assert requests(walked, "opendir") >= directories
    assert requests(walked, "readdir") >= directories  # at least one per directory
    assert requests(walked, "lookup") >= 1  # the store path; readdirplus hands out the rest
    assert 0 < walked["tvixfs_inodes"] <= entries + 1  # the kernel may have forgotten some
    assert walked["tvixfs_store_call_seconds_count{method=get,service=pathinfo}"] >= 1
    assert walked["tvixfs_fuse_served_bytes_total"] == 0  # a walk reads no file

    big = root / "large.bin"
    size = big.stat().st_size
    assert big.read_bytes() == (sample_tree / "large.bin").read_bytes()
    read = scrape(url)
    assert read["tvixfs_fuse_served_bytes_total"] == size
    assert read["tvixfs_store_fetched_bytes_total"] == size
    assert read["tvixfs_chunk_cache_misses_total"] >= 1
    assert requests(read, "read") >= 1

    # keep_cache: the kernel answers a second read from its page cache, asking nobody.
    assert big.read_bytes() == (sample_tree / "large.bin").read_bytes()
    again = scrape(url)
    assert again["tvixfs_fuse_served_bytes_total"] == size

    # Without those pages the mount serves the file again, from its chunk cache.
    _drop_pages(big)
    assert big.read_bytes() == (sample_tree / "large.bin").read_bytes()
    reread = scrape(url)
    assert reread["tvixfs_fuse_served_bytes_total"] == 2 * size
    assert reread["tvixfs_chunk_cache_hits_total"] > again["tvixfs_chunk_cache_hits_total"]
    assert reread["tvixfs_store_fetched_bytes_total"] == size
    assert reread["tvixfs_chunk_cache_misses_total"] == read["tvixfs_chunk_cache_misses_total"]
    assert reread["tvixfs_store_calls_in_flight"] == 0
    assert all(v == 0 for k, v in reread.items() if k.startswith("tvixfs_fuse_request_failures_total"))
    assert reread["tvixfs_process_resident_memory_bytes"] > 0


@needs_fuse
def test_status_prints_the_key_numbers(
    metered_mount: tuple[Mount, str], sample_store: tuple[str, str]
) -> None:
    mount, _ = metered_mount
    data = (mount.path(sample_store[1]) / "share" / "doc" / "README").read_bytes()
    printed = subprocess.run(
        [*TVIXFS, "status", str(mount.mountpoint)], capture_output=True, text=True, check=True
    ).stdout
    assert f"on {mount.mountpoint}, up " in printed
    assert re.search(r"^inodes: \d+$", printed, re.MULTILINE), printed  # the kernel may forget them
    assert re.search(r"^requests: .*\blookup [1-9]", printed, re.MULTILINE), printed
    assert re.search(r"^requests: .*\bread [1-9]", printed, re.MULTILINE), printed
    assert "store: reachable" in printed
    assert re.search(r"^metrics: http://127\.0\.0\.1:\d+/metrics$", printed, re.MULTILINE), printed
    assert re.search(r"^directory listings: (not )?cached by the kernel", printed, re.MULTILINE), printed
    assert "failed requests (EIO): 0" in printed
    # The same text, as an extended attribute of the mount root, for any tool.
    assert os.getxattr(mount.mountpoint, "user.tvixfs.status").decode().startswith("mount: ")
    assert "user.tvixfs.status" in os.listxattr(mount.mountpoint)
    assert len(data) == 800


@needs_fuse
def test_status_without_metrics_and_of_what_is_no_mount(
    sample_store: tuple[str, str], short_tmp: Path
) -> None:
    with mounted(TVIXFS, short_tmp, sample_store[0]) as mount:
        done = subprocess.run(
            [*TVIXFS, "status", str(mount.mountpoint)], check=False, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "inodes: " in done.stdout
        assert "request and store call counts: mount with --metrics-listen" in done.stdout
    done = subprocess.run([*TVIXFS, "status", str(short_tmp)], check=False, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == f"tvixfs: error: {short_tmp} is not a tvixfs mount point\n"


@needs_fuse
@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("unix:/tmp/metrics.sock", "--metrics-listen takes HOST:PORT or PORT, not a unix socket"),
        ("localhost", "listen address must be HOST:PORT"),
        ("127.0.0.1:99999", "bad listen address"),
    ],
)
def test_a_bad_metrics_address_is_one_line(
    address: str, message: str, sample_store: tuple[str, str], short_tmp: Path
) -> None:
    (short_tmp / "mnt").mkdir()
    done = subprocess.run(
        [*TVIXFS, "mount", "--store", sample_store[0], "--metrics-listen", address, str(short_tmp / "mnt")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert message in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_a_busy_metrics_port_is_one_line(short_tmp: Path) -> None:
    with running_daemon(TVIXFS, short_tmp, extra=["--metrics-listen", "127.0.0.1:0"]) as first:
        taken = metrics_url(first.stderr()).removeprefix("http://").removesuffix("/metrics")
        done = subprocess.run(
            [*TVIXFS, "daemon", "--store", "memory://", "--listen", "[::1]:0", "--metrics-listen", taken],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        assert f"--metrics-listen: cannot listen on {taken}" in done.stderr
        assert "Traceback" not in done.stderr


def test_the_daemon_counts_what_clients_ask(short_tmp: Path) -> None:
    with running_daemon(TVIXFS, short_tmp, extra=["--metrics-listen", "127.0.0.1:0"]) as daemon:
        url = metrics_url(daemon.stderr())
        client = open_grpc_store(daemon.tcp)
        try:
            digest = client.blobs.put([b"y" * 5000])
            assert b"".join(client.blobs.read(digest)) == b"y" * 5000
            assert client.pathinfos.get(b"\1" * 20) is None
        finally:
            client.close()
        samples = scrape(url)
        assert samples["tvixfs_store_call_seconds_count{method=put,service=blob}"] == 1
        assert samples["tvixfs_store_call_seconds_count{method=get,service=pathinfo}"] == 1
        assert samples["tvixfs_store_fetched_bytes_total"] >= 5000
        assert samples["tvixfs_store_reachable"] == 1
        assert "tvixfs_fuse_served_bytes_total" not in samples  # no mount in a daemon


def test_the_nar_bridge_counts_its_store_calls(short_tmp: Path) -> None:
    stderr = short_tmp / "bridge.stderr"
    args = [*TVIXFS, "nar-bridge", "--store", "memory://", "--listen", "127.0.0.1:0"]
    with stderr.open("wb") as err:
        bridge = subprocess.Popen([*args, "--metrics-listen", "127.0.0.1:0"], stderr=err)
    try:
        for _ in range(300):
            found = re.search(r"serving on (\S+)", stderr.read_text())
            if found or bridge.poll() is not None:
                break
            time.sleep(0.1)
        assert found, stderr.read_text()
        missing = f"http://{found.group(1)}/{'0' * 32}.narinfo"
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(missing, timeout=30)
        assert answer.value.code == 404
        samples = scrape(metrics_url(stderr.read_text()))
        assert samples["tvixfs_store_call_seconds_count{method=get,service=pathinfo}"] >= 1
        assert samples["tvixfs_store_reachable"] == 1
    finally:
        bridge.terminate()
        bridge.wait(30)
