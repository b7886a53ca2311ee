"""Gain reference / defect / MTF discovery, gain size check and gain orientation."""

from __future__ import annotations

import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from autospa.errors import InputError
from autospa.mdcatch.detectors import load_config, resolve
from autospa.mdcatch.gain import (
    ORIENTATIONS,
    check_gain_size,
    find_gain_orientation,
    find_gain_reference,
    find_mtf,
    gain_report,
    read_image,
    read_image_shape,
    relion_gain_transform,
)
from autospa.mdcatch.metadata import AcquisitionMetadata

DATA = Path(__file__).parent / "data" / "mdcatch"
sys.path.insert(0, str(DATA))
import mdcatch_writers as w  # noqa: E402


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return load_config()


def test_relion_gain_transform_group():
    a = np.arange(12.0).reshape(3, 4)
    # clockwise quarter turn as displayed with row 0 on top: first row becomes last column
    r1 = relion_gain_transform(a, 1, 0)
    assert r1.shape == (4, 3) and np.array_equal(r1[:, -1], a[0]) and np.array_equal(r1[0], a[::-1, 0])
    assert np.array_equal(relion_gain_transform(relion_gain_transform(a, 1, 0), 3, 0), a)
    assert np.array_equal(relion_gain_transform(a, 2, 0), a[::-1, ::-1])
    assert np.array_equal(relion_gain_transform(a, 0, 1), a[::-1]) and np.array_equal(relion_gain_transform(a, 0, 2), a[:, ::-1])
    # flip applied after the rotation
    assert np.array_equal(relion_gain_transform(a, 1, 1), np.rot90(a, -1)[::-1])
    # the 8 orientations are distinct, and flip 2 duplicates one of them
    sq = np.arange(16.0).reshape(4, 4)
    outs = {relion_gain_transform(sq, r, f).tobytes() for r, f in ORIENTATIONS}
    assert len(outs) == 8 and relion_gain_transform(sq, 0, 2).tobytes() in outs
    with pytest.raises(ValueError):
        relion_gain_transform(a, 4, 0)


@pytest.mark.parametrize(
    "gain,movie,match,fixes",
    [
        ((4092, 5760), (4092, 5760), True, []),
        ((5760, 4092), (4092, 5760), False, [(1, 1.0)]),
        ((8184, 11520), (4092, 5760), False, [(0, 2.0)]),
        ((11520, 8184), (4092, 5760), False, [(1, 2.0)]),
        ((4092, 5760), (8184, 11520), False, [(0, 0.5)]),
        ((4096, 4096), (4092, 5760), False, []),
    ],
)
def test_check_gain_size(gain, movie, match, fixes):
    c = check_gain_size(gain, movie)
    assert c.matches is match
    assert [(f.gain_rot, f.gain_bin) for f in c.fixes] == fixes
    if fixes and fixes[0][0] == 1:
        assert "rotate the gain by 90 degrees" in c.message
    if fixes and fixes[0][1] == 2.0:
        assert "bin the gain by 2" in c.message
    if not match and not fixes:
        assert "no rotation or 2x binning" in c.message
    assert not check_gain_size(None, movie).matches


