"""MRD 2 ↔ ISMRMRD 1: headers, acquisitions (noise scans, calibration lines, counters) and images map both ways
without loss; streams written by mrd-python's own phantom tool read as acquisitions."""

from __future__ import annotations

import subprocess
import sys

import ismrmrd
import numpy as np
import pytest

from cdl_lambda.gadgets import mrd2
from cdl_lambda.gadgets.wire import parse_ismrmrd_header

mrd = pytest.importorskip("mrd")

FULL_HEADER = """<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
 <version>2</version>
 <subjectInformation><patientName>Test^Phantom</patientName><patientWeight_kg>70.5</patientWeight_kg>
  <patientID>P-042</patientID><patientBirthdate>1990-02-03</patientBirthdate><patientGender>O</patientGender>
 </subjectInformation>
 <studyInformation><studyDate>2026-12-06</studyDate><studyTime>10:11:12</studyTime><studyID>S1</studyID>
  <accessionNumber>77</accessionNumber><studyInstanceUID>1.2.3.4</studyInstanceUID>
  <bodyPartExamined>HEAD</bodyPartExamined></studyInformation>
 <measurementInformation><measurementID>M-7</measurementID><seriesDate>2026-12-06</seriesDate>
  <patientPosition>FFS</patientPosition><relativeTablePosition><x>1.5</x><y>0</y><z>-20</z></relativeTablePosition>
  <initialSeriesNumber>3</initialSeriesNumber><protocolName>t1_tse</protocolName>
  <frameOfReferenceUID>1.2.3.5</frameOfReferenceUID></measurementInformation>
 <acquisitionSystemInformation><systemVendor>LowField Inc</systemVendor><systemFieldStrength_T>0.064
  </systemFieldStrength_T><relativeReceiverNoiseBandwidth>0.79</relativeReceiverNoiseBandwidth>
  <receiverChannels>4</receiverChannels><coilLabel><coilNumber>0</coilNumber><coilName>H1</coilName></coilLabel>
  <coilLabel><coilNumber>1</coilNumber><coilName>H2</coilName></coilLabel><institutionName>Lab</institutionName>
 </acquisitionSystemInformation>
 <experimentalConditions><H1resonanceFrequency_Hz>2750000</H1resonanceFrequency_Hz></experimentalConditions>
 <encoding><encodedSpace><matrixSize><x>128</x><y>64</y><z>1</z></matrixSize><fieldOfView_mm><x>480</x><y>240</y>
  <z>5</z></fieldOfView_mm></encodedSpace><reconSpace><matrixSize><x>64</x><y>64</y><z>1</z></matrixSize>
  <fieldOfView_mm><x>240</x><y>240</y><z>5</z></fieldOfView_mm></reconSpace><encodingLimits>
  <kspace_encoding_step_1><minimum>0</minimum><maximum>63</maximum><center>32</center></kspace_encoding_step_1>
  <slice><minimum>0</minimum><maximum>2</maximum><center>1</center></slice></encodingLimits>
  <trajectory>cartesian</trajectory><parallelImaging><accelerationFactor><kspace_encoding_step_1>2
  </kspace_encoding_step_1><kspace_encoding_step_2>1</kspace_encoding_step_2></accelerationFactor>
  <calibrationMode>embedded</calibrationMode></parallelImaging></encoding>
 <sequenceParameters><TR>500</TR><TR>600</TR><TE>12.5</TE><flipAngle_deg>90</flipAngle_deg>
  <sequence_type>TSE</sequence_type></sequenceParameters>
 <userParameters><userParameterLong><name>iterations</name><value>8</value></userParameterLong>
  <userParameterDouble><name>d</name><value>2.5</value></userParameterDouble>
  <userParameterString><name>sliceerrors</name><value>report</value></userParameterString></userParameters>
</ismrmrdHeader>"""


def test_a_full_header_maps_both_ways():
    original = parse_ismrmrd_header(FULL_HEADER)
    converted = mrd2.header_from_xml(FULL_HEADER)
    assert converted.subject_information.patient_id == "P-042"
    assert converted.measurement_information.patient_position == mrd.PatientPosition.F_FS
    assert converted.sequence_parameters.t_r == [500.0, 600.0]
    assert converted.encoding[0].parallel_imaging.calibration_mode == mrd.CalibrationMode.EMBEDDED
    assert converted.user_parameters.user_parameter_string[0].value == "report"
    assert str(converted.study_information.study_time) == "10:11:12"
    back = parse_ismrmrd_header(mrd2.header_to_xml(converted))
    assert back == original
    assert mrd2.header_from_xml(mrd2.header_to_xml(converted)) == converted  # and the other way


