"""Maintainers' tool: ship a trained run's model in the repository (``store/shipped/`` + registry).

    python -m dinoreg.training.ship RUN_DIR NAME

Copies ``RUN_DIR/model.safetensors`` and its card (name set to ``NAME``) into ``store/shipped/``
and adds (or replaces) the ``NAME`` entry of ``store/networks.json`` with its SHA-256 and size,
so ``dinoreg methods`` lists it as a learned method with shipped weights.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from dinoreg.store import read_card, sha256_of
from dinoreg.store.networks import REGISTRY_FILE, SHIPPED_DIR


def ship(run_dir: Path, name: str) -> Path:
    weights = run_dir / "model.safetensors"
    card = read_card(run_dir / "model.json")
    card["name"] = name
    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    target = SHIPPED_DIR / f"{name}.safetensors"
    shutil.copyfile(weights, target)
    (SHIPPED_DIR / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    registry = json.loads(REGISTRY_FILE.read_text())
    entries = [e for e in registry.get("models", []) if e.get("name") != name]
    entries.append({"name": name, "architecture": card["architecture"], "source": "shipped",
                    "sha256": sha256_of(target), "size": target.stat().st_size})
    registry["models"] = entries
    REGISTRY_FILE.write_text(json.dumps(registry, indent=2) + "\n")
    return target


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m dinoreg.training.ship RUN_DIR NAME")
    print(ship(Path(sys.argv[1]), sys.argv[2]))
