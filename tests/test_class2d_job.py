"""`autospa class2d` end to end: accuracy against the simulator's truth, RELION outputs,
checkpoint and --continue after a real kill, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from autospa.io.particles_star import read_particles_star
from autospa.io.star import read_star
from autospa.jobs.class2d import Class2DOptions, run_class2d
from autospa.jobs.demo import score_against_truth, write_unaligned_set
from autospa.simulate.particles import simulate_2d_classes

PIX = 3.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("c2d")
    sim = simulate_2d_classes(n=500, n_classes=3, box=64, pixel_size_a=PIX, snr=0.1, seed=5, shift_sigma_px=1.5,
                              max_shift_px=3.0)
    star, truth = write_unaligned_set(root / "Simulated", sim)
    return star, sim.truth


def _check(result, truth):
    pp = result["particles"]
    return score_against_truth(truth, pp["class_index"], pp["psi_deg"], pp["origin_px"], PIX)


def test_em_classifies_and_aligns(dataset, tmp_path):
    star, truth = dataset
    # device "auto" (scheme jobs with use_gpu Yes): this machine's GPU where it has one, else the CPU
    opts = Class2DOptions(input=str(star), output=str(tmp_path / "em" / "run"), n_classes=6, n_iter=10, ctf=True,
                          particle_diameter_a=150, random_seed=2, psi_step_deg=12.0, offset_step_px=2.0, device="auto")
    res = run_class2d(opts)
    purity, psi_err, shift_err = _check(res, truth)
    assert purity >= 0.9
    assert psi_err <= 5.0
    assert shift_err <= 1.0


def test_vdam_classifies_aligns_and_writes_relion_outputs(dataset, tmp_path):
    star, truth = dataset
    out = tmp_path / "vdam" / "run"
    opts = Class2DOptions(input=str(star), output=str(out), n_classes=6, n_iter=30, grad=True, ctf=True,
                          particle_diameter_a=150, random_seed=2, grad_write_iter=10, psi_step_deg=12.0,
                          offset_step_px=2.0)
    res = run_class2d(opts)
    purity, psi_err, shift_err = _check(res, truth)
    assert purity >= 0.9
    assert psi_err <= 5.0
    assert shift_err <= 1.0
    state = res["state"]
    # inactive-class substitution: K = 6 > 3 structures, yet no class is left empty
    assert float(state.class_prior.min()) > 0.0
    root = tmp_path / "vdam" / "run_it030"
    for suffix in ("_classes.mrcs", "_model.star", "_data.star", "_optimiser.star", "_sampling.star", "_classes.png",
                   "_1moment.mrcs", "_2moment.mrcs"):
        assert Path(f"{root}{suffix}").is_file(), suffix
    with mrcfile.open(f"{root}_classes.mrcs") as m:
        assert m.data.shape == (6, 64, 64)
        assert float(m.voxel_size.x) == pytest.approx(PIX)
        assert np.allclose(m.data, state.refs.numpy(), atol=1e-5)
    model = read_star(f"{root}_model.star")
    classes = model["model_classes"]
    # named as RELION names them: the --o root (here absolute) plus the suffix
    assert list(classes["rlnReferenceImage"])[:2] == [f"000001@{root}_classes.mrcs", f"000002@{root}_classes.mrcs"]
    assert list(classes["rlnGradMoment1"])[0] == f"000001@{root}_1moment.mrcs"
    assert list(classes["rlnGradMoment2"])[0] == f"000001@{root}_2moment.mrcs"
    assert classes["rlnClassDistribution"].sum() == pytest.approx(1.0, abs=1e-6)
    for label in ("rlnAccuracyRotations", "rlnAccuracyTranslationsAngst", "rlnEstimatedResolution",
                  "rlnOverallFourierCompleteness", "rlnGradMoment1"):
        assert label in classes.columns
    assert model["model_general"]["rlnNrClasses"] == 6
    assert len(model["model_class_1"]) == 33 and "rlnSsnrMap" in model["model_class_1"]
    data = read_particles_star(f"{root}_data.star")  # RELION-readable, stacks resolve
    assert len(data.particles) == 500
    assert set(data.particles["rlnClassNumber"]) <= set(range(1, 7))
    assert np.allclose(data.particles["rlnOriginXAngst"], res["particles"]["origin_px"][:, 0] * PIX, atol=1e-4)
    opt = read_star(f"{root}_optimiser.star")["optimiser_general"]
    assert opt["rlnCurrentIteration"] == 30 and opt["rlnDoGradientRefine"] == 1


def _cli(*args, cwd=None):
    return [sys.executable, "-m", "autospa", *args]


def test_continue_after_kill_equals_uninterrupted_run(dataset, tmp_path):
    star, _ = dataset
    common = ["--i", str(star), "--K", "3", "--iter", "5", "--ctf", "--particle_diameter", "150", "--j", "1",
              "--psi_step", "12", "--offset_step", "2"]
    # run from the project directory with a relative --o, as RELION's pipeline runs jobs
    ref = subprocess.run(_cli("class2d", *common, "--o", "a/run"), capture_output=True, text=True, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    # the class averages are named from the project directory (RELION: 000001@Class2D/job008/run_it025_classes.mrcs)
    refs = list(read_star(tmp_path / "a" / "run_it005_model.star")["model_classes"]["rlnReferenceImage"])
    assert refs == [f"{c:06d}@a/run_it005_classes.mrcs" for c in (1, 2, 3)]
    out = tmp_path / "b" / "run"
    proc = subprocess.Popen(_cli("class2d", *common, "--o", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = tmp_path / "b" / "run_checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline:
        if Path(f"{out}_it003_model.star").exists():
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the run and its workers
    proc.wait()
    assert ckpt.exists()
    done = torch.load(ckpt, weights_only=False)["iteration"]
    assert 2 <= done < 5, "the kill should land mid-run"
    cont = subprocess.run(_cli("class2d", "--o", str(out), "--continue", "--j", "1"), capture_output=True, text=True)
    assert cont.returncode == 0, cont.stderr
    a = torch.load(tmp_path / "a" / "run_checkpoint.pt", weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert b["iteration"] == a["iteration"] == 5
    assert torch.allclose(a["state"]["refs"], b["state"]["refs"], atol=1e-4)
    assert np.array_equal(a["particles"]["class_index"], b["particles"]["class_index"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--i", "missing.star", "--o", "out/run"], "missing.star"),
        (["--i", "bad.txt", "--o", "out/run"], "bad.txt"),
        (["--o", "out/run", "--continue"], "checkpoint"),
        (["--continue", "bad.txt"], "optimiser.star"),
        (["--continue", "out/run_it007_optimiser.star"], "run_checkpoint.pt"),
    ],
)
def test_bad_input_one_line_exit_1(tmp_path, args, message):
    (tmp_path / "bad.txt").write_text("not a star file\n")
    r = subprocess.run(_cli("class2d", *args, "--j", "1"), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_scheme_jobs_take_their_device_from_use_gpu(tmp_path):
    from autospa.jobs import class2d, initialmodel, refine3d

    job = tmp_path / "Class2D" / "job001"
    for mod in (class2d, initialmodel, refine3d):
        opts = {"fn_img": "particles.star", "fn_ref": "ref.mrc", "particle_diameter": "150"}
        assert mod.options_from_job(job, {**opts, "use_gpu": "Yes"}).device == "auto"
        assert mod.options_from_job(job, {**opts, "use_gpu": "No"}).device == "cpu"
        assert mod.options_from_job(job, opts).device == "cpu"
