"""``torchrun --nproc_per_node 2`` (gloo, CPU) trains a few steps; the ranks end with equal weights
after drawing different pairs, and only rank 0 writes the model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CONFIG = """seed = 2
[network]
name = "unet"
config = { encoder = [8, 16], decoder = [8], output_level = 1, integrate_steps = 0 }
[data]
source = "random-shapes"
shape = [16, 16, 16]
max_velocity_mm = 4.0
[loss]
lncc = 1.0
dice = 0.0
diffusion = 0.05
lncc_window = 3
[run]
steps = 3
log_every = 1
validate_every = 0
threads = 1
device = "cpu"
"""



def free_port() -> int:
    """A TCP port no one listens on now (a fixed port collides when two test runs share the machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

def test_two_process_ddp_training_agrees(tmp_path):
    (tmp_path / "tiny.toml").write_text(CONFIG)
    env = dict(os.environ, PYTHONPATH=str(REPO / "DinoRegistration"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "dinoreg", "train", "--config", str(tmp_path / "tiny.toml"),
               "--output", str(tmp_path / "run"), "--quiet"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = json.loads((tmp_path / "run" / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["first_loss"] != ranks[1]["first_loss"]  # each rank drew its own pairs
    assert (tmp_path / "run" / "model.safetensors").exists()
    steps = [line.split(",")[0] for line in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    assert steps.count("3") >= 1 and len(set(steps)) == 3  # one log (rank 0), steps 1..3
