"""Every fault of the fault store, through a real mount: what the user sees, and how fast.

    .venv/bin/python bench/faults.py                     # default deadlines, then 5 s ones
    .venv/bin/python bench/faults.py --timeout default   # only the defaults
    .venv/bin/python bench/faults.py --timeout 5 --only hang

Runs as root (it mounts). One fault store (``tests/faultstore.py``, its own process, on a unix
socket) serves a store path per case plus a spare one and a control one; one ``tvixfs mount``
of it serves them all. For each case, in order: the paths the operation needs are looked up
while the store is honest, the fault is switched on, the operation runs in a thread, and while
it is in flight the rest of the mount is checked (a cached listing and a readlink answered by
the daemon, and, when the fault leaves those methods alone, a lookup and listing of a store
path nobody touched yet, which needs the store). Then the fault is cleared and the same
operation must succeed, with the right bytes, on the same mount. Every file's content is unique
(the daemon shares inodes and caches by digest), so no case is answered from an earlier one.

Writes ``bench/FAULTS.md`` (one table per deadline setting) and prints the same.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from faultstore import Fault, RemoteFaults, spawn_faultstore  # noqa: E402
from mounting import TVIXFS, Mount, mounted  # noqa: E402
from uniquetrees import CHUNK, dump_nar, read_bounded, unique_tree  # noqa: E402

from tvixfs.fs.chunkcache import UNAVAILABLE_MEMORY  # noqa: E402

OUT = Path(__file__).resolve().parent / "FAULTS.md"
# A hung operation that has not ended after this long is reported as hanging.
HANG_LIMIT = 300.0
# How long a path answered "absent" may stay absent after clear() (negative entries expire).
VISIBLE_WITHIN = 10.0


@dataclass(frozen=True)
class Case:
    fault: Fault
    op: str  # lookup | listdir | read:<relative file>
    label: str = ""
    # "none": nothing looked up before the fault; "root": the store path; "file": and the file
    prep: str = "root"

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        f = self.fault
        scope = f" {','.join(f.methods)}" if f.methods else ""
        return f"{f.kind}{scope}" + (f" after={f.after}" if f.after else "")


READ_SMALL = "read:doc/small.txt"
READ_LARGE = "read:large.bin"
CASES = [
    Case(Fault("blackhole"), "lookup", prep="none"),
    Case(Fault("refuse"), "lookup", prep="none"),
    Case(Fault("hang", methods=("pathinfo.get",)), "lookup", prep="none"),
    Case(Fault("hang", methods=("directory.get",)), "listdir"),
    Case(Fault("hang", methods=("blob.read",)), READ_SMALL, prep="file"),
    Case(Fault("hang", methods=("blob.stat",)), READ_LARGE, prep="file"),
    Case(Fault("hang", methods=("blob.read",), after=100_000), READ_LARGE, prep="file"),
    Case(Fault("slow", methods=("blob.read",), delay=0.01, piece=16384), READ_LARGE, prep="file"),
    Case(Fault("reset", methods=("blob.read",), after=100), READ_LARGE, prep="file"),
    Case(Fault("error", methods=("directory.get",)), "listdir", label="error INTERNAL directory.get"),
    Case(Fault("corrupt", methods=("blob.read",), after=5), READ_SMALL, prep="file"),
    Case(Fault("corrupt", methods=("blob.read",), after=5), READ_LARGE, prep="file"),
    Case(Fault("truncate", methods=("blob.read",), after=5), READ_SMALL, prep="file"),
    Case(Fault("extra_bytes", methods=("blob.read",)), READ_LARGE, prep="file"),
    Case(Fault("chunk_sizes"), READ_LARGE, prep="file"),
    Case(Fault("chunk_digests"), READ_LARGE, prep="file"),
    Case(Fault("chunk_swap"), READ_LARGE, prep="file"),
    Case(
        Fault("absurd_size", methods=("blob.stat",)), READ_LARGE, prep="file", label="absurd_size blob.stat"
    ),
    Case(Fault("absurd_size", methods=("directory.get",)), "listdir", label="absurd_size directory.get"),
    Case(
        Fault("absurd_size", methods=("pathinfo.get",)), "lookup", prep="none", label="absurd_size pathinfo"
    ),
    Case(Fault("wrong_directory"), "listdir"),
    Case(Fault("dir_unreferenced"), "listdir"),
    Case(Fault("dir_order"), "listdir"),
    Case(Fault("dir_duplicate", after=1), "listdir"),
    Case(Fault("bad_name"), "listdir", label="bad_name '..'"),
    Case(Fault("bad_name", name=b"a/b"), "listdir", label="bad_name 'a/b'"),
    Case(Fault("duplicate_name"), "listdir"),
    Case(Fault("unsorted"), "listdir"),
    Case(Fault("truncate", methods=("directory.get",), after=1), "listdir", label="truncate directory.get"),
    Case(Fault("pathinfo_name"), "lookup", prep="none"),
    Case(Fault("pathinfo_hash"), "lookup", prep="none"),
    Case(Fault("pathinfo_no_node"), "lookup", prep="none"),
]


@dataclass
class Row:
    case: str
    op: str
    result: str = ""
    seconds: float = 0.0
    rest: str = ""
    recovered: str = ""
    log: str = ""
    notes: list[str] = field(default_factory=list)


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def run_op(op: str, mounted_path: Path, source: Path) -> str:
    """Run the operation; "ok", "WRONG ..." for an answer that differs from the source."""
    if op == "lookup":
        return "ok" if stat.S_ISDIR(os.stat(mounted_path).st_mode) else "WRONG: not a directory"
    if op == "listdir":
        names = sorted(os.listdir(mounted_path))
        return "ok" if names == sorted(os.listdir(source)) else f"WRONG LISTING {names}"
    relative = op.removeprefix("read:")
    want = (source / relative).read_bytes()
    got = read_bounded(mounted_path / relative, len(want) + 1)
    if got == want:
        return "ok"
    return "WRONG BYTES" + (" (same length)" if len(got) == len(want) else f" ({len(got)} of {len(want)})")


def outcome(fn: Callable[[], str]) -> tuple[str, float]:
    start = time.monotonic()
    try:
        result = fn()
    except OSError as e:
        result = _errname(e)
    return result, time.monotonic() - start


def _shorten(line: str, basename: str) -> str:
    line = line.split(" ERROR ", 1)[-1].replace(basename, "<path>")
    line = re.sub(r"\b([0-9a-f]{8})[0-9a-f]{56}\b", r"\1…", line)
    return line if len(line) <= 200 else line[:197] + "…"


class Bench:
    def __init__(self, store: RemoteFaults, mount: Mount, sources: dict[str, Path]) -> None:
        self.store = store
        self.mount = mount
        self.sources = sources  # basename -> source tree

    def path(self, basename: str) -> Path:
        return self.mount.path(basename)

    def prepare(self, case: Case, basename: str) -> None:
        if case.prep == "none":
            return
        os.stat(self.path(basename))
        if case.prep == "file":
            os.stat(self.path(basename) / case.op.removeprefix("read:"))

    def rest_of_mount(self, case: Case, control: str, spare: str) -> str:
        """The daemon keeps answering while the fault holds the operation."""
        checks: list[tuple[str, Callable[[], str]]] = [
            ("cached listing", lambda: run_op("listdir", self.path(control), self.sources[control])),
            (
                "readlink",
                lambda: "ok" if os.readlink(self.path(control) / "link") == "doc/small.txt" else "WRONG",
            ),
        ]
        store_wide = case.fault.kind in ("blackhole", "refuse") or not case.fault.methods
        if not store_wide and not {"pathinfo.get", "directory.get"} & set(case.fault.methods):
            checks.append(("fresh path", lambda: run_op("listdir", self.path(spare), self.sources[spare])))
        parts = []
        failed = False
        for what, check in checks:
            result, seconds = outcome(check)
            failed = failed or result != "ok"
            parts.append(f"{what} {seconds:.2f}s" + ("" if result == "ok" else f" {result}"))
        return ("NO: " if failed else "yes: ") + ", ".join(parts)

    def run(self, case: Case, basename: str, control: str, spare: str) -> Row:
        row = Row(case.name, case.op.replace("read:", "read "))
        source = self.sources[basename]
        self.prepare(case, basename)
        fired_before = sum(self.store.stats()["fired"].values())
        log_start = len(self.mount.stderr())
        self.store.set(case.fault)
        box: list[tuple[str, float]] = []
        worker = threading.Thread(
            target=lambda: box.append(outcome(lambda: run_op(case.op, self.path(basename), source)))
        )
        worker.start()
        deadline = time.monotonic() + 2.0
        while worker.is_alive() and time.monotonic() < deadline:
            if sum(self.store.stats()["fired"].values()) > fired_before:
                break
            time.sleep(0.02)
        row.rest = self.rest_of_mount(case, control, spare)
        worker.join(HANG_LIMIT)
        if worker.is_alive():
            row.result, row.seconds = "HANGS", HANG_LIMIT
        else:
            row.result, row.seconds = box[0]
        self.store.clear()
        if worker.is_alive():
            worker.join(60)
        row.recovered = self.recovery(case, basename, source)
        errors = [line for line in self.mount.stderr()[log_start:].splitlines() if " ERROR " in line]
        named = [line for line in errors if basename in line]
        if named:
            row.log = _shorten(named[0], basename) + (
                f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            )
        elif errors:
            row.log = "NOT NAMING THE PATH: " + _shorten(errors[0], basename)
        else:
            row.log = "(no ERROR line)"
        return row

    def recovery(self, case: Case, basename: str, source: Path) -> str:
        start = time.monotonic()
        state = ""  # how it failed before it recovered, if it did not at once
        while True:
            result, seconds = outcome(lambda: run_op(case.op, self.path(basename), source))
            waited = time.monotonic() - start
            if result == "ok":
                took = f" ({seconds:.1f}s)" if seconds >= 0.5 else ""
                return f"yes, after {waited:.1f}s {state}" if state else f"yes{took}"
            if result == "ENOENT" and waited <= VISIBLE_WITHIN:
                state = "absent"  # a negative entry of the store path, until it expires
            elif result == "EIO" and waited <= UNAVAILABLE_MEMORY + 1:
                state = "failing"  # a chunk the store hung on fails at once for a moment
            else:
                return f"NO: {result}"
            time.sleep(0.1)


def run_all(cases: list[Case], timeout: str, work: Path) -> list[Row]:
    trees: list[tuple[Path, str]] = []
    for i in range(len(cases)):
        trees.append((unique_tree(work / f"c{i}", 1000 + i), f"case{i}"))
        trees.append((unique_tree(work / f"s{i}", 2000 + i), f"spare{i}"))
    trees.append((unique_tree(work / "control", 7), "control"))
    nars = [(dump_nar(tree), name) for tree, name in trees]
    env = (
        {}
        if timeout == "default"
        else {"TVIXFS_GRPC_TIMEOUT": timeout, "TVIXFS_GRPC_STREAM_TIMEOUT": timeout}
    )
    rows = []
    with (
        spawn_faultstore(work, nars, chunk_size=CHUNK) as store,
        mounted(TVIXFS, work, store.url, env=env) as mount,
    ):
        sources = {basename: tree for basename, (tree, _) in zip(store.paths, trees, strict=True)}
        control = store.paths[-1]
        if (ready := outcome(lambda: run_op("listdir", mount.path(control), sources[control]))[0]) != "ok":
            sys.exit(f"the mount does not work even without faults ({ready}):\n{mount.stderr()}")
        bench = Bench(store, mount, sources)
        for i, case in enumerate(cases):
            row = bench.run(case, store.paths[2 * i], control, store.paths[2 * i + 1])
            print(
                f"  {row.case:34} {row.op:18} {row.result:8} {row.seconds:7.2f}s  rest {row.rest}; "
                f"recovered {row.recovered}; log: {row.log}",
                flush=True,
            )
            rows.append(row)
        alive = mount.process.proc.poll() is None
        if not alive:
            rows.append(Row("(mount daemon)", "", "DIED", 0, "", "", mount.stderr()[-300:]))
    return rows


COLUMNS = [
    "fault",
    "operation",
    "result",
    "time to error",
    "rest of the mount during the fault",
    "recovered after clear",
    "daemon log (first ERROR line)",
]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        cells = [r.case, r.op, r.result, f"{r.seconds:.2f} s", r.rest, r.recovered, r.log.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PREAMBLE = """# Faults through a real mount

