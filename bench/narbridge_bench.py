"""nar-bridge throughput: `nix copy` through the bridge against tvixfs's own NAR commands.

    .venv/bin/python bench/narbridge_bench.py [--reps 3]

Root, with Debian's Nix. The tree is the Python standard library (no site-packages, tests or
bytecode), added to a chroot store. Push: `nix copy --to http://bridge` (xz, zstd, none) into a
fresh embedded store, against `tvixfs import-nar` of the same NAR. Pull: `nix copy --from
http://bridge` into a fresh chroot store, against `tvixfs export-nar | nix-store --restore`
(both end with the tree on disk) and `export-nar > /dev/null` (rendering only). Repetitions
are interleaved; each cell is the median. Writes bench/NARBRIDGE.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from bridgeserver import running_bridge, url  # noqa: E402

WORK = HERE / "work" / "narbridge"
TVIXFS = [str(Path(sys.executable).with_name("tvixfs"))]
NIX = ["nix", "--extra-experimental-features", "nix-command"]
NOTE = (
    "Context rows are Nix alone: the same `nix copy --to` into a `file://` cache. With xz (Nix's "
    "default) Nix's own single-threaded compression dominates; the bridge starts ingesting only "
    "once the whole compressed NAR has arrived. Use `?compression=zstd` or `none` on a fast link."
)


def sh(*argv: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def fresh(path: Path) -> Path:
    if path.exists():
        sh("chmod", "-R", "u+w", path)
        shutil.rmtree(path)
    return path


def scratch() -> Path:
    """A directory for one bridge's notify socket and log."""
    run = fresh(WORK / "run")
    run.mkdir()
    return run


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    reps = parser.parse_args().reps
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(WORK / "xdg")
    source, path, nar, files = prepare()
    mib = nar.stat().st_size / (1 << 20)
    samples = measure(reps, source, path, nar)
    lines = [
        "# nar-bridge throughput",
        "",
        f"Tree: the Python {sys.version.split()[0]} standard library, {files} files, NAR {mib:.1f} MiB. "
        f"Median of {reps} interleaved runs on the shared 2-vCPU machine; bridge start-up excluded.",
        "",
        "| what | seconds | MiB/s of NAR |",
        "| --- | --- | --- |",
    ]
    for name, values in samples.items():
        median = statistics.median(values)
        lines.append(f"| {name.replace('|', chr(92) + '|')} | {median:.2f} | {mib / median:.1f} |")
    lines += ["", NOTE]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "NARBRIDGE.md").write_text(text)


def prepare() -> tuple[Path, str, Path, int]:
    """(chroot store, store path of the tree, its NAR file, number of files)."""
    tree = WORK / "tree"
    if not tree.exists():
        shutil.copytree(
            sysconfig.get_paths()["stdlib"],
            tree,
            symlinks=True,
            ignore=shutil.ignore_patterns("site-packages", "test", "__pycache__", "config-*"),
        )
    source = fresh(WORK / "a")
    path = sh("nix-store", "--store", f"local?root={source}", "--add", tree).stdout.decode().strip()
    nar = WORK / "tree.nar"
    nar.write_bytes(sh(*NIX, "store", "dump-path", "--store", f"local?root={source}", path).stdout)
    return source, path, nar, sum(len(f) for _, _, f in os.walk(tree))


def measure(reps: int, source: Path, path: str, nar: Path) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}

    def push(compression: str) -> None:
        store = fresh(WORK / f"push-{compression}")
        with running_bridge(TVIXFS, scratch(), f"local://{store}", ["--allow-upload"]) as bridge:
            fresh(WORK / "xdg")
            target = f"{url(bridge)}?compression={compression}"
            seconds = timed(lambda: sh(*NIX, "copy", "--to", target, "--from", f"local?root={source}", path))
        samples.setdefault(f"nix copy --to bridge ({compression})", []).append(seconds)

    def to_file(compression: str) -> None:
        """What Nix itself costs: the same copy into a file:// binary cache."""
        cache = fresh(WORK / "file-cache")
        cache.mkdir()
        target = f"file://{cache}?compression={compression}"
        seconds = timed(lambda: sh(*NIX, "copy", "--to", target, "--from", f"local?root={source}", path))
        samples.setdefault(f"context: nix copy --to file:// ({compression})", []).append(seconds)

    def import_nar() -> None:
        store = fresh(WORK / "import")
        seconds = timed(lambda: sh(*TVIXFS, "import-nar", nar, "--path", path, "--store", f"local://{store}"))
        samples.setdefault("tvixfs import-nar", []).append(seconds)

    def pull() -> None:
        store = f"local://{WORK / 'push-none'}"
        with running_bridge(TVIXFS, scratch(), store) as bridge:
            fresh(WORK / "xdg")
            target = fresh(WORK / "b")
            copy = [
                *NIX,
                "copy",
                "--no-check-sigs",
                "--from",
                url(bridge),
                "--to",
                f"local?root={target}",
                path,
            ]
            samples.setdefault("nix copy --from bridge", []).append(timed(lambda: sh(*copy)))

    def export() -> None:
        store = f"local://{WORK / 'push-none'}"
        out = fresh(WORK / "restored")
        command = f"{TVIXFS[0]} export-nar --store {store} {path} | nix-store --restore {out}"
        samples.setdefault("tvixfs export-nar | nix-store --restore", []).append(
            timed(lambda: sh("sh", "-c", command))
        )
        null = f"{TVIXFS[0]} export-nar --store {store} {path} > /dev/null"
        samples.setdefault("tvixfs export-nar > /dev/null", []).append(timed(lambda: sh("sh", "-c", null)))

    for _ in range(reps):
        for action in (
            lambda: push("xz"),
            lambda: to_file("xz"),
            lambda: push("zstd"),
            lambda: push("none"),
            lambda: to_file("none"),
            import_nar,
            pull,
            export,
        ):
            action()
    return samples


if __name__ == "__main__":
    main()
