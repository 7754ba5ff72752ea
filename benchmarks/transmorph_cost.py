"""Cost of our TransMorph network at the published size, with random weights of the real size (issue 18).

    /usr/bin/time -v .venv/bin/python benchmarks/transmorph_cost.py [--save DIR/transmorph/TransMorph_OASIS.pth.tar]
    /usr/bin/time -v .venv/bin/python benchmarks/transmorph_cost.py --network vitvnet [--save ...]

Builds the published configuration (OASIS checkpoint: ``variant`` half, input 160 x 192 x 224), puts
random values in every tensor, runs one forward on a random pair and prints wall and CPU seconds.
``--save`` writes the weights in the authors' format (``torch.save({'state_dict': ...})``; their
file also holds the optimiser state, about 3x larger) so that ``dinoreg register --method
transmorph`` can be timed with ``DINOREG_MODELS_DIR=DIR``. Exactness against the authors' code is
``benchmarks/transmorph_reference.py`` / ``Testing/test_transmorph.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "DinoRegistration"))

from dinoreg.networks.transmorph import TransMorph  # noqa: E402
from dinoreg.networks.vitvnet_original import OriginalViTVNet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", type=Path, help="write the random weights here (authors' checkpoint format)")
    parser.add_argument("--network", choices=["transmorph", "transmorph-ixi", "vitvnet"], default="transmorph",
                        help="OASIS TransMorph (default), IXI TransMorph or IXI ViT-V-Net, published configurations")
    args = parser.parse_args()
    torch.manual_seed(0)
    builders = {"transmorph": TransMorph, "transmorph-ixi": lambda: TransMorph({"variant": "full"}),
                "vitvnet": OriginalViTVNet}
    network = builders[args.network]().eval()
    with torch.no_grad():
        for name, value in network.state_dict().items():
            if value.is_floating_point() and name != "spatial_trans.grid":
                if name.endswith("running_var"):
                    value.copy_(torch.rand_like(value) + 0.5)
                else:
                    norm = value.dim() == 1 and name.endswith("weight") and ("norm" in name or ".1." in name)
                    value.copy_(torch.randn_like(value) * 0.02 + (1.0 if norm else 0.0))
    values = sum(v.numel() for k, v in network.state_dict().items())
    print(f"tensors: {len(network.state_dict())}, values: {values:,}, parameters: "
          f"{sum(p.numel() for p in network.parameters()):,}")
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 1, "state_dict": network.state_dict()}, args.save)
        print(f"saved {args.save} ({args.save.stat().st_size:,} bytes)")
    shape = network.input_shape
    moving, fixed = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        field = network(moving, fixed)
    print(f"forward at {shape}: {time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} s CPU, "
          f"field {tuple(field.shape)}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
