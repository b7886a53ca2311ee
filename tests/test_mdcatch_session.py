"""Session watcher: completeness over polls, drift, optics groups, session files, persistence."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from autospa.errors import InputError
from autospa.io.session_files import read_key_values, read_session_json
from autospa.io.star import read_star
from autospa.mdcatch.detectors import load_config
from autospa.mdcatch.gain import relion_gain_transform
from autospa.mdcatch.session import (
    SessionWatcher,
    WatchSettings,
    detect_software,
    ingest_file,
    movies_glob,
    pair_for_file,
)

DATA = Path(__file__).parent / "data" / "mdcatch"
sys.path.insert(0, str(DATA))
import mdcatch_writers as w  # noqa: E402

approx = pytest.approx


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return load_config()


def _epu_grid(session: Path, disc: int = 1, square: int = 100) -> Path:
    d = session / f"Images-Disc{disc}" / f"GridSquare_{square}" / "Data"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _bump_mtime(path: Path, seconds: int) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def _add_epu_movie(d: Path, i: int, *, frames: int = 4, dose: float = 4.0e21, mag: int = 105000,
                   pixel_m: float = 1.06e-10, xml: bool = True, sr: int = 1, size=(48, 64),
                   gain: np.ndarray | None = None) -> Path:
    stem = f"FoilHole_{1000 + i}_Data_2000_2001_20210614_0831{i:02d}"
    if xml:
        (d / (stem + ".xml")).write_text(w.epu_xml(width=size[1], height=size[0], n_fractions=frames, dose_e_m2=dose,
                                                   magnification=mag, pixel_size_m=pixel_m * sr, super_resolution=sr,
                                                   beam_shift=(0.01 * i, -0.01 * i)))
    if gain is None:
        data = np.ones((frames, *size), np.uint8)
    else:
        data = np.random.default_rng(i).poisson(3.0 / gain, size=(frames, *gain.shape)).astype(np.uint8)
    movie = d / (stem + "_fractions.tiff")
    w.write_serialem_tiff(movie, data, rf=None, pixel_a=None)
    _bump_mtime(movie, i)  # acquisition order
    return movie


def test_epu_session_over_polls(tmp_path, config):
    session, out = tmp_path / "session", tmp_path / "out"
    d = _epu_grid(session)
    m0 = _add_epu_movie(d, 0)
    m1 = _add_epu_movie(d, 1, xml=False)  # metadata not written yet
    watcher = SessionWatcher(session, out, config)
    r = watcher.poll()
    assert r.ingested == [] and r.pending == 2 and watcher.software == "EPU"
    r = watcher.poll()
    assert [x["movie"] for x in r.ingested] == [str(m0)] and r.first_movie and r.pending == 1
    # the second movie is still being written: it grows between polls
    (d / (m1.name[: -len("_fractions.tiff")] + ".xml")).write_text(
        w.epu_xml(width=64, height=48, n_fractions=4, beam_shift=(0.01, -0.01)))
    with open(m1, "ab") as fh:
        fh.write(b"\0" * 16)
    r = watcher.poll()
    assert r.ingested == [] and r.pending == 1
    r = watcher.poll()
    assert [x["movie"] for x in r.ingested] == [str(m1)] and not r.first_movie and r.total == 2

    ref = watcher.reference
    assert ref.detector_model == "K3" and ref.n_frames == 4 and ref.total_dose_e_a2 == approx(40.0)
    assert ref.movie == str(m0) and ref.source_format == "epu_xml+tiff"
    state = read_session_json(out / "session.json")
    assert [x["movie"] for x in state["movies"]] == [str(m0), str(m1)]
    assert state["movies"][1]["beam_shift"] == [0.01, -0.01]
    assert state["derived"]["dose_per_frame_e_a2"] == approx(10.0)
    assert state["movies_glob"] == str(session.resolve() / "Images-Disc*" / "GridSquare_*" / "Data"
                                       / "FoilHole_*_Data_*_fractions.tiff")
    assert state["drift"] == [] and state["failed"] == {} and state["watch"]["pending"] == {}

    kv = read_key_values(out / "session_params.txt")
    assert (out / "session_params.txt").read_text().startswith(f"Movies dir: {session.resolve()}\n\n")
    assert kv["session.movies"] == "2" and kv["metadata.pixel_size_a"] == "1.06" and kv["derived.box_size_px"] == "256"
    assert list(kv) == sorted(kv)

    star = read_star(out / "movies.star")
    optics = star["optics"].to_dict("records")
    assert optics == [{"rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1, "rlnMicrographOriginalPixelSize": 1.06,
                       "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}]
    assert list(star["movies"]["rlnMicrographMovieName"]) == [str(m0), str(m1)]
    assert (out / "movies.star").read_text().lstrip().startswith("# version 30001")


def test_drift_and_optics_groups(tmp_path, config):
    session, out = tmp_path / "s", tmp_path / "o"
    d = _epu_grid(session)
    _add_epu_movie(d, 0)
    _add_epu_movie(d, 1, dose=4.1e21)  # within 5 %
    _add_epu_movie(d, 2, dose=4.6e21)  # dose drift
    _add_epu_movie(d, 3, mag=130000)  # magnification drift -> new optics group
    _add_epu_movie(d, 4, pixel_m=0.83e-10)  # pixel drift -> new optics group
    _add_epu_movie(d, 5, sr=2, size=(96, 128), pixel_m=0.53e-10)  # super-resolution, 0.53 A -> new group
    watcher = SessionWatcher(session, out, config)
    watcher.poll()
    r = watcher.poll()
    assert r.total == 6
    flags = {(Path(f["movie"]).name[:13], f["field"]) for f in r.drift}
    assert flags == {
        ("FoilHole_1002", "total_dose_e_a2"),
        ("FoilHole_1003", "magnification"),
        ("FoilHole_1004", "pixel_size_a"),
        ("FoilHole_1005", "pixel_size_a"),
        ("FoilHole_1005", "detector_mode"),
    }
    dose_flag = next(f for f in r.drift if f["field"] == "total_dose_e_a2")
    assert dose_flag["reference"] == approx(40.0) and dose_flag["value"] == approx(46.0)
    groups = [m["optics_group"] for m in watcher.state["movies"]]
    assert groups == [1, 1, 1, 2, 3, 4]
    star = read_star(out / "movies.star")
    assert list(star["optics"]["rlnOpticsGroup"]) == [1, 2, 3, 4]
    assert list(star["optics"]["rlnMicrographOriginalPixelSize"]) == approx([1.06, 1.06, 0.83, 0.53])
    assert list(star["movies"]["rlnOpticsGroup"]) == groups


def test_state_persists_between_processes(tmp_path, config):
    session, out = tmp_path / "s", tmp_path / "o"
    d = _epu_grid(session)
    _add_epu_movie(d, 0)
    SessionWatcher(session, out, config).poll()  # first sighting, saved
    r = SessionWatcher(session, out, config).poll()  # a new process sees it stable
    assert len(r.ingested) == 1 and r.first_movie
    _add_epu_movie(d, 1)
    SessionWatcher(session, out, config).poll()
    w3 = SessionWatcher(session, out, config)
    r = w3.poll()
    assert len(r.ingested) == 1 and not r.first_movie and w3.n_movies == 2
    assert w3.reference.movie.endswith("083100_fractions.tiff")
    assert read_session_json(out / "session.json")["watch"]["polls"] == 4
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(InputError, match="belongs to session"):
        SessionWatcher(other, out, config)


def test_failed_movie_and_epu_sum(tmp_path, config):
    session, out = tmp_path / "s", tmp_path / "o"
    d = _epu_grid(session)
    good = _add_epu_movie(d, 0)
    bad_stem = "FoilHole_9_Data_9_9_20210614_083199"
    (d / (bad_stem + ".xml")).write_text("<MicroscopeImage><broken>")
    (d / (bad_stem + "_fractions.tiff")).write_bytes(b"not a tiff")
    # a plain (unsuffixed) single-image MRC beside its XML is EPU's sum, not a movie
    sum_stem = "FoilHole_8_Data_8_8_20210614_083198"
    (d / (sum_stem + ".xml")).write_text(w.epu_xml(width=64, height=48))
    with mrcfile.new(d / (sum_stem + ".mrc")) as m:
        m.set_data(np.zeros((48, 64), np.float32))
    watcher = SessionWatcher(session, out, config)
    watcher.poll()
    r = watcher.poll()
    assert [x["movie"] for x in r.ingested] == [str(good)]
    assert list(r.failed) == [str(d / (bad_stem + "_fractions.tiff"))]
    assert "not a well-formed XML" in next(iter(r.failed.values()))
    assert watcher.state["ignored"] == [str(d / (sum_stem + ".mrc"))]
    r = watcher.poll()  # unchanged failures are not retried
    assert r.failed == {} and r.ingested == []


def test_serialem_session_per_movie_and_session_mdoc(tmp_path, config):
    session, out = tmp_path / "sem", tmp_path / "o"
    session.mkdir()
    a = session / "grid1_0001.tif"
    w.write_serialem_tiff(a, np.ones((5, 16, 24), np.uint8), pixel_a=0.4175)
    (session / "grid1_0001.tif.mdoc").write_text(w.frame_mdoc(movie_name="grid1_0001.tif", n_frames=5, dose=5.0))
    # movies named by a session mdoc's sections
    for name in ("sq1_0001.tif", "sq1_0002.tif"):
        w.write_serialem_tiff(session / name, np.ones((4, 16, 24), np.uint8), pixel_a=0.835)
    (session / "session.mdoc").write_text((DATA / "session_bracketed.mdoc").read_text())
    (session / "CountRef_grid1.mrc").write_bytes(b"")  # gain references are not movies
    assert detect_software(session) == "SerialEM"
    watcher = SessionWatcher(session, out, config, WatchSettings(software="SerialEM", particle_diameter_a=150.0))
    watcher.poll()
    r = watcher.poll()
    names = [Path(x["movie"]).name for x in r.ingested]
    assert sorted(names) == ["grid1_0001.tif", "sq1_0001.tif", "sq1_0002.tif"]
    by = {Path(x["movie"]).name: x for x in watcher.state["movies"]}
    assert by["grid1_0001.tif"]["detector_mode"] == "super-resolution" and by["grid1_0001.tif"]["n_frames"] == 5
    assert by["sq1_0002.tif"]["total_dose_e_a2"] == 60.0 and by["sq1_0002.tif"]["n_frames"] == 4  # frames counted
    assert by["sq1_0001.tif"]["optics_group_label"] == "1" and by["sq1_0002.tif"]["optics_group_label"] == "2"
    assert watcher.derived.particle_diameter_a == 150.0
    assert watcher.state["movies_glob"] == str(session.resolve() / "*.tif")


def test_pair_for_file_and_movies_glob(tmp_path):
    d = _epu_grid(tmp_path / "s", disc=2, square=77)
    movie = _add_epu_movie(d, 0)
    xml = d / (movie.name[: -len("_fractions.tiff")] + ".xml")
    assert pair_for_file(xml).movie == movie and pair_for_file(movie).metadata == xml
    glob = movies_glob(movie, tmp_path / "s", "EPU", xml)
    assert glob.endswith("Images-Disc*/GridSquare_*/Data/FoilHole_*_Data_*_fractions.tiff")
    assert movie in [Path(p) for p in __import__("glob").glob(glob)]
    sem = tmp_path / "sem"
    sem.mkdir()
    t = sem / "a.tif"
    w.write_serialem_tiff(t, np.ones((2, 4, 4), np.uint8))
    (sem / "a.tif.mdoc").write_text(w.frame_mdoc(movie_name="a.tif"))
    assert pair_for_file(sem / "a.tif.mdoc").movie == t and pair_for_file(t).metadata == sem / "a.tif.mdoc"
    assert pair_for_file(sem / "nothing.mdoc") is None


def test_ingest_file_merges_counterpart(tmp_path, config):
    d = _epu_grid(tmp_path / "s")
    movie = _add_epu_movie(d, 0, frames=6)
    xml = d / (movie.name[: -len("_fractions.tiff")] + ".xml")
    for path in (xml, movie):
        rep = ingest_file(path, config)
        assert rep.movie == str(movie) and rep.metadata_file == str(xml)
        assert rep.metadata.n_frames == 6 and rep.metadata.voltage_kv == 300.0
        assert rep.derived.dose_per_frame_e_a2 == approx(40.0 / 6)


def test_watch_measures_gain_orientation_for_it_options(tmp_path, config):
    session, out = tmp_path / "s", tmp_path / "o"
    d = _epu_grid(session)
    rng = np.random.default_rng(5)
    gain = np.exp(0.1 * rng.standard_normal((64, 48))).astype(np.float32)
    with mrcfile.new(d / "K3_gain.mrc") as m:  # K3 gain pattern *gain*.mrc
        m.set_data(gain)
    seen = relion_gain_transform(gain, 3, 1)  # (48, 64) as the movies
    _add_epu_movie(d, 0, frames=8, gain=seen)
    watcher = SessionWatcher(session, out, config)
    watcher.poll()
    watcher.poll()
    g = watcher.state["gain"]
    assert g["gain_reference"] == str(d / "K3_gain.mrc") and g["orientation"] == "frames"
    assert (g["gain_rot"], g["gain_flip"]) == (3, 1) and g["usable"]
    opts = watcher.it_configuration()
    assert opts["gain"] == str(d / "K3_gain.mrc")
    assert opts["options"]["prep__motioncorr__gain_rot"] == "270 degrees (3)"
    assert opts["options"]["prep__motioncorr__gain_flip"] == "Flip upside down (1)"
    assert opts["pixel_size_a"] == approx(1.06) and opts["dose_per_frame"] == approx(5.0)
    assert opts["movies"] == watcher.state["movies_glob"]
    # the pipeline in a project elsewhere reaches the movies through a Movies link
    project = tmp_path / "project"
    glob = watcher.pipeline_movies_glob(project)
    assert glob == "Movies/Images-Disc*/GridSquare_*/Data/FoilHole_*_Data_*_fractions.tiff"
    assert (project / "Movies").resolve() == session.resolve()
    assert sorted(p.name for p in project.glob(glob)) == sorted(p.name for p in d.glob("*_fractions.tiff"))
    assert watcher.pipeline_movies_glob(project) == glob  # an existing link to the same folder is kept
    # a project that holds the session sees the movies by their own path
    assert watcher.pipeline_movies_glob(session.parent) == "s/Images-Disc*/GridSquare_*/Data/FoilHole_*_Data_*_fractions.tiff"
    other = tmp_path / "other"
    (other / "Movies").mkdir(parents=True)
    with pytest.raises(InputError, match="not a link to the movies folder"):
        watcher.pipeline_movies_glob(other)


def test_it_options_need_a_movie(tmp_path, config):
    (tmp_path / "s").mkdir()
    watcher = SessionWatcher(tmp_path / "s", tmp_path / "o", config)
    assert watcher.poll().total == 0 and watcher.software is None
    with pytest.raises(InputError, match="no complete movie"):
        watcher.it_configuration()
    with pytest.raises(InputError, match="no complete movie"):
        watcher.pipeline_movies_glob(tmp_path / "p")
    with pytest.raises(InputError, match="session folder not found"):
        SessionWatcher(tmp_path / "missing", tmp_path / "o2", config)


def test_serialem_pairing_is_one_movie_per_mdoc_entry(tmp_path, config):
    session, out = tmp_path / "sem", tmp_path / "o"
    session.mkdir()
    a = session / "grid1_0001.tif"
    w.write_serialem_tiff(a, np.ones((5, 16, 24), np.uint8), pixel_a=0.4175)
    (session / "grid1_0001.tif.mdoc").write_text(w.frame_mdoc(movie_name="grid1_0001.tif", n_frames=5, dose=5.0))
    # a processed copy of the same name elsewhere in the session: not this mdoc's movie
    (session / "processed").mkdir()
    copy = session / "processed" / "grid1_0001.tif"
    w.write_serialem_tiff(copy, np.ones((5, 16, 24), np.uint8), pixel_a=0.4175)
    # a single-image MRC without metadata (a sum): ignored once its size is stable
    with mrcfile.new(session / "processed" / "grid1_0001_sum.mrc") as m:
        m.set_data(np.zeros((16, 24), np.float32))
    # frames named by a session mdoc's section, saved in another folder: paired by the unique name
    (session / "frames").mkdir()
    w.write_serialem_tiff(session / "frames" / "sq1_0001.tif", np.ones((4, 16, 24), np.uint8), pixel_a=0.835)
    (session / "session.mdoc").write_text((DATA / "session_bracketed.mdoc").read_text())
    watcher = SessionWatcher(session, out, config, WatchSettings(software="SerialEM"))
    pairs = {p.movie: p.metadata for p in watcher.discover()}
    assert pairs[a] == session / "grid1_0001.tif.mdoc" and pairs[copy] is None
    assert pairs[session / "frames" / "sq1_0001.tif"] == session / "session.mdoc"
    watcher.poll()
    r = watcher.poll()
    assert sorted(Path(x["movie"]).name for x in r.ingested) == ["grid1_0001.tif", "sq1_0001.tif"]
    assert watcher.state["ignored"] == [str(session / "processed" / "grid1_0001_sum.mrc")]
    assert r.pending == 1 and list(watcher.state["watch"]["pending"]) == [str(copy)]
    assert watcher.poll().pending == 1  # the copy waits for metadata; its header is not read again
    assert watcher.state["watch"]["checked"][str(copy)] == watcher.state["watch"]["pending"][str(copy)]["movie"]
