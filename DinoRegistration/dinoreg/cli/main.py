"""The ``dinoreg`` command: register, demo, methods, evaluate, apply, weights.

Thin: parses arguments, reads files, calls the pipeline, writes outputs. Errors a user can fix are
printed as one line (``dinoreg: error: ...``) with exit status 2; a failed registration exits 1.
Progress goes to stderr as a bar (``--quiet`` silences it) or to stdout as JSON lines
(``--progress-json``, used by the Slicer module's background process).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from dinoreg.app.output_policy import check_output_file
from dinoreg.cli.arguments import parse_params
from dinoreg.cli.batch import add_batch_command
from dinoreg.cli.devices import command_devices
from dinoreg.cli.models import add_models_command, method_listing
from dinoreg.cli.train import add_training_commands
from dinoreg.cli.weights import add_weights_subcommand
from dinoreg.errors import Cancelled, InputError, RegistrationFailed
from dinoreg.progress import Progress, done_event, error_event, print_event, progress_event

if TYPE_CHECKING:  # names for hints only: these modules load lazily (torch, SimpleITK)
    from dinoreg.app.pipeline import RegistrationResult
    from dinoreg.core.volume import Volume
    from dinoreg.optim.affine import AffineStage

DEMO_FILES = ("MRBrainTumor1.nii.gz", "MRBrainTumor2.nii.gz")
#: iterations torch's OpenMP threads (libgomp) spin before sleeping, for one registration from a terminal:
#: about half a millisecond (libgomp's own default is 300000, passive waiting 0). Issue 17, measured on a
#: 2-core CPU: 1-3 s less per 1 mm brain pair than passive waiting (the convex search's many small
#: operations gain most), while a CPU shared with other work loses at most that half millisecond per wait
SPIN_COUNT = 20000


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    json_events = getattr(args, "progress_json", False)
    show_warnings_in_one_line()
    signal.signal(signal.SIGTERM, raise_cancelled)  # a terminated run cleans up like a cancelled one
    try:
        return args.func(args)
    except (InputError, RegistrationFailed, Cancelled) as error:
        status = 2 if isinstance(error, InputError) else (130 if isinstance(error, Cancelled) else 1)
        report_error(str(error), json_events)
        return status
    except MemoryError:
        report_error("out of memory: use a GPU with more memory, --device cpu, or --preset fast", json_events)
        return 1
    except KeyboardInterrupt:
        report_error("interrupted: nothing was written", json_events)
        return 130
    except OSError as error:  # writing failed (disk full, file-size limit, permissions): nothing was kept
        where = f" ({error.filename})" if error.filename else ""
        report_error(f"cannot write the outputs: {error.strerror or error}{where}: free disk space or choose "
                     "another output folder", json_events)
        return 1
    except RuntimeError as error:
        if "out of memory" in str(error).lower():
            report_error("out of GPU memory: retry with --device cpu or --preset fast", json_events)
            return 1
        raise


def show_warnings_in_one_line() -> None:
    """Python warnings (qform/sform, GPU fallback, ...) as ``dinoreg: warning: ...`` lines on stderr."""
    def show(message: Warning | str, category: type, filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        print(f"dinoreg: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def raise_cancelled(signum: int, frame: object) -> None:
    raise Cancelled("registration stopped (terminated): nothing was written")


def report_error(message: str, json_events: bool) -> None:
    if json_events:
        print_event(error_event(message))
    print(f"dinoreg: error: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinoreg", description="Deformable registration of 3D medical volumes "
                                     "with foundation-model (DINOv2/DINOv3) and MIND features.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    register = sub.add_parser("register", help="register MOVING to FIXED and write all outputs to OUTDIR")
    register.add_argument("fixed", help="fixed image (NIfTI, NRRD, MHA, MGZ or DICOM folder)")
    register.add_argument("moving", help="moving image, resampled onto the fixed grid")
    add_run_arguments(register)
    register.set_defaults(func=command_register)

    demo = sub.add_parser("demo", help="register the bundled demo pair (MRBrainTumor2 -> MRBrainTumor1)")
    demo.add_argument("-o", "--output", default="dinoreg-demo", help="output folder (default: ./dinoreg-demo)")
    add_run_arguments(demo, with_output=False)
    demo.set_defaults(func=command_demo)

    methods = sub.add_parser("methods", help="list the methods, whether each can run here and why not")
    methods.add_argument("--json", action="store_true", help="machine-readable output")
    methods.set_defaults(func=command_methods)

    devices = sub.add_parser("devices", help="PyTorch, GPUs with free memory, and engine packages missing or too old")
    devices.add_argument("--json", action="store_true", help="machine-readable output (used by the Slicer panel)")
    devices.set_defaults(func=command_devices)

    evaluate = sub.add_parser("evaluate", help="Dice, HD95, Jacobian statistics and landmark TRE of a result")
    evaluate.add_argument("--fixed-labels", help="label map on the fixed grid")
    evaluate.add_argument("--warped-labels", help="warped moving label map (e.g. OUTDIR/warped_labels.nii.gz)")
    evaluate.add_argument("--labels", help="comma-separated label ids to evaluate (default: all in both maps)")
    evaluate.add_argument("--jacobian", help="Jacobian determinant map (e.g. OUTDIR/jacobian.nii.gz)")
    evaluate.add_argument("--transform", help="transform.h5 (fixed -> moving) for landmark TRE")
    evaluate.add_argument("--fixed-landmarks", help="fixed landmarks: .csv (x,y,z LPS mm) or Slicer .fcsv/.mrk.json (frame read from the file; LPS if it names none, as in Slicer)")
    evaluate.add_argument("--moving-landmarks", help="corresponding moving landmarks, same formats")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.set_defaults(func=command_evaluate)

    apply = sub.add_parser("apply", help="resample an image or label map with a saved transform.h5")
    apply.add_argument("transform", help="transform.h5 written by 'dinoreg register' (fixed -> moving)")
    apply.add_argument("moving", help="image or label map on the moving side")
    apply.add_argument("-r", "--reference", required=True, help="fixed image giving the output grid")
    apply.add_argument("-o", "--output", required=True, help="output file (.nii.gz, .nrrd, ...)")
    apply.add_argument("--labels", action="store_true", help="nearest-neighbour interpolation for label maps")
    apply.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    apply.set_defaults(func=command_apply)

    add_weights_subcommand(sub)

    add_models_command(sub)

    add_training_commands(sub)

    add_batch_command(sub)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, with_output: bool = True) -> None:
    if with_output:
        parser.add_argument("-o", "--output", required=True, help="output folder: new, empty, or an earlier dinoreg result (only its files are replaced)")
    parser.add_argument("--method", default="auto", help="registration method (see 'dinoreg methods'); "
                        "auto = best available")
    parser.add_argument("--preset", help="parameter preset of the method (e.g. brain-mr, body-ct, fast)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override one method parameter (repeatable)")
    parser.add_argument("--no-affine", action="store_true", help="skip the affine pre-alignment stage")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute")
    parser.add_argument("--fixed-mask", help="binary mask on the fixed grid (registration focuses inside)")
    parser.add_argument("--moving-mask", help="binary mask on the moving grid")
    parser.add_argument("--moving-labels", help="label map on the moving grid, warped with nearest neighbour")
    parser.add_argument("--fixed-labels", help="label map on the fixed grid: Dice before/after goes in report.json")
    parser.add_argument("--fixed-landmarks", help="points on the fixed image (.fcsv, .mrk.json or x,y,z LPS .csv): "
                        "landmark distances before/after go in report.json")
    parser.add_argument("--moving-landmarks", help="the corresponding points on the moving image (same labels or order)")
    parser.add_argument("--no-inverse", action="store_true", help="do not compute inverse_transform.h5")
    parser.add_argument("--no-jacobian", action="store_true", help="do not compute jacobian.nii.gz")
    parser.add_argument("--scene", help="also write a Slicer scene bundle (.mrb); needs the slicer-core package")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--progress-json", action="store_true", help="progress as JSON lines on stdout")


# ---------------------------------------------------------------------------------------------- register

def command_register(args: argparse.Namespace) -> int:
    return run_registration(args, Path(args.fixed), Path(args.moving), Path(args.output))


def command_demo(args: argparse.Namespace) -> int:
    fixed, moving = demo_pair()
    status = run_registration(args, fixed, moving, Path(args.output))
    if status == 0 and not args.progress_json:
        outdir = Path(args.output).absolute()
        print(f"demo outputs in {outdir}:")
        for name in sorted(p.name for p in outdir.iterdir() if not p.name.startswith(".")):
            print(f"  {outdir / name}")
    return status


def demo_pair() -> tuple[Path, Path]:
    """The bundled demo images: in the repository's Resources/Demo, or installed under share/dinoreg."""
    here = Path(__file__).resolve().parents[1]
    candidates = [here.parent.parent / "Resources" / "Demo", Path(sys.prefix) / "share" / "dinoreg" / "demo"]
    for folder in candidates:
        if all((folder / name).is_file() for name in DEMO_FILES):
            return folder / DEMO_FILES[0], folder / DEMO_FILES[1]
    raise InputError(f"demo images not found in {', '.join(map(str, candidates))}: reinstall dinoreg from the repository")


