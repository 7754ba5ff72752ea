"""Published networks in the model store: listing, first download (resumable, hash recorded),
verify, tamper detection, clear, and their rows for the Slicer panel (issue 18). No internet: the
authors' URL is replaced by a local file:// URL serving random weights in the authors' format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dinoreg.errors import InputError
from dinoreg.methods.base import get_method
from dinoreg.store import published
from dinoreg.networks.gradicon import GradICON


def dinoreg(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dinoreg.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_published_models_are_listed_with_provenance_and_licence(tmp_path, monkeypatch):
    import os

    env = {**os.environ, "DINOREG_MODELS_DIR": str(tmp_path)}
    rows = {row["name"]: row for row in json.loads(dinoreg("models", "list", "--json", env=env).stdout)}
    for name in ("unigradicon", "multigradicon"):
        row = rows[name]
        assert row["source"] == "published" and not row["present"]
        assert row["url"].startswith("https://github.com/uncbiag/uniGradICON/releases/download/")
        assert "weights licence unstated" in row["card"] and "download 283 MB" in row["card"]
    assert "published Dice 0.742 (0.760 with IO) on LUMIR 2024" in rows["unigradicon"]["card"]
    listing = json.loads(dinoreg("methods", "--json", env=env).stdout)
    methods = {row["name"]: row for row in (listing["methods"] if isinstance(listing, dict) else listing)}
    row = methods["unigradicon"]
    assert row["kind"] == "learned" and not row["available"] and row["weights"]["source"] == "published"
    assert row["weights"]["size_mb"] == 282.8 and row["card"] == rows["unigradicon"]["card"]
    card = published.published_card("unigradicon")
    assert card["code"]["commit"] and "Apache-2.0" in card["code"]["licence"] and card["paper"].endswith("2403.05780")
    monkeypatch.setenv("DINOREG_MODELS_DIR", str(tmp_path))
    method = get_method("unigradicon")
    assert method.kind == "learned" and method.label == "uniGradICON (trained network, download 283 MB)"
    reason = method.availability().reason
    assert "dinoreg models download unigradicon" in reason and "licence: unstated" in reason


@pytest.fixture()
def served_weights(tmp_path, monkeypatch):
    """Random weights of the real size, 'published' at a file:// URL instead of the authors' one."""
    source = tmp_path / "served" / "Step_2_final.trch"
    source.parent.mkdir()
    torch.manual_seed(0)
    torch.save(GradICON().state_dict(), source)
    cards = published.published_cards()
    card = cards["unigradicon"]
    card["weights"] = {**card["weights"], "url": source.as_uri(), "approximate_bytes": source.stat().st_size}
    monkeypatch.setattr(published, "published_cards", lambda: cards)
    monkeypatch.setenv("DINOREG_MODELS_DIR", str(tmp_path / "models"))
    return source


def test_first_download_records_the_hash_and_later_changes_are_refused(served_weights):
    from dinoreg.networks.loading import verify_model
    from dinoreg.store import clear_models, download_model

    target = published.weights_path("unigradicon")
    target.parent.mkdir(parents=True)
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(b"an interrupted download from a server that ignores ranges")
    assert not get_method("unigradicon").availability().ok
    seen = []
    assert download_model("unigradicon", lambda done, total: seen.append((done, total))) == target
    assert target.read_bytes() == served_weights.read_bytes() and not partial.exists()
    assert seen[-1] == (target.stat().st_size, target.stat().st_size)
    from dinoreg.store.downloads import sha256_of

    assert target.with_name(target.name + ".sha256").read_text().split()[0] == sha256_of(served_weights)
    assert get_method("unigradicon").availability().ok
    assert verify_model("unigradicon").startswith("unigradicon: ok")
    with open(target, "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(InputError, match="no longer matches the SHA-256 recorded"):
        verify_model("unigradicon")
    removed = clear_models()
    assert target in removed and not target.exists() and not get_method("unigradicon").availability().ok
    assert served_weights.exists()  # never touches files it did not create


def test_a_wrong_file_at_the_url_is_not_kept(served_weights):
    from dinoreg.store import download_model

    served_weights.write_bytes(b"<html>not found</html>")
    with pytest.raises(InputError, match="expected about"):
        download_model("unigradicon")
    assert not published.weights_path("unigradicon").exists()


def test_panel_offers_the_download_of_published_networks():
    from DinoRegistrationLib.methods import methodItems, needsWeights, shortReason

    row = {"name": "unigradicon", "label": "uniGradICON (trained network, download 283 MB)", "kind": "learned",
           "rank": 45, "available": False, "reason": "the weights of unigradicon are not downloaded",
           "weights": {"source": "published", "present": False, "size_mb": 282.8}, "card": "published gradicon"}
    assert needsWeights(row)
    assert shortReason(row) == "uniGradICON (trained network, download 283 MB) weights (283 MB) not downloaded yet"
    assert methodItems([row])[0]["toolTip"].startswith("published gradicon")


def test_modality_choice_and_bad_input_give_one_line_errors():
    import numpy as np

    from dinoreg.methods.published import detect_modality, normalise_intensities

    assert detect_modality(np.array([-1024.0, 40.0]), "auto") == "ct"
    assert detect_modality(np.array([0.0, 900.0]), "auto") == "mri"
    assert detect_modality(np.array([0.0, 1.0]), "CT") == "ct"
    with pytest.raises(InputError, match="modality must be ct, mri or auto"):
        detect_modality(np.array([0.0]), "pet")
    with pytest.raises(InputError, match="constant after CT normalisation"):
        normalise_intensities(np.full((4, 4, 4), 3000.0, dtype=np.float32), "ct")  # all above the window
    with pytest.raises(InputError, match="constant after MRI normalisation"):
        normalise_intensities(np.full((4, 4, 4), 7.0, dtype=np.float32), "mri")


def test_panel_download_of_a_published_network_uses_models_download_with_json_progress(served_weights, capsys):
    """The panel's Download button for a network runs ``dinoreg models download NAME --progress-json`` in the
    background (not the DINO backbone downloader), and that command speaks the panel's event protocol."""
    import argparse

    from DinoRegistrationLib import methods as methodList
    from dinoreg.cli.models import download_handler
    from dinoreg.progress import parse_event

    row = {"name": "unigradicon", "available": False,
           "weights": {"source": "published", "present": False}, "reason": "run 'dinoreg models download unigradicon'"}
    assert methodList.needsWeights(row) and methodList.isNetworkDownload(row)
    assert methodList.weightsName(row) == "unigradicon"
    assert download_handler(argparse.Namespace(names=["unigradicon"], progress_json=True)) == 0
    events = [parse_event(line) for line in capsys.readouterr().out.splitlines()]
    assert all(event is not None for event in events)  # nothing but JSON events on stdout
    assert events[-1]["event"] == "done" and events[-1]["name"] == "unigradicon"
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
