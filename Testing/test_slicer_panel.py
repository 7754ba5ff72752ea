"""What the panel shows and ships, checked without Slicer's GUI: the method and preset lists built from
``dinoreg methods --json`` (today's fields and the richer ones of the networks work), the one list of
engine requirements, the extension's CMake metadata, and the self-test's skip without the engine."""

from __future__ import annotations

import re
import sys
import unittest
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "DinoRegistration"
sys.path.insert(0, str(MODULE_DIR))

from dinoreg import requirements  # noqa: E402
from DinoRegistrationLib import methods as method_list  # noqa: E402

DINO_REASON = ("DINO model facebook/dinov2-with-registers-small is not downloaded: looked in /root/.cache/huggingface/"
               "hub/models--facebook--dinov2-with-registers-small and /root/.cache/dinoreg/dino/converted/"
               "dinov2_vits14_reg; fetch it with: dinoreg weights download dinov2_vits14_reg")
PRESETS = ["accurate", "body-ct", "brain-mr", "default", "fast"]
TODAY = [  # 'dinoreg methods --json' of today's engine (alphabetical, no label/kind/rank)
    {"name": "affine", "summary": "affine", "available": True, "reason": "", "presets": ["default"],
     "default_preset": "default", "parameters": {}},
    {"name": "dino-mind", "summary": "dm", "available": False, "reason": DINO_REASON, "presets": PRESETS,
     "default_preset": "default", "parameters": {"model": "facebook/dinov2-with-registers-small"}},
    {"name": "dino-zeroshot", "summary": "dz", "available": False, "reason": DINO_REASON, "presets": PRESETS,
     "default_preset": "default", "parameters": {"model": "facebook/dinov2-with-registers-small"}},
    {"name": "identity", "summary": "nothing", "available": True, "reason": "", "presets": ["default"],
     "default_preset": "default", "parameters": {}},
    {"name": "mind-zeroshot", "summary": "MIND + ConvexAdam", "available": True, "reason": "", "presets": PRESETS,
     "default_preset": "default", "parameters": {"regularisation": 1.0, "adam_iterations": 80}},
]
RICH = [  # with the fields the networks work adds
    {"name": "identity", "label": "Identity", "kind": "baseline", "rank": 99, "available": True, "presets": []},
    {"name": "mind-zeroshot", "label": "MIND features", "kind": "zero-shot", "rank": 3, "available": True,
     "presets": PRESETS, "default_preset": "brain-mr"},
    {"name": "dino-zeroshot", "label": "DINOv2 features", "kind": "zero-shot", "rank": 2, "available": False,
     "reason": DINO_REASON, "presets": PRESETS,
     "weights": {"source": "download", "present": False, "path": "", "sha256": "", "size_mb": 88}},
    {"name": "unet-oasis", "label": "Brain MR network", "kind": "learned", "rank": 1, "available": True,
     "presets": ["io", "brain-mr"], "default_preset": "io",
     "card": "Trained on OASIS T1 brains at 1 mm; validation Dice 0.78",
     "weights": {"source": "shipped", "present": True, "path": "x.safetensors", "sha256": "ab"}},
]


def test_method_list_today_plain_labels_by_recommendation_baselines_hidden():
    items = method_list.methodItems(TODAY)
    assert [i["data"] for i in items] == ["dino-mind", "dino-zeroshot", "mind-zeroshot"]
    assert items[0]["text"].endswith("(unavailable)") and "weights download" in items[0]["toolTip"]
    assert items[2]["text"] == "MIND features (no model needed)"
    label = method_list.automaticLabel(TODAY)
    assert label == "Automatic: MIND features (no model needed) (DINO weights not downloaded yet)"  # no internal name
    assert len(method_list.shortReason(TODAY[1])) < 80  # one line instead of six lines of cache paths
    assert method_list.needsWeights(TODAY[1]) and method_list.weightsName(TODAY[1]) == "dinov2_vits14_reg"


def test_method_list_with_rank_kind_card_and_weights():
    items = method_list.methodItems(RICH)
    assert [i["text"] for i in items] == ["Brain MR network", "DINOv2 features (unavailable)", "MIND features"]
    assert items[0]["toolTip"].startswith("Trained on OASIS")  # the model card
    assert method_list.automaticLabel(RICH) == "Automatic: Brain MR network"
    assert method_list.shortReason(RICH[2]) == "DINOv2 features weights (88 MB) not downloaded yet"
    assert not method_list.needsWeights(RICH[3])  # shipped weights: nothing to download


