"""MDCatch ingestion of the simulator's EPU-style and SerialEM-style sessions, against its truth.

The sessions come from :func:`autospa.simulate.session.simulate_session` (movies as MRC mode 12,
an EPU FoilHole XML or a SerialEM frame mdoc beside each, a gain reference, truth STAR files); what
the watcher and the parser report is compared with the values the simulator was given and with its
truth tables.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from autospa.cli.main import main
from autospa.io.session_files import read_session_json
from autospa.io.star import read_star
from autospa.mdcatch.detectors import load_config
from autospa.mdcatch.session import SessionWatcher, WatchSettings, ingest_file

approx = pytest.approx

PIXEL_A, VOLTAGE_KV, CS_MM, Q0 = 2.0, 300.0, 2.7, 0.1
N_FRAMES, DOSE_PER_FRAME, EXPOSURE_S, SHAPE = 6, 1.0, 2.0, (96, 128)
N_MOVIES = 3
T0 = datetime(2026, 1, 1, 9, 0, 0, tzinfo=timezone.utc)  # the simulator's first exposure, 75 s apart


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    from autospa.simulate.phantoms import pseudo_atomic_phantom
    from autospa.simulate.session import simulate_session

    root = tmp_path_factory.mktemp("simulated")
    vol = pseudo_atomic_phantom(24, PIXEL_A, seed=3)
    out = {}
    for software in ("EPU", "SerialEM"):
        out[software] = simulate_session(
            root / software, [vol], n_movies=N_MOVIES, software=software, shape=SHAPE, n_frames=N_FRAMES,
            pixel_size_a=PIXEL_A, dose_per_frame_e_a2=DOSE_PER_FRAME, particles_per_micrograph=4, seed=2,
            voltage_kv=VOLTAGE_KV, cs_mm=CS_MM, amplitude_contrast=Q0, exposure_s=EXPOSURE_S,
        )  # fmt: skip
    return out


@pytest.fixture
def site_config(tmp_path, monkeypatch):
    """A facility's copy of the table: the simulator's instrument, and a Cs for unidentified scopes."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    p = tmp_path / "site.toml"
    p.write_text(f'[defaults]\ncs_mm = {CS_MM}\n[microscopes.autospa-sim]\nname = "Simulator"\ncs_mm = {CS_MM}\n')
    return p


def _truth(files) -> dict[str, dict]:
    """Movie path (absolute) -> its truth row (defocus ...)."""
    mics = read_star(files.micrographs_star)["micrographs"]
    return {str((files.outdir / r["rlnMicrographMovieName"]).resolve()): r for r in mics.to_dict("records")}


