"""Our :class:`Transform` <-> ITK transforms and ``.h5`` files (read by ITK, ANTs, Elastix, Slicer).

Conventions: an exported transform maps FIXED physical points to MOVING physical points (LPS mm),
i.e. ITK's resampling transform and Slicer's "FromParent". Dense fields become
``DisplacementFieldTransform`` on the fixed grid with LPS mm vectors; affines ``AffineTransform``.

ITK's ``CompositeTransform`` applies the LAST added transform FIRST (checked in the tests), so our
steps, which apply in list order, are added in reverse.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dinoreg.core.affine_map import AffineMap
from dinoreg.core.transforms import DenseField, Transform
from dinoreg.core.volume import Grid, copy_geometry_to_sitk
from dinoreg.errors import InputError
from dinoreg.io.file_modes import honour_umask


def affine_to_sitk(affine: AffineMap) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in affine.matrix.ravel()))
    transform.SetTranslation(tuple(float(v) for v in affine.translation))
    return transform


def field_to_sitk(field: DenseField) -> sitk.DisplacementFieldTransform:
    image = sitk.GetImageFromArray(field.displacement.astype(np.float64), isVector=True)
    copy_geometry_to_sitk(field.grid, image)
    return sitk.DisplacementFieldTransform(image)


def to_sitk_transform(transform: Transform) -> sitk.CompositeTransform:
    """ITK composite transform equal to ``transform`` (fixed -> moving points)."""
    composite = sitk.CompositeTransform(3)
    for step in reversed(transform.steps):
        composite.AddTransform(affine_to_sitk(step) if isinstance(step, AffineMap) else field_to_sitk(step))
    return composite


def from_sitk_transform(itk_transform: sitk.Transform) -> Transform:
    """Our chain from an ITK transform: affine-like and displacement-field parts are supported."""
    parts = flatten_sitk(itk_transform)
    steps = [sitk_part_to_step(part) for part in reversed(parts)]
    return Transform(steps)


def flatten_sitk(itk_transform: sitk.Transform) -> list[sitk.Transform]:
    """The parts of a (possibly nested) composite, in ITK's stored order (last applied first)."""
    kind = itk_transform.GetTransformEnum() if hasattr(itk_transform, "GetTransformEnum") else None
    if kind == sitk.sitkComposite:
        composite = sitk.CompositeTransform(itk_transform)
        parts: list[sitk.Transform] = []
        for index in range(composite.GetNumberOfTransforms()):
            parts.extend(flatten_sitk(composite.GetNthTransform(index)))
        return parts
    return [itk_transform]


def sitk_part_to_step(part: sitk.Transform) -> AffineMap | DenseField:
    if part.GetTransformEnum() == sitk.sitkDisplacementField:
        field_image = sitk.DisplacementFieldTransform(part).GetDisplacementField()
        return DenseField(sitk.GetArrayFromImage(field_image).astype(np.float32), Grid.from_sitk(field_image))
    if part.GetTransformEnum() == sitk.sitkIdentity:
        return AffineMap()
    if part.IsLinear():
        return AffineMap.from_sitk(part)
    raise InputError(f"transform part {part.GetName()} is not supported: use affine or displacement-field transforms")


def write_transform(transform: Transform, path: str | os.PathLike) -> Path:
    """Write an ITK ``.h5``/``.tfm`` file atomically (temporary name, then rename)."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix or ".h5", dir=path.parent)
    os.close(handle)
    try:
        try:
            sitk.WriteTransform(to_sitk_transform(transform), temporary)
        except RuntimeError as error:  # ITK reports a full disk or a file-size limit this way
            raise OSError(errno.EIO, f"ITK could not write the file ({str(error).strip().splitlines()[-1][:100]})",
                          str(path)) from None
        honour_umask(temporary)  # mkstemp made it 0600
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def read_transform(path: str | os.PathLike) -> Transform:
    """Read an ITK transform file (as written by :func:`write_transform`, ANTs or Slicer)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"transform '{path}' does not exist: check the path")
    try:
        return from_sitk_transform(sitk.ReadTransform(str(path)))
    except RuntimeError as error:
        raise InputError(f"transform '{path}' could not be read ({str(error).strip().splitlines()[0][:100]}): "
                         "give an ITK .h5/.tfm/.txt transform file") from None
