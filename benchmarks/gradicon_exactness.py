"""Full-size (175^3) check and cost of our uniGradICON network against the authors' package.

    .venv/bin/python benchmarks/gradicon_exactness.py [--side 175] [--save WEIGHTS.trch]
    .venv/bin/python benchmarks/gradicon_exactness.py --io-step --side 96   # cost of one io step, ours only

Random weights in every tensor (as Testing/test_gradicon.py, which runs the same comparison at 68^3
in CI) are loaded into the reference (``unigradicon.make_network``, installed with the test extra)
and into ours (from the authors' file format); prints the largest field difference (network voxels)
and the wall and CPU seconds of each forward. ``--save`` also writes the random weights as a
``Step_2_final.trch`` of the real size, e.g. to time ``dinoreg register --method unigradicon`` with
``DINOREG_MODELS_DIR`` pointing at a folder holding ``unigradicon/Step_2_final.trch``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "Testing"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "DinoRegistration"))

from test_gradicon import reference_network  # noqa: E402

from dinoreg.networks.gradicon import GradICON  # noqa: E402


def timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=175)
    parser.add_argument("--save", default=None)
    parser.add_argument("--io-step", action="store_true", help="time one instance-optimisation step (ours only)")
    args = parser.parse_args()
    side = args.side
    if args.io_step:
        io_step(side)
        return
    reference = reference_network(side)
    state = reference.regis_net.state_dict()
    if args.save:
        torch.save(state, args.save)
        print(f"saved {args.save}: {os.path.getsize(args.save)} bytes")
    ours = GradICON()
    ours.load_state_dict(state, strict=True)
    ours.eval()
    torch.manual_seed(1)
    moving, fixed = torch.rand(1, 1, side, side, side), torch.rand(1, 1, side, side, side)
    with torch.no_grad():
        field, wall, cpu = timed(lambda: ours(moving, fixed))
        print(f"ours: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS so far "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")

        def run_reference():
            reference(moving, fixed)  # the reference also computes its training loss here
            return (reference.phi_AB(reference.identity_map) - reference.identity_map) * (side - 1)

        expected, wall, cpu = timed(run_reference)
        print(f"reference (forward incl. its loss): {wall:.1f} s wall, {cpu:.1f} s CPU")
    print(f"side {side}: max |ours - reference| = {float((field - expected).abs().max()):.3g} network voxels "
          f"(field max {float(expected.abs().max()):.3g})")


def io_step(side: int) -> None:
    """One step of the io preset (the reference's fine-tuning) and the final forward, random weights."""
    from dinoreg.methods.published import DEFAULTS, finetune_network_io
    from dinoreg.progress import Progress

    torch.manual_seed(0)
    network = GradICON().eval()
    for parameter in network.parameters():
        parameter.data.normal_(0, 0.05)
    moving, fixed = torch.rand(1, 1, side, side, side), torch.rand(1, 1, side, side, side)
    params = {**DEFAULTS, "io_iterations": 1}
    _, wall, cpu = timed(lambda: finetune_network_io(network, moving, fixed, params, Progress()))
    print(f"side {side}: one io step + final forward {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
