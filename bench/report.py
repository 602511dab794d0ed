"""Figures as ratios against their targets: the printed table and bench/RESULTS.md."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from measure import Samples


@dataclass
class Figure:
    """One row: tvixfs and its baseline, measured in the same run, and the target of their ratio.

    `higher` figures are speed ratios (baseline time / tvixfs time, or throughput ratios):
    at least `target` passes. `lower` figures are cost ratios (tvixfs time, bytes or RSS
    over the baseline's): at most `target` passes. A target of None is context, not a goal.
    """

    title: str
    baseline_name: str
    unit: str  # "s" or "B"
    better: str  # "higher" or "lower"
    target: float | None
    tvixfs: Samples = field(default_factory=Samples)
    baseline: Samples = field(default_factory=Samples)
    note: str = ""
    error: str = ""

    def ratio(self) -> float | None:
        if self.error or not self.tvixfs.n or not self.baseline.n:
            return None
        if self.better == "higher":
            return self.baseline.median / self.tvixfs.median
        return self.tvixfs.median / self.baseline.median

    def verdict(self) -> str:
        r = self.ratio()
        if r is None:
            return "ERROR"
        if self.target is None:
            return "info"
        ok = r >= self.target if self.better == "higher" else r <= self.target
        return "PASS" if ok else "MISS"

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"{'≥' if self.better == 'higher' else '≤'} {self.target:g}"


def fmt(value: float, unit: str) -> str:
    if unit == "B":
        for scale, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if value >= scale:
                return f"{value / scale:.1f} {suffix}"
        return f"{value:.0f} B"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def _row(f: Figure) -> list[str]:
    r = f.ratio()
    reps = f"{f.tvixfs.n}/{f.baseline.n}"
    if r is None:
        return [f.title, "-", "-", f.baseline_name, "-", f.target_text(), "ERROR", reps]
    return [
        f.title,
        fmt(f.tvixfs.median, f.unit),
        fmt(f.baseline.median, f.unit),
        f.baseline_name,
        f"{r:.2f}",
        f.target_text(),
        f.verdict(),
        reps,
    ]


HEADER = ["figure", "tvixfs", "baseline", "baseline is", "ratio", "target", "result", "reps"]


def text_table(figures: list[Figure]) -> str:
    rows = [HEADER, *(_row(f) for f in figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(figures: list[Figure]) -> str:
    rows = [HEADER, ["---"] * len(HEADER), *(_row(f) for f in figures)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _samples_text(f: Figure) -> str:
    if f.error:
        return f"- **{f.title}**: error: `{f.error.strip().splitlines()[-1][:300]}`"

    def one(s: Samples) -> str:
        return ", ".join(fmt(v, f.unit) for v in s.values)

    text = f"- **{f.title}**: tvixfs [{one(f.tvixfs)}]; {f.baseline_name} [{one(f.baseline)}]"
    return text + (f". {f.note}" if f.note else "")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    mem_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    libfuse = subprocess.run(
        ["pkg-config", "--modversion", "fuse3"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "nproc": str(os.cpu_count()),
        "memory": f"{mem_kib / (1 << 20):.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyfuse3": _version("pyfuse3"),
        "grpcio": _version("grpcio"),
        "libfuse": libfuse or "unknown",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def results_markdown(
    figures: list[Figure], command: str, info: dict[str, str], notes: list[str], analysis: str = ""
) -> str:
    """The whole RESULTS.md; `analysis` is the hand-written profile text (bench/ANALYSIS.md).

    The analysis is copied in on every run, so the table and the reasons behind each MISS are
    read together; it is written by people from profiles, not produced by this run.
    """
    info = {**info, "load average at end": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# tvixfs benchmark results",
        "",
        f"Command: `{command}` (as root), {when}. What each figure means: `bench/README.md`.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".",
        "",
        "Each cell is the median of the repetitions counted in `reps` (tvixfs/baseline); "
        "`ratio` is baseline time / tvixfs time for speed figures (higher is better) and "
        "tvixfs / baseline for time, byte and RSS costs (lower is better): the sign of the "
        "target says which.",
        "",
        markdown_table(figures),
        "",
        "## Notes",
        "",
        *(f"- {n}" for n in notes),
        "",
        *_analysis_section(analysis),
        "## All samples",
        "",
        *(_samples_text(f) for f in figures),
        "",
    ]
    return "\n".join(parts)


def _analysis_section(analysis: str) -> list[str]:
    """ANALYSIS.md under a heading of its own: its title dropped, its sections one level down."""
    lines = analysis.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = "\n".join(lines[1:]).strip().splitlines()
    if not lines:
        return []
    body = ["#" + line if line.startswith("#") else line for line in lines]
    return ["## Where the time goes (bench/ANALYSIS.md: profiles taken by hand)", "", *body, ""]


def command_line() -> str:
    return " ".join([".venv/bin/python", "bench/run.py", *sys.argv[1:]])
