"""The model trained here and shipped in models/shipped/ (issue 9): listed as a learned, shipped
method with a complete card, and it registers a pair through the CLI from a fresh clone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from dinoreg.cli.main import main

SHIPPED = "unet-brain"


@pytest.fixture(autouse=True)
def shipped_model_present():
    """Until a trained model beats the affine baseline no weights are shipped (see BENCHMARKS.md)."""
    from dinoreg.store import find_model

    info = find_model(SHIPPED)
    if info is None or info.source != "shipped":
        pytest.skip(f"no shipped model '{SHIPPED}' in store/networks.json yet")


def test_shipped_model_is_listed_with_its_card(capsys):
    assert main(["methods", "--json"]) == 0
    methods = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    entry = methods[SHIPPED]
    assert entry["kind"] == "learned" and entry["available"]
    from dinoreg.store import find_model, read_card

    info = find_model(SHIPPED)
    assert info.source == "shipped" and info.present
    card = read_card(info.card_path)
    training = card["training"]
    for key in ("data", "resolution_mm", "steps", "hardware", "wall_time_s"):
        assert training[key], key
    assert 0.5 < card["validation"]["dice"] <= 1.0
    assert card["preprocessing"]["spacing_mm"] == 2.0 and card["weights_bytes"] < 5_000_000


def test_shipped_model_registers_a_shifted_brain(tmp_path):
    """A brain-like volume and a copy shifted by 4 mm: the network alone (no affine) must recover
    most of the shift (a real prediction, not the identity)."""
    rng = np.random.default_rng(0)
    shape = (64, 72, 64)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    brain = ((x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.8) ** 2 < 1).astype(np.float32)
    image = brain * (0.6 + 0.3 * ((x ** 2 + y ** 2 + z ** 2) < 0.3)) + 0.02 * rng.random(shape).astype(np.float32)
    fixed = sitk.GetImageFromArray(image)
    fixed.SetSpacing((2.0, 2.0, 2.0))
    moving = sitk.GetImageFromArray(np.roll(image, 2, axis=2))  # +4 mm along x (i)
    moving.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "moving.nii.gz"))
    status = main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(tmp_path / "out"),
                   "--method", SHIPPED, "--no-affine", "--quiet", "--device", "cpu", "--no-inverse"])
    assert status == 0
    transform = sitk.ReadTransform(str(tmp_path / "out" / "transform.h5"))
    centre = fixed.TransformContinuousIndexToPhysicalPoint((32.0, 36.0, 32.0))
    shift = np.array(transform.TransformPoint(centre)) - np.array(centre)
    assert 1.5 < shift[0] < 6.0, shift  # fixed -> moving: about +4 mm along x
