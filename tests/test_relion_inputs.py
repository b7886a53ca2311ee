"""Particle sets as RELION writes them, run through the refinement jobs: mixed optics groups,
subsets that keep RELION's whole data_optics table, and the errors users see."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from autospa.cli.main import main
from autospa.errors import InputError
from autospa.io.mrc import write_mrc
from autospa.io.star import read_star, write_star
from autospa.jobs.class2d import Class2DOptions, run_class2d
from autospa.jobs.refine_common import check_normalisation
from autospa.numerics.masks import background_mean_std
from test_io_data import make_project


def test_class2d_refuses_optics_groups_of_different_pixel_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # RELION's project directory: image names are relative to it
    star, _, _ = make_project(tmp_path, groups=2, apix=1.5)  # group 1: 1.5 A, group 2: 3.0 A
    opts = Class2DOptions(input=str(star), output=str(tmp_path / "C2" / "run"), n_classes=1, n_iter=1)
    with pytest.raises(InputError, match=r"different pixel sizes \(group 1: 1.5 A, group 2: 3 A\)") as err:
        run_class2d(opts)
    assert str(star) in str(err.value) and "\n" not in str(err.value)


def test_class2d_ignores_optics_groups_no_particle_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    star, _, parts = make_project(tmp_path, groups=2, apix=1.5)
    blocks = read_star(star)
    blocks["particles"]["rlnOpticsGroup"] = 2  # a subset of group 2 only; data_optics still lists group 1
    write_star(star, blocks)
    out = tmp_path / "C2" / "run"
    opts = Class2DOptions(input=str(star), output=str(out), n_classes=1, n_iter=1, psi_step_deg=30.0)
    run_class2d(opts)
    model = read_star(Path(f"{out}_it001_model.star"))
    assert model["model_general"]["rlnPixelSize"] == 3.0
    assert model["model_groups"]["rlnGroupName"].tolist() == ["opticsGroup2"]
    assert model["model_groups"]["rlnGroupNrParticles"].tolist() == [len(parts)]
    data = read_star(Path(f"{out}_it001_data.star"))
    assert data["optics"]["rlnOpticsGroup"].tolist() == [1, 2]
    assert (data["particles"]["rlnOpticsGroup"] == 2).all()


def test_background_mean_std_counts_pixels_beyond_the_rounded_radius() -> None:
    img = torch.zeros(1, 8, 8, dtype=torch.float32)
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    outside = (yy - 4) ** 2 + (xx - 4) ** 2 > 3**2  # round(2.6) = 3, centre at 8 // 2
    img[0][outside] = torch.arange(int(outside.sum()), dtype=torch.float32)
    mean, std = background_mean_std(img, 2.6)
    vals = np.arange(int(outside.sum()), dtype=np.float64)
    assert int(outside.sum()) == 64 - 29  # 29 lattice points with x^2 + y^2 <= 9
    assert float(mean[0]) == pytest.approx(vals.mean(), abs=1e-12)
    assert float(std[0]) == pytest.approx(vals.std(), abs=1e-12)  # population std, as RELION


def test_refinement_refuses_unnormalised_particles_as_relion_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    star, stacks, _ = make_project(tmp_path, groups=1)
    name = sorted(stacks)[1]
    raw = (stacks[name] * 40.0 + 3000.0).astype(np.float32)
    write_mrc(tmp_path / name, raw, 1.5)  # raw counts: one micrograph not normalised
    yy, xx = np.mgrid[:16, :16] - 8
    bg = raw[0][yy**2 + xx**2 > 6**2].astype(np.float64)  # default diameter: 75 % of the 16-px box
    opts = Class2DOptions(input=str(star), output=str(tmp_path / "C2" / "run"), n_classes=1, n_iter=1, psi_step_deg=30.0)
    expected = (f"particle 6 (000001@{name}) is not normalised: background mean {bg.mean():.4g}, "
                f"standard deviation {bg.std():.4g} outside a circle of 6 px")
    with pytest.raises(InputError) as err:
        run_class2d(opts)
    assert expected in str(err.value)
    assert "--dont_check_norm" in str(err.value)
    assert not Path(f"{opts.output}_it001_model.star").exists()
    opts.check_norm = False  # --dont_check_norm
    run_class2d(opts)
    assert Path(f"{opts.output}_it001_model.star").is_file()


def test_normalised_particles_pass_the_check() -> None:
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.normal(size=(20, 32, 32)))
    check_normalisation(imgs, np.arange(20), 12.0)  # no error
    with pytest.raises(InputError, match=r"particle 4 .*standard deviation 0.3"):
        imgs[3] *= 0.3
        check_normalisation(imgs, np.arange(20), 12.0)


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("class2d", ["--psi_step", "0"], "--psi_step must be positive (got 0)"),
        ("class2d", ["--offset_step", "-1"], "--offset_step must be positive (got -1)"),
        ("class2d", ["--offset_range", "-2"], "--offset_range must be zero or positive (got -2)"),
        ("class2d", ["--iter", "0"], "--iter must be at least 1 (got 0)"),
        ("class2d", ["--particle_diameter", "-150"], "--particle_diameter must be positive (Angstrom) (got -150)"),
        ("initial-model", ["--tau2_fudge", "0"], "--tau2_fudge must be positive (got 0)"),
        ("refine3d", ["--iter", "0"], "--iter must be at least 1 (got 0)"),
    ],
)
def test_out_of_range_options_are_one_line_errors_before_any_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, command: str, extra: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    star, _, _ = make_project(tmp_path)
    write_mrc(tmp_path / "ref.mrc", np.zeros((16, 16, 16), np.float32), 1.5)
    args = [command, "--i", str(star), "--o", "Job/run"]
    if command == "refine3d":
        args += ["--ref", "ref.mrc"]
    rc = main(args + extra + ["--j", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err == f"autospa {command}: error: {star}: {message}"
    assert not (tmp_path / "Job").exists()


def test_scheme_jobs_take_dont_check_norm_from_other_args(tmp_path):
    """RELION users switch the normalisation check off in a job's "Additional arguments"
    (other_args); the class2d, initial-model and refine3d jobs read it there."""
    from autospa.jobs import class2d, initialmodel, refine3d

    off = {"fn_img": "particles.star", "fn_ref": "ref.mrc", "other_args": '"--dont_check_norm"'}
    on = {"fn_img": "particles.star", "fn_ref": "ref.mrc", "other_args": ""}
    for mod in (class2d, initialmodel, refine3d):
        assert mod.options_from_job(tmp_path, off).check_norm is False, mod.__name__
        assert mod.options_from_job(tmp_path, on).check_norm is True, mod.__name__
    got = refine3d.options_from_job(tmp_path, {**off, "other_args": "--iter 3 --dont_check_norm --maxsig 20"})
    assert (got.max_iter, got.maxsig, got.check_norm) == (3, 20, False)