Written by `.venv/bin/python bench/faults.py` (see its docstring for the method). One
`tvixfs mount` of a fault store (`tests/faultstore.py`, its own process, unix socket); each
row switches one fault on, runs one operation through the kernel, checks that the daemon keeps
answering meanwhile, clears the fault and repeats the operation on the same mount.

- *result*: what the operation got: `ok` (right bytes), an errno, or `WRONG …` (wrong bytes or
  names reached the user). *time to error*: how long the operation took, including the
  kernel's own retries.
- *rest of the mount*: run while the faulted operation was in flight: a cached listing and a
  readlink (answered by the daemon, no store call), and for faults scoped to blob methods a
  lookup and listing of a store path nobody had touched (needs the store).
- *recovered after clear*: the same operation once the store is honest again, same mount;
  its time if it took 0.5 s or more (reconnecting after `refuse` takes up to ~1.5 s), or
  "after N s absent": how long the store path stayed absent (its negative entry expiring), or
  "after N s failing": how long a chunk the store had hung on kept failing (chunkcache.py).

What bounds the time of an operation against a store that says nothing:
- a unary call (PathInfo Get for a lookup, blob Stat): the gRPC client's deadline,
  `TVIXFS_GRPC_TIMEOUT`, default 30 s;
- a blob or chunk read and a recursive directory Get (server streams): the FUSE bridge's
  deadline (`tvixfs/defaults.py` `DEADLINE`, 60 s, `--deadline`, for a whole chunk of up to 16 MiB,
  or per message of a stream), since the gRPC stream deadline `TVIXFS_GRPC_STREAM_TIMEOUT`
  defaults to 600 s; an abandoned call keeps its worker thread until the gRPC deadline;
