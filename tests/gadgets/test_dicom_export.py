"""DICOM out: every file passes ``dciodvfy`` (Debian dicom3tools) without an error, pydicom reads back the geometry
of the ISMRMRD image headers, ``dcm2niix`` (Debian) makes one NIfTI volume of a multi-slice oblique series with the
slices in order and the right voxel size, series kinds and UIDs are as documented and stable."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from cdl_lambda.gadgets.dicom_export import MAX_PIXEL, export, read_images
from cdl_lambda.gadgets.image_output import build_image, mark_not_reconstructed

pydicom = pytest.importorskip("pydicom")

NY, NX, SLICES = 40, 48, 5
FOV = (240.0, 160.0, 3.0)            # Δx = 5 mm (columns, readout), Δy = 4 mm (rows, phase), 3 mm thick
GAP = 3.5                            # slice centre to slice centre, mm
IDENTITY = {"dictionary": "cdl-K32-k9-l0.1-b0.1", "network": "cdl-lambda-v3-mc-b8", "network_sha256": "ab" * 32}


def rotation(ax: float, ay: float) -> np.ndarray:
    cx, sx, cy, sy = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay)
    return np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])


ROTATION = rotation(0.3, -0.2)        # an oblique stack
READ, PHASE, SLICE = ROTATION[:, 0], ROTATION[:, 1], ROTATION[:, 2]
CENTRE = np.array([12.0, -30.0, 45.0])


def slice_pixels(index: int) -> np.ndarray:
    """A pattern that tells rows, columns and slices apart: a ramp along the rows, one along the columns, and a
    block whose size grows with the slice index."""
    rows, cols = np.mgrid[0:NY, 0:NX]
    pixels = 10.0 + rows + 0.5 * cols
    pixels[2:4 + 2 * index, 2:6] = 100.0 + 20 * index
    return pixels.astype(np.float32)


def stack_images(kind: str = "image", series: int = 1, bad_slice: int | None = None) -> list:
    images = []
    for index in range(SLICES):
        reference = ismrmrd.AcquisitionHeader()
        reference.position[:] = CENTRE + (index - SLICES // 2) * GAP * SLICE
        reference.read_dir[:], reference.phase_dir[:], reference.slice_dir[:] = READ, PHASE, SLICE
        reference.idx.slice = index
        pixels = slice_pixels(index)
        image = build_image(pixels, reference, kind=kind, image_index=index + 1, series_index=series,
                            field_of_view=FOV, identity=IDENTITY, chain="cdl-lambda")
        if index == bad_slice:
            image.data[:] = 0
            mark_not_reconstructed(image.meta, "NaN samples in readout 3")
        image.attribute_string = image.meta.serialize()
        images.append(image)
    return images


def header():
    from cdl_lambda.gadgets.wire import parse_ismrmrd_header
    return parse_ismrmrd_header(
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><subjectInformation><patientName>Test^Phantom'
        '</patientName><patientID>P-042</patientID></subjectInformation><studyInformation><studyDate>2026-12-06'
        '</studyDate><studyTime>10:11:12</studyTime></studyInformation><measurementInformation><measurementID>M-7'
        '</measurementID><patientPosition>HFS</patientPosition><protocolName>t1_tse</protocolName>'
        '</measurementInformation><acquisitionSystemInformation><systemVendor>LowField Inc</systemVendor>'
        '<systemFieldStrength_T>0.064</systemFieldStrength_T></acquisitionSystemInformation><experimentalConditions>'
        '<H1resonanceFrequency_Hz>2750000</H1resonanceFrequency_Hz></experimentalConditions><encoding><encodedSpace>'
        '<matrixSize><x>96</x><y>40</y><z>1</z></matrixSize><fieldOfView_mm><x>480</x><y>160</y><z>3</z>'
        '</fieldOfView_mm></encodedSpace><reconSpace><matrixSize><x>48</x><y>40</y><z>1</z></matrixSize>'
        '<fieldOfView_mm><x>240</x><y>160</y><z>3</z></fieldOfView_mm></reconSpace><encodingLimits/>'
        '<trajectory>cartesian</trajectory></encoding><sequenceParameters><TR>500</TR><TE>12</TE>'
        '</sequenceParameters></ismrmrdHeader>')


def dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture()
def exported(tmp_path):
    images = stack_images() + stack_images("zero_filled", 2) + stack_images(series=5, bad_slice=3)
    files = export(images, tmp_path / "dicom", header())
    return tmp_path / "dicom", files


def test_every_file_passes_dciodvfy(exported):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    folder, files = exported
    assert len(files) == 3 * SLICES
    for path in files:
        assert dciodvfy_errors(path) == [], path
    # the check sees errors: a file without its orientation fails
    broken = pydicom.dcmread(files[0])
    del broken.ImageOrientationPatient
    broken.save_as(folder / "broken.dcm")
    assert dciodvfy_errors(folder / "broken.dcm")


def test_geometry_series_and_header_read_back(exported):
    folder, files = exported
    assert sorted(p.name for p in folder.iterdir()) == ["series_001", "series_002", "series_005"]
    first = [pydicom.dcmread(p) for p in sorted((folder / "series_001").glob("*.dcm"))]
    for index, ds in enumerate(first):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.Modality == "MR"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "OTHER"] and ds.SeriesDescription == "CDL-Lambda"
        assert (ds.Rows, ds.Columns) == (NY, NX)
        assert np.allclose([float(v) for v in ds.PixelSpacing], [FOV[1] / NY, FOV[0] / NX])
        assert float(ds.SliceThickness) == pytest.approx(FOV[2])
        assert np.allclose([float(v) for v in ds.ImageOrientationPatient], [*READ, *PHASE], atol=1e-9)
        centre = CENTRE + (index - SLICES // 2) * GAP * SLICE
        corner = centre - (NX // 2) * 5.0 * READ - (NY // 2) * 4.0 * PHASE
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], corner, atol=1e-6)
        assert ds.PatientPosition == "HFS" and str(ds.PatientName) == "Test^Phantom" and ds.PatientID == "P-042"
        assert ds.StudyDate == "20261206" and ds.ProtocolName == "t1_tse" and float(ds.RepetitionTime) == 500
        assert ds.SoftwareVersions[0].startswith("cdl-lambda ") and "network cdl-lambda-v3-mc-b8 abab" in \
            ds.SoftwareVersions[1]
        expected = np.rint(slice_pixels(index) * MAX_PIXEL / slice_pixels(SLICES - 1).max())
        assert np.array_equal(ds.pixel_array, expected.astype(np.uint16))
    meta = ismrmrd.Meta.deserialize(stack_images()[0].attribute_string)
    scale = MAX_PIXEL / slice_pixels(SLICES - 1).max()
    assert float(first[0].WindowCenter) == pytest.approx(float(meta["WindowCenter"]) * scale, rel=1e-5)
    zero = pydicom.dcmread(sorted((folder / "series_002").glob("*.dcm"))[0])
    assert list(zero.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "zero-filled" in zero.SeriesDescription
    incomplete = [pydicom.dcmread(p) for p in sorted((folder / "series_005").glob("*.dcm"))]
    assert all(list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] for ds in incomplete)
    assert incomplete[0].SeriesDescription == "CDL-Lambda INCOMPLETE (1 of 5 not reconstructed)"
    assert "NOT RECONSTRUCTED" in incomplete[3].ImageComments and not incomplete[3].pixel_array.any()
    # one study and frame of reference, one series UID per series, distinct instances
    every = [pydicom.dcmread(p) for p in files]
    assert len({ds.StudyInstanceUID for ds in every}) == 1 and len({ds.FrameOfReferenceUID for ds in every}) == 1
    assert len({ds.SeriesInstanceUID for ds in every}) == 3 and len({ds.SOPInstanceUID for ds in every}) == 15
    assert all(uid.startswith("2.25.") and len(uid) <= 64 for ds in every
               for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))


def test_uids_and_files_are_stable_and_follow_the_input(tmp_path, exported):
    folder, files = exported
    again = export(stack_images() + stack_images("zero_filled", 2) + stack_images(series=5, bad_slice=3),
                   tmp_path / "again", header())
    assert [p.read_bytes() for p in files] == [p.read_bytes() for p in again]  # byte for byte
    other = header()
    other.measurementInformation.measurementID = "M-8"
    third = export(stack_images(), tmp_path / "other", other)
    assert pydicom.dcmread(third[0]).StudyInstanceUID != pydicom.dcmread(files[0]).StudyInstanceUID


def test_dcm2niix_makes_one_volume_with_slices_in_order(exported, tmp_path):
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix (Debian dcm2niix) is not installed")
    nibabel = pytest.importorskip("nibabel")
    folder, _ = exported
    out = tmp_path / "nifti"
    out.mkdir()
    done = subprocess.run(["dcm2niix", "-z", "n", "-f", "volume", "-o", str(out), str(folder / "series_001")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    volumes = sorted(out.glob("*.nii"))
    assert [p.name for p in volumes] == ["volume.nii"], done.stdout
    nifti = nibabel.load(volumes[0])
    data = np.asarray(nifti.dataobj)
    assert data.shape == (NX, NY, SLICES)
    assert np.allclose(nifti.header.get_zooms(), (FOV[0] / NX, FOV[1] / NY, GAP), atol=1e-4)
    # every input pixel (row r, column c, slice s), placed in the world (LPS → NIfTI's RAS), lands on a voxel that
    # holds its value: the slices are in order and the geometry is the ISMRMRD one
    rows, cols = np.mgrid[0:NY, 0:NX]
    inverse = np.linalg.inv(nifti.affine)
    for index in range(SLICES):
        centre = CENTRE + (index - SLICES // 2) * GAP * SLICE
        lps = (centre[None, None] + ((cols - NX // 2) * 5.0)[..., None] * READ
               + ((rows - NY // 2) * 4.0)[..., None] * PHASE)
        ras = lps * np.array([-1.0, -1.0, 1.0])
        voxel = np.einsum("ij,rcj->rci", inverse[:3, :3], ras) + inverse[:3, 3]
        assert np.allclose(voxel, np.rint(voxel), atol=1e-3)
        i, j, k = np.rint(voxel).astype(int).transpose(2, 0, 1)
        assert (k == index).all()
        expected = np.rint(slice_pixels(index) * MAX_PIXEL / slice_pixels(SLICES - 1).max())
        assert np.array_equal(data[i, j, k], expected)


def test_cli_exports_a_replayed_file_and_refuses_bad_input(tmp_path, caplog):
    from cdl_lambda.gadgets.cli import main
    images_file = tmp_path / "images.h5"
    with ismrmrd.Dataset(str(images_file), "dataset", create_if_needed=True) as dataset:
        for image in stack_images():
            dataset.append_image("image_1", image)
    images, head = read_images(images_file)
    assert len(images) == SLICES and head is None
    assert main(["export-dicom", str(images_file), str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out" / "series_001").glob("*.dcm"))) == SLICES
    assert main(["export-dicom", str(tmp_path / "missing.h5"), str(tmp_path / "out2")]) == 2
    assert "missing.h5" in caplog.text and "not a readable HDF5 file" in caplog.text
    (tmp_path / "file").write_text("")
    assert main(["export-dicom", str(images_file), str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in caplog.text


def test_a_3d_image_becomes_one_instance_per_partition(tmp_path):
    """An image of nz partitions (as Gadgetron's ImageArray path returns a 3-D scan): nz instances, FOVz / nz thick,
    centred along the slice normal around the image's position."""
    reference = ismrmrd.AcquisitionHeader()
    reference.position[:] = CENTRE
    reference.read_dir[:], reference.phase_dir[:], reference.slice_dir[:] = READ, PHASE, SLICE
    volume = np.stack([slice_pixels(z) for z in range(4)])  # (nz, ny, nx)
    image = ismrmrd.Image.from_array(volume[None], acquisition=reference, transpose=False,
                                     field_of_view=(FOV[0], FOV[1], 12.0))
    image.image_series_index = 1
    files = export([image], tmp_path / "dicom")
    assert len(files) == 4
    for z, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert float(ds.SliceThickness) == pytest.approx(3.0) and ds.MRAcquisitionType == "3D"
        centre = CENTRE + (z - 2) * 3.0 * SLICE
        corner = centre - (NX // 2) * 5.0 * READ - (NY // 2) * 4.0 * PHASE
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], corner, atol=1e-6)
        assert np.array_equal(ds.pixel_array, np.rint(slice_pixels(z) * MAX_PIXEL / volume.max()))
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(path) == []
