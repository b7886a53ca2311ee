"""``autospa mdcatch parse | watch | gain`` through the real console-script entry point."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import psutil
import pytest

from autospa.cli.main import main
from autospa.io.scheme_files import read_exit_status, read_job_template
from autospa.io.session_files import read_session_json
from autospa.io.star import read_star
from autospa.mdcatch.gain import relion_gain_transform
from autospa.orchestration.it import load_it_config
from autospa.orchestration.scheme_commands import abort_scheme

DATA = Path(__file__).parent / "data" / "mdcatch"
sys.path.insert(0, str(DATA))
import mdcatch_writers as w  # noqa: E402

approx = pytest.approx


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def _movie(d: Path, i: int, frames: int = 4, dose: float = 4.0e21) -> Path:
    """One EPU exposure: its XML and a (48, 64) TIFF movie of ``frames`` frames."""
    stem = f"FoilHole_{10 + i}_Data_20_21_20210614_0831{i:02d}"
    (d / (stem + ".xml")).write_text(w.epu_xml(width=64, height=48, n_fractions=frames, dose_e_m2=dose))
    movie = d / (stem + "_fractions.tiff")
    w.write_serialem_tiff(movie, np.ones((frames, 48, 64), np.uint8), rf=None, pixel_a=None)
    return movie


def test_parse_json_every_field(capsys):
    assert main(["mdcatch", "parse", str(DATA / "epu_k3_vpp.xml"), "--json", "--particle-diameter", "150"]) == 0
    out = json.loads(capsys.readouterr().out)
    md, dv = out["metadata"], out["derived"]
    assert md["pixel_size_a"] == approx(1.06) and md["voltage_kv"] == 300.0 and md["cs_mm"] == 2.7
    assert md["total_dose_e_a2"] == approx(45.0) and md["n_frames"] == 50 and md["detector_model"] == "K3"
    assert md["phase_plate"] is True and md["phase_plate_position"] == 12
    assert dv["dose_per_frame_e_a2"] == approx(0.9) and dv["particle_diameter_a"] == 150.0
    assert dv["box_size_px"] == 214 and dv["mask_size_px"] == 156  # 150 / 1.06 = 141.5 px
    assert out["gain"]["mtf_name"] == "mtf_K3_300kv_nocds.star" and out["gain"]["gain_reference"] is None
    assert out["metadata_file"] == str(DATA / "epu_k3_vpp.xml") and out["movie"] is None


def test_parse_text_lists_every_field(capsys):
    assert main(["mdcatch", "parse", str(DATA / "frames_unbracketed.tif.mdoc")]) == 0
    text = capsys.readouterr().out
    for section in ("[metadata]", "[derived]", "[gain]"):
        assert section in text
    for key in ("pixel_size_a", "voltage_kv", "cs_mm", "total_dose_e_a2", "dose_per_frame_e_a2", "exposure_time_s",
                "n_frames", "magnification", "detector_mode", "binning", "target_defocus_a", "phase_plate",
                "energy_filter_slit_width_ev", "spot_size", "beam_shift", "timestamp", "microscope_id",
                "motioncorr_bin_factor", "group_frames", "box_size_px", "mask_size_px", "downscaled_box_px"):
        assert f"  {key} " in text, key
    assert "super-resolution" in text and "motioncorr_bin_factor          = 2" in text


@pytest.mark.parametrize("name", ["malformed_truncated.xml", "not_epu.xml", "bad_value.xml", "malformed.mdoc"])
def test_parse_malformed_exits_1(capsys, name):
    assert main(["mdcatch", "parse", str(DATA / name)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("autospa mdcatch: error: ") and name in err and "\n" not in err


@pytest.mark.parametrize("name,content,problem", [
    ("junk_Fractions.mrc", b"\x01\x02" * 300, "not a readable MRC file"),
    ("junk.tif", b"II*\x00garbage", "TIFF file has no pages"),
    ("junk_EER.eer", b"not a tiff at all", "not a readable TIFF/EER file"),
    ("empty.mdoc", b"\n\n", "not a SerialEM mdoc"),
    ("binary.mdoc", b"\xff\xfe\x00\x81", "not a text file"),
])
def test_parse_malformed_movies_exit_1(tmp_path, capsys, name, content, problem):
    f = tmp_path / name
    f.write_bytes(content)
    assert main(["mdcatch", "parse", str(f), "--json"]) == 1
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert cap.out == "" and err.startswith("autospa mdcatch: error: ") and name in err and problem in err
    assert "\n" not in err


def test_watch_bad_input_exits_1(tmp_path, capsys):
    assert main(["mdcatch", "watch", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--once"]) == 1
    assert "session folder not found" in capsys.readouterr().err
    (tmp_path / "s").mkdir()
    assert main(["mdcatch", "watch", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--interval", "0"]) == 1
    assert "--interval must be positive" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "session.json").write_text("{not json")
    assert main(["mdcatch", "watch", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--once"]) == 1
    err = capsys.readouterr().err
    assert "session.json: not valid JSON" in err
    assert (tmp_path / "o" / "session.json").read_text() == "{not json"  # not overwritten
    bad_it = tmp_path / "it.json"
    bad_it.write_text("{oops")
    assert main(["mdcatch", "watch", str(tmp_path / "s"), "--out", str(tmp_path / "o2"), "--once", "--launch",
                 "--it-config", str(bad_it)]) == 1
    assert "it.json: cannot parse" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()  # nothing written before the inputs are read


def test_parse_missing_file_and_bad_config(tmp_path, capsys):
    assert main(["mdcatch", "parse", str(tmp_path / "nothing.xml")]) == 1
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[x\n")
    assert main(["mdcatch", "parse", str(DATA / "epu_k3_vpp.xml"), "--config", str(bad)]) == 1
    assert "not valid TOML" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path, capsys):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    bad = subprocess.run([sys.executable, "-m", "autospa", "mdcatch", "parse", str(DATA / "not_epu.xml")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines()[-1] == (
        f"autospa mdcatch: error: {DATA / 'not_epu.xml'}: not an EPU MicroscopeImage XML (root element 'GridSquare')")
    assert main(["mdcatch", "parse", str(DATA / "epu_falcon4_eer.xml"), "--json"]) == 0
    # 40 e/A^2 over 4.5 s x 320 Hz = 1440 EER frames: 36 frames per 1 e/A^2 fraction
    assert json.loads(capsys.readouterr().out)["derived"]["eer_grouping"] == 36


def _job(project: Path, scheme: str, job: str) -> dict:
    return dict(read_job_template(project / "Schemes" / scheme / job / "job.star").options)


def test_watch_once_and_launch_site_command(tmp_path, capsys):
    session, out = tmp_path / "session", tmp_path / "out"
    d = session / "Images-Disc1" / "GridSquare_5" / "Data"
    d.mkdir(parents=True)
    _movie(d, 0)
    marker = tmp_path / "launched.txt"
    # a site command standing in for `autospa it`: records how it was called
    launcher = (f"{sys.executable} -c \"import sys, pathlib; "
                f"pathlib.Path({str(marker)!r}).write_text(' '.join(sys.argv[1:]))\"")
    args = ["mdcatch", "watch", str(session), "--out", str(out), "--once", "--launch", "--launch-command", launcher,
            "--particle-diameter", "120", "--symmetry", "D7"]
    assert main(args) == 0  # first sighting: nothing complete, nothing launched
    assert not marker.exists() and read_session_json(out / "session.json")["launched"] is None
    assert not (out / "Schemes").exists() and not (out / "it_config.yaml").exists()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "launched:" in text and "1 movie(s) ingested" in text
    st = read_session_json(out / "session.json")
    cfg = out / "it_config.yaml"
    assert st["launched"]["config"] == str(cfg) and st["launched"]["command"][-2:] == ["--config", str(cfg)]
    assert st["launched"]["project"] == str(out.resolve()) and st["launched"]["schemes"] == ["prep", "proc"]
    for _ in range(100):  # the detached command writes its marker
        if marker.exists() and marker.read_text():
            break
        time.sleep(0.1)
    assert marker.read_text() == f"--config {cfg}"
    # the configuration is autospa it's: its own reader accepts it
    it = load_it_config(cfg)
    assert it.pixel_size_a == approx(1.06) and it.voltage_kv == 300.0 and it.cs_mm == 2.7
    assert it.dose_per_frame == approx(10.0) and it.super_resolution is False and it.symmetry == "D7"
    assert it.particle_diameter_a == 120.0 and it.box_size_px == 170 and it.downscaled_box_px == 64
    # movies inside the project folder's parent are reached through the Movies link
    assert it.movies == "Movies/Images-Disc*/GridSquare_*/Data/FoilHole_*_Data_*_fractions.tiff"
    assert (out / "Movies").resolve() == session.resolve()
    # the schemes are installed and set from the session
    assert _job(out, "prep", "importmovies")["angpix"] == "1.06"
    assert _job(out, "proc", "refine3d")["sym_name"] == "D7"
    # launched once only
    _movie(d, 1)
    assert main(args) == 0 and main(args) == 0
    assert read_session_json(out / "session.json")["launched"]["pid"] == st["launched"]["pid"]
    assert len(read_star(out / "movies.star")["movies"]) == 2


@pytest.mark.parametrize("engine", ["plain", pytest.param("prefect", marks=pytest.mark.slow)])
def test_watch_launch_runs_it_schemes(tmp_path, capsys, monkeypatch, engine):
    """--launch with the default launcher: prepare_it on the shipped schemes, then ``autospa it``
    in a detached process; the schemes' options carry the derived values."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # inherited by the pipeline process
    session, out, project = tmp_path / "session", tmp_path / "meta", tmp_path / "project"
    d = session / "Images-Disc1" / "GridSquare_5" / "Data"
    d.mkdir(parents=True)
    _movie(d, 0, frames=5, dose=5.0e21)
    extra = tmp_path / "it.yaml"  # processing preferences; maxtime 0: both schemes stop after one pass
    extra.write_text("maxtime_hr: 0.0\nwait_sec: 0.0\nclass2d_classes: 20\n"
                     "options:\n  prep__motioncorr__patch_y: '4'\n")
    args = ["mdcatch", "watch", str(session), "--out", str(out), "--project", str(project), "--once", "--launch",
            "--it-config", str(extra), "--particle-diameter", "150", "--engine", engine]
    assert main(args) == 0 and main(args) == 0
    info = read_session_json(out / "session.json")["launched"]
    cfg = project.resolve() / "it_config.yaml"
    assert info["command"][1:] == ["-m", "autospa", "it", "--project", str(project.resolve()), "--engine", engine,
                                   "--config", str(cfg)]
    assert info["config"] == str(cfg) and info["schemes"] == ["prep", "proc"]
    log = project / "it_launch.log"
    try:  # the pipeline process was started by main() in this process: wait for it
        psutil.Process(info["pid"]).wait(timeout=90)
    except psutil.NoSuchProcess:
        pass  # already reaped
    except psutil.TimeoutExpired:  # still running: stop the schemes, then the process we started
        for name in ("prep", "proc"):
            abort_scheme(name, project)
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.kill(info["pid"], signal.SIGTERM)
        pytest.fail(f"autospa it did not stop: {log.read_text() if log.exists() else ''}")
    text = log.read_text()
    assert "scheme prep:" in text and "scheme proc: exited at EXIT_maxtime" in text
    # what the launch configured, as the scheme runner reads it
    imp, mc = _job(project, "prep", "importmovies"), _job(project, "prep", "motioncorr")
    assert imp["fn_in_raw"] == "Movies/Images-Disc*/GridSquare_*/Data/FoilHole_*_Data_*_fractions.tiff"
    assert float(imp["angpix"]) == approx(1.06) and float(imp["kV"]) == 300.0 and float(imp["Cs"]) == 2.7
    assert float(imp["Q0"]) == 0.1 and imp["optics_group_name"] == "opticsGroup1"
    assert float(mc["dose_per_frame"]) == approx(10.0) and mc["bin_factor"] == "1" and mc["group_frames"] == "1"
    assert (mc["patch_x"], mc["patch_y"]) == ("7", "4")  # --it-config options win over the derived ones
    assert mc["gain_rot"] == "No rotation (0)" and mc["gain_flip"] == "No flipping (0)" and mc["fn_gain_ref"] == ""
    ext, c2d = _job(project, "proc", "extract"), _job(project, "proc", "class2d")
    # 150 A at 1.06 A/px: box even ceil(212.3) = 214, mask ceil(155.7) = 156 px = 165.36 A, downscaled 64
    assert (ext["extract_size"], ext["rescale"], ext["do_rescale"]) == ("214", "64", "Yes")
    assert float(c2d["particle_diameter"]) == approx(165.36) and c2d["nr_classes"] == "20"
    assert float(_job(project, "proc", "autopick")["log_diam_max"]) == 150.0
    # the runner ran them: prep visited its first job, proc stopped at its maxtime check
    assert read_exit_status(project / "Schemes" / "prep") in ("SUCCESS", "FAILURE")
    assert read_exit_status(project / "Schemes" / "proc") == "SUCCESS"
    assert (project / "Movies").resolve() == session.resolve()


