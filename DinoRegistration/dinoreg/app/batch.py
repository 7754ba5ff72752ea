"""Many registrations from one CSV table: one output folder per pair, resumable, local or on Dask.

The table (``PAIRS.csv``) has a header with the columns ``fixed`` and ``moving`` and optionally
``fixed_mask``, ``moving_mask``, ``fixed_labels``, ``moving_labels``, ``method``, ``preset``;
relative paths are taken relative to the table's folder. Every pair gets the folder
``OUTDIR/<row number>_<fixed name>__<moving name>`` written by :func:`outputs.write_outputs`, which
renames a complete staging folder into place: **a pair is complete when its ``report.json``
exists**. A resumed batch skips complete pairs and redoes the rest (stale staging folders of a
killed run are removed). A failed pair is recorded with a one-line reason and never stops the others.

Workers: a local process pool by default (``workers`` processes, each with its share of the CPU
threads); with ``scheduler`` (a Dask distributed address such as ``tcp://host:8786``) the pairs are
submitted to that cluster instead, so a user adds machines rather than waiting. We schedule
nothing ourselves: ``concurrent.futures`` and ``dask.distributed`` do.

Outputs of the batch itself: ``summary.csv`` (one row per pair) and ``summary.md`` (the same table
plus the failures with their reasons), both written atomically.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from dinoreg.app.output_policy import BATCH, MARKER, check_output_target, write_marker
from dinoreg.app.output_policy import remove_stale_staging
from dinoreg.errors import Cancelled, InputError, RegistrationFailed
from dinoreg.io.output_files import OUTPUT_FILES
from dinoreg.io.file_modes import honour_umask

PATH_COLUMNS = ("fixed", "moving", "fixed_mask", "moving_mask", "fixed_labels", "moving_labels")
KNOWN_COLUMNS = PATH_COLUMNS + ("method", "preset")
#: how long to wait for a Dask scheduler before giving up
SCHEDULER_TIMEOUT = "20s"
SUMMARY_COLUMNS = ("pair", "status", "reason", "method", "seconds", "ncc_before", "ncc_after", "dice_before",
                   "dice_after", "sdlogj", "percent_nonpositive_jacobian", "peak_ram_mb", "fixed", "moving", "folder")


@dataclass
class BatchPair:
    """One row of the table: absolute paths (or None) and the method to run."""

    name: str
    fixed: str
    moving: str
    fixed_mask: str | None = None
    moving_mask: str | None = None
    fixed_labels: str | None = None
    moving_labels: str | None = None
    method: str = "auto"
    preset: str | None = None


@dataclass
class BatchSettings:
    """Options shared by every pair (a row's ``method``/``preset`` override these)."""

    method: str = "auto"
    preset: str | None = None
    params: dict[str, Any] | None = None
    use_affine: bool = True
    device: str = "auto"
    threads: int = 0  # torch threads per worker; 0 = leave torch's default


def read_pairs(csv_path: str | os.PathLike, default_method: str = "auto", default_preset: str | None = None) -> list[BatchPair]:
    """Parse and check the table (columns, non-empty paths); files are checked when a pair runs."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"pairs table '{csv_path}' does not exist or is not a file: give a CSV file with "
                         "columns fixed,moving")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            header = [name.strip() for name in (rows[0].keys() if rows else []) if name is not None]
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"pairs table '{csv_path}' is not a readable CSV file ({error}): "
                         "save it as UTF-8 CSV with a header line fixed,moving,...") from None
    if not rows:
        raise InputError(f"pairs table '{csv_path}' has no rows: add a header line fixed,moving and one line per pair")
    missing = [name for name in ("fixed", "moving") if name not in header]
    if missing:
        raise InputError(f"pairs table '{csv_path}' lacks the column(s) {', '.join(missing)}: its header must "
                         f"name fixed,moving (optional: {', '.join(KNOWN_COLUMNS[2:])})")
    unknown = [name for name in header if name and name not in KNOWN_COLUMNS]
    if unknown:
        raise InputError(f"pairs table '{csv_path}' has unknown column(s) {', '.join(unknown)}: "
                         f"allowed are {', '.join(KNOWN_COLUMNS)}")
    pairs = []
    for number, row in enumerate(rows, start=1):
        if None in row:  # csv.DictReader files the surplus fields of a long row under the key None
            raise InputError(f"pairs table '{csv_path}' row {number} has more fields than the header "
                             f"({len(header) + len(row[None])} for {len(header)} columns): remove the extra "
                             "commas or quote paths that contain a comma")
        values = {(key or "").strip(): (value or "").strip() for key, value in row.items() if key}
        if not values.get("fixed") or not values.get("moving"):
            raise InputError(f"pairs table '{csv_path}' row {number} has no fixed or moving path: fill both columns")
        paths = {column: str((csv_path.parent / values[column]).absolute()) if values.get(column) else None
                 for column in PATH_COLUMNS}
        name = f"{number:04d}_{file_stem(paths['fixed'])}__{file_stem(paths['moving'])}"
        pairs.append(BatchPair(name=name, **paths, method=values.get("method") or default_method,
                               preset=values.get("preset") or default_preset))
    return pairs


def file_stem(path: str) -> str:
    """A short folder-safe name of an image file ('sub-01_T1w.nii.gz' -> 'sub-01_T1w')."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".mgz", ".mgh"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:40] or "image"


def is_complete(folder: Path) -> bool:
    """A pair folder is complete when its report exists (written last, the folder renamed into place)."""
    return (folder / OUTPUT_FILES["report"]).is_file()


def pair_request(pair: BatchPair, settings: BatchSettings) -> dict[str, Any]:
    """What was asked of one pair: method, preset, parameters, affine stage and the input files
    (path, size, modification time). Stored in report.json; a resumed batch redoes a pair whose
    request differs from the one on disk."""
    def fingerprint(path: str | None) -> list[Any] | None:
        if not path:
            return None
        try:
            info = os.stat(path)
        except OSError:
            return [path]
        return [path, info.st_size, info.st_mtime_ns]

    return {"method": pair.method, "preset": pair.preset, "params": {k: str(v) for k, v in (settings.params or {}).items()},
            "use_affine": settings.use_affine, "inputs": {column: fingerprint(getattr(pair, column)) for column in PATH_COLUMNS}}


def is_done(folder: Path, pair: BatchPair, settings: BatchSettings) -> bool:
    """Complete, and made for the same request (method, preset, params, inputs) as now."""
    if not is_complete(folder):
        return False
    try:
        report = json.loads((folder / OUTPUT_FILES["report"]).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("request") == json.loads(json.dumps(pair_request(pair, settings)))


def remove_pair_staging(outdir: Path, pair: BatchPair) -> None:
    """Remove the staging folders a killed run of ``pair`` left (only ours: see output_policy); an
    incomplete pair folder of ours is replaced by the next write, one not ours fails that pair."""
    remove_stale_staging(outdir / pair.name)


# ---------------------------------------------------------------------------------------------- one pair

def run_pair(pair: BatchPair, outdir: str, settings: BatchSettings) -> dict[str, Any]:
    """Register one pair into ``outdir/pair.name``; returns its summary row. Never raises for a bad
    pair: the failure becomes ``status='failed'`` with a one-line ``reason`` and no output folder.

    Top-level and picklable: it runs in a pool process or on a Dask worker.
    """
    folder = Path(outdir) / pair.name
    try:
        if settings.threads > 0:
            import torch  # lazy: torch is not needed to start this command

            torch.set_num_threads(settings.threads)
        report = register_pair(pair, folder, settings)
        return summary_row(pair, folder, report)
    except MemoryError:
        return failed_row(pair, "out of memory: run fewer workers (--workers) or use --preset fast")
    except Exception as error:  # every failure of one pair is reported, never propagated
        return failed_row(pair, user_message(error))


def register_pair(pair: BatchPair, folder: Path, settings: BatchSettings) -> dict[str, Any]:
    from dinoreg.app.outputs import write_outputs  # lazy: imports SimpleITK, numpy, scipy, torch
    from dinoreg.app.pipeline import RegistrationOptions, register  # lazy: imports SimpleITK, numpy, scipy, torch
    from dinoreg.io.volumes import read_label_volume, read_mask, read_volume  # lazy: imports SimpleITK, numpy

    fixed = read_volume(pair.fixed, "fixed image")
    moving = read_volume(pair.moving, "moving image")
    fixed_mask = read_mask(pair.fixed_mask, fixed, "fixed mask") if pair.fixed_mask else None
    moving_mask = read_mask(pair.moving_mask, moving, "moving mask") if pair.moving_mask else None
    fixed_labels = read_label_volume(pair.fixed_labels, fixed, "fixed label map") if pair.fixed_labels else None
    moving_labels = read_label_volume(pair.moving_labels, moving, "moving label map") if pair.moving_labels else None
    options = RegistrationOptions(method=pair.method, preset=pair.preset, params=dict(settings.params or {}),
                                  use_affine=settings.use_affine, device=settings.device)
    result = register(fixed, moving, options, fixed_mask, moving_mask, moving_labels, fixed_labels)
    result.report["request"] = pair_request(pair, settings)
    write_outputs(result, folder, {"fixed": pair.fixed, "moving": pair.moving})
    return result.report


def user_message(error: BaseException) -> str:
    """The first line of an error message, with its type when it is not one of ours."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, (InputError, RegistrationFailed, Cancelled)):
        return text[:300]
    return f"{type(error).__name__}: {text}"[:300]


def summary_row(pair: BatchPair, folder: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Summary values of a finished pair, from its report (as written to report.json)."""
    labels = report.get("labels") or {}
    jacobian = report.get("jacobian") or {}
    return {"pair": pair.name, "status": "ok", "reason": "", "method": report.get("method", ""),
            "seconds": report.get("seconds_total"),
            "ncc_before": (report.get("similarity_before") or {}).get("ncc"),
            "ncc_after": (report.get("similarity_after") or {}).get("ncc"),
            "dice_before": labels.get("dice_mean_before"), "dice_after": labels.get("dice_mean_after"),
            "sdlogj": jacobian.get("sdlogj"), "percent_nonpositive_jacobian": jacobian.get("percent_nonpositive"),
            "peak_ram_mb": report.get("peak_ram_mb"), "fixed": pair.fixed, "moving": pair.moving, "folder": str(folder),
            **({"status": "ok, with warnings", "reason": "; ".join(report["warnings"])[:300]}
               if report.get("warnings") else {})}


def failed_row(pair: BatchPair, reason: str) -> dict[str, Any]:
    row = {column: None for column in SUMMARY_COLUMNS}
    row.update(pair=pair.name, status="failed", reason=reason, method=pair.method, fixed=pair.fixed,
               moving=pair.moving, folder="")
    return row


def completed_row(pair: BatchPair, folder: Path) -> dict[str, Any]:
    """The summary row of a pair finished by an earlier run (read back from its report.json)."""
    try:
        report = json.loads((folder / OUTPUT_FILES["report"]).read_text())
    except (OSError, ValueError) as error:
        return failed_row(pair, f"its report.json cannot be read ({error}): delete {folder} and rerun")
    row = summary_row(pair, folder, report)
    row["status"] = "ok (earlier run)"
    return row


# ---------------------------------------------------------------------------------------------- the batch

def run_batch(pairs: list[BatchPair], outdir: str | os.PathLike, settings: BatchSettings | None = None,
              workers: int = 1, scheduler: str | None = None,
              on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run every pair not yet complete in ``outdir``; write ``summary.csv`` and ``summary.md``.

    ``workers``: local processes (1 = in this process); ``scheduler``: a Dask distributed
    scheduler address (then ``workers`` is ignored). ``on_result`` is called with each pair's row
    as it finishes (a progress bar). Returns the rows in table order.
    """
    settings = settings or BatchSettings()
    outdir = Path(outdir).absolute()
    inputs = [getattr(pair, column) for pair in pairs for column in PATH_COLUMNS]
    check_output_target(outdir, inputs, kind=BATCH)
    outdir.mkdir(parents=True, exist_ok=True)
    if not (outdir / MARKER).is_file():
        write_marker(outdir, BATCH)
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for pair in pairs:
        if is_done(outdir / pair.name, pair, settings):
            rows[pair.name] = completed_row(pair, outdir / pair.name)
            if on_result:
                on_result(rows[pair.name])
        else:
            remove_pair_staging(outdir, pair)
            todo.append(pair)
    try:
        if scheduler:
            results = run_on_dask(todo, outdir, settings, scheduler)
        elif workers > 1 and len(todo) > 1:
            results = run_in_process_pool(todo, outdir, settings, workers)
        else:
            results = (run_pair(pair, str(outdir), settings) for pair in todo)
        for row in results:
            rows[row["pair"]] = row
            if on_result:
                on_result(row)
    finally:  # a summary of what is done, also after Ctrl-C
        ordered = [rows.get(pair.name) or failed_row(pair, "not run (the batch was stopped)") for pair in pairs]
        write_summary(ordered, outdir)
    return ordered


def run_in_process_pool(pairs: list[BatchPair], outdir: Path, settings: BatchSettings,
                        workers: int) -> Iterable[dict[str, Any]]:
    """Local worker processes (``spawn``: safe with torch threads); a crashed worker fails only its pair."""
    if settings.threads <= 0:
        settings = BatchSettings(**{**asdict(settings), "threads": max(1, (os.cpu_count() or 1) // workers)})
    remaining = list(pairs)
    while remaining:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_pair, pair, str(outdir), settings): pair for pair in remaining}
            remaining = []
            broken = False
            try:
                for future in as_completed(futures):
                    pair = futures[future]
                    try:
                        yield future.result()
                    except BrokenProcessPool:
                        broken = True
                        remaining.append(pair)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            if broken:
                # A worker died (killed, out of memory): the pairs it held cannot be told apart from
                # the ones merely queued, so each is retried alone once; a second death fails it.
                yield from retry_alone(remaining, outdir, settings)
                remaining = []


def retry_alone(pairs: list[BatchPair], outdir: Path, settings: BatchSettings) -> Iterable[dict[str, Any]]:
    for pair in pairs:
        remove_pair_staging(outdir, pair)
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                yield pool.submit(run_pair, pair, str(outdir), settings).result()
            except BrokenProcessPool:
                remove_pair_staging(outdir, pair)
                yield failed_row(pair, "the worker process died (killed or out of memory): rerun with fewer workers")


def run_on_dask(pairs: list[BatchPair], outdir: Path, settings: BatchSettings, scheduler: str) -> Iterable[dict[str, Any]]:
    """Submit every pair to a Dask distributed scheduler; rows come back as pairs finish.

    The output folder must be visible to the workers at the same path (a shared file system).
    """
    try:
        from distributed import Client, as_completed  # optional: Dask cluster runs only
    except ImportError:
        raise InputError("--scheduler needs Dask distributed: pip install 'dask[distributed]'") from None
    try:
        client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
    except (OSError, TimeoutError) as error:
        raise InputError(f"cannot reach the Dask scheduler '{scheduler}' ({user_message(error)}): "
                         "check the address (tcp://host:8786) and that the scheduler runs") from None
    try:
        futures = [client.submit(run_pair, pair, str(outdir), settings, key=f"dinoreg-{pair.name}-{os.getpid()}",
                                 pure=False, retries=0) for pair in pairs]
        by_key = {future.key: pair for future, pair in zip(futures, pairs)}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as error:  # the worker died or the task was lost
                yield failed_row(by_key[future.key], f"Dask task failed: {user_message(error)}")
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------- summary

def write_summary(rows: list[dict[str, Any]], outdir: Path) -> None:
    """``summary.csv`` and ``summary.md`` in ``outdir``, each written atomically."""
    def write_csv(handle: Any) -> None:
        writer = csv.DictWriter(handle, fieldnames=list(SUMMARY_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: format_value(row.get(key)) for key in SUMMARY_COLUMNS})

    write_atomically(outdir / "summary.csv", write_csv)
    write_atomically(outdir / "summary.md", lambda handle: handle.write(markdown_summary(rows)))


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_summary(rows: list[dict[str, Any]]) -> str:
    ok = [row for row in rows if row["status"].startswith("ok")]
    failed = [row for row in rows if not row["status"].startswith("ok")]
    shown = ("pair", "status", "method", "seconds", "ncc_before", "ncc_after", "dice_before", "dice_after",
             "sdlogj", "percent_nonpositive_jacobian")
    lines = ["# dinoreg batch summary", "", f"{len(ok)} of {len(rows)} pairs registered, {len(failed)} failed.", "",
             "| " + " | ".join(shown) + " |", "|" + " --- |" * len(shown)]
    lines += ["| " + " | ".join(format_value(row.get(key)) or "-" for key in shown) + " |" for row in rows]
    if failed:
        lines += ["", "## Failures", ""] + [f"- `{row['pair']}`: {row['reason']}" for row in failed]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(handle, "w", newline="", encoding="utf-8") as stream:
            write(stream)
        honour_umask(temporary)  # mkstemp made it 0600
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
