"""Run the tvixfs benchmark: `.venv/bin/python bench/run.py [--quick] [--only FIG ...]`.

Must run as root (mounts, drop_caches, network namespaces). Prints the table of ratios and
writes bench/RESULTS.md (full mode) or bench/work/RESULTS-quick.md (--quick). See
bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from context import BENCH, FULL, QUICK, WORK, context
from figures import FIGURES
from report import Figure, command_line, machine, results_markdown, text_table
from selfcheck import self_check

BUSY_NOTE = (
    "The machine is shared (2 vCPUs, other jobs running alongside): absolute numbers move "
    "between runs; each ratio pairs samples taken interleaved in the same run."
)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tvixfs benchmark (issue #6)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller workloads, fewer repetitions")
    mode.add_argument("--self-check", action="store_true", help="tiny import+mount+read, seconds")
    p.add_argument("--only", nargs="+", choices=sorted(FIGURES), help="run only these figures")
    p.add_argument("--out", type=Path, help="where to write the results (markdown)")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section")
    return p.parse_args()


def _run_figures(names: list[str], quick: bool) -> tuple[list[Figure], list[str]]:
    figures: list[Figure] = []
    start = time.perf_counter()
    with context(QUICK if quick else FULL) as ctx:
        print(f"== setup: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        for name in names:
            start = time.perf_counter()
            print(f"== {name} ...", file=sys.stderr, flush=True)
            try:
                figures.extend(FIGURES[name](ctx))
            except Exception as e:  # one broken piece must not hide the other figures
                traceback.print_exc()
                figures.append(Figure(name, "-", "s", "higher", None, error=f"{type(e).__name__}: {e}"))
            print(f"   {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return figures, ctx.notes


def main() -> int:
    args = _parse()
    if os.geteuid() != 0:
        print("bench/run.py must run as root (mounts, drop_caches, network namespaces)", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so every mount, daemon and tmpfs is torn down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.self_check:
        self_check()
        return 0
    info = machine()
    started = time.perf_counter()
    figures, notes = _run_figures(args.only or list(FIGURES), args.quick)
    elapsed = time.perf_counter() - started
    notes = [*args.note, BUSY_NOTE, *notes, f"wall time of the whole run: {elapsed / 60:.1f} min"]
    print(text_table(figures))
    out = args.out or (WORK / "RESULTS-quick.md" if args.quick else BENCH / "RESULTS.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    analysis_file = BENCH / "ANALYSIS.md"
    analysis = analysis_file.read_text() if analysis_file.exists() else ""
    out.write_text(results_markdown(figures, command_line(), info, notes, analysis))
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0 if all(f.verdict() != "ERROR" for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