def spin_briefly_while_waiting() -> None:
    """Before torch is loaded: short spin-waits (:data:`SPIN_COUNT`) instead of the engine's passive
    default (``dinoreg/__init__.py``), unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``
    (the Slicer module sets passive waiting for its background process, which shares the CPU with Slicer)."""
    from dinoreg import OPENMP_WAITING_SET_BY_USER  # the package's record, made before it set its default

    if OPENMP_WAITING_SET_BY_USER or "torch" in sys.modules:
        return
    os.environ.pop("OMP_WAIT_POLICY", None)
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)


def run_registration(args: argparse.Namespace, fixed_path: Path, moving_path: Path, outdir: Path) -> int:
    spin_briefly_while_waiting()
    from dinoreg.app.output_policy import check_output_target  # lazy: torch-free, as the next two
    from dinoreg.io.volumes import read_label_volume, read_mask, read_volume  # lazy: imports SimpleITK, numpy
    from dinoreg.optim.affine import AffineStage  # lazy: SimpleITK only

    outdir = check_output_target(outdir, run_inputs(args, fixed_path, moving_path))
    check_label_options(args)
    if args.scene:
        check_scene_support()
    params = parse_params(args.param)
    fixed = read_volume(fixed_path, "fixed image")
    moving = read_volume(moving_path, "moving image")
    fixed_mask = read_mask(args.fixed_mask, fixed, "fixed mask") if args.fixed_mask else None
    moving_mask = read_mask(args.moving_mask, moving, "moving mask") if args.moving_mask else None
    moving_labels = read_label_volume(args.moving_labels, moving, "moving label map") if args.moving_labels else None
    fixed_labels = read_label_volume(args.fixed_labels, fixed, "fixed label map") if args.fixed_labels else None
    landmarks = read_landmark_pair(getattr(args, "fixed_landmarks", None), getattr(args, "moving_landmarks", None))
    # The affine stage (SimpleITK, one thread) runs while this thread loads torch: the pipeline uses it
    # if the method takes an affine stage and stops it otherwise (issue 17: 0.6-1.3 s less per run)
    if args.no_affine:
        result = run_pipeline(args, params, fixed, moving, fixed_mask, moving_mask, moving_labels, fixed_labels, None)
    else:
        with AffineStage(fixed, moving, fixed_mask, moving_mask) as affine_stage:
            result = run_pipeline(args, params, fixed, moving, fixed_mask, moving_mask, moving_labels, fixed_labels,
                                  affine_stage)
    if landmarks is not None:
        result.report["landmarks"] = landmark_report(result, landmarks)
    from dinoreg.app.outputs import write_outputs  # lazy: imports torch (loaded by now)

    inputs = {"fixed": str(fixed_path), "moving": str(moving_path)}
    write_outputs(result, outdir, inputs)
    for warning in result.report.get("warnings") or ():
        print(f"dinoreg: warning: {warning}", file=sys.stderr)
    if args.scene:
        write_scene_bundle = scene_writer()

        write_scene_bundle(outdir, Path(args.scene), fixed_path, moving_path)
    emit_done(result.report, outdir, args)
    return 0


