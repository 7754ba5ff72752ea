"""Writing a registration's results to a folder that appears complete or not at all.

Everything is written into a hidden temporary folder beside the target, then moved into place;
which folders may be written and how an earlier result of ours is replaced is ``output_policy``'s
rule (never a file the tool did not write).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dinoreg.app.output_policy import check_output_target, make_staging, publish, remove_own_files
from dinoreg.app.pipeline import RegistrationResult
from dinoreg.io.itk_files import write_transform
from dinoreg.io.output_files import OUTPUT_FILES
from dinoreg.io.volumes import write_volume
from dinoreg.peak_memory import peak_rss_mb
from dinoreg.report.preview import write_preview



def check_output_folder(outdir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Fail early (before any work) if ``outdir`` may not or cannot be written (``output_policy`` rule)."""
    return check_output_target(outdir, inputs)


def write_outputs(result: RegistrationResult, outdir: str | os.PathLike, inputs: dict[str, str] | None = None) -> Path:
    """Write every output file of ``result`` into ``outdir`` (complete or not at all); returns its path.

    ``inputs`` (role -> path) are also checked: ``outdir`` may not be or contain one of them.
    """
    outdir = check_output_folder(outdir, (inputs or {}).values())
    staging = make_staging(outdir)
    try:
        write_files(result, staging, inputs or {})
        publish(staging, outdir)
    except BaseException:
        if staging.exists():
            remove_own_files(staging)
        raise
    return outdir


def write_files(result: RegistrationResult, folder: Path, inputs: dict[str, str]) -> None:
    # the slowest to compress first (a float Jacobian map compresses least), so the two writers finish together
    volumes = {"jacobian": result.jacobian, "warped": result.warped, "heatmap": result.heatmap,
               "heatmap_before": result.heatmap_before, "warped_labels": result.warped_labels}
    # The gzip-compressed volumes are written by two threads (SimpleITK releases the GIL while
    # writing: about 1.6x faster on two cores) while this thread draws the preview and writes the
    # transforms (HDF5 stays on one thread). Leaving the block waits for every write; the first
    # error is raised.
    with ThreadPoolExecutor(max_workers=2) as pool:
        writes = [pool.submit(write_volume, volume, folder / OUTPUT_FILES[name])
                  for name, volume in volumes.items() if volume is not None]
        title = f"{result.report['method']}  |  NCC {result.report['similarity_before']['ncc']:.3f} -> " \
                f"{result.report['similarity_after']['ncc']:.3f}"
        write_preview(folder / OUTPUT_FILES["preview"], result.fixed, result.moving_on_fixed_grid, result.warped,
                      result.heatmap_before, result.heatmap, title)
        write_transform(result.transform, folder / OUTPUT_FILES["transform"])
        if result.inverse is not None:
            write_transform(result.inverse, folder / OUTPUT_FILES["inverse_transform"])
        for write in writes:
            write.result()
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    report = dict(result.report, inputs=inputs, outputs=names + [OUTPUT_FILES["report"]])
    peak = peak_rss_mb()  # now, after the outputs were written (writing can be the peak)
    if peak is not None:
        report["peak_ram_mb"] = result.report["peak_ram_mb"] = round(max(peak, report.get("peak_ram_mb") or 0.0), 1)
    (folder / OUTPUT_FILES["report"]).write_text(json.dumps(to_json(report), indent=2))


def to_json(value: Any) -> Any:
    """Make numpy scalars/arrays and paths JSON-serialisable."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
