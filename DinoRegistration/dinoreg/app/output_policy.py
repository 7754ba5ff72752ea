"""Which output folders the tool may write into, and how it replaces its own earlier results.

One rule for ``dinoreg register``/``demo``/``batch``/``apply``, the API and the Slicer panel's
"Keep files in" (light module: no numpy/torch/ITK, so the panel can import it):

- ``-o`` must be a new folder, an empty folder, or a folder this tool wrote before (recognised by
  its marker file :data:`MARKER`, or, for results written before the marker existed, a report.json
  with our schema). Anything else is refused with one line before any work.
- ``-o`` may never be (or contain) an input, the current folder or the home folder; an empty
  ``-o`` is refused.
- Replacing an earlier result removes only the file names this tool writes (:data:`OWN_FILES`);
  anything a user added to that folder stays.
- Hidden staging folders (``.NAME.tmp-*``) left by a killed run are removed by later runs, but
  only those holding our staging marker and only our own file names, and not while the process
  that made them still runs (nor when another machine made them: Dask workers share the folder).

Written by hand: no library knows which files this tool owns.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterable

from dinoreg.errors import InputError
from dinoreg.io.file_modes import honour_umask
from dinoreg.io.output_files import OUTPUT_FILES

#: marker file in every folder we write; its JSON names the kind of folder
MARKER = ".dinoreg-output.json"
#: marker inside a staging folder (holds the writing process id)
STAGING_MARKER = ".dinoreg-staging.json"
REGISTRATION, BATCH = "registration", "batch"
BATCH_FILES = ("summary.csv", "summary.md")
#: every file name a registration folder of ours may hold (ITK/temporary names start with '.tmp-')
OWN_FILES = frozenset(OUTPUT_FILES.values()) | {MARKER, STAGING_MARKER}
REPORT_KEYS = ("method", "similarity_before", "similarity_after")


def is_ancestor_or_same(folder: Path, path: Path) -> bool:
    """True when ``folder`` is ``path`` or one of its ancestors (both resolved)."""
    return folder == path or folder in path.parents


def resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def folder_kind(folder: Path) -> str | None:
    """REGISTRATION or BATCH when ``folder`` was written by this tool; None otherwise."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        if isinstance(marker, dict) and marker.get("tool") == "dinoreg":
            return marker.get("kind")
    except (OSError, ValueError):
        pass
    try:  # a result written before the marker existed: report.json with our schema
        report = json.loads((folder / OUTPUT_FILES["report"]).read_text())
        if isinstance(report, dict) and all(key in report for key in REPORT_KEYS) and "outputs" in report:
            return REGISTRATION
    except (OSError, ValueError):
        pass
    try:  # a batch folder written before the marker existed: our summary table
        with open(folder / "summary.csv", encoding="utf-8") as handle:
            if handle.readline().startswith("pair,status,reason,"):
                return BATCH
    except (OSError, UnicodeDecodeError):
        pass
    return None


def check_output_target(outdir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                        kind: str = REGISTRATION, option: str = "-o") -> Path:
    """Refuse (``InputError``, one line) an output folder the rules above forbid; return it absolute.

    ``inputs``: the files/folders the run reads (None entries ignored); ``kind``: what will be
    written (an existing folder of ours must be of the same kind).
    """
    if outdir is None or not os.fspath(outdir).strip():
        raise InputError(f"the output folder ({option}) is empty: give a new folder name, e.g. {option} results")
    absolute = Path(outdir).absolute()
    target = resolved(outdir)
    forbidden = [(resolved("~"), "your home folder")]
    try:
        forbidden.append((Path.cwd().resolve(), "the current folder"))
    except OSError:  # the current folder was deleted: nothing there to protect
        pass
    forbidden += [(resolved(path), f"the input '{path}'") for path in inputs if path]
    for place, name in forbidden:
        if is_ancestor_or_same(target, place):
            where = "is" if target == place else "contains"
            raise InputError(f"output folder '{absolute}' {where} {name}: choose a new folder for the outputs "
                             f"({option} results) so nothing else is replaced")
    if target.exists() and not target.is_dir():
        raise InputError(f"output '{absolute}' is a file, not a folder: choose another {option}")
    if target.is_dir():
        entries = [entry for entry in os.listdir(target)]
        if entries and folder_kind(target) != kind:
            raise InputError(f"output folder '{absolute}' already holds files not written by dinoreg "
                             f"({', '.join(sorted(entries)[:3])}{', ...' if len(entries) > 3 else ''}): "
                             f"choose a new or empty folder with {option}")
    check_writable(absolute)
    return absolute