def run_pipeline(args: argparse.Namespace, params: dict[str, Any], fixed: Volume, moving: Volume,
                 fixed_mask: Volume | None, moving_mask: Volume | None, moving_labels: Volume | None,
                 fixed_labels: Volume | None, affine_stage: AffineStage | None) -> RegistrationResult:
    """Load the pipeline (torch) and register, with the progress display of ``args``."""
    from dinoreg.app.pipeline import RegistrationOptions, register  # lazy: imports torch

    options = RegistrationOptions(method=args.method, preset=args.preset, params=params,
                                  use_affine=not args.no_affine, device=args.device,
                                  compute_inverse=not args.no_inverse, compute_jacobian=not args.no_jacobian)
    with progress_display(args.quiet, args.progress_json) as progress:
        return register(fixed, moving, options, fixed_mask, moving_mask, moving_labels, fixed_labels, progress,
                        affine_stage=affine_stage)


def run_inputs(args: argparse.Namespace, fixed_path: Path, moving_path: Path) -> list[str | Path | None]:
    """Every file a run reads (the output folder may not be or contain one of them)."""
    return [fixed_path, moving_path, args.fixed_mask, args.moving_mask, args.moving_labels, args.fixed_labels,
            getattr(args, "fixed_landmarks", None), getattr(args, "moving_landmarks", None)]


