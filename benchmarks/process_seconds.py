"""Time the whole ``dinoreg register`` process, as a user runs it, on the benchmark's real pair.

Each run is a fresh process (start-up, reading, the registration and every output file), timed by
``/usr/bin/time``-style accounting (wall, user and system CPU seconds), with the engine's own
stage seconds from ``report.json``. Several engine source trees can be compared in one series:
runs alternate between them, so that a machine whose speed drifts (shared VMs do) affects each
tree alike. Prints one line per run and the median per tree and direction.

    python benchmarks/process_seconds.py --repeats 3 --source /path/to/old/checkout --source . -- --preset accurate

Needs the real pair in the benchmark cache (``python benchmarks/compare.py --quick`` makes it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "dinoreg-benchmark" / "compare"
DIRECTIONS = {"oasis<-mne": ("oasis-vxm_160x192x224_v2_t1.nii", "mne_t1.nii.gz"),
              "mne<-oasis": ("mne_t1.nii.gz", "oasis-vxm_160x192x224_v2_t1.nii")}


def run_once(source: Path, fixed: Path, moving: Path, extra: list[str], threads: int) -> dict:
    """One whole process from ``source``'s engine; wall/user/system seconds and the report's stages."""
    output = Path(tempfile.mkdtemp(prefix="dinoreg-process-")) / "out"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(source / "DinoRegistration"))
    command = [sys.executable, "-m", "dinoreg", "register", str(fixed), str(moving), "-o", str(output), "--quiet", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads((output / "report.json").read_text())
    shutil.rmtree(output.parent)
    return {"wall": wall, "user": after.ru_utime - before.ru_utime, "system": after.ru_stime - before.ru_stime,
            "engine": sum(report["seconds_per_stage"].values()), "stages": report["seconds_per_stage"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", action="append", type=Path, help="checkout whose engine runs (repeatable; default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("extra", nargs="*", help="arguments after -- go to dinoreg register (e.g. --preset accurate)")
    args = parser.parse_args()
    sources = [path.resolve() for path in (args.source or [BENCH_DIR.parent])]
    missing = [name for pair in DIRECTIONS.values() for name in pair if not (args.cache / name).exists()]
    if missing:
        raise SystemExit(f"{', '.join(sorted(set(missing)))} not in {args.cache}: run benchmarks/compare.py --quick first")
    results: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        for source in sources:
            for direction, (fixed, moving) in DIRECTIONS.items():
                run = run_once(source, args.cache / fixed, args.cache / moving, args.extra, args.threads)
                results.setdefault((str(source), direction), []).append(run["wall"])
                stages = ", ".join(f"{name} {seconds:.2f}" for name, seconds in run["stages"].items())
                print(f"{repeat + 1} {source} {direction}: wall {run['wall']:.2f} s, user {run['user']:.1f} s, "
                      f"system {run['system']:.1f} s, engine {run['engine']:.2f} s ({stages})", flush=True)
    for (source, direction), walls in results.items():
        print(f"median {source} {direction}: {statistics.median(walls):.2f} s wall over {len(walls)} runs "
              f"({', '.join(f'{w:.2f}' for w in walls)})")


if __name__ == "__main__":
    main()