def check_writable(outdir: Path) -> None:
    """Probe by creating and removing a temporary file in the nearest existing ancestor (permission
    bits say nothing for root or read-only file systems)."""
    ancestor = outdir
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        if not ancestor.is_dir():
            raise OSError
        handle, probe = tempfile.mkstemp(prefix=".dinoreg-probe-", dir=ancestor)
        os.close(handle)
        os.remove(probe)
    except OSError:
        raise InputError(f"output folder '{outdir}' is not writable: choose a folder you can write to with -o") from None


def write_marker(folder: Path, kind: str, name: str = MARKER) -> None:
    path = folder / name
    path.write_text(json.dumps({"tool": "dinoreg", "kind": kind, "pid": os.getpid(), "host": socket.gethostname()}))


def make_staging(outdir: Path) -> Path:
    """A hidden staging folder beside ``outdir`` (its parent created), marked as ours."""
    outdir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(outdir)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.tmp-", dir=outdir.parent))
    write_marker(staging, REGISTRATION, STAGING_MARKER)
    return staging


def is_own_name(name: str) -> bool:
    return name in OWN_FILES or name.startswith(".tmp-")


def remove_own_files(folder: Path) -> None:
    """Remove the files of ours in ``folder``, then the folder if that left it empty."""
    for entry in list(folder.iterdir()):
        if is_own_name(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass  # something not ours is left: keep it (and the folder)


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_staging(outdir: Path) -> None:
    """Remove ``.NAME.tmp-*`` staging folders of ours beside ``outdir`` left by killed runs."""
    if not outdir.parent.is_dir():
        return
    for stale in outdir.parent.glob(f".{outdir.name}.tmp-*"):
        try:
            marker = json.loads((stale / STAGING_MARKER).read_text())
        except (OSError, ValueError):
            continue  # not ours
        if not isinstance(marker, dict) or marker.get("tool") != "dinoreg":
            continue
        if marker.get("host", socket.gethostname()) != socket.gethostname() or process_alive(int(marker.get("pid", 0))):
            continue  # still being written here, or by a worker on another machine (a shared file system)
        if stale.is_dir() and not stale.is_symlink():
            remove_own_files(stale)


def publish(staging: Path, outdir: Path) -> None:
    """Move the complete ``staging`` folder's files to ``outdir``.

    A new ``outdir``: one rename (atomic). An existing one (empty, or ours): our old files are
    removed by name (report.json first, so the folder never looks complete with mixed files), the
    new ones moved in with report.json last; files we did not write stay.
    """
    (staging / STAGING_MARKER).unlink()
    write_marker(staging, REGISTRATION)
    honour_umask(staging, folder=True)
    if not outdir.exists():
        staging.rename(outdir)
        return
    report = OUTPUT_FILES["report"]
    old_report = outdir / report
    if old_report.is_file():
        old_report.unlink()
    new_names = {entry.name for entry in staging.iterdir()}
    for entry in list(outdir.iterdir()):
        if entry.name in OWN_FILES and entry.name not in new_names and entry.is_file() and not entry.is_symlink():
            entry.unlink()
    for name in sorted(new_names - {report}) + ([report] if report in new_names else []):
        os.replace(staging / name, outdir / name)
    staging.rmdir()


def check_output_file(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                      option: str = "-o") -> Path:
    """Refuse (one line) an output *file* that is empty, a folder, one of the inputs, or in a folder
    that does not exist or cannot be written; return it absolute."""
    if output is None or not os.fspath(output).strip():
        raise InputError(f"the output file ({option}) is empty: give a file name, e.g. {option} warped.nii.gz")
    absolute = Path(output).absolute()
    target = resolved(output)
    for path in inputs:
        if path and (target == resolved(path) or (target.exists() and Path(path).exists()
                                                  and os.path.samefile(target, path))):
            raise InputError(f"output '{absolute}' is the input '{path}': choose another output file with {option} "
                             "(inputs are never overwritten)")
    if target.is_dir():
        raise InputError(f"output '{absolute}' is a folder: give a file name with {option}, e.g. warped.nii.gz")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise InputError(f"cannot write '{absolute}': its folder does not exist or is not writable")
    return absolute