def test_launch_needs_valid_it_settings(tmp_path, capsys):
    session, out = tmp_path / "session", tmp_path / "out"
    d = session / "Images-Disc1" / "GridSquare_5" / "Data"
    d.mkdir(parents=True)
    _movie(d, 0)
    extra = tmp_path / "it.yaml"
    extra.write_text("picker: cryolo\n")
    args = ["mdcatch", "watch", str(session), "--out", str(out), "--once", "--launch", "--it-config", str(extra)]
    assert main(args) == 0
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("autospa mdcatch: error: ") and "picker" in err and "\n" not in err
    assert read_session_json(out / "session.json")["launched"] is None and not (out / "it_config.yaml").exists()
    assert not (out / "Movies").exists() and not (out / "Schemes").exists()
    extra.write_text("- a list\n")
    assert main(args) == 1
    assert "must hold a mapping" in capsys.readouterr().err


def test_watch_loop_while_files_arrive(tmp_path, capsys):
    session, out = tmp_path / "session", tmp_path / "out"
    d = session / "Images-Disc1" / "GridSquare_5" / "Data"
    d.mkdir(parents=True)
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(main(["mdcatch", "watch", str(session), "--out", str(out), "--json",
                                                         "--interval", "0.1", "--timeout", "4"])))
    t.start()
    time.sleep(0.3)
    _movie(d, 0)
    time.sleep(0.4)
    _movie(d, 1, dose=6.0e21)
    t.join(timeout=30)
    assert rc == [0]
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    ingested = [m for line in lines for m in line["ingested"]]
    assert [Path(m).name[:11] for m in ingested] == ["FoilHole_10", "FoilHole_11"]
    drift = [f for line in lines for f in line["drift"]]
    assert [(f["field"], f["value"]) for f in drift] == [("total_dose_e_a2", approx(60.0))]
    assert lines[-1]["total"] == 2 and lines[-1]["pending"] == 0


def test_gain_subcommand(tmp_path, capsys):
    rng = np.random.default_rng(2)
    gain = np.exp(0.1 * rng.standard_normal((32, 48))).astype(np.float32)
    with mrcfile.new(tmp_path / "gain.mrc") as m:
        m.set_data(gain)
    frames = rng.poisson(3.0 / relion_gain_transform(gain, 2, 1), size=(10, 32, 48)).astype(np.uint8)
    w.write_serialem_tiff(tmp_path / "movie.tif", frames)
    assert main(["mdcatch", "gain", str(tmp_path / "gain.mrc"), str(tmp_path / "movie.tif"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["check"]["matches"] is True
    best = out["orientations"][0]
    assert (best["gain_rot"], best["gain_flip"]) == (2, 1)
    assert main(["mdcatch", "gain", str(tmp_path / "gain.mrc"), str(tmp_path / "movie.tif")]) == 0
    assert "best: gain_rot 2, gain_flip 1" in capsys.readouterr().out