def _poisson_frames(gain_as_seen: np.ndarray, n: int, dose: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.poisson(dose / gain_as_seen, size=(n, *gain_as_seen.shape)).astype(np.uint8)


@pytest.mark.parametrize("rot,flip", ORIENTATIONS)
def test_find_gain_orientation_recovers_every_orientation(rot, flip):
    rng = np.random.default_rng(7)
    gain = np.exp(0.1 * rng.standard_normal((48, 64)))  # pixel-to-pixel gain, mean ~1
    seen = relion_gain_transform(gain, rot, flip)
    frames = _poisson_frames(seen, 6, 3.0, seed=rot * 10 + flip)
    ranking = find_gain_orientation(gain, frames.sum(0))
    assert (ranking[0].gain_rot, ranking[0].gain_flip) == (rot, flip)
    # expected r ~ 0.1 * 18 / sqrt((0.1 * 18)**2 + 18) = 0.39 for 18 counts per pixel and a 10 % gain spread
    assert ranking[0].correlation > 0.3 and ranking[0].correlation - ranking[1].correlation > 0.25
    assert np.array_equal(relion_gain_transform(gain, ranking[0].gain_rot, ranking[0].gain_flip), seen)
    assert len(ranking) == 4  # a 48 x 64 gain fits a (48, 64) or (64, 48) movie in 4 orientations each


def test_find_gain_orientation_super_resolution_gain():
    rng = np.random.default_rng(3)
    gain_c = np.exp(0.15 * rng.standard_normal((32, 32)))
    gain_sr = np.kron(gain_c, np.ones((2, 2)))  # super-resolution gain of counting movies
    frames = _poisson_frames(relion_gain_transform(gain_c, 3, 1), 8, 4.0, seed=1)
    best = find_gain_orientation(gain_sr, frames.sum(0))[0]
    assert (best.gain_rot, best.gain_flip) == (3, 1)
    assert find_gain_orientation(np.ones((5, 7)), np.ones((20, 20))) == []


def test_read_image_and_shape(tmp_path):
    g = np.arange(12, dtype=np.float32).reshape(3, 4)
    with mrcfile.new(tmp_path / "g.mrc") as m:
        m.set_data(g)
    tifffile.imwrite(tmp_path / "g.tiff", g, photometric="minisblack")
    assert read_image_shape(tmp_path / "g.mrc") == (3, 4) == read_image_shape(tmp_path / "g.tiff")
    assert np.array_equal(read_image(tmp_path / "g.mrc"), g) and np.array_equal(read_image(tmp_path / "g.tiff"), g)
    stack = np.stack([g, 2 * g, 3 * g])
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    assert np.array_equal(read_image(tmp_path / "s.tif", max_frames=None), 6 * g)
    assert np.array_equal(read_image(tmp_path / "s.tif", max_frames=2), 3 * g)
    assert read_image_shape(tmp_path / "x.dm4") is None
    with pytest.raises(InputError, match="dm2mrc"):
        read_image(tmp_path / "x.dm4")
    with pytest.raises(InputError, match="EER"):
        read_image(tmp_path / "x.eer")
    (tmp_path / "bad.mrc").write_bytes(b"nope")
    with pytest.raises(InputError, match="bad.mrc"):
        read_image_shape(tmp_path / "bad.mrc")


def test_find_gain_by_recorded_name_then_pattern(tmp_path, config):
    session = tmp_path / "session"
    movies = session / "frames"
    movies.mkdir(parents=True)
    movie = movies / "sq1_0001.tif"
    movie.write_bytes(b"")
    meta = AcquisitionMetadata(source="x", source_format="mdoc", gain_reference=r"X:\Data\grid1\CountRef_grid1.mrc",
                               detector_model="K3")
    assert find_gain_reference(meta, session, config, movie) is None
    (movies / "K3_gain.tiff").write_bytes(b"")  # matches the K3 pattern *_gain.tiff
    assert find_gain_reference(meta, session, config, movie) == movies / "K3_gain.tiff"
    (session / "countref_grid1.MRC").write_bytes(b"")  # the recorded name (case-insensitive) wins
    assert find_gain_reference(meta, session, config, movie) == session / "countref_grid1.MRC"
    # configured gain_dirs, relative to the session
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[paths]\ngain_dirs = ["../gains"]\nmtf_dirs = ["../mtf"]\n')
    cfg = load_config(cfg_file, use_user_config=False)
    (tmp_path / "gains").mkdir()
    (tmp_path / "gains" / "EER_GainReference.gain").write_bytes(b"")
    eer = AcquisitionMetadata(source="x", source_format="epu_xml", gain_reference="EER_GainReference.gain")
    assert find_gain_reference(eer, session, cfg) == tmp_path / "gains" / "EER_GainReference.gain"
    (tmp_path / "mtf").mkdir()
    (tmp_path / "mtf" / "mtf_K3_300kv_nocds.star").write_text("data_\n")
    assert find_mtf("mtf_K3_300kv_nocds.star", session, cfg) == tmp_path / "mtf" / "mtf_K3_300kv_nocds.star"
    assert find_mtf("mtf_K3_300kv_nocds.star", session, config) is None


def test_gain_report_measures_orientation(tmp_path, config):
    session = tmp_path / "s"
    session.mkdir()
    rng = np.random.default_rng(11)
    gain = np.exp(0.1 * rng.standard_normal((40, 56))).astype(np.float32)
    with mrcfile.new(session / "CountRef_x.mrc") as m:
        m.set_data(gain)
    seen = relion_gain_transform(gain, 1, 0)  # the camera's frames are the gain turned a quarter
    movie = session / "a.tif"
    w.write_serialem_tiff(movie, _poisson_frames(seen, 8, 3.0, seed=2), gain="CountRef_x.mrc", rf=0)
    meta = resolve(AcquisitionMetadata(source=str(movie), source_format="tiff", movie_format="tiff",
                                       image_width_px=40, image_height_px=56, gain_reference="CountRef_x.mrc"), config)
    rep = gain_report(meta, session, config, mtf_name=None, movie=movie)
    assert rep.gain_reference == str(session / "CountRef_x.mrc")
    assert not rep.check.matches and [(f.gain_rot, f.gain_bin) for f in rep.check.fixes] == [(1, 1.0)]
    assert rep.orientation == "frames" and (rep.gain_rot, rep.gain_flip) == (1, 0) and rep.usable
    d = rep.to_dict()
    assert d["orientation_scores"][0]["gain_rot"] == 1
    assert tuple(d["check"]["gain_shape"]) == (40, 56) and tuple(d["check"]["movie_shape"]) == (56, 40)
    # gain-corrected (flat) frames: nothing correlates, the orientation stays unsettled
    flat = session / "b.tif"
    w.write_serialem_tiff(flat, np.random.default_rng(0).poisson(3.0, (8, 56, 40)).astype(np.uint8))
    rep = gain_report(meta, session, config, mtf_name=None, movie=flat)
    assert rep.orientation.startswith("ambiguous") and not rep.usable and (rep.gain_rot, rep.gain_flip) == (0, 0)
