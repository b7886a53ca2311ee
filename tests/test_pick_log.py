"""LoG picking (preprocess/pick_log.py, jobs/autopick.py) and Topaz (when installed) against the truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from autospa.errors import InputError
from autospa.io.preprocess_files import read_coordinate_index, read_coordinates, write_micrograph, write_micrograph_table
from autospa.jobs.autopick import AutopickParams, count_picks, run_autopick
from autospa.preprocess.pick_log import log_diameters, log_responses, pick_log
from test_preprocess_simdata import simulate_micrograph

DIAMETER = 150.0
PIXEL = 2.0


def _match(picks: np.ndarray, truth: np.ndarray, radius_px: float) -> tuple[float, float]:
    """Precision and recall with a pick counted right when within ``radius_px`` of a true centre."""
    if len(picks) == 0:
        return 0.0, 0.0
    d = np.hypot(picks[:, None, 0] - truth[None, :, 0], picks[:, None, 1] - truth[None, :, 1])
    return float((d.min(1) <= radius_px).mean()), float((d.min(0) <= radius_px).mean())


def test_log_filter_peaks_at_a_disc_of_the_searched_diameter() -> None:
    n = 128
    yy, xx = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    disc = ((xx - 64) ** 2 + (yy - 64) ** 2 <= 10.0**2).float()  # diameter 20 px
    d = torch.tensor([8.0, 14.0, 20.0, 28.0, 40.0], dtype=torch.float64)
    resp = log_responses(disc, d)[:, 64, 64]
    # RELION's sigma = d / pi responds most to a disc slightly smaller than d: 20 px wins or its neighbour
    assert int(torch.argmax(resp)) in (1, 2)
    assert float(resp[4]) < float(resp[2]) and float(resp[0]) < float(resp[2])
    assert log_diameters(150, 180).tolist() == [30.0, 38.0, 50.0, 75.0, 150.0, 165.0, 180.0, 360.0, 540.0, 720.0, 900.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_log_precision_and_recall_at_least_0_9(seed: int) -> None:
    m = simulate_micrograph(n=768, pixel_size_a=PIXEL, n_particles=20, diameter_a=DIAMETER, noise=1.0, seed=seed)
    picks = pick_log(m.image, PIXEL, 130.0, 170.0)
    precision, recall = _match(picks.coords_px.numpy(), m.coords_px, 0.25 * DIAMETER / PIXEL)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    # picks are centred: median error well below a tenth of the diameter
    c = picks.coords_px.numpy()
    d = np.hypot(c[:, None, 0] - m.coords_px[None, :, 0], c[:, None, 1] - m.coords_px[None, :, 1]).min(1)
    assert np.median(d) * PIXEL < 0.1 * DIAMETER
    assert torch.all(picks.fom[:-1] >= picks.fom[1:])  # strongest first


def test_log_threshold_and_inversion() -> None:
    m = simulate_micrograph(n=512, pixel_size_a=PIXEL, n_particles=8, diameter_a=DIAMETER, noise=1.0, seed=5)
    loose = pick_log(m.image, PIXEL, 130.0, 170.0, adjust_threshold=-1.0)
    strict = pick_log(m.image, PIXEL, 130.0, 170.0, adjust_threshold=1.0)
    assert len(strict.coords_px) < len(loose.coords_px)
    # white particles on an inverted image are found with --Log_invert, not without
    inv = pick_log(-m.image, PIXEL, 130.0, 170.0, invert=True)
    _, recall_inv = _match(inv.coords_px.numpy(), m.coords_px, 0.25 * DIAMETER / PIXEL)
    wrong = pick_log(-m.image, PIXEL, 130.0, 170.0)
    _, recall_wrong = _match(wrong.coords_px.numpy(), m.coords_px, 0.25 * DIAMETER / PIXEL)
    assert recall_inv >= 0.9 and recall_wrong < 0.5


def _write_inputs(root: Path, seeds: list[int]) -> tuple[Path, dict[str, np.ndarray]]:
    truth = {}
    names = []
    for s in seeds:
        m = simulate_micrograph(n=512, pixel_size_a=PIXEL, n_particles=8, diameter_a=DIAMETER, noise=1.0, seed=10 + s)
        name = f"MotionCorr/job002/Movies/mic{s:03d}.mrc"
        write_micrograph(root / name, m.image.numpy(), PIXEL)
        truth[name] = m.coords_px
        names.append(name)
    optics = pd.DataFrame(
        {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnMicrographOriginalPixelSize": [PIXEL],
         "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1], "rlnMicrographPixelSize": [PIXEL]}
    )  # fmt: skip
    rows = pd.DataFrame({"rlnMicrographName": names, "rlnOpticsGroup": [1] * len(names)})
    star = write_micrograph_table(root / "CtfFind/job003/micrographs_ctf.star", optics, rows)
    return star, truth


def test_autopick_job_writes_relion_coordinate_files_and_continues(tmp_path: Path) -> None:
    _, truth = _write_inputs(tmp_path, [0, 1])
    params = AutopickParams(
        input_star="CtfFind/job003/micrographs_ctf.star", output_dir="AutoPick/job004", log_diam_min=130.0, log_diam_max=170.0
    )
    out = run_autopick(params, tmp_path)
    index = read_coordinate_index(out)
    assert list(index["rlnMicrographName"]) == list(truth)
    tp = n_picks = n_found = n_true = 0
    for mic, coord_file in zip(index["rlnMicrographName"], index["rlnMicrographCoordinates"], strict=True):
        assert coord_file == mic.replace("MotionCorr/job002", "AutoPick/job004")[:-4] + "_autopick.star"
        coords = read_coordinates(tmp_path / coord_file)
        assert {"rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit", "rlnClassNumber", "rlnAnglePsi"} <= set(coords.columns)
        precision, recall = _match(coords[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), truth[mic], 0.25 * DIAMETER / PIXEL)
        tp += precision * len(coords)
        n_picks += len(coords)
        n_found += recall * len(truth[mic])
        n_true += len(truth[mic])
        assert (tmp_path / coord_file).with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert tp / n_picks >= 0.9 and n_found / n_true >= 0.9, (tp / n_picks, n_found / n_true)
    counts = count_picks(out, tmp_path)
    assert counts.sum() >= 0.9 * sum(len(t) for t in truth.values())

    # continue with one more micrograph: only it is picked
    first = tmp_path / index["rlnMicrographCoordinates"].iloc[0]
    stamp = first.stat().st_mtime_ns
    _, truth = _write_inputs(tmp_path, [0, 1, 2])
    out = run_autopick(params, tmp_path, continue_=True)
    index2 = read_coordinate_index(out)
    assert len(index2) == 3 and first.stat().st_mtime_ns == stamp


def test_autopick_rejects_bad_diameters_and_missing_topaz(tmp_path: Path) -> None:
    _write_inputs(tmp_path, [0])
    bad = AutopickParams(input_star="CtfFind/job003/micrographs_ctf.star", output_dir="AutoPick/job004", log_diam_min=200, log_diam_max=100)
    with pytest.raises(InputError, match="LoG_diam_min"):
        run_autopick(bad, tmp_path)
    from autospa.preprocess.pick_topaz import topaz_available

    if not topaz_available():
        topaz = AutopickParams(input_star="CtfFind/job003/micrographs_ctf.star", output_dir="AutoPick/job004", method="topaz")
        with pytest.raises(InputError, match="topaz"):
            run_autopick(topaz, tmp_path)
    assert not (tmp_path / "AutoPick/job004/autopick.star").exists()


def test_topaz_pretrained_model_finds_the_particles() -> None:
    pytest.importorskip("topaz.model.factory", reason="topaz-em (the 'topaz' extra) is not installed")
    from autospa.preprocess.pick_topaz import pick_topaz

    m = simulate_micrograph(n=768, pixel_size_a=PIXEL, n_particles=20, diameter_a=DIAMETER, noise=1.0, seed=0)
    picks = pick_topaz(m.image, PIXEL, DIAMETER, threshold=0.0)
    precision, recall = _match(picks.coords_px.numpy(), m.coords_px, 0.25 * DIAMETER / PIXEL)
    assert recall >= 0.8 and precision >= 0.8, (precision, recall)
    c = picks.coords_px.numpy()
    d = np.hypot(c[:, None, 0] - c[None, :, 0], c[:, None, 1] - c[None, :, 1]) + np.eye(len(c)) * 1e9
    assert d.min() * PIXEL >= DIAMETER / 2 - 2 * PIXEL * picks.scale  # non-maximum suppression radius
