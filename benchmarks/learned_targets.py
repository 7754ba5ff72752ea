"""Whole-process timing and Dice of ``dinoreg register`` on the real brain pair, for the learned targets.

The real inter-subject pair (``dinoreg/data/real_pairs.py``): the OASIS scan and the MNE
sample subject (LIA, 160x192x224, 1 mm), in both directions, with their 31-structure label maps.
Each (method, direction) runs ``python -m dinoreg register FIXED MOVING -o OUT
--method M [--preset P] --fixed-labels FL --moving-labels ML --quiet`` as a fresh process; the
seconds are the whole process (start-up, reading, affine, method, writing every output); the Dice
is ``report.json``'s ``labels.dice_mean_after``. Prints a Markdown table and the machine load.

Usage::

    python benchmarks/learned_targets.py --methods affine,mind-zeroshot,unet-brain,unet-brain@io
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DinoRegistration"))

from dinoreg.data import real_pairs
from dinoreg.data import synthesis  # noqa: E402


def write_subjects(folder: Path) -> dict[str, tuple[Path, Path]]:
    """OASIS and MNE as NIfTI image + label files (LIA geometry centred on the origin)."""
    folder.mkdir(parents=True, exist_ok=True)
    subjects = {}
    for name, loader in (("oasis", real_pairs.oasis_subject), ("mne", real_pairs.mne_subject)):
        image_path, labels_path = folder / f"{name}_t1.nii.gz", folder / f"{name}_labels.nii.gz"
        if not (image_path.exists() and labels_path.exists()):
            image, labels = loader()
            synthesis.write_nifti(synthesis.lia_volume(image), image_path)
            synthesis.write_nifti(synthesis.lia_volume(labels.astype("int16")), labels_path)
        subjects[name] = (image_path, labels_path)
    return subjects


def run_one(method: str, fixed: tuple[Path, Path], moving: tuple[Path, Path], out: Path, threads: int) -> tuple[float, float]:
    name, _, preset = method.partition("@")
    command = [sys.executable, "-m", "dinoreg", "register", str(fixed[0]), str(moving[0]), "-o", str(out),
               "--method", name, "--fixed-labels", str(fixed[1]), "--moving-labels", str(moving[1]), "--quiet"]
    if preset:
        command += ["--preset", preset]
    env = dict(os.environ, PYTHONPATH=str(REPO / "DinoRegistration"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{method} failed: {result.stderr.strip()[-500:]}")
    report = json.loads((out / "report.json").read_text())
    return float(report["labels"]["dice_mean_after"]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="affine,mind-zeroshot,unet-brain,unet-brain@io")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dinoreg-learned-targets"))
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each run (0: leave as is)")
    args = parser.parse_args()
    subjects = write_subjects(args.work / "data")
    directions = (("oasis", "mne"), ("mne", "oasis"))
    rows = []
    for method in args.methods.split(","):
        dice, seconds = [], []
        for fixed, moving in directions:
            d, s = run_one(method, subjects[fixed], subjects[moving], args.work / f"{method}_{fixed}_from_{moving}", args.threads)
            dice.append(d)
            seconds.append(s)
            print(f"{method:24s} {fixed}<-{moving}: Dice {d:.3f}  {s:.1f} s  (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
        rows.append((method, dice, seconds))
    print(f"\n{platform.node()} ({os.cpu_count()} CPUs), load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| method | Dice oasis<-mne | Dice mne<-oasis | mean Dice | s oasis<-mne | s mne<-oasis | mean s |")
    print("|---|---|---|---|---|---|---|")
    for method, dice, seconds in rows:
        print(f"| {method} | {dice[0]:.3f} | {dice[1]:.3f} | {sum(dice) / 2:.3f} | {seconds[0]:.1f} | {seconds[1]:.1f} | {sum(seconds) / 2:.1f} |")


if __name__ == "__main__":
    main()
