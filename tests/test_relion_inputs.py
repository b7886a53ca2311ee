"""Particle sets as RELION writes them, run through the refinement jobs: mixed optics groups,
subsets that keep RELION's whole data_optics table, and the errors users see."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autospa.errors import InputError
from autospa.io.star import read_star, write_star
from autospa.jobs.class2d import Class2DOptions, run_class2d
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
