"""Checks of an image file chosen by what the file *is* (ITK's ImageIO, gzip magic bytes), not its name.

ITK silently zero-fills truncated NIfTI/MetaImage files and turns NaN/inf NIfTI voxels into 0;
it also orthogonalises a sheared direction matrix with nothing but a WARNING line on stderr. So
before the voxels are read we look at the header (``ImageFileReader.ReadImageInformation``) and,
for NIfTI, at the raw bytes with nibabel's header classes (which read from any file object,
whatever the file is called). Written by hand because no library checks a file against its own
header for us.
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np
import SimpleITK as sitk

from dinoreg.errors import InputError

GZIP_MAGIC = b"\x1f\x8b"
#: |D^T D - I| above this: the direction matrix is not a rotation (sheared or scaled axes)
ORTHONORMAL_TOLERANCE = 1e-3
PAIR_SUFFIXES = (".hdr", ".img", ".hdr.gz", ".img.gz")


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(2) == GZIP_MAGIC


def image_io_name(path: Path) -> str:
    """The ITK ImageIO that would read ``path`` ('NiftiImageIO', 'NrrdImageIO', ...; '' when none)."""
    return sitk.ImageFileReader().GetImageIOFromFileName(str(path))


def gzip_length(path: Path, role: str) -> int:
    """Decompressed length of a gzip file, read to its end-of-stream marker and CRC."""
    length = 0
    try:
        with gzip.open(path, "rb") as stream:
            while True:
                chunk = stream.read(1 << 24)
                if not chunk:
                    return length
                length += len(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as error:
        raise InputError(f"{role} '{path}' is truncated or corrupted ({error}): copy or download it again") from None


def open_content(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def check_input_file(path: Path, role: str, is_image: bool) -> None:
    """Refuse (``InputError``) a truncated file, NaN/inf NIfTI voxels (images only) and a
    non-orthonormal direction matrix; checks picked by the file's content and ImageIO."""
    compressed = is_gzip(path)
    data_bytes = gzip_length(path, role) if compressed else path.stat().st_size
    io_name = image_io_name(path)
    if io_name == "NiftiImageIO":
        check_nifti(path, role, is_image, data_bytes)
    elif io_name == "MetaImageIO" and not compressed:
        check_metaimage_size(path, role)


def nifti_header(stream: IO[bytes]) -> Any:
    """nibabel's NIfTI-1 or NIfTI-2 header read from the start of ``stream``."""
    import nibabel  # lazy: only for NIfTI header checks

    start = stream.read(4)
    stream.seek(0)
    sizes = {int.from_bytes(start, "little"), int.from_bytes(start, "big")}
    klass = nibabel.Nifti2Header if 540 in sizes else nibabel.Nifti1Header
    return klass.from_fileobj(stream, check=False)


def check_nifti(path: Path, role: str, is_image: bool, data_bytes: int) -> None:
    import nibabel  # lazy: only for NIfTI header checks

    if path.name.lower().endswith(PAIR_SUFFIXES):  # .hdr/.img pair: nibabel finds both by name
        try:
            image = nibabel.load(str(path))
            data_file = Path(image.file_map["image"].filename)
            header = image.header
        except Exception:
            return  # nibabel cannot parse it: SimpleITK says what is wrong
        available = gzip_length(data_file, role) if is_gzip(data_file) else data_file.stat().st_size
        needed = int(header.get_data_offset()) + data_size(header)
        if available < needed:
            raise truncated(role, path, available, needed)
        check_sform(header, role, path)
        if is_image:
            check_finite(np.asanyarray(image.dataobj), role, path)
        return
    try:
        with open_content(path) as stream:
            header = nifti_header(stream)
    except Exception:
        return
    needed = int(header.get_data_offset()) + data_size(header)
    if data_bytes < needed:
        raise truncated(role, path, data_bytes, needed)
    check_sform(header, role, path)
    warn_qform_sform(header, role, path)
    if is_image and np.dtype(header.get_data_dtype()).kind in "fc":
        with open_content(path) as stream:
            check_finite(header.raw_data_from_fileobj(stream), role, path)