@pytest.mark.parametrize("software", ["EPU", "SerialEM"])
def test_watch_simulated_session(sessions, site_config, tmp_path, software):
    files = sessions[software]
    truth = _truth(files)
    config = load_config(site_config)
    watcher = SessionWatcher(files.outdir, tmp_path / "out", config, WatchSettings(particle_diameter_a=60.0))
    assert watcher.poll().ingested == []  # first sighting: nothing is complete yet
    rep = watcher.poll()
    assert watcher.software == software and rep.failed == {} and rep.drift == []
    ingested = [r["movie"] for r in rep.ingested]
    assert ingested == [str(m.resolve()) for m in files.movies]  # all of them, in acquisition order
    # the truth micrographs beside the SerialEM movies share their names but are not movies of the
    # session: never paired with an mdoc, never ingested
    assert rep.pending == 0
    for i, rec in enumerate(watcher.state["movies"]):
        t = truth[rec["movie"]]
        assert rec["pixel_size_a"] == approx(PIXEL_A) and rec["voltage_kv"] == VOLTAGE_KV
        assert rec["n_frames"] == N_FRAMES and rec["exposure_time_s"] == EXPOSURE_S
        assert rec["total_dose_e_a2"] == approx(N_FRAMES * DOSE_PER_FRAME)
        assert rec["detector_mode"] == "counting" and rec["magnification"] == 105000
        # the metadata's target defocus is the simulated mean defocus, in A (RELION's sign)
        assert rec["target_defocus_a"] == approx(0.5 * (t["rlnDefocusU"] + t["rlnDefocusV"]), rel=1e-9)
        stamp = T0 + timedelta(seconds=75 * i)
        assert rec["timestamp"] == (stamp.isoformat() if software == "EPU" else stamp.replace(tzinfo=None).isoformat())
        assert rec["optics_group"] == 1 and rec["drift"] == []

    ref = watcher.reference
    assert ref.cs_mm == CS_MM and ref.frames_estimated is False
    assert ref.source_format == ("epu_xml+mrc" if software == "EPU" else "mdoc+mrc")
    assert (ref.image_width_px, ref.image_height_px) == (SHAPE[1], SHAPE[0]) and ref.movie_format == "mrc"
    if software == "EPU":
        assert ref.microscope_id == "autospa-sim" and ref.microscope_name == "Simulator"
        assert ref.detector_name == "EF-CCD" and ref.energy_filter_slit_width_ev == 20.0 and ref.spot_size == 5
        assert ref.software_version == "3.5.1"
    else:
        assert ref.microscope_id is None and ref.software == "SerialEM" and ref.gain_reference == "gain.mrc"
        assert ref.microscope_name == "autospa simulator"

    d = watcher.derived
    assert d.dose_per_frame_e_a2 == approx(DOSE_PER_FRAME) and d.motioncorr_bin_factor == 1 and d.group_frames == 1
    # 60 A at 2 A/px: 30 px; box even ceil(45) = 46, mask 33 px; 46 px at 2 A is already below 3.75 A
    assert (d.box_size_px, d.mask_size_px, d.downscaled_box_px) == (46, 33, 46)
    assert d.dose_rate_e_px_s == approx(N_FRAMES * DOSE_PER_FRAME * PIXEL_A**2 / EXPOSURE_S)

    # the simulator's gain: found, the size fits, and the orientation measured on the raw frames is
    # the identity (the simulator records Poisson(expected / gain) in the gain's own orientation)
    g = watcher.state["gain"]
    assert g["gain_reference"] == str(files.gain.resolve()) and g["check"]["matches"]
    assert g["orientation"] == "frames" and (g["gain_rot"], g["gain_flip"]) == (0, 0) and g["usable"]
    assert g["orientation_scores"][0]["correlation"] > g["orientation_scores"][1]["correlation"] + 0.1

    # the optics table equals the simulator's
    star = read_star(tmp_path / "out" / "movies.star")
    sim_optics = read_star(files.micrographs_star)["optics"].iloc[0]
    opt = star["optics"].iloc[0]
    for label in ("rlnMicrographOriginalPixelSize", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        assert opt[label] == approx(sim_optics[label]), label
    assert list(star["movies"]["rlnMicrographMovieName"]) == ingested

    it = watcher.it_configuration()
    assert it["pixel_size_a"] == approx(PIXEL_A) and it["dose_per_frame"] == approx(DOSE_PER_FRAME)
    assert it["gain"] == str(files.gain.resolve()) and it["cs_mm"] == CS_MM
    assert it["options"]["prep__motioncorr__gain_rot"] == "No rotation (0)"


def test_parse_simulated_files(sessions, site_config, capsys):
    epu, sem = sessions["EPU"], sessions["SerialEM"]
    truth = _truth(epu)
    assert main(["mdcatch", "parse", str(epu.metadata[1]), "--json", "--config", str(site_config)]) == 0
    out = json.loads(capsys.readouterr().out)
    md = out["metadata"]
    assert out["movie"] == str(epu.movies[1]) and out["metadata_file"] == str(epu.metadata[1])
    assert md["pixel_size_a"] == approx(PIXEL_A) and md["n_frames"] == N_FRAMES and md["cs_mm"] == CS_MM
    t = truth[str(epu.movies[1].resolve())]
    assert md["target_defocus_a"] == approx(0.5 * (t["rlnDefocusU"] + t["rlnDefocusV"]))
    assert out["derived"]["dose_per_frame_e_a2"] == approx(DOSE_PER_FRAME)
    # the movie alone finds its mdoc
    assert main(["mdcatch", "parse", str(sem.movies[0]), "--json", "--config", str(site_config),
                 "--session", str(sem.outdir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metadata_file"] == str(sem.metadata[0]) and out["metadata"]["source_format"] == "mdoc+mrc"
    assert out["metadata"]["total_dose_e_a2"] == approx(N_FRAMES * DOSE_PER_FRAME)
    assert out["gain"]["gain_reference"] == str(sem.gain) and out["gain"]["usable"] is True


def test_watch_cli_on_simulated_session(sessions, site_config, tmp_path, capsys):
    files = sessions["EPU"]
    args = ["mdcatch", "watch", str(files.outdir), "--out", str(tmp_path / "o"), "--once", "--config", str(site_config)]
    assert main(args) == 0 and main(args) == 0
    text = capsys.readouterr().out
    assert f"{N_MOVIES} movie(s) ingested, 0 pending, 0 drift flag(s)" in text
    st = read_session_json(tmp_path / "o" / "session.json")
    assert [Path(m["movie"]).name for m in st["movies"]] == [p.name for p in files.movies]


def test_simulated_epu_session_ships_its_microscope_for_mdcatch(sessions, tmp_path, monkeypatch):
    # EPU XML records no Cs, and the simulator's instrument ID is in no microscope table: without the
    # config the simulator writes, the watcher has no Cs and writes no movies.star
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    files = sessions["EPU"]
    assert files.mdcatch_config == files.outdir / "truth" / "mdcatch_site.toml"
    config = load_config(files.mdcatch_config)
    assert config.microscopes["autospa-sim"].cs_mm == CS_MM
    watcher = SessionWatcher(files.outdir, tmp_path / "out", config, WatchSettings(particle_diameter_a=60.0))
    watcher.poll()
    assert len(watcher.poll().ingested) == N_MOVIES
    optics = read_star(tmp_path / "out" / "movies.star")["optics"]
    assert float(optics["rlnSphericalAberration"].iloc[0]) == CS_MM
    assert float(optics["rlnMicrographOriginalPixelSize"].iloc[0]) == PIXEL_A
