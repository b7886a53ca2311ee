"""MDCatch parsers: every field of EPU XML, SerialEM mdoc, FEI MRC, TIFF and EER headers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from autospa.errors import InputError
from autospa.mdcatch.metadata import AcquisitionMetadata, merge
from autospa.mdcatch.parsers import detect_format, parse_file
from autospa.mdcatch.parsers.epu_xml import parse_epu_xml
from autospa.mdcatch.parsers.fei_mrc import parse_mrc
from autospa.mdcatch.parsers.mdoc import parse_mdoc, parse_mdoc_sections, read_mdoc
from autospa.mdcatch.parsers.tiff_eer import parse_tiff

DATA = Path(__file__).parent / "data" / "mdcatch"
sys.path.insert(0, str(DATA))
import mdcatch_writers as w  # noqa: E402

approx = pytest.approx


def _fields(meta: AcquisitionMetadata, expected: dict) -> None:
    got = meta.to_dict()
    for k, v in expected.items():
        if isinstance(v, float):
            assert got[k] == approx(v, rel=1e-9), k
        else:
            assert got[k] == v, k


# ------------------------------------------------------------------------------------- EPU XML
def test_epu_xml_k3_phase_plate_every_field():
    m = parse_epu_xml(DATA / "epu_k3_vpp.xml")
    _fields(m, {
        "source_format": "epu_xml", "software": "EPU", "software_version": "2.12.1.2782", "movie": None,
        "timestamp": "2021-06-14T08:31:05.123456+00:00", "microscope_id": "3593",
        "microscope_name": "TITAN52335930", "voltage_kv": 300.0, "cs_mm": None, "magnification": 105000,
        "pixel_size_a": 1.06, "binning": 1, "super_resolution_factor": 1, "detector_name": "EF-CCD",
        "detector_model": None, "detector_mode": "counting", "movie_format": None, "image_width_px": 5760,
        "image_height_px": 4092, "exposure_time_s": 2.5, "n_frames": 50, "frames_estimated": False,
        "frame_rate_hz": None, "total_dose_e_a2": 45.0, "total_dose_e_px": 45.0 * 1.06**2,
        "dose_per_frame_e_a2": None, "target_defocus_a": 15000.0, "phase_plate": True,
        "phase_plate_name": "Ph P3", "phase_plate_position": 12, "energy_filter_slit_inserted": True,
        "energy_filter_slit_width_ev": 20.0, "spot_size": 4, "probe_mode": "NanoProbe",
        "beam_diameter_um": 0.95, "gun_lens": 4, "extractor_voltage_v": 4150.0, "beam_shift": [0.0125, -0.0031],
        "beam_tilt": [0.0021, 0.0007], "image_shift": [0.1, -0.2], "c2_aperture": None, "objective_aperture": None,
        "gain_reference": None, "defect_file": None, "gain_transform_serialem": None, "optics_group_label": None,
    })
    # MDCatch bug 3: phase-plate name/position were lost without an Aperture[OBJ].Name key.
    assert m.objective_aperture is None and m.phase_plate_position == 12
    assert m.warnings == ()


def test_epu_xml_falcon4_eer_every_field():
    m = parse_epu_xml(DATA / "epu_falcon4_eer.xml")
    _fields(m, {
        "software_version": "3.0.0.4748", "timestamp": "2021-09-02T17:45:00+02:00", "microscope_id": "4248",
        "voltage_kv": 300.0, "magnification": 165000, "pixel_size_a": 0.83, "detector_name": "EF-Falcon",
        "detector_mode": "counting", "movie_format": "eer", "image_width_px": 4096, "image_height_px": 4096,
        "exposure_time_s": 4.5, "frame_rate_hz": 320.0, "n_frames": 1440, "frames_estimated": True,
        "total_dose_e_a2": 40.0, "target_defocus_a": 20000.0, "phase_plate": False, "phase_plate_name": None,
        "energy_filter_slit_width_ev": 10.0, "spot_size": 6, "beam_diameter_um": 0.6, "gun_lens": None,
        "extractor_voltage_v": 4400.0, "beam_shift": [-0.04, 0.02], "c2_aperture": "50", "objective_aperture": "100",
        "gain_reference": "20210601_103022_EER_GainReference.gain",
    })


def test_epu_xml_falcon3_fraction_elements_and_unknown_fields():
    m = parse_epu_xml(DATA / "epu_falcon3_fractions.xml")
    # Falcon: one element per fraction (MDCatch counts fractions, not raw frames).
    assert m.n_frames == 4
    assert m.detector_name == "BM-Falcon" and m.detector_mode == "counting"
    assert m.voltage_kv == 200.0 and m.total_dose_e_a2 == approx(32.0) and m.pixel_size_a == approx(1.1)
    assert m.gun_lens is None  # old EPU writes the string 'None'
    assert m.software == "EPU" and m.software_version == "1.11.0.30"
    assert m.microscope_id == "777" and m.beam_shift is None and m.energy_filter_slit_inserted is None


@pytest.mark.parametrize("sr,mode", [(1, "counting"), (2, "super-resolution")])
def test_epu_xml_super_resolution_divides_pixel(tmp_path, sr, mode):
    p = tmp_path / "FoilHole_1_Data_2_3_4_5.xml"
    p.write_text(w.epu_xml(pixel_size_m=1.0e-10, super_resolution=sr))
    m = parse_epu_xml(p)
    assert m.detector_mode == mode and m.super_resolution_factor == sr
    assert m.pixel_size_a == approx(1.0 / sr)
    assert m.physical_pixel_size_a == approx(1.0)


def test_epu_xml_linear_mode_and_dose_from_dose_on_camera(tmp_path):
    text = w.epu_xml(counting=False, dose_e_m2=None, pixel_size_m=1.2e-10)
    text = text.replace("<CustomData xmlns:a", '<CustomData xmlns:a').replace(
        "</CustomData>",
        w._kv("DoseOnCamera", "72.0") + "</CustomData>",
    )
    p = tmp_path / "x.xml"
    p.write_text(text)
    m = parse_epu_xml(p)
    assert m.detector_mode == "linear"
    assert m.total_dose_e_a2 == approx(72.0 / 1.2**2)
    assert any("DoseOnCamera" in x for x in m.warnings)


def test_epu_xml_missing_values_are_warnings(tmp_path):
    p = tmp_path / "x.xml"
    p.write_text(w.epu_xml(dose_e_m2=None, n_fractions=None))
    m = parse_epu_xml(p)
    assert m.total_dose_e_a2 is None and m.n_frames is None
    assert any("dose" in x and "number of frames" in x for x in m.warnings)


@pytest.mark.parametrize(
    "name,problem",
    [
        ("malformed_truncated.xml", "not a well-formed XML"),
        ("not_epu.xml", "not an EPU MicroscopeImage XML"),
        ("bad_value.xml", "ExposureTime is not a number"),
    ],
)
def test_epu_xml_malformed(name, problem):
    with pytest.raises(InputError) as e:
        parse_epu_xml(DATA / name)
    assert problem in str(e.value) and name in str(e.value)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- mdoc
def test_mdoc_unbracketed_title_super_resolution_every_field():
    m = parse_mdoc(DATA / "frames_unbracketed.tif.mdoc")
    _fields(m, {
        "source_format": "mdoc", "software": "SerialEM", "movie": "grid1_0001_Jun14_09.12.44.tif",
        "timestamp": "2021-06-14T09:12:44", "microscope_id": "3593", "microscope_name": "Titan Krios",
        "voltage_kv": 300.0, "cs_mm": 2.7, "magnification": 105000, "pixel_size_a": 0.4175, "binning": 1,
        "super_resolution_factor": 2, "detector_mode": "super-resolution", "movie_format": "tiff",
        "exposure_time_s": 2.0, "n_frames": 50, "total_dose_e_a2": 52.5, "dose_per_frame_e_a2": 1.05,
        "target_defocus_a": 18000.0, "phase_plate": False, "energy_filter_slit_inserted": True,
        "energy_filter_slit_width_ev": 20.0, "spot_size": 5, "image_shift": [0.25, -0.5],
        "gain_reference": "SuperRef_grid1.dm4", "defect_file": "defects_grid1.txt",
        "optics_group_label": "hole1-shot2", "detector_name": None,
    })
    # MDCatch bug 2: super-resolution binning is the int 1 with factor 2 (not the string '1').
    assert isinstance(m.binning, int) and isinstance(m.super_resolution_factor, int)
    assert m.physical_pixel_size_a == approx(0.835)
    assert m.warnings == ()


@pytest.mark.parametrize("bracketed", [True, False])
@pytest.mark.parametrize("dnum", ["3593", None])
def test_mdoc_title_forms(tmp_path, bracketed, dnum):
    # MDCatch bug 1: unbracketed title lines and a missing D-number must not stop the parser.
    p = tmp_path / "m.tif.mdoc"
    p.write_text(w.frame_mdoc(movie_name="m.tif", title_bracketed=bracketed, d_number=dnum, binning="1", pixel_a=0.83))
    m = parse_mdoc(p)
    assert m.microscope_id == dnum
    assert m.microscope_name == "Titan Krios"
    assert m.detector_mode == "counting" and m.super_resolution_factor == 1 and m.pixel_size_a == 0.83
    md = read_mdoc(p)
    assert len(md.titles) == 1 and "T" not in md.header and len(md.sections) == 1


def test_mdoc_session_sections():
    md = read_mdoc(DATA / "session_bracketed.mdoc")
    assert len(md.titles) == 2 and [s[0] for s in md.sections] == ["ZValue", "ZValue"]
    secs = parse_mdoc_sections(DATA / "session_bracketed.mdoc")
    assert [s.movie for s in secs] == ["sq1_0001.tif", "sq1_0002.tif"]
    assert [s.total_dose_e_a2 for s in secs] == [48.0, 60.0]
    assert [s.n_frames for s in secs] == [40, 50]
    assert [s.optics_group_label for s in secs] == ["1", "2"]
    assert all(s.microscope_id is None and s.image_width_px == 5760 and s.image_height_px == 4092 for s in secs)
    second = parse_mdoc(DATA / "session_bracketed.mdoc", movie="sq1_0002.tif")
    assert second.exposure_time_s == 3.75 and second.target_defocus_a == 20000.0
    assert second.timestamp == "2022-02-01T10:00:31"
    with pytest.raises(InputError, match="no section"):
        parse_mdoc(DATA / "session_bracketed.mdoc", movie="other.tif")


def test_mdoc_frame_doses_consistency(tmp_path):
    p = tmp_path / "a.mdoc"
    p.write_text("Voltage = 300\n[FrameSet = 0]\nExposureDose = 0\nFrameDosesAndNumber = 0.8 10 1.2 10\nPixelSpacing = 1\n")
    m = parse_mdoc(p)
    assert m.total_dose_e_a2 == approx(20.0) and m.n_frames == 20 and m.dose_per_frame_e_a2 is None
    assert any("ExposureDose is 0" in x for x in m.warnings)


def test_mdoc_malformed():
    with pytest.raises(InputError) as e:
        parse_mdoc(DATA / "malformed.mdoc")
    assert "line 2" in str(e.value) and "malformed.mdoc" in str(e.value)


def test_mdoc_bad_value(tmp_path):
    p = tmp_path / "b.mdoc"
    p.write_text("Voltage = three hundred\n")
    with pytest.raises(InputError, match="Voltage is not a number"):
        parse_mdoc(p)


# ------------------------------------------------------------------------------------- MRC
@pytest.mark.parametrize("version", [1, 2])
def test_fei_mrc_every_field(tmp_path, version):
    p = tmp_path / "FoilHole_1_Data_2_3_4_5_Fractions.mrc"
    w.write_fei_mrc(p, version=version, shape=(5, 32, 48), dose_e_m2=6.0e20, slit=(True, 15.0), phase_plate=True)
    m = parse_mrc(p)
    _fields(m, {
        "source_format": "fei_mrc", "software": "EPU", "software_version": "2.9.0", "microscope_id": "9952833",
        "microscope_name": "TITAN", "voltage_kv": 200.0, "magnification": 92000, "pixel_size_a": 1.1,
        "binning": 1, "super_resolution_factor": 1, "detector_name": "BM-Falcon", "detector_mode": "counting",
        "movie_format": "mrc", "image_width_px": 48, "image_height_px": 32, "exposure_time_s": 1.0,
        "n_frames": 5, "total_dose_e_a2": 5 * 6.0, "target_defocus_a": 20000.0, "phase_plate": True,
        "energy_filter_slit_inserted": True, "energy_filter_slit_width_ev": 15.0, "spot_size": 9,
        "beam_diameter_um": 1.2, "beam_shift": [0.1, -0.2], "image_shift": [0.3, 0.4],
    })
    assert m.phase_plate_position == (7 if version == 2 else None)
    assert m.objective_aperture == ("OBJ 100" if version == 2 else None)


def test_fei_mrc_single_image_and_padded_records(tmp_path):
    p = tmp_path / "sum.mrc"
    w.write_fei_mrc(p, version=1, shape=(1, 16, 16), fractions=False, dose_e_m2=3.5e21, counting=False)
    m = parse_mrc(p)
    assert m.n_frames == 1 and m.total_dose_e_a2 == approx(35.0) and m.detector_mode == "linear"
    q = tmp_path / "padded.mrc"
    w.write_fei_mrc(q, version=2, shape=(3, 16, 16), pad_record_to=1024, dose_e_m2=1.0e20)
    m = parse_mrc(q)
    assert m.n_frames == 3 and m.total_dose_e_a2 == approx(3.0) and m.phase_plate_position == 7


def test_fei_mrc_bad_metadata_size(tmp_path):
    p = tmp_path / "bad.mrc"
    w.write_fei_mrc(p, version=2, shape=(2, 16, 16), metadata_size=100)
    with pytest.raises(InputError, match="Metadata size"):
        parse_mrc(p)


def test_plain_serialem_mrc(tmp_path):
    p = tmp_path / "movie.mrc"
    w.write_plain_mrc(p, np.zeros((6, 20, 30), np.int8), pixel_a=0.66, label="SerialEMCCD: Dose frac. image, scaled by 1.00  r/f 2")
    m = parse_mrc(p)
    assert m.source_format == "mrc" and m.n_frames == 6 and m.pixel_size_a == approx(0.66, rel=1e-6)
    assert (m.image_width_px, m.image_height_px) == (30, 20) and m.gain_transform_serialem == 2
    assert m.software == "SerialEM"


def test_not_an_mrc(tmp_path):
    p = tmp_path / "junk.mrc"
    p.write_bytes(b"\x01\x02" * 100)
    with pytest.raises(InputError, match="junk.mrc"):
        parse_mrc(p)


# ------------------------------------------------------------------------------------- TIFF / EER
def test_serialem_tiff(tmp_path):
    p = tmp_path / "sq1_0001.tif"
    w.write_serialem_tiff(p, np.ones((7, 40, 60), np.uint8), pixel_a=0.835, rf=5)
    m = parse_tiff(p)
    _fields(m, {
        "source_format": "tiff", "software": "SerialEM", "movie_format": "tiff", "image_width_px": 60,
        "image_height_px": 40, "n_frames": 7, "timestamp": "2022-02-01T10:00:12", "gain_reference": "CountRef_grid1.dm4",
        "defect_file": "defects_grid1.txt", "gain_transform_serialem": 5, "voltage_kv": None, "microscope_id": None,
        "cs_mm": None, "binning": None,
    })
    # MDCatch inverted the resolution (numerator / 2.54e8); the pixel is 2.54e8 / pixels-per-inch.
    assert m.pixel_size_a == approx(0.835, rel=1e-8)


def test_tiff_without_resolution_has_no_pixel_size(tmp_path):
    p = tmp_path / "x.tiff"
    w.write_serialem_tiff(p, np.ones((2, 8, 8), np.uint8), pixel_a=None, rf=None, datetime=None)
    m = parse_tiff(p)
    assert m.pixel_size_a is None and m.gain_reference is None and m.timestamp is None and m.n_frames == 2


def test_eer_header(tmp_path):
    p = tmp_path / "FoilHole_1_Data_2_3_4_5_EER.eer"
    w.write_eer(p, n_frames=12, size=64, items={"exposureTime": "4.5", "totalDose": "27.556", "numberOfFrames": "12",
                                                "commercialName": "Falcon 4i", "acquisitionDateTime": "2021-09-02T17:45:00"})
    m = parse_tiff(p)
    _fields(m, {
        "source_format": "eer", "movie_format": "eer", "detector_mode": "counting", "n_frames": 12,
        "exposure_time_s": 4.5, "total_dose_e_px": 27.556, "total_dose_e_a2": None, "pixel_size_a": None,
        "detector_name": "Falcon 4i", "image_width_px": 64, "timestamp": "2021-09-02T17:45:00",
    })


def test_eer_frame_count_mismatch_and_missing_tag(tmp_path):
    p = tmp_path / "a.eer"
    w.write_eer(p, n_frames=5, items={"numberOfFrames": "6"})
    assert any("6 frames but the file has 5 pages" in x for x in parse_tiff(p).warnings)
    q = tmp_path / "b.eer"
    w.write_eer(q, n_frames=3, metadata=False)
    m = parse_tiff(q)
    assert m.movie_format == "eer" and any("65001" in x for x in m.warnings)


def test_not_a_tiff(tmp_path):
    p = tmp_path / "x.tif"
    p.write_text("hello")
    with pytest.raises(InputError, match="not a readable TIFF"):
        parse_tiff(p)


# ------------------------------------------------------------------------------------- dispatch, merge
def test_detect_format_by_suffix_and_content(tmp_path):
    a = tmp_path / "noext1"
    w.write_serialem_tiff(a, np.ones((1, 4, 4), np.uint8))
    b = tmp_path / "noext2"
    w.write_plain_mrc(b, np.zeros((2, 4, 4), np.float32))
    c = tmp_path / "noext3"
    c.write_text(w.epu_xml())
    d = tmp_path / "noext4"
    d.write_text("Voltage = 300\n")
    assert [detect_format(x) for x in (a, b, c, d)] == ["tiff", "mrc", "xml", "mdoc"]
    assert parse_file(c).voltage_kv == 300.0 and parse_file(d).voltage_kv == 300.0
    e = tmp_path / "noext5"
    e.write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="unrecognised file"):
        detect_format(e)
    with pytest.raises(InputError, match="no such file"):
        detect_format(tmp_path / "missing.xml")


def test_merge_metadata_file_with_movie(tmp_path):
    xml = parse_epu_xml(DATA / "epu_falcon4_eer.xml")
    p = tmp_path / "m_EER.eer"
    w.write_eer(p, n_frames=1404, size=32, items={"exposureTime": "4.5", "totalDose": "27.556"})
    movie = parse_tiff(p)
    m = merge(xml, movie)
    # the counted EER frames replace the XML's estimate; the XML's values win elsewhere
    assert m.n_frames == 1404 and m.frames_estimated is False
    assert m.pixel_size_a == approx(0.83) and m.image_width_px == 32 and m.total_dose_e_a2 == approx(40.0)
    assert m.source_format == "epu_xml+eer" and m.source.endswith("m_EER.eer")
    # round trip through JSON-ready dicts is exact
    assert AcquisitionMetadata.from_dict(m.to_dict()) == m
