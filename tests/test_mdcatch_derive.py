"""MDCatch configuration, detector resolution and derived values (with MDCatch's bugs fixed)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from autospa.errors import InputError
from autospa.mdcatch.derive import (
    DOWNSCALE_BOXES,
    box_and_mask,
    build_it_options,
    derive_parameters,
    downscaled_box,
    eer_grouping,
    frame_grouping,
)
from autospa.mdcatch.detectors import load_config, presets_by_size, resolve, user_config_path
from autospa.mdcatch.metadata import AcquisitionMetadata
from autospa.mdcatch.parsers.epu_xml import parse_epu_xml
from autospa.mdcatch.parsers.mdoc import parse_mdoc

DATA = Path(__file__).parent / "data" / "mdcatch"
sys.path.insert(0, str(DATA))
import mdcatch_writers as w  # noqa: E402

approx = pytest.approx


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no user copy
    return load_config()


# ------------------------------------------------------------------------------------- formulas
def test_box_and_mask_spa_and_helical():
    # d = 180 / 1.06 = 169.81 px: mask ceil(186.79) = 187, box even ceil(254.72) = 256
    assert box_and_mask(180.0, 1.06) == (256, 187)
    # exact multiples stay: d = 100 px -> box 150, mask 110
    assert box_and_mask(100.0, 1.0) == (150, 110)
    # helical, width 100 px: box even ceil(180) = 180, mask ceil(162) = 162
    assert box_and_mask(100.0, 1.0, helical=True) == (180, 162)
    with pytest.raises(InputError):
        box_and_mask(0.0, 1.0)


def test_downscaled_box_relion_it_rule():
    # box 256 at 1.06 A: 48 -> 5.65 A, 64 -> 4.24 A, 96 -> 2.83 A < 3.75: 96
    assert downscaled_box(256, 1.06) == 96
    # never larger than the box: box 60 at 5 A -> 48 gives 6.25 A, 64 > 60 -> 60
    assert downscaled_box(60, 5.0) == 60
    # first size whose pixel is below 3.75 A, brute force over a range
    for box in range(50, 700, 37):
        for px in (0.5, 0.83, 1.1, 2.0):
            small = downscaled_box(box, px)
            ok = [s for s in DOWNSCALE_BOXES if s <= box and px * box / s < 3.75]
            assert small == (ok[0] if ok else box) or (not ok and small == box)


def test_frame_grouping_equals_mdcatch_rule():
    def mdcatch(dpf: float) -> int:
        g = 1
        if dpf < 0.8:
            g = 2
        if 2 * dpf < 0.8:
            g = 3
        return g

    for i in range(1, 400):
        dpf = i / 200.0
        assert frame_grouping(dpf) == mdcatch(dpf), dpf


def test_eer_grouping_fixes_floor_division():
    # MDCatch: 1 // 0.05 == 19.0 (floating point); the grouping to 1 e/A^2 is 20.
    assert 1 // 0.05 == 19.0
    assert eer_grouping(0.05, 1000, 1.0) == (20, 50, 0)
    g, n, drop = eer_grouping(40.0 / 1404, 1404, 1.0)
    assert g == 35 and n == 1404 // 35 and drop == 1404 % 35
    assert eer_grouping(2.0, 10, 1.0) == (1, 10, 0)
    assert eer_grouping(0.01, None, 0.5) == (50, None, None)


# ------------------------------------------------------------------------------------- config
def test_shipped_config(config):
    assert set(config.detectors) >= {"Falcon3", "Falcon4", "Falcon4i", "K2", "K3"}
    k3 = config.detectors["K3"]
    assert (k3.width_px, k3.height_px, k3.super_resolution, k3.patches) == (5760, 4092, True, (7, 5))
    assert k3.mtf_name("counting", 300.0) == "mtf_K3_300kv_nocds.star"
    assert config.detectors["Falcon3"].mtf_name("linear", 200) == "mtf_falcon2_200kV.star"
    assert config.microscopes["3593"].cs_mm == 2.7 and config.microscopes["3593"].gatan_camera == "K3"
    assert config.default("particle_diameter_a") == 180.0
    assert [p.key for p, f in presets_by_size(config, 11520, 8184)] == ["K3"]
    assert {p.key for p, f in presets_by_size(config, 4096, 4096)} == {"Falcon3", "Falcon4", "Falcon4i"}


def test_user_and_explicit_config_override(tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    user = user_config_path()
    assert user == xdg / "autospa" / "detectors.toml"
    user.parent.mkdir(parents=True)
    user.write_text('[microscopes.1234]\nname = "Arctica"\ncs_mm = 2.7\ntfs_camera = "Falcon3"\n'
                    "[defaults]\nparticle_diameter_a = 150.0\n")
    cfg = load_config()
    assert cfg.microscopes["1234"].name == "Arctica" and "3593" in cfg.microscopes  # merged, not replaced
    assert cfg.default("particle_diameter_a") == 150.0 and cfg.default("symmetry") == "C1"
    explicit = tmp_path / "site.toml"
    explicit.write_text("[defaults]\nparticle_diameter_a = 120.0\n[detectors.K3]\nframe_rate_hz = 1500.0\n")
    cfg = load_config(explicit)
    assert cfg.default("particle_diameter_a") == 120.0 and cfg.detectors["K3"].frame_rate_hz == 1500.0
    assert cfg.detectors["K3"].width_px == 5760 and cfg.sources[-1] == str(explicit)
    assert load_config(explicit, use_user_config=False).microscopes.get("1234") is None


@pytest.mark.parametrize(
    "text,problem",
    [
        ("[defaults\n", "not valid TOML"),
        ('[microscopes.1]\nname = "x"\ntfs_camera = "Falcon9"\n', "not a [detectors] preset"),
        ('[detectors.X]\nvendor = "TFS"\n', "[detectors.X] is invalid"),
    ],
)
def test_bad_config(tmp_path, config, text, problem):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(InputError) as e:
        load_config(p, use_user_config=False)
    assert problem in str(e.value) and "bad.toml" in str(e.value)
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.toml")


# ------------------------------------------------------------------------------------- resolve
def test_resolve_by_microscope_table(config):
    m = resolve(parse_epu_xml(DATA / "epu_k3_vpp.xml"), config)
    assert m.detector_model == "K3" and m.cs_mm == 2.7 and m.microscope_name == "Krios3"
    m = resolve(parse_epu_xml(DATA / "epu_falcon4_eer.xml"), config)
    assert m.detector_model == "Falcon4" and m.cs_mm == 2.7


def test_resolve_unknown_microscope_is_a_warning(config):
    # MDCatch bug 5: an unknown ID gave a KeyError in the GUI.
    m = resolve(parse_epu_xml(DATA / "epu_falcon3_fractions.xml"), config)
    assert m.cs_mm is None
    assert any("777 is not in the microscope table" in x for x in m.warnings)
    assert any("Cs unknown" in x for x in m.warnings)
    # 4096 x 4096 from an MRC-fraction camera: the three Falcons fit; the non-EER one is chosen
    m = resolve(parse_epu_xml(DATA / "epu_falcon3_fractions.xml").replace(movie_format="mrc"), config)
    assert m.detector_model == "Falcon3"


def test_default_cs_for_unidentified_microscopes(tmp_path, config):
    m = AcquisitionMetadata(source="x", source_format="mdoc", voltage_kv=300.0)
    assert resolve(m, config).cs_mm is None  # the shipped table sets no default
    site = tmp_path / "site.toml"
    site.write_text("[defaults]\ncs_mm = 2.62\n")
    cfg = load_config(site)
    r = resolve(m, cfg)
    assert r.cs_mm == 2.62 and any("[defaults] cs_mm" in w for w in r.warnings)
    assert not any("Cs unknown" in w for w in r.warnings)
    # a known microscope keeps its own Cs; a Cs in the metadata wins over both
    assert resolve(parse_epu_xml(DATA / "epu_k3_vpp.xml"), cfg).cs_mm == 2.7
    assert resolve(m.replace(cs_mm=1.4), cfg).cs_mm == 1.4
    site.write_text('[defaults]\ncs_mm = "2.7"\n')
    with pytest.raises(InputError, match="cs_mm must be a number"):
        load_config(site)


def test_resolve_serialem_super_resolution_by_scope_and_size(config):
    m = resolve(parse_mdoc(DATA / "frames_unbracketed.tif.mdoc"), config)
    assert m.detector_model == "K3"  # Krios3 has Falcon3 and K3; only the K3 records super-resolution
    bare = AcquisitionMetadata(source="x", source_format="tiff", movie_format="tiff",
                               image_width_px=11520, image_height_px=8184)
    r = resolve(bare, config)
    assert r.detector_model == "K3" and r.super_resolution_factor == 2 and r.detector_mode == "super-resolution"
    r = resolve(bare.replace(image_width_px=3838, image_height_px=3710), config)
    assert r.detector_model == "K2" and r.super_resolution_factor == 1 and r.detector_mode == "counting"


def test_resolve_ambiguous_and_mismatched_size(config):
    r = resolve(AcquisitionMetadata(source="x", source_format="eer", movie_format="eer",
                                    image_width_px=4096, image_height_px=4096), config)
    assert r.detector_model is None and any("ambiguous" in x and "Falcon4i" in x for x in r.warnings)
    r = resolve(AcquisitionMetadata(source="x", source_format="mdoc", detector_name="K3",
                                    image_width_px=100, image_height_px=80), config)
    assert r.detector_model == "K3" and any("is not a K3 frame" in x for x in r.warnings)


# ------------------------------------------------------------------------------------- derive
def test_derive_k3_counting(config):
    m = resolve(parse_epu_xml(DATA / "epu_k3_vpp.xml"), config)
    d = derive_parameters(m, config)
    assert d.dose_per_frame_e_a2 == approx(45.0 / 50)
    assert d.motioncorr_bin_factor == 1 and d.micrograph_pixel_size_a == approx(1.06)
    assert d.group_frames == 1 and d.eer_grouping is None
    assert (d.box_size_px, d.mask_size_px, d.downscaled_box_px) == (256, 187, 96)
    assert d.mask_diameter_a == approx(187 * 1.06)
    assert d.downscaled_pixel_size_a == approx(1.06 * 256 / 96)
    # dose rate: 45 e/A^2 x (1.06 A)^2 / 2.5 s per physical pixel
    assert d.dose_rate_e_px_s == approx(45.0 * 1.06**2 / 2.5)
    assert (d.patch_x, d.patch_y) == (7, 5) and d.mtf_name == "mtf_K3_300kv_nocds.star"
    assert d.log_diameter_min_a == approx(0.8333 * 180) and d.log_diameter_max_a == 180.0
    assert d.tube_diameter_a is None and d.warnings == ()


def test_derive_serialem_super_resolution_uses_binned_pixel(config):
    # MDCatch bug 2: SerialEM super-resolution kept motioncorr bin 1 and boxes at the 0.4175 A pixel.
    m = resolve(parse_mdoc(DATA / "frames_unbracketed.tif.mdoc"), config)
    d = derive_parameters(m, config, particle_diameter_a=180.0)
    assert d.motioncorr_bin_factor == 2 and d.micrograph_pixel_size_a == approx(0.835)
    expect_box, expect_mask = box_and_mask(180.0, 0.835)
    assert (d.box_size_px, d.mask_size_px) == (expect_box, expect_mask) == (324, 238)
    assert d.dose_per_frame_e_a2 == approx(1.05) and d.group_frames == 1
    assert d.dose_rate_e_px_s == approx(52.5 * 0.835**2 / 2.0)


def test_derive_eer(config):
    m = resolve(parse_epu_xml(DATA / "epu_falcon4_eer.xml"), config).replace(n_frames=1404, frames_estimated=False)
    d = derive_parameters(m, config)
    dpf = 40.0 / 1404
    assert d.dose_per_frame_e_a2 == approx(dpf)
    assert d.eer_grouping == 35 and d.eer_fractions == 40 and d.eer_dropped_frames == 4
    # MDCatch bug 4: motion correction got dose_per_frame 1.0 instead of the grouped fraction's dose
    assert d.motioncorr_dose_per_frame_e_a2 == approx(35 * dpf)
    assert d.group_frames == 1
    d2 = derive_parameters(m, config, eer_target_dose_e_a2=0.5)
    assert d2.eer_grouping == round(0.5 / dpf)


def test_derive_without_frames_or_pixel(config):
    m = AcquisitionMetadata(source="x", source_format="tiff", total_dose_e_a2=40.0)
    d = derive_parameters(m, config, helical=True, particle_diameter_a=100.0)
    assert d.dose_per_frame_e_a2 is None and d.box_size_px is None and d.tube_diameter_a == 120.0
    assert any("dose per frame unknown" in x for x in d.warnings)
    assert any("pixel size unknown" in x for x in d.warnings)
    # MDCatch bug 7: a frame count of 0 gave DosePerFrame 0; here it stays unknown
    assert derive_parameters(m.replace(n_frames=0), config).dose_per_frame_e_a2 is None


def test_it_options(config):
    m = resolve(parse_mdoc(DATA / "frames_unbracketed.tif.mdoc"), config)
    d = derive_parameters(m, config, particle_diameter_a=160.0)
    opts = build_it_options(m, d, config, movies_glob="/data/s/*.tif", gain_reference="/data/s/gain.mrc",
                            gain_rot=1, gain_flip=2, mtf_file="/mtf/k3.star", defect_file="/data/s/defects.txt",
                            symmetry="D2")
    raw = opts["options"]
    assert opts["movies"] == "/data/s/*.tif" and opts["gain"] == "/data/s/gain.mrc"
    assert opts["pixel_size_a"] == approx(0.4175)  # the super-resolution pixel, binned by 2
    assert opts["super_resolution"] is True
    assert opts["voltage_kv"] == 300.0 and opts["cs_mm"] == 2.7 and opts["amplitude_contrast"] == 0.1
    assert opts["dose_per_frame"] == approx(1.05) and opts["phase_plate"] is False
    assert "eer_grouping" not in opts  # not an EER movie: the pipeline's default stays
    assert opts["particle_diameter_a"] == 160.0 and opts["symmetry"] == "D2"
    assert opts["box_size_px"] == d.box_size_px == 288 and opts["downscaled_box_px"] == d.downscaled_box_px == 96
    assert opts["mask_diameter_a"] == approx(d.mask_diameter_a, abs=0.005) and d.mask_size_px == 211
    assert opts["log_diameter_ratio"] == 0.8333 and opts["movies_per_pass"] == 50
    assert raw == {
        "prep__importmovies__optics_group_name": "opticsGroup1",
        "prep__importmovies__fn_mtf": "/mtf/k3.star",
        "prep__motioncorr__fn_defect": "/data/s/defects.txt",
        "prep__motioncorr__gain_rot": "90 degrees (1)",
        "prep__motioncorr__gain_flip": "Flip left to right (2)",
        "prep__motioncorr__group_frames": "1",
        "prep__motioncorr__patch_x": "7",
        "prep__motioncorr__patch_y": "5",
    }
    with pytest.raises(InputError, match="Cs"):
        build_it_options(m.replace(cs_mm=None), d, config, movies_glob="x")
    with pytest.raises(InputError, match="gain_rot"):
        build_it_options(m, d, config, movies_glob="x", gain_rot=4)
    assert math.isfinite(opts["dose_per_frame"])


def test_it_options_are_autospa_it_settings(config):
    """The configuration is accepted by ``autospa it`` and becomes relion_it's options with our values."""
    from autospa.orchestration.it import config_from_mapping, derive_options

    m = resolve(parse_mdoc(DATA / "frames_unbracketed.tif.mdoc"), config)
    d = derive_parameters(m, config, particle_diameter_a=160.0)
    it = derive_options(config_from_mapping(build_it_options(m, d, config, movies_glob="Movies/*.tif", gain_rot=3)))
    assert it["prep__importmovies__fn_in_raw"] == "Movies/*.tif"
    assert float(it["prep__importmovies__angpix"]) == approx(0.4175)
    assert it["prep__motioncorr__bin_factor"] == "2"
    assert float(it["prep__motioncorr__dose_per_frame"]) == approx(1.05)
    assert float(it["prep__importmovies__kV"]) == 300.0 and float(it["prep__importmovies__Cs"]) == 2.7
    assert it["prep__motioncorr__gain_rot"] == "270 degrees (3)" and it["prep__motioncorr__patch_x"] == "7"
    assert it["prep__ctffind__do_phaseshift"] == "No"
    assert it["proc__extract__extract_size"] == "288" and it["proc__extract__rescale"] == "96"
    assert it["proc__extract__do_rescale"] == "Yes"
    assert float(it["proc__class2d__particle_diameter"]) == approx(d.mask_diameter_a, abs=0.005)
    assert float(it["proc__autopick__log_diam_max"]) == 160.0
    assert float(it["proc__autopick__log_diam_min"]) == approx(0.8333 * 160, rel=1e-4)
    assert it["prep__do_at_most"] == "50"
    # EER: the grouping and the dose of one grouped fraction (MDCatch bug 4)
    e = resolve(parse_epu_xml(DATA / "epu_falcon4_eer.xml"), config).replace(n_frames=1404, frames_estimated=False)
    de = derive_parameters(e, config)
    it = derive_options(config_from_mapping(build_it_options(e, de, config, movies_glob="Movies/*.eer")))
    assert it["prep__motioncorr__eer_grouping"] == "35"
    assert float(it["prep__motioncorr__dose_per_frame"]) == approx(35 * 40.0 / 1404, rel=1e-5)
    assert it["prep__motioncorr__bin_factor"] == "1"


def test_fei_mrc_derives_nonzero_dose_per_frame(tmp_path, config):
    p = tmp_path / "m.mrc"
    w.write_fei_mrc(p, version=2, shape=(4, 16, 16), dose_e_m2=8.0e20)
    from autospa.mdcatch.parsers.fei_mrc import parse_mrc

    d = derive_parameters(resolve(parse_mrc(p), config), config)
    assert d.dose_per_frame_e_a2 == approx(8.0)
