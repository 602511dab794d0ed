"""``s3://`` against ``local://``: import, and a program's first run from a mount.

    .venv/bin/python bench/s3_store.py [--reps 1]

Starts a moto S3 server on 127.0.0.1 (tests/s3server.py; its request log counts the
requests), then, per repetition and store: ``tvixfs import`` of the Python tree bench/run.py
uses (into a fresh bucket / a fresh directory) and the first run of ``python3 -I -c 'import
json, email, http.client'`` from a fresh ``tvixfs mount`` of it (page cache dropped). Prints the
median times and the S3 requests per store path imported and per first run, by method. moto is
a Python server sharing the machine's two cores: it, not a network, bounds the s3:// times.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from context import WORK, import_tree  # noqa: E402
from figures import PROGRAM, _python_env  # noqa: E402
from measure import drop_caches, run_quiet, timed  # noqa: E402
from procs import tvixfs_mount  # noqa: E402
from s3server import start_moto  # noqa: E402
from trees import count_entries, python_tree  # noqa: E402

# A request line in werkzeug's log; those answered 4xx are coloured (an ANSI escape first).
REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)?(GET|HEAD|PUT|POST|DELETE) /')


class RequestLog:
    """Requests moto logged since the last ``take``, by method."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.at = 0

    def take(self) -> dict[str, int]:
        with self.path.open("rb") as f:
            f.seek(self.at)
            new = f.read()
            self.at += len(new)
        counts: dict[str, int] = {}
        for method in REQUEST.findall(new.decode(errors="replace")):
            counts[method] = counts.get(method, 0) + 1
        return counts


def one_rep(
    url: str, tree: Path, tmp: Path, log: RequestLog
) -> tuple[float, float, dict[str, int], dict[str, int]]:
    """(import seconds, first-run seconds, S3 requests of the import, of the first run)."""
    log.take()
    names: list[str] = []
    import_time = timed(lambda: names.append(import_tree(url, tree, "python")))
    imported = log.take()
    with tvixfs_mount(url, tmp / "mnt", tmp / "mount.log"):
        root = tmp / "mnt" / names[0]
        drop_caches()
        log.take()
        argv = [root / "bin" / "python3", "-I", "-c", PROGRAM]
        run_time = timed(lambda: run_quiet(argv, env=_python_env(root)))
        ran = log.take()
    return import_time, run_time, imported, ran


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    tree = python_tree(WORK / "trees")
    entries = count_entries(tree)
    work = Path(tempfile.mkdtemp(prefix="tvxb", dir="/tmp"))
    log = RequestLog(work / "moto.log")
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ[name] = value  # moto takes any; set, so that no client looks for others
    moto = start_moto(log=log.path)
    times: dict[str, dict[str, list[float]]] = {s: {"import": [], "first run": []} for s in ("local", "s3")}
    requests: dict[str, dict[str, int]] = {}
    try:
        for _ in range(args.reps):
            for kind in ("local", "s3"):
                tmp = Path(tempfile.mkdtemp(prefix="tvxb", dir="/tmp"))
                try:
                    url = (
                        moto.url(moto.new_bucket("bench"), "store")
                        if kind == "s3"
                        else f"local://{tmp / 'store'}"
                    )
                    imported, ran, import_requests, run_requests = one_rep(url, tree, tmp, log)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                times[kind]["import"].append(imported)
                times[kind]["first run"].append(ran)
                if kind == "s3":
                    requests = {"import": import_requests, "first run": run_requests}
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"Python tree: {entries} entries, one store path; median of {args.reps}")
    print(f"{'':10} {'local://':>10} {'s3:// (moto)':>13} {'ratio':>6}")
    for what in ("import", "first run"):
        local, s3 = (statistics.median(times[k][what]) for k in ("local", "s3"))
        print(f"{what:10} {local:9.2f}s {s3:12.2f}s {s3 / local:6.1f}")
    for what, counted in requests.items():
        by_method = ", ".join(f"{m} {n}" for m, n in sorted(counted.items()))
        print(f"S3 requests per {what}: {sum(counted.values())} ({by_method})")


if __name__ == "__main__":
    main()
