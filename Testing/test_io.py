"""Readers keep the full geometry: NIfTI, NRRD, MHA, a DICOM series folder and FreeSurfer MGZ."""

from __future__ import annotations

import time

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from dinoreg.io.volumes import read_volume, write_volume
from dinoreg.core.volume import Grid, Volume
from test_transforms import OBLIQUE


def sample_volume() -> Volume:
    grid = Grid((12, 10, 8), origin=(-20.5, 13.0, 40.0), spacing=(0.9, 1.1, 2.5), direction=OBLIQUE)
    array = (np.arange(np.prod(grid.shape)).reshape(grid.shape) % 251).astype(np.int16)
    return Volume(array, grid)


def assert_same_volume(a: Volume, b: Volume) -> None:
    assert a.grid.same_as(b.grid, tolerance_mm=1e-3), (a.grid, b.grid)
    np.testing.assert_array_equal(a.array, b.array)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_file_formats_round_trip(tmp_path, suffix):
    volume = sample_volume()
    path = write_volume(volume, tmp_path / f"v{suffix}")
    assert_same_volume(read_volume(path), volume)


def test_dicom_series_folder(tmp_path):
    volume = sample_volume()
    volume = Volume(volume.array, Grid(volume.grid.size, volume.grid.origin, volume.grid.spacing, np.eye(3)))
    image = volume.to_sitk()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125." + time.strftime("%H%M%S")
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        tags = {
            "0020|000e": series_uid,
            "0020|0037": "\\".join(map(str, (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))),
            "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0013": str(k),
            "0008|0060": "MR",
            "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}",
            "0018|0050": str(image.GetSpacing()[2]),
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)
    loaded = read_volume(tmp_path)
    assert_same_volume(loaded, volume)


def test_freesurfer_mgz_matches_nifti_with_the_same_header(tmp_path):
    volume = sample_volume()
    lps_matrix = volume.grid.index_to_physical
    ras_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_matrix
    data_ijk = volume.array.transpose(2, 1, 0).astype(np.float32)
    nibabel.save(nibabel.MGHImage(data_ijk, ras_affine), str(tmp_path / "v.mgz"))
    nibabel.save(nibabel.Nifti1Image(data_ijk, ras_affine), str(tmp_path / "v.nii.gz"))
    from_mgz = read_volume(tmp_path / "v.mgz")
    from_nifti = read_volume(tmp_path / "v.nii.gz")
    assert_same_volume(from_mgz, from_nifti)
    assert from_mgz.grid.same_as(volume.grid, tolerance_mm=1e-3)


def test_folder_without_dicom_is_a_clear_error(tmp_path):
    from dinoreg.errors import InputError

    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(tmp_path, "fixed image")


def test_preview_slices_are_anatomical_whatever_the_storage_order():
    """The same anatomy stored LPS and LIA (FreeSurfer's order) gives the same preview slices."""
    from dinoreg.report.preview import mid_slices

    volume = Volume(np.random.default_rng(0).random((9, 10, 11)).astype(np.float32), Grid((11, 10, 9)))
    lia = Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), "LIA"))
    assert lia.array.shape != volume.array.shape
    for (a, aspect_a), (b, aspect_b) in zip(mid_slices(volume), mid_slices(lia)):
        np.testing.assert_array_equal(a, b)
        assert aspect_a == aspect_b