def check_label_options(args: argparse.Namespace) -> None:
    """Dice before/after needs both label maps: one alone would be ignored without a word."""
    if args.fixed_labels and not args.moving_labels:
        raise InputError("--fixed-labels needs --moving-labels too (Dice compares the warped moving labels with "
                         "the fixed ones): add --moving-labels or drop --fixed-labels")


def read_landmark_pair(fixed_path: str | None, moving_path: str | None) -> tuple | None:
    """((labels, points), (labels, points)) of ``--fixed-landmarks`` / ``--moving-landmarks``, read and paired
    before the run so a bad file fails at once; None when neither is given."""
    if not fixed_path and not moving_path:
        return None
    if not (fixed_path and moving_path):
        raise InputError("landmark distances need both --fixed-landmarks and --moving-landmarks")
    from dinoreg.io.landmarks import pair_landmarks, read_labelled_landmarks  # lazy: imports numpy

    fixed, moving = read_labelled_landmarks(fixed_path), read_labelled_landmarks(moving_path)
    pair_landmarks(fixed[0], moving[0])
    return fixed, moving


def landmark_report(result: Any, landmarks: tuple) -> dict[str, Any]:
    """Landmark distances (mm) before and after registration: moving points mapped onto the fixed image by
    the inverse transform (moving -> fixed), as the Slicer panel's Check section does."""
    import numpy as np  # lazy: not needed to start this command
    import torch  # lazy: torch is not needed to start this command

    from dinoreg.io.landmarks import landmark_check  # lazy: imports numpy

    inverse = result.inverse if result.inverse is not None else result.transform.inverse()

    def moving_to_fixed(points: np.ndarray) -> np.ndarray:
        mapped = inverse.apply(torch.tensor(points, dtype=torch.float32).reshape(1, 1, -1, 3))
        return mapped.reshape(-1, 3).double().cpu().numpy()

    return landmark_check(landmarks[0], landmarks[1], moving_to_fixed,
                          "moving points mapped to fixed by the inverse transform; LPS mm")


#: entry-point group through which the Slicer side offers its scene writer (the engine never imports it)
SCENE_WRITERS = "dinoreg.scene_writers"


def scene_writer() -> Callable[..., None]:
    """``write_scene_bundle(outdir, mrb_path, fixed_path, moving_path)`` from the installed plug-in."""

    from importlib.metadata import entry_points  # lazy: 40 ms, only for --scene

    found = entry_points()
    group = found.select(group=SCENE_WRITERS) if hasattr(found, "select") else found.get(SCENE_WRITERS, [])
    for entry in group:
        if entry.name == "mrb":
            return entry.load()
    raise InputError("--scene needs the Slicer side of DinoRegistration installed (pip install 'dinoreg[scene]' from "
                     "the repository), or drop --scene")


def check_scene_support() -> None:
    if find_spec("slicer") is None:  # slicer-core, optional: looked up, never imported by the engine
        raise InputError("--scene needs Slicer's MRML libraries: pip install slicer-core, or drop --scene") from None
    scene_writer()