def test_presets_lead_with_the_common_four_without_the_duplicate_default():
    assert [name for _, name in method_list.presetItems(None)] == ["brain-mr", "body-ct", "fast", "accurate"]
    assert [text for text, _ in method_list.presetItems(TODAY[4])] == ["Brain MR", "Body CT", "Fast", "Accurate"]
    assert [name for _, name in method_list.presetItems(RICH[3])] == ["brain-mr", "io"]  # learned: 'io' offered
    assert method_list.presetFor(RICH[3], "fast") == "io" and method_list.presetFor(TODAY[4], "fast") == "fast"
    assert method_list.presetFor(TODAY[0], "brain-mr") == ""  # a baseline without presets


def test_one_list_of_engine_requirements_agrees_with_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    normalise = lambda r: re.sub(r"[-_.]+", "-", r.lower()).replace(" ", "")  # noqa: E731
    for family, listed in requirements.declared_requirements().items():
        declared = project["optional-dependencies"][family] if family else project["dependencies"]
        assert sorted(map(normalise, declared)) == sorted(map(normalise, listed)), family or "core"
    module = (MODULE_DIR / "DinoRegistration.py").read_text() + "".join(
        p.read_text() for p in (MODULE_DIR / "DinoRegistrationLib").glob("*.py"))
    assert "transformers>=" not in module  # no copy of the list on the Slicer side


def test_requirement_versions_are_checked():
    assert requirements.is_at_least("2.13.0+cpu", "2.1") and requirements.is_at_least("5.0.0rc1", "5")
    assert not requirements.is_at_least("4.47.1", "5") and requirements.is_at_least("1.3", None)
    versions = {"transformers": "4.47.0", "torch": None}
    report = requirements.check_requirements(lambda name: versions.get(name, "99"), lambda name: False,
                                             families=("core", "dino"))
    assert report["missing"] == ["torch"] and report["outdated"] == ["transformers 4.47.0 (needs >=5)"]
    built_in = requirements.check_requirements(lambda name: None if name == "SimpleITK" else "99", lambda name: True)
    assert built_in["missing"] == [] and built_in["install"] == []  # e.g. Slicer's own SimpleITK, no metadata
    assert set(report["install"]) == {"torch>=2.1", "transformers>=5"} or sys.version_info < (3, 10)
    from DinoRegistrationLib.install import missingSummary, needsTorch, pipRequirements

    assert pipRequirements(report) == ["transformers>=5"] and needsTorch(report)
    assert missingSummary(report) == "torch; transformers 4.47.0 (needs >=5)"
    assert requirements.check_requirements()["missing"] == []  # this test environment has the engine


def cmake_set(path: Path, name: str) -> list[str]:
    match = re.search(rf"set\({name}\s+(.*?)\)", path.read_text(), re.S)
    return match.group(1).split() if match else []


def test_extension_metadata_points_to_files_in_the_repository():
    top = REPO / "CMakeLists.txt"
    assert " ".join(cmake_set(top, "EXTENSION_SCREENSHOTURLS")).strip('"'), "the Extensions Index asks for a screenshot"
    for name in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in " ".join(cmake_set(top, name)).strip('"').split():
            relative = re.sub(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/", "", url)
            assert relative != url and (REPO / relative).is_file(), f"{name}: {url} is not a file of the repository"


def test_demo_volumes_are_installed_with_their_licence():
    files = [f.replace("${CMAKE_CURRENT_SOURCE_DIR}/", "") for f in cmake_set(MODULE_DIR / "CMakeLists.txt", "DEMO_FILES")]
    assert any(f.endswith("Demo/LICENSE.txt") for f in files)
    assert all((MODULE_DIR / f).resolve().is_file() for f in files)
    names = {Path(f).name for f in files}
    assert {"MRBrainTumor1.nii.gz", "MRBrainTumor2.nii.gz"} <= names


def test_self_test_skips_with_the_reason_where_the_engine_is_missing(monkeypatch):
    """Slicer's extension build machines run the self-test (ctest) without PyTorch: it must be skipped, which
    unittest counts as a success (slicer.testing.runUnitTest fails only if not wasSuccessful())."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' package is not slicer-core")
    import DinoRegistration

    monkeypatch.setattr(requirements.check_requirements, "__defaults__",
                        (lambda name: None if name == "torch" else "99", lambda name: name != "torch", ("core",)))
    result = unittest.TextTestRunner(stream=open("/dev/null", "w") if sys.platform != "win32" else None).run(
        unittest.TestLoader().loadTestsFromTestCase(DinoRegistration.DinoRegistrationTest))
    assert result.wasSuccessful() and result.testsRun == len(result.skipped) == 3
    assert "torch" in result.skipped[0][1]