def check_sform(header: Any, role: str, path: Path) -> None:
    """ITK replaces a sheared NIfTI sform by the qform (or an orthogonalised matrix) without a word:
    refuse it like any non-orthonormal direction."""
    if int(header["sform_code"]) <= 0 or len(header.get_data_shape()) < 3:
        return
    matrix = np.asarray(header.get_sform(), dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(matrix, axis=0)
    if (norms > 0).all() and np.isfinite(matrix).all():
        check_orthonormal(matrix / norms, role, path)


#: qform and sform mapping some corner voxel more than this apart (mm) are reported
QFORM_SFORM_TOLERANCE_MM = 0.5


def warn_qform_sform(header: Any, role: str, path: Path) -> None:
    """Say which of two disagreeing NIfTI orientations (qform, sform) is used, with a UserWarning."""
    if int(header["qform_code"]) <= 0 or int(header["sform_code"]) <= 0 or len(header.get_data_shape()) < 3:
        return
    qform, sform = np.asarray(header.get_qform(), float), np.asarray(header.get_sform(), float)
    shape = np.array(header.get_data_shape()[:3], dtype=float)
    corners = np.array([[(s - 1) * int(bit) for bit, s in zip(f"{n:03b}", shape)] + [1.0] for n in range(8)])
    gap = float(np.abs(corners @ (qform - sform).T).max())
    if not np.isfinite(gap) or gap <= QFORM_SFORM_TOLERANCE_MM:
        return
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    origin_lps = np.array(reader.GetOrigin()) * [-1, -1, 1]  # back to RAS, as in the header
    used = "sform" if np.abs(sform[:3, 3] - origin_lps).max() <= np.abs(qform[:3, 3] - origin_lps).max() else "qform"
    warnings.warn(f"{role} '{path}': its qform and sform disagree by up to {gap:.1f} mm; the {used} is used "
                  "(as ITK and Slicer read it): check the result's position, and fix the header if the other is right",
                  UserWarning, stacklevel=2)


def data_size(header: Any) -> int:
    return int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize


def truncated(role: str, path: Path, available: int, needed: int) -> InputError:
    return InputError(f"{role} '{path}' is truncated ({available} of {needed} bytes): copy or download it again")


def check_finite(data: np.ndarray, role: str, path: Path) -> None:
    if data.dtype.kind not in "fc":
        return
    count = int(np.count_nonzero(~np.isfinite(data)))
    if count:
        raise InputError(f"{role} '{path}' contains {count} NaN/inf voxels: replace them (e.g. with the image "
                         "minimum) before registering")


def check_header(path: Path, role: str, is_image: bool) -> None:
    """Geometry and size from the header alone (no voxels read): a non-orthonormal direction
    matrix is refused, and an image over the memory budget is refused before it is read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = reader.GetSize()
    if len(size) == 3:
        direction = np.array(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
        check_orthonormal(direction, role, path)
    if is_image:
        check_image_budget(int(np.prod(size)) * reader.GetNumberOfComponents(), role, path)


def check_orthonormal(direction: np.ndarray, role: str, path: Path | str) -> None:
    error = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if error > ORTHONORMAL_TOLERANCE:
        raise InputError(f"{role} '{path}' has a non-orthonormal direction matrix (sheared or scaled axes, "
                         f"deviation {error:.2f}): outputs could not lie on its grid; resample it onto an "
                         "orthogonal grid first (e.g. with ITK's ResampleImageFilter)")


# ---------------------------------------------------------------------------------------------- memory budget

BUDGET_VARIABLE = "DINOREG_MEMORY_BUDGET_MB"
BYTES_PER_FIXED_VOXEL = 64  # working copies, features and fields per fixed voxel (measured)


def memory_budget_bytes() -> int | None:
    """The budget in bytes (None when unknown, e.g. no sysconf on Windows and no variable set)."""
    value = os.environ.get(BUDGET_VARIABLE)
    if value:
        try:
            return int(float(value) * 2**20)
        except ValueError:
            raise InputError(f"{BUDGET_VARIABLE}={value!r} is not a number of megabytes: set it like 8000") from None
    try:
        return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(count: int) -> str:
    """'3.2 GB', '45 MB' or '900 kB': never '0.0 GB'."""
    if count >= 2**30:
        return f"{count / 2**30:.1f} GB"
    if count >= 2**20:
        return f"{count / 2**20:.0f} MB"
    return f"{max(count, 1) / 2**10:.0f} kB"


def check_image_budget(voxels: int, role: str, path: object) -> None:
    """From the header, before the voxels are read: a fixed image needs ``BYTES_PER_FIXED_VOXEL``
    per voxel, any other at least its float32 copy; refuse what cannot fit in the budget."""
    budget = memory_budget_bytes()
    needed = voxels * (BYTES_PER_FIXED_VOXEL if role.startswith("fixed") else 4)
    if budget is not None and needed > budget:
        raise InputError(f"{role} '{path}' has {voxels:,} voxels: registering it needs about {format_bytes(needed)}, "
                         f"more than the memory budget of {format_bytes(budget)} ({BUDGET_VARIABLE}): crop it to "
                         "the region of interest or resample it coarser first")


# ---------------------------------------------------------------------------------------------- MetaImage

METAIMAGE_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
                   "MET_ULONG": 8, "MET_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def check_metaimage_size(path: Path, role: str) -> None:
    with open(path, "rb") as stream:
        head = stream.read(4096)
    if b"ElementDataFile = LOCAL" not in head:
        return
    fields = dict(line.split(" = ", 1) for line in head[: head.index(b"ElementDataFile = LOCAL")].decode(
        "latin-1").splitlines() if " = " in line)
    if fields.get("CompressedData", "False").strip() == "True" or fields.get("ElementType", "").strip() not in METAIMAGE_BYTES:
        return
    voxels = int(np.prod([int(v) for v in fields.get("DimSize", "0").split()]))
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    needed = head.index(b"ElementDataFile = LOCAL") + len(b"ElementDataFile = LOCAL") + 1 + \
        voxels * channels * METAIMAGE_BYTES[fields["ElementType"].strip()]
    if path.stat().st_size < needed:
        raise InputError(f"{role} '{path}' is truncated ({path.stat().st_size} of {needed} bytes): copy it again")