def emit_done(report: dict[str, Any], outdir: Path, args: argparse.Namespace) -> None:
    if args.progress_json:

        print_event(done_event(outdir=str(outdir)))
    elif not args.quiet:
        before, after = report["similarity_before"]["ncc"], report["similarity_after"]["ncc"]
        print(f"{report['method']}: NCC {before:.3f} -> {after:.3f} in {report['seconds_total']:.1f} s; "
              f"outputs in {outdir}", file=sys.stderr)


class progress_display:
    """Context manager giving a :class:`Progress` wired to a terminal bar or JSON lines."""

    def __init__(self, quiet: bool, json_lines: bool) -> None:
        self.quiet, self.json_lines = quiet, json_lines
        self.bar = None

    def __enter__(self):
        self.cancel_event = threading.Event()
        return Progress(self.callback(), self.cancel_event)

    def callback(self) -> Callable[[str, float, float | None], None] | None:
        if self.json_lines:
            return self.print_json
        if self.quiet:
            return None
        from tqdm import tqdm  # lazy: only when a terminal bar is shown

        self.bar = tqdm(total=100, file=sys.stderr, bar_format="{desc:<28} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        return self.update_bar

    @staticmethod
    def print_json(stage: str, fraction: float, seconds_left: float | None) -> None:

        print_event(progress_event(stage, fraction, seconds_left))

    def update_bar(self, stage: str, fraction: float, seconds_left: float | None) -> None:
        percent = round(100 * fraction)
        if stage == self.bar.desc and percent == self.bar.n:
            return
        self.bar.set_description_str(stage, refresh=False)
        self.bar.n = percent
        self.bar.refresh()

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- methods

def command_methods(args: argparse.Namespace) -> int:
    from dinoreg.methods.base import registry  # lazy: imports SimpleITK, numpy, torch

    rows = []
    for name, cls in sorted(registry().items()):
        method = cls()
        availability = method.availability()
        rows.append({"name": name, "summary": method.summary, "available": availability.ok,
                     "reason": availability.reason, "presets": sorted(method.presets),
                     "default_preset": method.default_preset, "parameters": method.parameters(),
                     **method_listing(method)})
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        state = "available" if row["available"] else f"unavailable: {row['reason']}"
        print(f"{row['name']:<16} {state}\n{'':<16} {row['summary']}")
        named = [p for p in row["presets"] if p != "default"]
        if named:
            print(f"{'':<16} presets (--preset): {', '.join(named)}")
    return 0


# ---------------------------------------------------------------------------------------------- evaluate / apply

def command_evaluate(args: argparse.Namespace) -> int:
    from dinoreg.report.evaluation import evaluate_outputs  # lazy: imports numpy, scipy

    results = evaluate_outputs(args.fixed_labels, args.warped_labels, args.labels, args.jacobian, args.transform,
                               args.fixed_landmarks, args.moving_landmarks)
    if not results:
        raise InputError("nothing to evaluate: give --fixed-labels and --warped-labels, --jacobian, "
                         "or --transform with --fixed-landmarks and --moving-landmarks")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            if not isinstance(value, dict):
                print(f"{key:<28} {value:.4f}" if isinstance(value, float) else f"{key:<28} {value}")
    return 0


def command_apply(args: argparse.Namespace) -> int:
    from dinoreg.io.itk_files import read_transform  # lazy: imports SimpleITK, numpy, torch
    from dinoreg.core.spatial import resolve_device  # lazy: imports SimpleITK, numpy, torch
    from dinoreg.core.transforms import warp_volume  # lazy: imports SimpleITK, numpy, torch
    from dinoreg.io.volumes import read_volume, write_volume  # lazy: imports SimpleITK, numpy


    output = check_output_file(args.output, (args.transform, args.moving, args.reference))
    transform = read_transform(args.transform)
    reference = read_volume(args.reference, "reference image")
    moving = read_volume(args.moving, "moving image")
    mode = "nearest" if args.labels else "linear"
    write_volume(warp_volume(moving, transform, reference.grid, mode, resolve_device(args.device)), output)
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
