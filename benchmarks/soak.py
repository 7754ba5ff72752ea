"""Soak: many registrations in a row in ONE process; memory must not grow.

    python benchmarks/soak.py [--runs 50] [--method mind-zeroshot] [--preset fast]

Registers the demo pair (MRBrainTumor2 -> MRBrainTumor1) ``--runs`` times through ``register()``
and writes the outputs each time (into one temporary folder, replaced every run), as a service or
a batch worker would. Prints the resident memory (VmRSS) after each run, and on a GPU the allocated
memory; the verdict compares the mean of the last 10 runs with the mean of runs 6-15 (the first
runs warm caches and allocators up). Record the result in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DinoRegistration"))


def rss_mb() -> float:
    """Current resident memory in MB (Linux /proc; ru_maxrss elsewhere, which is a peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--method", default="mind-zeroshot")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from dinoreg.io.volumes import read_volume
    from dinoreg.app.outputs import write_outputs
    from dinoreg.app.pipeline import RegistrationOptions, register

    demo = REPO / "Resources" / "Demo"
    fixed, moving = read_volume(demo / "MRBrainTumor1.nii.gz"), read_volume(demo / "MRBrainTumor2.nii.gz")
    options = RegistrationOptions(method=args.method, preset=args.preset, device=args.device)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    rss, gpu = [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for run in range(1, args.runs + 1):
            result = register(fixed, moving, options)
            write_outputs(result, Path(folder) / "out")
            del result
            rss.append(rss_mb())
            gpu.append(torch.cuda.memory_allocated() / 2**20 if cuda else 0.0)
            print(f"run {run:3d}: RSS {rss[-1]:7.1f} MB" + (f", GPU allocated {gpu[-1]:7.1f} MB" if cuda else ""), flush=True)
    early = sum(rss[5:15]) / len(rss[5:15]) if len(rss) >= 15 else rss[0]
    late = sum(rss[-10:]) / len(rss[-10:])
    print(f"\n{args.runs} x {args.method}{'@' + args.preset if args.preset else ''} in {time.perf_counter() - started:.0f} s "
          f"(load average {'/'.join(f'{v:.1f}' for v in os.getloadavg())}): RSS first {rss[0]:.0f} MB, "
          f"runs 6-15 mean {early:.0f} MB, last 10 mean {late:.0f} MB, max {max(rss):.0f} MB; "
          f"growth {late - early:+.0f} MB" + (f"; GPU allocated first {gpu[0]:.0f} MB, last {gpu[-1]:.0f} MB" if cuda else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
