"""Motion correction (preprocess/motion.py, jobs/motioncorr.py) against the simulator's truth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from autospa.errors import InputError
from autospa.io.mrc import read_mrc_header, write_mrc
from autospa.io.preprocess_files import read_micrograph, read_micrograph_table, read_motion_metadata
from autospa.io.relion_import import import_movies
from autospa.jobs.motioncorr import MotionCorrParams, run_motioncorr
from autospa.preprocess.motion import (
    accumulated_motion,
    apply_gain,
    dose_weights,
    fit_polynomial_motion,
    motion_correct,
    orient_gain,
    patch_centres,
    polynomial_shift,
)
from autospa.simulate.movies import simulate_gain_reference, simulate_movie
from test_preprocess_simdata import movie_canvas

N_PX = 320
JOB_PX = 256
MARGIN = 20
PIXEL = 1.0


def _movie(
    seed: int, n_frames: int = 10, gain: torch.Tensor | None = None, global_px: float = 5.0, local_px: float = 0.8, n_px: int = N_PX
):
    canvas = movie_canvas(n_px, MARGIN, PIXEL, seed=seed)
    return simulate_movie(canvas, MARGIN, n_frames, 1.5, PIXEL, seed=seed, global_px=global_px, local_px=local_px, gain=gain)


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).sum(-1).mean()))


# ------------------------------------------------------------------------------ numerics ---


def test_gain_orientation_matches_relion_convention() -> None:
    g = torch.arange(6, dtype=torch.float32).reshape(2, 3)  # rows top to bottom
    # 90 degrees clockwise: the first column read bottom-up becomes the first row
    assert orient_gain(g, 1, 0).tolist() == [[3.0, 0.0], [4.0, 1.0], [5.0, 2.0]]
    assert orient_gain(g, 2, 0).tolist() == [[5.0, 4.0, 3.0], [2.0, 1.0, 0.0]]
    assert orient_gain(g, 0, 1).tolist() == [[3.0, 4.0, 5.0], [0.0, 1.0, 2.0]]
    assert orient_gain(g, 0, 2).tolist() == [[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]
    # rotating four times is the identity; rot 1 then rot 3 too
    assert torch.equal(orient_gain(orient_gain(g, 1), 3), g)
    with pytest.raises(InputError, match="gain reference is 2 x 3"):
        apply_gain(torch.ones(4, 3, 3), orient_gain(g, 1), "gain.mrc")


def test_dose_weights_keep_noise_power_and_zero_frequency() -> None:
    w = dose_weights(16, 64, 64, 1.0, 2.0, 300.0)
    assert w.shape == (16, 64, 33)
    np.testing.assert_allclose((w**2).sum(0).numpy(), 16.0, rtol=1e-5)
    # zero frequency: all frames weigh the same; high frequencies favour the early frames
    np.testing.assert_allclose(w[:, 0, 0].numpy(), 1.0, rtol=1e-4)
    assert float(w[0, 0, 32]) > float(w[-1, 0, 32]) * 5


def test_polynomial_model_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    coeffs = torch.randn(36, generator=gen, dtype=torch.float64) * 0.05
    centres = patch_centres(500, 600, 5, 5).to(torch.float64)
    n = 10
    z = torch.arange(n, dtype=torch.float64)[None, None, :]
    u = (centres[..., 0] / 600 - 0.5)[..., None]
    v = (centres[..., 1] / 500 - 0.5)[..., None]
    shifts = polynomial_shift(coeffs, z, u, v)  # (5, 5, n, 2)
    fitted = fit_polynomial_motion(centres, shifts, 600, 500, ridge=0.0)
    np.testing.assert_allclose(fitted.numpy(), coeffs.numpy(), atol=1e-8)


def test_accumulated_motion_of_a_straight_path() -> None:
    shifts = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [9.0, 12.0], [12.0, 16.0], [15.0, 20.0]])
    total, early, late = accumulated_motion(shifts, 0.5)
    assert math.isclose(total, 12.5) and math.isclose(early, 7.5) and math.isclose(late, 5.0)


def test_recovered_drift_within_half_a_pixel_of_truth() -> None:
    gain = simulate_gain_reference((N_PX, N_PX), seed=3)
    mov = _movie(seed=3, gain=gain)
    res = motion_correct(mov.frames, PIXEL, gain=gain, dose_per_frame=1.5, patch_x=3, patch_y=3)
    truth = mov.drift.global_shift_table()[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()
    rms = _rms(res.shifts_px.numpy(), truth)
    assert rms < 0.5, rms
    assert float(np.abs(truth).max()) > 3.0  # the test moves by several pixels
    # the local model predicts the residual (local) motion at the patch centres
    local = mov.drift.local_shift_table((3, 3))
    n = mov.frames.shape[0]
    zz = torch.as_tensor(local["rlnMicrographFrameNumber"].to_numpy() - 1, dtype=torch.float64)
    u = torch.as_tensor(local["rlnMicrographCoordinateX"].to_numpy() / N_PX - 0.5)
    v = torch.as_tensor(local["rlnMicrographCoordinateY"].to_numpy() / N_PX - 0.5)
    pred = polynomial_shift(res.local_coeffs, zz, u, v).numpy()
    true_local = local[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy().copy()
    # the local field's mean is absorbed by the global shifts: compare after removing per-frame means
    fr = local["rlnMicrographFrameNumber"].to_numpy()
    for f in range(1, n + 1):
        sel = fr == f
        pred[sel] -= pred[sel].mean(0)
        true_local[sel] -= true_local[sel].mean(0)
    assert _rms(pred, true_local) < 0.5
    # the corrected sum matches the specimen (at frame 1's position) far better than the plain sum
    # at the frequencies that drift blurs
    specimen = movie_canvas(N_PX, MARGIN, PIXEL, seed=3)[MARGIN:-MARGIN, MARGIN:-MARGIN]
    plain = (mov.frames * gain).sum(0)
    k2 = torch.fft.rfftfreq(N_PX)[None, :] ** 2 + torch.fft.fftfreq(N_PX)[:, None] ** 2
    band = (k2 > 0.08**2) & (k2 < 0.25**2)

    def band_cc(a: torch.Tensor, b: torch.Tensor) -> float:
        fa, fb = torch.fft.rfft2(a.double())[band], torch.fft.rfft2(b.double())[band]
        return float((fa * fb.conj()).real.sum() / torch.sqrt((fa.abs() ** 2).sum() * (fb.abs() ** 2).sum()))

    cc_corrected, cc_plain = band_cc(res.micrograph, specimen), band_cc(plain, specimen)
    assert cc_corrected > 0.5 and cc_corrected > 2 * cc_plain, (cc_corrected, cc_plain)


# ---------------------------------------------------------------------------------- the job ---


def _write_movies(root: Path, seeds: list[int], gain: torch.Tensor | None) -> dict[str, object]:
    (root / "Movies").mkdir(parents=True, exist_ok=True)
    truth = {}
    for s in seeds:
        mov = _movie(seed=s, n_frames=8, gain=gain, n_px=JOB_PX)
        name = f"Movies/mov{s:03d}.tiff"
        tifffile.imwrite(root / name, mov.frames.numpy().astype(np.uint16))
        truth[name] = mov
    return truth


def test_motioncorr_job_outputs_and_continue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import Client, LocalCluster

    monkeypatch.chdir(tmp_path)
    gain = simulate_gain_reference((JOB_PX, JOB_PX), seed=9)
    # the gain file is stored rotated by 90 degrees: --gain_rot 3 (270) brings it back
    write_mrc(tmp_path / "gain.mrc", torch.rot90(gain, k=1).numpy(), PIXEL)
    truth = _write_movies(tmp_path, [1, 2], gain)
    import_movies("Movies/*.tiff", "Import/job001", PIXEL, 300.0, 2.7, 0.1)
    params = MotionCorrParams(
        input_star="Import/job001/movies.star",
        output_dir="MotionCorr/job002",
        gainref="gain.mrc",
        gain_rot=3,
        patch_x=2,
        patch_y=2,
        dose_per_frame=1.5,
        save_no_dw=True,
    )
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        out = run_motioncorr(params, tmp_path, client=client)
    table = read_micrograph_table(out, "micrographs", "rlnMicrographName")
    rows = table.rows
    assert list(rows["rlnMicrographName"]) == ["MotionCorr/job002/Movies/mov001.mrc", "MotionCorr/job002/Movies/mov002.mrc"]
    assert float(table.optics["rlnMicrographPixelSize"].iloc[0]) == PIXEL
    for _, row in rows.iterrows():
        movie = row["rlnMicrographName"].replace("MotionCorr/job002/", "").replace(".mrc", ".tiff")
        mov = truth[movie]
        info = read_mrc_header(tmp_path / row["rlnMicrographName"])
        assert info.mode == 12 and info.shape[-2:] == (JOB_PX, JOB_PX)
        meta = read_motion_metadata(tmp_path / row["rlnMicrographMetadata"])
        true_shift = mov.drift.global_shift_table()[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()
        assert _rms(meta.global_shifts_px, true_shift) < 0.5
        assert meta.local_coeffs is not None and meta.local_coeffs.shape == (36,)
        assert meta.general["rlnMicrographMovieName"] == movie
        # accumulated motion in Angstrom: the path length of the truth within 0.5 px per frame
        assert abs(row["rlnAccumMotionTotal"] - mov.drift.accumulated_motion_px() * PIXEL) < 0.5 * 8
        assert row["rlnAccumMotionTotal"] == pytest.approx(row["rlnAccumMotionEarly"] + row["rlnAccumMotionLate"])
        png = (tmp_path / row["rlnMicrographName"]).with_name(Path(movie).stem + "_shifts.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        nodw, _ = read_micrograph(tmp_path / row["rlnMicrographNameNoDW"])
        assert nodw.shape == (JOB_PX, JOB_PX)

    # continue: a new movie appears; only it is processed, the old outputs stay untouched
    first = tmp_path / rows["rlnMicrographName"].iloc[0]
    stamp = first.stat().st_mtime_ns
    _write_movies(tmp_path, [3], gain)
    import_movies("Movies/*.tiff", "Import/job001", PIXEL, 300.0, 2.7, 0.1, continue_=True)
    out = run_motioncorr(params, tmp_path, continue_=True)
    rows2 = read_micrograph_table(out, "micrographs", "rlnMicrographName").rows
    assert len(rows2) == 3 and rows2["rlnMicrographName"].iloc[2].endswith("mov003.mrc")
    assert first.stat().st_mtime_ns == stamp


def test_motioncorr_rejects_a_gain_of_the_wrong_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write_movies(tmp_path, [4], None)
    write_mrc(tmp_path / "gain.mrc", np.ones((JOB_PX, JOB_PX + 8), np.float32), PIXEL)
    import_movies("Movies/*.tiff", "Import/job001", PIXEL, 300.0, 2.7, 0.1)
    params = MotionCorrParams(input_star="Import/job001/movies.star", output_dir="MotionCorr/job002", gainref="gain.mrc")
    with pytest.raises(InputError, match="gain reference is 264 x 256"):
        run_motioncorr(params, tmp_path)
    assert not (tmp_path / "MotionCorr/job002/corrected_micrographs.star").exists()
    assert not list(tmp_path.rglob("MotionCorr/**/*.mrc"))


def test_low_dose_movie_shifts_stay_near_the_truth() -> None:
    """A dose too low for any single frame's cross-correlation peak to stand out of the noise
    (0.1 e/px per frame with this canvas; `autospa simulate movies` reaches that regime at about
    1-3 e/px per frame). Measured before: shifts up to 100 px off, rlnAccumMotionTotal 409 A (noise
    peaks anywhere in a 200 A window, summed over iterations); now only significant peaks move a
    frame, within RELION's 50-px range: no motion is measured (error = the 3-px true drift)."""
    canvas = movie_canvas(JOB_PX, MARGIN, PIXEL, seed=11)
    mov = simulate_movie(canvas, MARGIN, 8, 0.1, PIXEL, seed=11, global_px=3.0, local_px=0.0)
    res = motion_correct(mov.frames, PIXEL, dose_per_frame=0.1, patch_x=1, patch_y=1)
    truth = mov.drift.global_shift_table()[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()
    err = np.abs(res.shifts_px.numpy() - truth).max()
    assert err <= 3.0, err
    assert float(res.shifts_px.abs().max()) <= 3.0
    assert res.accum_motion_a[0] <= 6.0  # rlnAccumMotionTotal (A): truth 3 A
    # three times the dose: the peaks are significant and the drift is recovered
    mov = simulate_movie(canvas, MARGIN, 8, 0.3, PIXEL, seed=11, global_px=3.0, local_px=0.0)
    res = motion_correct(mov.frames, PIXEL, dose_per_frame=0.3, patch_x=1, patch_y=1)
    truth = mov.drift.global_shift_table()[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()
    assert np.abs(res.shifts_px.numpy() - truth).max() < 1.0
