"""Writing a registration's results to a folder that appears complete or not at all.

Everything is written into a hidden temporary folder beside the target, then renamed into place;
an older folder of the same name is replaced only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dinoreg.app.pipeline import RegistrationResult
from dinoreg.core.itk_files import write_transform
from dinoreg.errors import InputError
from dinoreg.io.output_files import OUTPUT_FILES
from dinoreg.io.volumes import write_volume
from dinoreg.report.preview import write_preview


def check_output_folder(outdir: str | os.PathLike) -> Path:
    """Fail early (before any work) if ``outdir`` cannot be created or written.

    Probes by creating and removing a temporary file in the nearest existing ancestor, which is
    the only reliable test (permission bits say nothing for root or read-only file systems).
    """
    outdir = Path(outdir).absolute()
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"output '{outdir}' is a file, not a folder: choose another -o")
    ancestor = outdir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    probe_folder = outdir if outdir.exists() else ancestor
    try:
        if not probe_folder.is_dir():
            raise OSError
        handle, probe = tempfile.mkstemp(prefix=".dinoreg-probe-", dir=probe_folder)
        os.close(handle)
        os.remove(probe)
    except OSError:
        raise InputError(f"output folder '{outdir}' is not writable: choose a folder you can write to with -o") from None
    return outdir


def write_outputs(result: RegistrationResult, outdir: str | os.PathLike, inputs: dict[str, str] | None = None) -> Path:
    """Write every output file of ``result`` into ``outdir`` (atomically); returns its path."""
    outdir = check_output_folder(outdir)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.tmp-", dir=outdir.parent))
    try:
        write_files(result, staging, inputs or {})
        replace_folder(staging, outdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return outdir


def write_files(result: RegistrationResult, folder: Path, inputs: dict[str, str]) -> None:
    volumes = {"warped": result.warped, "heatmap": result.heatmap, "heatmap_before": result.heatmap_before,
               "jacobian": result.jacobian, "warped_labels": result.warped_labels}
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
    report = dict(result.report, inputs=inputs, outputs=sorted(p.name for p in folder.iterdir()) + [OUTPUT_FILES["report"]])
    (folder / OUTPUT_FILES["report"]).write_text(json.dumps(to_json(report), indent=2))


def replace_folder(staging: Path, outdir: Path) -> None:
    """Move ``staging`` to ``outdir``, replacing an existing folder only once the new one is complete."""
    if outdir.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.old-", dir=outdir.parent))
        backup.rmdir()
        outdir.rename(backup)
        staging.rename(outdir)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(outdir)
    outdir.chmod(0o755)


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
