"""The preprocessing chain through its subcommands, movies to particles, on a simulated session;
and the jobs as registered RELION job types run from job.star options."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from autospa.errors import AutospaError, InputError
from autospa.io.job_control import FAILURE, SUCCESS
from autospa.io.preprocess_files import read_coordinate_index, read_coordinates, read_micrograph_table, read_motion_metadata
from autospa.io.star import read_star
from autospa.io.zarr_store import open_store
from autospa.jobs.registry import get_job
from autospa.simulate.movies import simulate_movie
from test_preprocess_simdata import movie_canvas_with_truth

PIXEL = 2.0
N_PX = 384
MARGIN = 16
MODULES = ("autospa.cli.store", "autospa.cli.motioncorr", "autospa.cli.ctffind", "autospa.cli.autopick", "autospa.cli.extract")


def _cli(argv: list[str]) -> int:
    """Parse with the preprocessing subcommands (and ``import``) and run, as ``autospa`` does."""
    parser = argparse.ArgumentParser(prog="autospa")
    sub = parser.add_subparsers(dest="command")
    for name in MODULES:
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _session(root: Path, seeds: list[int]) -> dict[str, tuple]:
    (root / "Movies").mkdir(exist_ok=True)
    truth = {}
    for s in seeds:
        defocus = (14000.0 + 2000.0 * s, 13000.0 + 2000.0 * s, 30.0 * s)
        canvas, coords = movie_canvas_with_truth(N_PX, MARGIN, PIXEL, seed=s, n_particles=6, defocus=defocus)
        mov = simulate_movie(canvas, MARGIN, 8, 2.0, PIXEL, seed=s, global_px=4.0, local_px=0.5)
        tifffile.imwrite(root / f"Movies/m{s}.tiff", mov.frames.numpy().astype(np.uint16))
        truth[f"m{s}"] = (mov, coords, defocus)
    return truth


def test_movies_to_particles_through_the_subcommands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    truth = _session(tmp_path, [1, 2])
    assert _cli(["import", "--movies", "Movies/*.tiff", "--o", "Import/job001", "--angpix", str(PIXEL), "--kV", "300", "--Cs", "2.7", "--Q0", "0.1"]) == 0
    assert _cli(["motioncorr", "--i", "Import/job001/movies.star", "--o", "MotionCorr/job002", "--patch_x", "2", "--patch_y", "2",
                 "--dose_per_frame", "2.0", "--pipeline_control", "MotionCorr/job002/"]) == 0  # fmt: skip
    assert (tmp_path / "MotionCorr/job002" / SUCCESS).exists()
    mics = read_micrograph_table("MotionCorr/job002/corrected_micrographs.star", "micrographs", "rlnMicrographName").rows
    for _, row in mics.iterrows():
        mov = truth[Path(row["rlnMicrographName"]).stem][0]
        meta = read_motion_metadata(row["rlnMicrographMetadata"])
        shift_truth = mov.drift.global_shift_table()[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()
        assert np.sqrt(((meta.global_shifts_px - shift_truth) ** 2).sum(1).mean()) < 0.5

    assert _cli(["ctffind", "--i", "MotionCorr/job002/corrected_micrographs.star", "--o", "CtfFind/job003", "--box", "256", "--ResMax", "6"]) == 0
    ctf = read_micrograph_table("CtfFind/job003/micrographs_ctf.star", "micrographs", "rlnMicrographName").rows
    for _, row in ctf.iterrows():
        du, dv, _ = truth[Path(row["rlnMicrographName"]).stem][2]
        assert abs(row["rlnDefocusU"] - du) <= 100 and abs(row["rlnDefocusV"] - dv) <= 100

    assert _cli(["autopick", "--i", "CtfFind/job003/micrographs_ctf.star", "--o", "AutoPick/job004", "--LoG",
                 "--LoG_diam_min", "130", "--LoG_diam_max", "170"]) == 0  # fmt: skip
    index = read_coordinate_index("AutoPick/job004/autopick.star")
    found = total = 0
    for mic, cfile in zip(index["rlnMicrographName"], index["rlnMicrographCoordinates"], strict=True):
        c = read_coordinates(cfile)[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
        t = truth[Path(mic).stem][1]
        d = np.hypot(c[:, None, 0] - t[None, :, 0], c[:, None, 1] - t[None, :, 1])
        found += int((d.min(0) < 0.25 * 150 / PIXEL).sum())
        total += len(t)
    assert found >= 0.9 * total

    assert _cli(["extract", "--i", "CtfFind/job003/micrographs_ctf.star", "--coords", "AutoPick/job004/autopick.star",
                 "--o", "Extract/job005", "--particle_diameter", "150"]) == 0  # fmt: skip
    blocks = read_star("Extract/job005/particles.star")
    optics, parts = blocks["optics"], blocks["particles"]
    assert 2.8 <= float(optics["rlnImagePixelSize"].iloc[0]) <= 3.5  # downscaled from 2 A/pixel
    assert len(parts) >= 1 and set(parts["rlnMicrographName"]) <= set(ctf["rlnMicrographName"])
    assert open_store("Extract/job005/particles.zarr").n_particles == len(parts)
    assert "extract: wrote" in capsys.readouterr().out


def test_bad_input_fails_with_marker_and_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "movies.star").write_text("data_optics\n\nloop_\n_rlnOpticsGroup #1\n1\n")
    with pytest.raises(InputError, match="data_movies"):
        _cli(["motioncorr", "--i", "movies.star", "--o", "MotionCorr/job002", "--pipeline_control", "MotionCorr/job002"])
    assert (tmp_path / "MotionCorr/job002" / FAILURE).exists()
    assert not (tmp_path / "MotionCorr/job002/corrected_micrographs.star").exists()
    with pytest.raises(AutospaError):
        _cli(["ctffind", "--i", "missing.star", "--o", "CtfFind/job003"])


def test_job_types_are_registered_with_relion_labels() -> None:
    for label, module in [("relion.motioncorr.own", "motioncorr"), ("relion.ctffind.ctffind4", "ctffind"),
                          ("relion.autopick.log", "autopick"), ("relion.autopick.topaz", "autopick"),
                          ("relion.autopick.topaz.pick", "autopick"), ("relion.extract", "extract"),
                          ("relion.select.onvalue", "select")]:  # fmt: skip
        spec = get_job(label)
        assert spec.func.__module__ == f"autospa.jobs.{module}"
    assert get_job("relion.extract").directory == "Extract" and get_job("relion.autopick.log").directory == "AutoPick"


def test_prep_jobs_run_from_job_star_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """motioncorr -> autopick -> extract as the scheme runner calls them (options of the shipped schemes)."""
    monkeypatch.chdir(tmp_path)
    truth = _session(tmp_path, [3])
    from autospa.io.relion_import import import_movies

    import_movies("Movies/*.tiff", "Import/job001", PIXEL, 300.0, 2.7, 0.1)
    mc = tmp_path / "MotionCorr/job002"
    mc.mkdir(parents=True)
    get_job("relion.motioncorr.own").func(
        mc, {"input_star_mics": "Import/job001/movies.star", "fn_gain_ref": '""', "gain_rot": "No rotation (0)",
             "gain_flip": "No flipping (0)", "patch_x": "2", "patch_y": "2", "dose_per_frame": "2.0", "do_dose_weighting": "Yes",
             "do_float16": "Yes", "do_save_noDW": "Yes", "bin_factor": "1", "group_frames": "1", "bfactor": "150",
             "first_frame_sum": "1", "last_frame_sum": "-1", "eer_grouping": "20", "pre_exposure": "0"}, False)  # fmt: skip
    assert (mc / SUCCESS).exists()
    mics = read_micrograph_table(mc / "corrected_micrographs.star", "micrographs", "rlnMicrographName").rows
    assert "rlnMicrographNameNoDW" in mics.columns
    ap = tmp_path / "AutoPick/job004"
    ap.mkdir(parents=True)
    get_job("relion.autopick.log").func(
        ap, {"fn_input_autopick": "MotionCorr/job002/corrected_micrographs.star", "log_diam_min": "130", "log_diam_max": "170",
             "log_adjust_thr": "0", "log_upper_thr": "999", "log_maxres": "20", "log_invert": "No"}, False)  # fmt: skip
    assert (ap / SUCCESS).exists()
    # extract needs CTF values only when they exist: corrected micrographs have none, particles get none
    ex = tmp_path / "Extract/job005"
    ex.mkdir(parents=True)
    get_job("relion.extract").func(
        ex, {"star_mics": "MotionCorr/job002/corrected_micrographs.star", "coords_suffix": "AutoPick/job004/autopick.star",
             "extract_size": "80", "do_rescale": "Yes", "rescale": "64", "do_norm": "Yes", "do_invert": "Yes",
             "do_float16": "Yes", "bg_diameter": "-1", "do_fom_threshold": "No"}, False)  # fmt: skip
    assert (ex / SUCCESS).exists()
    parts = read_star(ex / "particles.star")["particles"]
    assert len(parts) >= 0.9 * len(truth["m3"][1]) and int(read_star(ex / "particles.star")["optics"]["rlnImageSize"].iloc[0]) == 64


def test_import_refuses_a_missing_gain_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a gain name that does not exist would only surface as every movie failing in motioncorr
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Movies").mkdir()
    tifffile.imwrite(tmp_path / "Movies/m0.tiff", np.ones((2, 8, 8), np.uint8))
    argv = ["import", "--movies", "Movies/*.tiff", "--o", "Import/job001", "--angpix", "1", "--kV", "300", "--Cs", "2.7", "--Q0", "0.1"]
    with pytest.raises(InputError, match=r"^nogain\.mrc: gain reference not found"):
        _cli([*argv, "--gainref", "nogain.mrc"])
    assert not (tmp_path / "Import/job001/movies.star").exists()
    tifffile.imwrite(tmp_path / "gain.tiff", np.ones((8, 8), np.float32))
    assert _cli([*argv, "--gainref", "gain.tiff"]) == 0
    optics = read_star(tmp_path / "Import/job001/movies.star")["optics"]
    assert optics["rlnMicrographGainName"].tolist() == ["gain.tiff"]
