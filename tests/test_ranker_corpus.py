"""The ranker's training corpus: job specifications, truth-derived targets on a corpus job written
by the test, and (slow) one real simulated + VDAM-classified corpus job."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from autospa.io.atomic import write_text
from autospa.io.mrc import write_mrc
from autospa.io.star import write_star
from autospa.jobs.ranker_train import (
    CorpusJobSpec,
    cached_job_examples,
    corpus_specs,
    is_validation_job,
    job_examples,
    make_corpus_job,
)
from autospa.ranker.targets import job_score_from_truth, target_scores


def test_corpus_specs_are_deterministic_and_cover_the_failure_modes() -> None:
    specs = corpus_specs(60, seed=0)
    assert specs == corpus_specs(60, seed=0)
    assert corpus_specs(5, seed=0, first_index=10) == specs[10:15]  # a larger corpus extends a smaller one
    assert len({s.name for s in specs}) == 60
    assert any(s.n_particles < 200 for s in specs)  # too few particles
    assert any(s.particle_scale > 1.3 for s in specs)  # wrong box
    assert any(s.junk_fraction == 0 for s in specs) and any(s.junk_fraction > 0.3 for s in specs)
    assert any(s.n_structures == 1 for s in specs) and any(s.n_structures >= 3 for s in specs)
    snr = np.array([s.snr for s in specs])
    assert snr.min() < 0.02 and snr.max() > 0.1
    assert all(s.n_classes >= s.n_structures + 2 and 20 <= s.n_iter <= 25 for s in specs)


def test_validation_split_is_by_job_name() -> None:
    names = [f"job{i:04d}" for i in range(2000)]
    val = [n for n in names if is_validation_job(n)]
    assert 0.17 < len(val) / len(names) < 0.23
    assert val == [n for n in names if is_validation_job(n)]


BOX, PIXEL = 48, 4.0


def _template(kind: int) -> np.ndarray:
    img = np.zeros((BOX, BOX), np.float32)
    if kind == 0:
        img[16:32, 21:27] = 1.0
        img[14:19, 24:33] = 0.8
    else:
        img[19:29, 14:34] = 1.0
    return img


def _write_corpus_job(folder) -> None:
    """Three classes: class 1 = structure 1 rotated by 90 degrees, all real (purity 1); class 2 =
    structure 2, 60 % real structure-2 particles, 40 % junk; class 3 = noise, 10 % real."""
    cls_dir = folder / "Class2D"
    cls_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    classes = np.stack([np.rot90(_template(0)).copy(), _template(1), 0.5 * rng.standard_normal((BOX, BOX))]).astype(np.float32)
    write_mrc(cls_dir / "run_it020_classes.mrcs", classes, PIXEL, stack=True)
    counts = np.array([100, 50, 50])
    n = int(counts.sum())
    table = pd.DataFrame({"rlnReferenceImage": [f"{c + 1:06d}@run_it020_classes.mrcs" for c in range(3)],
                          "rlnClassDistribution": counts / n, "rlnAccuracyRotations": [2.0, 4.0, 999.0],
                          "rlnAccuracyTranslationsAngst": [1.0, 2.0, 999.0], "rlnEstimatedResolution": [16.0, 20.0, 40.0]})
    write_star(cls_dir / "run_it020_model.star", {
        "model_general": {"rlnReferenceDimensionality": 2, "rlnOriginalImageSize": BOX, "rlnPixelSize": PIXEL}, "model_classes": table})
    pclass = np.repeat([1, 2, 3], counts)
    true_cls = np.concatenate([np.full(100, 1), np.full(30, 2), np.zeros(20, int), np.full(5, 1), np.zeros(45, int)])
    junk = (true_cls == 0).astype(int)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [PIXEL], "rlnImageSize": [BOX], "rlnImageDimensionality": [2]})
    names = [f"{i + 1:06d}@Particles/stack.mrcs" for i in range(n)]
    write_star(cls_dir / "run_it020_data.star", {"optics": optics, "particles": pd.DataFrame(
        {"rlnImageName": names, "rlnOpticsGroup": 1, "rlnClassNumber": pclass})})
    write_star(cls_dir / "run_it020_optimiser.star", {"optimiser_general": {
        "rlnModelStarFile": "run_it020_model.star", "rlnExperimentalDataStarFile": "run_it020_data.star",
        "rlnParticleDiameter": 160.0, "rlnDoCorrectCtf": 1}})
    write_star(folder / "truth.star", {"optics": optics, "particles": pd.DataFrame(
        {"rlnImageName": names, "rlnClassNumber": true_cls, "rlnAutospaIsJunk": junk})})
    write_mrc(folder / "templates.mrcs", np.stack([_template(0), _template(1)]), PIXEL, stack=True)
    write_text(folder / "spec.json", json.dumps({"name": folder.name, "last_root": "Class2D/run_it020"}))
    write_text(folder / "DONE", "")


def test_targets_from_truth_on_a_known_job(tmp_path) -> None:
    folder = tmp_path / "job0001"
    _write_corpus_job(folder)
    ex = job_examples(folder)
    assert ex.class_numbers.tolist() == [1, 2, 3]
    assert ex.purity.tolist() == pytest.approx([1.0, 0.6, 0.1])
    assert float(ex.match[0]) > 0.95 and float(ex.match[1]) > 0.95 and float(ex.match[2]) < 0.5
    assert ex.categories.tolist() == [1, 2, 0]
    real_fraction = 135 / 200
    assert ex.job_score == pytest.approx(job_score_from_truth(float(ex.match[0]), real_fraction))
    expected = target_scores(torch.tensor([1, 2, 0]), torch.tensor([16.0, 20.0, 40.0]), ex.job_score)
    assert torch.allclose(ex.targets.double(), expected, atol=1e-6)
    assert ex.targets[0] == pytest.approx(ex.job_score)  # best class: (0.75 + 0.25) x job score
    assert ex.images.shape == (3, 64, 64) and ex.features.shape == (3, 24)
    assert int(ex.particle_real.sum()) == 135
    cached = cached_job_examples(folder)
    assert (folder / "examples.pt").exists()
    again = cached_job_examples(folder)
    assert torch.equal(again.targets, cached.targets) and torch.equal(again.images, cached.images)


@pytest.mark.slow
def test_a_real_corpus_job(tmp_path) -> None:
    spec = CorpusJobSpec("job9000", 9000, 150, 2, 4, 48, 4.0, 0.1, 0.3, ("empty_ice", "aggregate"), 1.0, 8, 150.0)
    folder = make_corpus_job(spec, tmp_path)
    assert (folder / "DONE").exists() and not (folder / "Simulated").exists()
    ex = job_examples(folder)
    assert ex.particle_class.shape == (150,)
    assert 0.55 < float(ex.particle_real.double().mean()) < 0.85  # 30 % junk requested
    assert torch.all((ex.targets >= 0) & (ex.targets <= 1))
    assert float(ex.match.max()) > 0.7  # at SNR 0.1 the best class looks like its structure


def test_ranker_train_cli_rejects_an_empty_corpus(tmp_path, capsys) -> None:
    from autospa.cli.main import main

    assert main(["ranker", "train", "--corpus", str(tmp_path / "none"), "--o", str(tmp_path / "w.ckpt"), "--no_build"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finished corpus jobs" in err[0]
    assert not (tmp_path / "w.ckpt").exists()


@pytest.mark.slow
def test_training_writes_loadable_weights_and_a_report(tmp_path) -> None:
    from autospa.jobs.rank import load_ranker
    from autospa.jobs.ranker_train import train_ranker
    from autospa.ranker.train import TrainConfig

    names = ["job0001", "job0004"]  # job0004 falls in the validation split, job0001 does not
    assert [is_validation_job(n) for n in names] == [False, True]
    for n in names:
        _write_corpus_job(tmp_path / "corpus" / n)
    rep = train_ranker([tmp_path / "corpus"], tmp_path / "w.ckpt", TrainConfig(epochs=2, batch_size=2))
    assert rep["n_jobs_train"] == 1 and rep["n_jobs_validation"] == 1 and len(rep["train_mse_per_epoch"]) == 2
    assert 0.0 <= rep["validation_fpr"] and 0.0 <= rep["validation_fnr"] <= 1.0
    for key in ("match", "purity"):  # the oracles' floors on the validation job
        assert 0.0 <= rep[f"validation_mse_oracle_{key}_and_job_score"] <= 1.0
    ranker = load_ranker(tmp_path / "w.ckpt")
    assert ranker.default_threshold == pytest.approx(rep["default_threshold"])
    assert json.loads((tmp_path / "w.ckpt.json").read_text())["validation_jobs"] == ["job0004"]
