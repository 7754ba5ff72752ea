"""Run ONE registration method on one pair of image files and export its ITK transform.

Started by ``compare.py`` as its own process per (method, pair), so wall time and peak memory
belong to that method alone. Writes the transform (fixed -> moving points, LPS mm, ITK ``.h5``)
and a small JSON with the seconds of the registration itself (imports and file reading excluded)
and the peak GPU memory. Scoring is NOT done here: ``scorer.py`` reads the exported file.

    python benchmarks/run_method.py METHOD FIXED MOVING OUT.h5 RESULT.json [--threads N] [--device cpu]

METHOD: ``ours:<engine method>[@preset]`` (identity, affine, mind-zeroshot, ...), ``ants-syn``,
``elastix``, ``sitk-affine``, ``sitk-demons``, ``fireants``, ``unigradicon``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- ours

def run_ours(name: str, fixed: str, moving: str, out: str, device: str) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "DinoRegistration"))
    from dinoreg.io.volumes import read_volume
    from dinoreg.io.itk_files import write_transform
    from dinoreg.app.pipeline import RegistrationOptions, register

    method, _, preset = name.partition("@")
    fixed_volume, moving_volume = read_volume(fixed, "fixed image"), read_volume(moving, "moving image")
    options = RegistrationOptions(method=method, preset=preset or None, device=device, compute_inverse=False,
                                  compute_jacobian=False)
    started = time.perf_counter()
    result = register(fixed_volume, moving_volume, options)
    seconds = time.perf_counter() - started
    write_transform(result.transform, out)
    return {"seconds": seconds, "peak_gpu_mb": result.report.get("peak_gpu_mb")}


# ---------------------------------------------------------------------------------------------- anchors

def displacement_image_to_h5(field: Any, out: str) -> None:
    """A SimpleITK vector image of displacements (fixed grid, LPS mm) -> DisplacementFieldTransform file."""
    import SimpleITK as sitk

    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    sitk.WriteTransform(sitk.DisplacementFieldTransform(field), out)


def run_ants_syn(fixed: str, moving: str, out: str, device: str) -> dict[str, Any]:
    """``ants.registration(type_of_transform='SyN')`` with antspyx defaults; the affine and the warp
    are composed by ANTs itself into one displacement field (``apply_transforms(compose=...)``)."""
    import ants
    import SimpleITK as sitk

    fixed_image, moving_image = ants.image_read(fixed), ants.image_read(moving)
    started = time.perf_counter()
    result = ants.registration(fixed_image, moving_image, type_of_transform="SyN")
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        composed = ants.apply_transforms(fixed_image, moving_image, result["fwdtransforms"],
                                         compose=os.path.join(folder, "composed"))
        displacement_image_to_h5(sitk.ReadImage(composed), out)
    return {"seconds": seconds}


def run_elastix(fixed: str, moving: str, out: str, device: str) -> dict[str, Any]:
    """itk-elastix default affine + B-spline parameter maps, centre-of-gravity initialisation."""
    import itk
    import numpy as np
    import SimpleITK as sitk

    fixed_image, moving_image = itk.imread(fixed, itk.F), itk.imread(moving, itk.F)
    parameters = itk.ParameterObject.New()
    affine = parameters.GetDefaultParameterMap("affine")
    affine["AutomaticTransformInitialization"] = ["true"]
    affine["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
    parameters.AddParameterMap(affine)
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        _, result = itk.elastix_registration_method(fixed_image, moving_image, parameter_object=parameters,
                                                    log_to_console=False, output_directory=folder)
    seconds = time.perf_counter() - started
    field = itk.transformix_deformation_field(moving_image, result)
    image = sitk.GetImageFromArray(np.asarray(itk.array_from_image(field), dtype=np.float64), isVector=True)
    image.SetOrigin(tuple(field.GetOrigin()))
    image.SetSpacing(tuple(field.GetSpacing()))
    image.SetDirection(tuple(np.asarray(field.GetDirection()).ravel()))
    displacement_image_to_h5(image, out)
    return {"seconds": seconds}


def sitk_affine(fixed_image: Any, moving_image: Any) -> Any:
    """SimpleITK's textbook affine: moments initialisation, Mattes MI, 3 levels, regular-step gradient descent."""
    import SimpleITK as sitk

    initial = sitk.CenteredTransformInitializer(fixed_image, moving_image, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.1, 42)  # a fixed seed (0 would mean the wall clock)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200,
                                                    gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed_image, moving_image)


def run_sitk_affine(fixed: str, moving: str, out: str, device: str) -> dict[str, Any]:
    import SimpleITK as sitk

    fixed_image = sitk.ReadImage(fixed, sitk.sitkFloat32)
    moving_image = sitk.ReadImage(moving, sitk.sitkFloat32)
    started = time.perf_counter()
    transform = sitk_affine(fixed_image, moving_image)
    seconds = time.perf_counter() - started
    sitk.WriteTransform(transform, out)
    return {"seconds": seconds}