- a failed `read` is asked for twice by the kernel (readahead, then the page read itself);
  the reader remembers for 1 s a chunk the store did not answer for
  (`tvixfs/fs/chunkcache.py` `UNAVAILABLE_MEMORY`), so the second ask fails at once and a `cat`
  of a file whose store hangs waits one deadline;
- a listener that accepts and never speaks (blackhole): gRPC's connect timeout (20 s) or the
  call's deadline, whichever is shorter;
- a read spanning several chunks fetches them in one worker call, one after the other, so a
  store that stalls in every chunk costs one gRPC deadline per chunk, up to the bridge's.

Known limits the table shows: `chunk_swap` (genuine chunks listed in the wrong order) passes
every per-chunk check and yields wrong bytes, which then stay in the page cache for the life of
the mount (`keep_cache`); see `tvixfs/fs/chunkmap.py`. Not in the table: every store call of a
mount shares one pool of 16 worker threads, so 16 requests hung on one service hold up every
other one (`tests/test_mount_faults.py::test_hung_blob_reads_do_not_starve_lookups`).
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--timeout",
        action="append",
        help="'default' or seconds for TVIXFS_GRPC_TIMEOUT and TVIXFS_GRPC_STREAM_TIMEOUT; repeatable "
        "(default: default, then 5)",
    )
    parser.add_argument("--only", help="only cases whose name contains this")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        sys.exit("bench/faults.py mounts: run it as root, with /dev/fuse")
    cases = [c for c in CASES if args.only is None or args.only in c.name]
    sections = [PREAMBLE]
    for timeout in args.timeout or ["default", "5"]:
        title = (
            "Default deadlines"
            if timeout == "default"
            else f"TVIXFS_GRPC_TIMEOUT={timeout} TVIXFS_GRPC_STREAM_TIMEOUT={timeout}"
        )
        print(f"## {title}", flush=True)
        work = Path(tempfile.mkdtemp(prefix="tvxf", dir="/tmp"))
        started = time.monotonic()
        try:
            rows = run_all(cases, timeout, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        text = f"## {title}\n\n{table(rows)}\n\n({len(rows)} cases in {time.monotonic() - started:.0f} s)\n"
        print(text, flush=True)
        sections.append(text)
    args.out.write_text("\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
