"""Warnings for registrations that ran but probably failed: a result is not a success just because it exists.

Each warning is one line; the pipeline puts them in ``report["warnings"]`` and the CLI prints them
on stderr (``dinoreg: warning: ...``), so neither a user nor a batch summary mistakes them for
good results. Thresholds are deliberately loose (they flag garbage, not mediocre results).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dinoreg.core.volume import Volume

#: NCC after registration below this: the images share almost no structure
MIN_NCC_AFTER = 0.2
#: NCC gain below this while NCC stays low: the optimisation found nothing to align
MIN_NCC_GAIN = 0.02
LOW_NCC = 0.5
#: folded voxels (Jacobian <= 0) above this percentage: the deformation is not plausible
MAX_FOLDING_PERCENT = 5.0
#: an integer image with at most this many distinct values looks like a label map
MAX_LABEL_VALUES = 16
SAMPLES = 1_000_000


def input_warnings(volumes: dict[str, Volume]) -> list[str]:
    """Images with no usable intensity signal: label maps or masks passed as images."""
    messages = []
    for role, volume in volumes.items():
        values = volume.array.ravel()
        sample = values[:: max(1, values.size // SAMPLES)]
        distinct = np.unique(sample)
        if distinct.size <= MAX_LABEL_VALUES and np.allclose(distinct, np.round(distinct)):
            messages.append(f"the {role} has only {distinct.size} distinct values (a label map or mask?): "
                            "registration needs intensity images; pass label maps with --moving-labels/--fixed-labels")
    return messages


def result_warnings(report: dict[str, Any]) -> list[str]:
    """Signs of a failed registration in a finished report (similarity, folding)."""
    messages = []
    before = (report.get("similarity_before") or {}).get("ncc")
    after = (report.get("similarity_after") or {}).get("ncc")
    if after is not None and np.isfinite(after):
        if after < MIN_NCC_AFTER:
            messages.append(f"similarity after registration is very low (NCC {after:.3f}): the images may not show "
                            "the same anatomy or may not overlap; check the result before using it")
        elif before is not None and np.isfinite(before) and after - before < MIN_NCC_GAIN and after < LOW_NCC:
            messages.append(f"similarity barely improved (NCC {before:.3f} -> {after:.3f}): the registration "
                            "probably failed; check the inputs' orientation and overlap")
    folding = (report.get("jacobian") or {}).get("percent_nonpositive")
    if folding is not None and folding > MAX_FOLDING_PERCENT:
        messages.append(f"{folding:.1f} % of voxels are folded (Jacobian <= 0, more than {MAX_FOLDING_PERCENT:g} %): "
                        "the deformation is implausible; raise the regularisation (--param regularisation=...)")
    return messages