def test_acquisitions_map_both_ways_with_flags_counters_and_trajectory(accelerated_file):
    from support import read_file
    _, acquisitions = read_file(accelerated_file)
    kinds = {"noise": 0, "calibration": 0, "last_in_slice": 0}
    for acq in acquisitions:
        there = mrd2.acquisition_from_ismrmrd(acq)
        back = mrd2.acquisition_to_ismrmrd(there)
        assert bytes(back.getHead()) == bytes(acq.getHead())
        assert np.array_equal(back.data, acq.data)
        flags = there.head.flags
        kinds["noise"] += bool(flags & mrd.AcquisitionFlags.IS_NOISE_MEASUREMENT)
        kinds["calibration"] += bool(flags & (mrd.AcquisitionFlags.IS_PARALLEL_CALIBRATION
                                              | mrd.AcquisitionFlags.IS_PARALLEL_CALIBRATION_AND_IMAGING))
        kinds["last_in_slice"] += bool(flags & mrd.AcquisitionFlags.LAST_IN_SLICE)
        assert flags & mrd.AcquisitionFlags.IS_NOISE_MEASUREMENT or \
            there.head.idx.kspace_encode_step_1 == acq.idx.kspace_encode_step_1
        assert bool(flags & mrd.AcquisitionFlags.IS_NOISE_MEASUREMENT) == acq.is_flag_set(
            ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    assert kinds["noise"] > 0 and kinds["calibration"] > 0 and kinds["last_in_slice"] == 4, kinds
    # a trajectory (non-Cartesian): (samples, dims) in ISMRMRD 1, (dims, samples) in MRD 2
    head = ismrmrd.AcquisitionHeader()
    head.version = 1  # as written by ISMRMRD 1 (the converter writes version 1)
    head.number_of_samples, head.active_channels, head.available_channels, head.trajectory_dimensions = 6, 2, 2, 2
    head.channel_mask[0] = 0b11
    radial = ismrmrd.Acquisition(head)
    radial.traj[:] = np.arange(12, dtype=np.float32).reshape(6, 2)
    radial.data[:] = 1 + 2j
    there = mrd2.acquisition_from_ismrmrd(radial)
    assert there.trajectory.shape == (2, 6) and there.head.channel_order == [0, 1]
    back = mrd2.acquisition_to_ismrmrd(there)
    assert np.array_equal(back.traj, radial.traj) and bytes(back.getHead()) == bytes(radial.getHead())


def test_images_map_both_ways():
    from cdl_lambda.gadgets.image_output import build_image
    reference = ismrmrd.AcquisitionHeader()
    reference.position[:] = (1, 2, 3)
    reference.read_dir[:], reference.phase_dir[:], reference.slice_dir[:] = (0, 1, 0), (1, 0, 0), (0, 0, 1)
    reference.idx.slice, reference.idx.repetition = 2, 1
    pixels = np.arange(12, dtype=np.float32).reshape(3, 4)
    image = build_image(pixels, reference, kind="image", image_index=5, series_index=1, field_of_view=(240, 180, 5),
                        identity={"network": "n"}, chain="cdl-lambda")
    image.attribute_string = image.meta.serialize()
    there = mrd2.image_from_ismrmrd(image)
    assert there.data.shape == (1, 1, 3, 4) and list(there.head.col_dir) == [0, 1, 0] and there.head.slice == 2
    assert isinstance(mrd2.stream_item(there), mrd.StreamItem.ImageFloat)
    back = mrd2.image_to_ismrmrd(there)
    assert bytes(back.getHead()) == bytes(image.getHead()) and np.array_equal(back.data, image.data)
    assert dict(ismrmrd.Meta.deserialize(back.attribute_string)) == dict(ismrmrd.Meta.deserialize(
        image.attribute_string))


def test_reads_a_stream_from_mrd_pythons_phantom_tool(tmp_path):
    path = tmp_path / "phantom.mrd"
    subprocess.run([sys.executable, "-m", "mrd.tools.phantom", "-m", "32", "-c", "2", "-o", str(path)], check=True,
                   timeout=120)
    xml, count, acquisitions = mrd2.read_input(path)
    header = parse_ismrmrd_header(xml)
    assert header.encoding[0].encodedSpace.matrixSize.x == 64 and header.subjectInformation.patientID == "1234BGVF"
    acquisitions = list(acquisitions)
    noise = [a for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    assert len(noise) == 32 and len(acquisitions) == 32 + 32
    assert acquisitions[-1].is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE) and acquisitions[-1].idx.kspace_encode_step_1 == 31
    assert acquisitions[40].data.shape == (2, 64) and acquisitions[40].scan_counter == 40


def test_not_an_mrd2_stream_is_named(tmp_path):
    path = tmp_path / "scan.mrd"
    path.write_bytes(b"not yardl at all")
    with pytest.raises(ValueError, match="scan.mrd: not an MRD 2 stream"):
        mrd2.read_input(path)
