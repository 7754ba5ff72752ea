"""Cost of the registration networks and of a learned method's whole run, with random weights.

Not a test: prints a Markdown table (and optionally appends it to BENCHMARKS.md). Accuracy needs
trained weights (see ``brain_benchmark.py`` with a trained model's method name); this measures
what does not: seconds per forward pass of every architecture's DEFAULT configuration at the
2 mm brain size (80x96x112, padded to each network's shape multiple), and the stages of a whole
``register`` call of a learned method on the 1 mm 160x192x224 brain scan (affine stage off).

DINO architectures use a random backbone of the real ViT-S/14-with-registers size (384 wide,
12 layers), so their cost is that of the real model.

Usage::

    python benchmarks/network_speed.py                  # every architecture, CPU
    python benchmarks/network_speed.py --device cuda --output BENCHMARKS.md
    python benchmarks/network_speed.py --networks fmir,unet --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "DinoRegistration"))

ARCHITECTURES = ["fmir", "fmir@intensity", "fmir@dino", "unet", "vitvnet", "dino-vitvnet", "dino-encdec"]
BRAIN_2MM = (80, 96, 112)


def random_dino(folder: Path) -> str:
    from dinoreg.features.dino.benchmark import random_vits14_reg4

    return random_vits14_reg4(folder) if not (folder / "config.json").exists() else str(folder)


def build(spec: str, dino: str):
    from dinoreg.networks import build_network

    name, _, backend = spec.partition("@")
    config = {"backend": backend} if backend else {}
    if backend == "dino" or name.startswith("dino-"):
        config["dino_model"] = dino
    torch.manual_seed(0)
    network = build_network(name, config).eval()
    if getattr(network, "channels", 0) < getattr(network, "raw_channels", 0):
        samples = network.raw_features(torch.rand((1, 1, 32, 32, 32)))
        network.fit_channel_basis(samples.flatten(2).transpose(1, 2).reshape(-1, network.raw_channels))
    return network


def padded(shape: tuple[int, ...], multiple: int) -> tuple[int, ...]:
    return tuple(int(np.ceil(n / multiple) * multiple) for n in shape)


def forward_seconds(network, device: torch.device, repeats: int) -> tuple[tuple[int, ...], float, float]:
    """Input shape, median wall seconds and median CPU seconds (all threads) of one forward pass.

    On a shared machine the CPU seconds are the steadier number: divided by the thread count they
    approximate the wall time of an idle machine."""
    shape = padded(BRAIN_2MM, network.shape_multiple)
    fixed = torch.rand((1, 1, *shape), device=device)
    moving = torch.rand((1, 1, *shape), device=device)
    times, cpu = [], []
    with torch.no_grad():
        network(fixed, moving)  # warm-up
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            network(fixed, moving)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return shape, statistics.median(times), statistics.median(cpu)


def whole_run(spec: str, dino: str, device: str, models: Path, preset: str | None) -> dict:
    """Stage seconds of ``register`` with a random-weight local model on the 1 mm brain scan."""
    from dinoreg.store import save_model
    from dinoreg.app.pipeline import RegistrationOptions, register
    from dinoreg.core.volume import Volume

    shared = Path(os.environ.get("DINOREG_SHARED_DATA", REPO.parent / "shared" / "data"))
    data = np.load(shared / "brain" / "test_scan.npz")
    image = Volume.from_array_ras(np.ascontiguousarray(data["vol"].transpose(2, 1, 0)).astype(np.float32))
    moving = image.with_array(np.roll(image.array, 3, axis=1))
    name = "bench-" + spec.replace("@", "-")
    save_model(models / name, build(spec, dino), {"preprocessing": {"spacing_mm": 2.0, "orientation": "any"}})
    start = time.perf_counter()
    result = register(image, moving, RegistrationOptions(method=name, preset=preset, use_affine=False, device=device,
                                                         compute_inverse=False))
    return {"total": time.perf_counter() - start, **result.report["seconds_per_stage"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join(ARCHITECTURES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--whole", default="fmir,unet", help="architectures also timed through a whole register call")
    parser.add_argument("--output", default="-", help="append the table to this Markdown file ('-': print only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    workdir = Path(tempfile.mkdtemp(prefix="dinoreg-netbench-"))
    os.environ["DINOREG_MODELS_DIR"] = str(workdir / "models")
    dino = random_dino(workdir / "vits14-reg4")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"### Network cost ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, device {args.device}, load average {load:.1f} at start)", "",
             f"Command: `python benchmarks/network_speed.py {' '.join(argv or sys.argv[1:])}`", "",
             "| network | parameters | input | forward wall s (median) | forward CPU s (all threads) |",
             "| --- | --- | --- | --- | --- |"]
    for spec in [s for s in args.networks.split(",") if s]:
        network = build(spec, dino).to(device)
        shape, seconds, cpu_seconds = forward_seconds(network, device, args.repeats)
        parameters = sum(p.numel() for p in network.parameters())
        lines.append(f"| {spec} | {parameters:,} | {'x'.join(map(str, shape))} | {seconds:.3f} | {cpu_seconds:.3f} |")
        print(lines[-1], flush=True)
    lines += ["", "Symmetric inference (the learned methods' default) runs both directions: about twice a forward "
              "(FMIR shares the features).", "",
              "| whole `register` (1 mm 160x192x224 brain, 2 mm model grid, no affine, no inverse) | total s | stages |",
              "| --- | --- | --- |"]
    for spec in [s for s in args.whole.split(",") if s]:
        for preset in (None, "io"):
            stages = whole_run(spec, dino, args.device, workdir / "models", preset)
            total = stages.pop("total")
            detail = ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
            lines.append(f"| {spec}{' @io' if preset else ''} | {total:.2f} | {detail} |")
            print(lines[-1], flush=True)
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", f"Load average at the end: {end_load:.1f} (timings on a shared machine are upper bounds).", ""]
    text = "\n".join(lines)
    print(text)
    if args.output != "-":
        with open(args.output, "a") as handle:
            handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
