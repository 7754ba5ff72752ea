"""Reading and writing volumes with full geometry, and checking that inputs are usable.

Formats: NIfTI, NRRD, MHA/MHD and a DICOM series folder through SimpleITK; FreeSurfer .mgz/.mgh
through nibabel (SimpleITK has no MGH reader). Every reader returns a :class:`Volume` in LPS mm.
Every writer writes to a temporary name and renames, so a file appears complete or not at all.
"""

from __future__ import annotations

import errno
import gzip
import os
import re
import tempfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dinoreg.core.volume import Grid, Volume
from dinoreg.errors import InputError
from dinoreg.io.file_checks import check_header, check_input_file, check_metaimage_size
from dinoreg.io.file_modes import honour_umask

MGH_SUFFIXES = (".mgz", ".mgh")


def read_volume(path: str | os.PathLike, role: str = "image", is_image: bool = True) -> Volume:
    """Read a 3D scalar volume (file or DICOM folder). ``role`` names it in error messages.

    ``is_image`` also rejects constant and non-finite volumes (no use as registration inputs);
    label maps and derived maps (Jacobian) are read with ``is_image=False``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{role} '{path}' does not exist: check the path")
    try:
        if path.is_dir():
            image = read_dicom_series(path, role)
        elif path.name.lower().endswith(MGH_SUFFIXES):
            return check_scalar_3d(read_mgh(path), role, path, is_image)
        else:
            sitk.ProcessObject.SetGlobalWarningDisplay(False)  # our checks say what matters, in one line
            try:  # the header first: the budget is checked before any voxel is read (also by the NaN check)
                check_header(path, role, is_image)
            except RuntimeError:
                check_input_file(path, role, is_image)  # a truncated or corrupted file says so
                raise
            check_input_file(path, role, is_image)
            image = sitk.ReadImage(str(path))
    except InputError:
        raise
    except (RuntimeError, OSError, ValueError) as error:
        raise unreadable(path, role, error) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{role} '{path}' has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(colour or vector image): convert it to a single-channel greyscale volume")
    if image.GetDimension() != 3:
        raise InputError(f"{role} '{path}' is {image.GetDimension()}D: a 3D volume is needed "
                         "(for 4D series, extract one time point first)")
    return check_scalar_3d(Volume.from_sitk(image), role, path, is_image)


def unreadable(path: Path, role: str, error: BaseException) -> InputError:
    """One line for a file no reader understands: ITK's reason without its source paths, and the
    formats to use (not suggesting the one the file is named as)."""
    text = str(error).strip()
    reason = next((line.split("ERROR:", 1)[-1].strip() for line in text.splitlines() if "ERROR:" in line), "")
    reason = re.sub(r"(/[^\s:]+)+\.(cxx|hxx|h|cpp|txx)(:\d+)?:?", "", reason or (text.splitlines()[0] if text else ""))
    reason = re.sub(r"\s+", " ", reason).strip(" :") or type(error).__name__
    name = path.name.lower()
    formats = [(".nii", "NIfTI"), (".nrrd", "NRRD"), (".mha", "MHA/MHD"), (".mgz", "MGZ")]
    named_as = next((label for suffix, label in formats if suffix in name or (suffix == ".mha" and ".mhd" in name)), None)
    others = [label for _, label in formats if label != named_as] + ["a DICOM series folder"]
    advice = (f"it is named as {named_as} but is not a readable {named_as} file: check that it was copied "
              f"completely, or convert it to {', '.join(others[:-1])} or {others[-1]}") if named_as else \
        f"use {', '.join(others[:-1])} or {others[-1]}"
    return InputError(f"{role} '{path}' could not be read ({reason[:100]}): {advice}")


def check_file_complete(path: Path, role: str) -> None:
    """Reject truncated files, which ITK's NIfTI and MetaImage readers silently fill with zeros.

    Checks the gzip stream of ``.gz`` files (to its end-of-stream marker and CRC), the data size
    of NIfTI files against their header, and of uncompressed single-file MetaImage (``.mha``).
    """
    name = path.name.lower()
    data_bytes = None
    try:
        if name.endswith(".gz"):
            data_bytes = 0
            with gzip.open(path, "rb") as stream:
                while True:
                    chunk = stream.read(1 << 24)
                    if not chunk:
                        break
                    data_bytes += len(chunk)
        if name.endswith((".nii", ".nii.gz")):
            check_nifti_size(path, data_bytes if data_bytes is not None else path.stat().st_size, role)
        elif name.endswith(".mha"):
            check_metaimage_size(path, role)
    except gzip.BadGzipFile:
        return  # not gzip at all: the reader says what is wrong with it
    except (EOFError, zlib.error) as error:
        raise InputError(f"{role} '{path}' is truncated or corrupted ({error}): copy or download it again") from None


def check_nifti_size(path: Path, file_bytes: int, role: str) -> None:
    import nibabel  # lazy: only for NIfTI/MGZ header checks

    try:
        header = nibabel.load(str(path)).header
    except Exception:
        return  # not a NIfTI nibabel understands: SimpleITK reports what is wrong
    needed = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if file_bytes < needed:
        raise InputError(f"{role} '{path}' is truncated ({file_bytes} of {needed} bytes): copy or download it again")


def read_dicom_series(folder: Path, role: str) -> sitk.Image:
    """Read the largest DICOM series in ``folder``."""
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(f"{role} folder '{folder}' contains no DICOM series: point to a DICOM folder or an image file")
    files = max((reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids), key=len)
    reader.SetFileNames(files)
    return reader.Execute()


def read_mgh(path: Path) -> Volume:
    """FreeSurfer .mgz/.mgh via nibabel; its RAS vox2ras becomes our LPS grid."""
    try:
        import nibabel  # lazy: only for NIfTI/MGZ header checks
    except ImportError:
        raise InputError(f"'{path}' is a FreeSurfer file: install nibabel (pip install nibabel)") from None
    image = nibabel.load(str(path))
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"'{path}' has shape {data.shape}: a 3D volume is needed")
    vox_to_lps = np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3, :3]
    spacing = np.linalg.norm(vox_to_lps, axis=0)
    grid = Grid(data.shape, np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3, 3], spacing, vox_to_lps / spacing)
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), grid)


def check_scalar_3d(volume: Volume, role: str, path: Path | str, is_image: bool = True) -> Volume:
    """Reject volumes no registration can use: flat, singular geometry; for images also constant
    (which includes empty) and non-finite."""
    if min(volume.grid.size) < 2:
        raise InputError(f"{role} '{path}' is a single slice ({volume.grid.describe()}): a 3D volume is needed")
    if volume.array.dtype.kind not in "biuf":
        raise InputError(f"{role} '{path}' has pixel type {volume.array.dtype}: a numeric greyscale volume is needed")
    if abs(np.linalg.det(volume.grid.direction)) < 1e-3 or (volume.grid.spacing <= 0).any():
        raise InputError(f"{role} '{path}' has a degenerate direction or spacing: fix its header")
    if not is_image:
        return volume
    # (ITK's NIfTI reader turns NaN/inf into 0: file_checks.check_nifti looks at the raw voxels first.)
    if volume.array.dtype.kind == "f" and not np.isfinite(volume.array).all():
        count = int((~np.isfinite(volume.array)).sum())
        raise InputError(f"{role} '{path}' contains {count} NaN/inf voxels: replace them (e.g. with 0) before registering")
    if volume.array.min() == volume.array.max():
        raise InputError(f"{role} '{path}' is constant (every voxel is {volume.array.flat[0]}): it holds no image to register")
    return volume


def read_label_volume(path: str | os.PathLike, reference: Volume, role: str) -> Volume:
    """Read a label map or mask that must lie on the grid of ``reference``; integer labels kept."""
    path = Path(path)
    volume = read_volume(path, role, is_image=False) if path.exists() else None
    if volume is None:
        raise InputError(f"{role} '{path}' does not exist: check the path")
    if not volume.grid.same_as(reference.grid, tolerance_mm=1e-2 * float(reference.grid.spacing.min())):
        raise InputError(f"{role} '{path}' has geometry {volume.grid.describe()} at origin "
                         f"{np.round(volume.grid.origin, 2).tolist()}, which does not match its image "
                         f"({reference.grid.describe()} at {np.round(reference.grid.origin, 2).tolist()}): "
                         "resample the label map onto the image grid")
    if volume.array.dtype.kind == "f":
        if not np.allclose(volume.array, np.round(volume.array)):
            raise InputError(f"{role} '{path}' has non-integer values: a label map of integer labels is needed")
        volume = volume.with_array(np.round(volume.array).astype(np.int32))
    return volume


def read_mask(path: str | os.PathLike, reference: Volume, role: str) -> Volume:
    """Read a binary mask (any non-zero voxel is foreground) on the grid of ``reference``."""
    labels = read_label_volume(path, reference, role)
    return labels.with_array((labels.array != 0).astype(np.uint8))


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    suffix = "".join(path.suffixes) or ".nii.gz"
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        try:
            # gzip level 1: about 3x faster than the default level for a few percent larger files
            sitk.WriteImage(volume.to_sitk(), temporary, compress, 1 if compress else -1)
        except RuntimeError as error:  # ITK reports a full disk or a file-size limit this way
            raise OSError(errno.EIO, f"ITK could not write the file ({str(error).strip().splitlines()[-1][:100]})",
                          str(path)) from None
        try:  # ITK's NIfTI writer only prints an error when a write falls short (disk full): check the file
            check_file_complete(Path(temporary), "written file")
        except InputError:
            raise OSError(errno.ENOSPC, "the file was cut short while writing (disk full?)", str(path)) from None
        honour_umask(temporary)  # mkstemp made it 0600
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path
