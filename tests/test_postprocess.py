"""Post-processing of half maps (refinement/postprocess.py, io/postprocess_files.py,
jobs/postprocess.py, ``autospa postprocess``) on a phantom plus independent white noise of known
variance, so that the true FSC of the halves is ``S / (S + N)`` with S the phantom's and N the
noise's shell power.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autospa.cli.main import main
from autospa.io.mrc import read_mrc, write_mrc
from autospa.io.postprocess_files import read_postprocess_star
from autospa.numerics.fsc import fsc, power_spectrum_1d
from autospa.numerics.masks import soft_spherical_mask
from autospa.refinement.postprocess import (
    PostprocessOptions,
    apply_bfactor,
    corrected_fsc,
    first_shell_below,
    fit_bfactor,
    fsc_weight,
    guinier_plot,
    postprocess_halves,
    randomize_phases_beyond,
    relion_resolution,
)
from autospa.simulate.phantoms import pseudo_atomic_phantom

BOX, PIX = 48, 1.5


@pytest.fixture(scope="module")
def phantom() -> torch.Tensor:
    # sharp atoms (B_atoms = 8 pi^2 sigma^2 = 79 A^2), so the map has signal out to ~3 A
    return pseudo_atomic_phantom(box=BOX, pixel_size_a=PIX, seed=3, atom_sigma_a=1.0)


def halves(truth: torch.Tensor, noise_sigma: float, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n1 = noise_sigma * torch.randn(truth.shape, generator=g)
    n2 = noise_sigma * torch.randn(truth.shape, generator=g)
    return truth + n1, truth + n2, n1, n2


def truth_fsc(signal: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor) -> torch.Tensor:
    s = power_spectrum_1d(signal, 3)
    n = 0.5 * (power_spectrum_1d(n1, 3) + power_spectrum_1d(n2, 3))
    return s / (s + n)


def test_resolution_matches_the_truth_within_one_shell(phantom) -> None:
    mask = soft_spherical_mask(BOX, 0.36 * BOX, 4.0)
    for sigma_frac in (1.0, 2.0):
        h1, h2, n1, n2 = halves(phantom, sigma_frac * float(phantom.std()))
        res = postprocess_halves(h1, h2, mask, PostprocessOptions(pixel_size_a=PIX))
        # unmasked: S/(S+N) of the whole box
        i_un = first_shell_below(res.fsc_unmasked, 0.143)
        i_un_truth = first_shell_below(truth_fsc(phantom, n1, n2), 0.143)
        assert abs(i_un - i_un_truth) <= 1
        # corrected (masked): S/(S+N) of the masked signal and noise
        i_true = first_shell_below(res.fsc_corrected, 0.143)
        i_truth = first_shell_below(truth_fsc(phantom * mask, n1 * mask, n2 * mask), 0.143)
        assert abs(i_true - i_truth) <= 1
        assert res.final_resolution_a == pytest.approx(BOX * PIX / (i_true - 1))
        assert res.mask_used and i_un < i_true < BOX // 2 + 1  # the mask removes noise: better resolution
        # phase randomisation starts where the unmasked FSC first drops below 0.8
        assert res.randomize_at_shell == first_shell_below(res.fsc_unmasked, 0.8)
        assert res.randomize_from_a == pytest.approx(BOX * PIX / res.randomize_at_shell)
        # beyond randomize_at + 2 the phase-randomised FSC is near 0 with this soft mask
        assert float(res.fsc_random_masked[res.randomize_at_shell + 2 :].abs().max()) < 0.2


@pytest.mark.parametrize("blur", [50.0, 150.0])
def test_autob_recovers_the_bfactor_of_a_blurred_map(phantom, blur) -> None:
    sigma = 0.6 * float(phantom.std())
    base = postprocess_halves(*halves(phantom, sigma)[:2], None, PostprocessOptions(pixel_size_a=PIX, auto_bfactor=True))
    blurred = apply_bfactor(phantom, blur, PIX)
    res = postprocess_halves(*halves(blurred, sigma)[:2], None, PostprocessOptions(pixel_size_a=PIX, auto_bfactor=True))
    # against the Guinier slope of the noise-free blurred map over the same range
    s2, ln_f = guinier_plot(blurred, PIX)
    b_truth = fit_bfactor(s2, ln_f, 10.0, res.final_resolution_a)[0]
    assert res.bfactor == pytest.approx(b_truth, rel=0.2)
    # and the known blur: the estimate moves by -blur (sharpening B-factors are negative)
    assert base.bfactor - res.bfactor == pytest.approx(blur, rel=0.2)
    assert -1.0 <= res.fit_corr <= -0.9


def test_sharpening_undoes_the_blur(phantom) -> None:
    blurred = apply_bfactor(phantom, 100.0, PIX)
    h1, h2, _, _ = halves(blurred, 0.1 * float(phantom.std()))
    res = postprocess_halves(h1, h2, None, PostprocessOptions(pixel_size_a=PIX, adhoc_bfactor=-100.0))
    assert res.bfactor == -100.0
    # within the final resolution the sharpened map correlates with the phantom as well as the
    # half-map FSC allows: FSC(map, truth) = sqrt(2 FSC / (1 + FSC)) (Rosenthal & Henderson)
    c = fsc(res.sharpened, phantom)
    i = first_shell_below(res.fsc_corrected, 0.5)
    f = res.fsc_corrected[1:i]
    assert torch.all(c[1:i] > torch.sqrt(2 * f / (1 + f)) - 0.05)
    s2, ln_s = guinier_plot(res.sharpened, PIX)
    _, ln_p = guinier_plot(phantom, PIX)
    sel = (s2 > 1 / 10.0**2) & (s2 < 1 / res.final_resolution_a**2) & (torch.arange(s2.numel()) < i)
    # amplitudes restored to within the FSC weighting (weights > 0.9 where FSC > 0.8)
    assert float((ln_s[sel] - ln_p[sel]).abs().max()) < 0.25


def test_phase_randomisation_and_curve_helpers(phantom) -> None:
    g = torch.Generator().manual_seed(5)
    r = randomize_phases_beyond(phantom, 6, g)
    assert r.dtype == phantom.dtype
    c = fsc(r, phantom)
    assert float(c[:6].min()) > 0.999999  # untouched below the shell
    assert float(c[10:].abs().max()) < 0.2  # random beyond
    p0, p1 = power_spectrum_1d(phantom, 3), power_spectrum_1d(r, 3)
    assert torch.allclose(p0[1:], p1[1:], rtol=1e-4)  # amplitudes kept
    t = torch.tensor([1.0, 0.9, 0.8, 0.6, 0.5, 0.3])
    n = torch.tensor([1.0, 0.5, 0.4, 0.2, 0.1, 0.5])
    out = corrected_fsc(t, n, randomize_at=2)
    assert out[:4].tolist() == pytest.approx([1.0, 0.9, 0.8, 0.6])
    assert out[4] == pytest.approx((0.5 - 0.1) / 0.9)
    assert out[5] == pytest.approx((0.3 - 0.5) / 0.5)
    w = fsc_weight(torch.tensor([1.0, 0.5, 0.143, 0.05, -0.01, 0.2]))
    assert w[:4].tolist() == pytest.approx([1.0, math.sqrt(1 / 1.5), math.sqrt(0.286 / 1.143), math.sqrt(0.1 / 1.05)])
    assert w[4:].tolist() == [0.0, 0.0]  # zero from the first shell below 1e-4 on
    assert relion_resolution(torch.tensor([1.0, 0.9, 0.5, 0.2, 0.1]), 8, 2.0) == pytest.approx(8 * 2.0 / 3)
    assert relion_resolution(torch.tensor([1.0, 0.1, 0.5]), 4, 2.0) == 999.0


def test_cli_postprocess_writes_relion_outputs(tmp_path, phantom, capsys) -> None:
    mask = soft_spherical_mask(BOX, 0.36 * BOX, 4.0)
    h1, h2, _, _ = halves(apply_bfactor(phantom, 80.0, PIX), 0.5 * float(phantom.std()))
    d = tmp_path / "Refine3D"
    d.mkdir()
    write_mrc(d / "run_half1_class001_unfil.mrc", h1.numpy(), PIX)
    write_mrc(d / "run_half2_class001_unfil.mrc", h2.numpy(), PIX)
    write_mrc(d / "mask.mrc", mask.numpy(), PIX)
    out = tmp_path / "PostProcess"
    rc = main(["postprocess", "--i", str(d / "run_half1_class001_unfil.mrc"), "--mask", str(d / "mask.mrc"),
               "--o", str(out), "--autob"])
    assert rc == 0
    general, fsc_tab, guinier = read_postprocess_star(out / "postprocess.star")
    ref = postprocess_halves(h1, h2, mask, PostprocessOptions(pixel_size_a=PIX, auto_bfactor=True))
    assert general["rlnFinalResolution"] == pytest.approx(ref.final_resolution_a)
    assert general["rlnBfactorUsedForSharpening"] == pytest.approx(ref.bfactor)
    assert general["rlnUnfilteredMapHalf2"].endswith("run_half2_class001_unfil.mrc")
    assert general["rlnMaskName"].endswith("mask.mrc")
    assert general["rlnRandomiseFrom"] == pytest.approx(ref.randomize_from_a)
    assert list(fsc_tab.columns) == [
        "rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution", "rlnFourierShellCorrelationCorrected",
        "rlnFourierShellCorrelationUnmaskedMaps", "rlnFourierShellCorrelationMaskedMaps",
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps",
    ]
    assert np.allclose(fsc_tab["rlnFourierShellCorrelationCorrected"], ref.fsc_corrected.numpy())
    assert len(fsc_tab) == BOX // 2 + 1
    assert {"rlnResolutionSquared", "rlnLogAmplitudesOriginal", "rlnLogAmplitudesWeighted",
            "rlnLogAmplitudesSharpened", "rlnLogAmplitudesIntercept"} <= set(guinier.columns)
    sharp, px = read_mrc(out / "postprocess.mrc")
    masked, _ = read_mrc(out / "postprocess_masked.mrc")
    assert px == pytest.approx(PIX)
    assert np.allclose(masked, sharp * mask.numpy(), atol=1e-5 * np.abs(sharp).max())
    assert np.allclose(sharp, ref.sharpened.numpy(), atol=1e-5 * np.abs(sharp).max())
    for png in ("postprocess_fsc.png", "postprocess_guinier.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{ref.final_resolution_a:.2f} A" in capsys.readouterr().out


def test_cli_postprocess_bad_inputs_write_nothing(tmp_path, phantom, capsys) -> None:
    h = phantom.numpy()
    write_mrc(tmp_path / "a_half1.mrc", h, PIX)
    write_mrc(tmp_path / "a_half2.mrc", h, PIX)
    write_mrc(tmp_path / "small_mask.mrc", np.ones((16, 16, 16), np.float32), PIX)
    write_mrc(tmp_path / "bad_mask.mrc", 2.0 * np.ones(h.shape, np.float32), PIX)
    out = tmp_path / "pp"
    for extra in (["--mask", str(tmp_path / "small_mask.mrc")], ["--mask", str(tmp_path / "bad_mask.mrc")],
                  ["--i2", str(tmp_path / "missing.mrc")]):
        assert main(["postprocess", "--i", str(tmp_path / "a_half1.mrc"), "--o", str(out), *extra]) == 1
        assert not out.exists() or not any(out.iterdir())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("autospa postprocess: error:") for line in err)


def test_registry_job_relion_postprocess(tmp_path, phantom) -> None:
    from autospa.jobs.postprocess import job_postprocess

    project = tmp_path / "project"
    (project / "Refine3D" / "job005").mkdir(parents=True)
    job_dir = project / "PostProcess" / "job006"
    job_dir.mkdir(parents=True)
    h1, h2, _, _ = halves(phantom, 0.5 * float(phantom.std()))
    write_mrc(project / "Refine3D/job005/run_half1_class001_unfil.mrc", h1.numpy(), PIX)
    write_mrc(project / "Refine3D/job005/run_half2_class001_unfil.mrc", h2.numpy(), PIX)
    write_mrc(project / "mask.mrc", soft_spherical_mask(BOX, 0.36 * BOX, 4.0).numpy(), PIX)
    options = {"fn_in": "Refine3D/job005/run_half1_class001_unfil.mrc", "fn_mask": "mask.mrc", "angpix": "-1",
               "do_auto_bfac": "Yes", "autob_lowres": "10", "do_adhoc_bfac": "No", "adhoc_bfac": "-1000",
               "do_skip_fsc_weighting": "No", "low_pass": "5"}
    job_postprocess(job_dir, options, False)
    general, _, _ = read_postprocess_star(job_dir / "postprocess.star")
    assert 3.0 <= general["rlnFinalResolution"] < 10.0
    assert general["rlnBfactorUsedForSharpening"] < 0
    assert (job_dir / "postprocess_masked.mrc").is_file()
    assert (job_dir / "RELION_JOB_EXIT_SUCCESS").is_file()