def run_sitk_demons(fixed: str, moving: str, out: str, device: str) -> dict[str, Any]:
    """The SimpleITK affine above, then fast symmetric-forces demons (histogram-matched, 3 levels)."""
    import SimpleITK as sitk

    fixed_image = sitk.ReadImage(fixed, sitk.sitkFloat32)
    moving_image = sitk.ReadImage(moving, sitk.sitkFloat32)
    started = time.perf_counter()
    affine = sitk_affine(fixed_image, moving_image)
    aligned = sitk.Resample(moving_image, fixed_image, affine, sitk.sitkLinear, 0.0)
    aligned = sitk.HistogramMatching(aligned, fixed_image, 256, 7, True)
    field = None
    for shrink in (4, 2, 1):
        fixed_level = sitk.Shrink(fixed_image, [shrink] * 3) if shrink > 1 else fixed_image
        moving_level = sitk.Shrink(aligned, [shrink] * 3) if shrink > 1 else aligned
        if field is not None:
            field = sitk.Resample(field, fixed_level, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(50)
        demons.SetStandardDeviations(1.0)
        field = demons.Execute(fixed_level, moving_level, field) if field is not None else demons.Execute(fixed_level, moving_level)
    seconds = time.perf_counter() - started
    composite = sitk.CompositeTransform(affine)
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))  # x -> A(x + u(x))
    sitk.WriteTransform(composite, out)
    return {"seconds": seconds}


def run_fireants(fixed: str, moving: str, out: str, device: str) -> dict[str, Any]:
    """FireANTs the way its users run it on unaligned inputs (its template pipeline,
    ``fireants/scripts/template``): moments matching (``MomentsRegistration``, scale 4, second-order
    moments: centre of mass + principal axes, best of the axis flips by CC), then its affine stage
    initialised from the moments, then greedy deformable with its OASIS example's settings. CPU
    unless cuda. Before issue 17 the affine started from the centres of the image frames only: on
    the real pair (the MNE scan keeps its scanner coordinates) it never found the brain (Dice 0.29)."""
    import SimpleITK as sitk
    import torch
    from fireants.io import BatchedImages, Image
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration
    from fireants.registration.moments import MomentsRegistration

    device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    fixed_image = BatchedImages([Image.load_file(fixed, device=device)])
    moving_image = BatchedImages([Image.load_file(moving, device=device)])
    # The deformable stage runs its OASIS example's levels down to the image's own resolution (the
    # anchor must be FireANTs as published: issue 17); slow on a 2-core CPU (the 1 mm level is about
    # 17 s per iteration under load). The affine stage stops at half resolution: run down to 1 mm
    # (50 iterations) it drifted on oasis<-mne (2026-12-03: local CC at 4x went from -0.911 to -0.841,
    # final Dice 0.416 instead of 0.654); FireANTs' own template config gives that level only 25
    # iterations. DINOREG_FIREANTS_SCALES (e.g. "4,2") leaves deformable levels out for quick looks only.
    scales, iterations = [4, 2, 1], [200, 100, 50]
    if os.environ.get("DINOREG_FIREANTS_SCALES"):
        scales = [int(x) for x in os.environ["DINOREG_FIREANTS_SCALES"].split(",")]
        iterations = [{4: 200, 2: 100, 1: 50}.get(x, 100) for x in scales]
    affine_scales = [x for x in scales if x >= 2] or scales
    affine_iterations = [{4: 200, 2: 100, 1: 50}.get(x, 100) for x in affine_scales]
    started = time.perf_counter()
    moments = MomentsRegistration(4, fixed_image, moving_image, moments=2, orientation="rot", transl_mode="com",
                                  loss_type="cc")
    moments.optimize()
    affine = AffineRegistration(affine_scales, affine_iterations, fixed_image, moving_image, loss_type="cc",
                                optimizer="Adam", optimizer_lr=3e-3, init_rigid=moments.get_affine_init())
    affine.optimize()
    deformable = GreedyRegistration(scales, iterations, fixed_image, moving_image, loss_type="cc",
                                    deformation_type="compositive", optimizer="adam", optimizer_lr=0.5,
                                    cc_kernel_size=5, smooth_grad_sigma=1, smooth_warp_sigma=0.5,
                                    init_affine=affine.get_affine_matrix().detach())
    deformable.optimize()
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        warp = os.path.join(folder, "warp.nii.gz")
        deformable.save_as_ants_transforms(warp)
        displacement_image_to_h5(sitk.ReadImage(warp), out)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"seconds": seconds, "peak_gpu_mb": peak}


def peak_ram_mb() -> float | None:
    """This process's peak resident memory in MB: VmHWM, which (unlike ru_maxrss) does not inherit
    the parent's high-water mark through fork/exec; ru_maxrss where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    except ImportError:
        return None


ANCHORS = {"ants-syn": run_ants_syn, "elastix": run_elastix, "sitk-affine": run_sitk_affine,
           "sitk-demons": run_sitk_demons, "fireants": run_fireants}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method")
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("out")
    parser.add_argument("result")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.method.startswith("ours:"):
        record = run_ours(args.method[len("ours:"):], args.fixed, args.moving, args.out, args.device)
    else:
        record = ANCHORS[args.method](args.fixed, args.moving, args.out, args.device)
    record["peak_ram_mb"] = peak_ram_mb()
    Path(args.result).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
