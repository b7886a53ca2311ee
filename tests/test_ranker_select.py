"""``autospa rank`` / relion.select.class2dauto on a 2D job written by the test (known classes and
particles), with a model saved in RELION's checkpoint format whose score is a known feature."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from autospa.cli.main import main
from autospa.io.mrc import read_mrc, write_mrc
from autospa.io.ranker_files import save_checkpoint
from autospa.io.star import read_star, write_star
from autospa.jobs.rank import RankOptions, load_ranker, run_rank, select_classes
from autospa.jobs.registry import get_job, resolve_job_type
from autospa.ranker import features as F
from autospa.ranker.network import MODEL_DEFINITION, ClassRankerNet

BOX, PIXEL, DIAMETER = 48, 4.0, 160.0
COUNTS = np.array([150, 100, 80, 62, 8])  # class 5 has too few particles to be scored
N = int(COUNTS.sum())
ACC_ROT = np.array([2.0, 3.0, 999.0, 6.0, 999.0])
RES = np.array([12.0, 14.0, 30.0, 20.0, 40.0])


def _disc(radius: float, value: float) -> np.ndarray:
    ax = np.arange(BOX) - BOX // 2
    return np.where(ax[:, None] ** 2 + ax[None, :] ** 2 <= radius**2, value, 0.0)


def _classes() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([
        _disc(10, 2.0) + 0.05 * rng.standard_normal((BOX, BOX)),
        _disc(7, 1.5) + 0.2 * rng.standard_normal((BOX, BOX)),
        0.3 * rng.standard_normal((BOX, BOX)),
        _disc(9, 0.6) + 0.5 * rng.standard_normal((BOX, BOX)),
        _disc(5, 1.0),
    ]).astype(np.float32)  # fmt: skip


def write_2d_job(folder, do_ctf: int = 1):
    """run_it010_{model,data,optimiser}.star and _classes.mrcs (relative names, as our class2d writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_mrc(folder / "run_it010_classes.mrcs", _classes(), PIXEL, stack=True)
    k = len(COUNTS)
    classes = pd.DataFrame({
        "rlnReferenceImage": [f"{c + 1:06d}@run_it010_classes.mrcs" for c in range(k)],
        "rlnClassDistribution": COUNTS / N, "rlnAccuracyRotations": ACC_ROT,
        "rlnAccuracyTranslationsAngst": np.array([1.0, 1.5, 999.0, 3.0, 999.0]), "rlnEstimatedResolution": RES,
        "rlnOverallFourierCompleteness": np.full(k, 0.9), "rlnClassPriorOffsetX": np.zeros(k), "rlnClassPriorOffsetY": np.zeros(k),
    })  # fmt: skip
    blocks = {"model_general": {"rlnReferenceDimensionality": 2, "rlnOriginalImageSize": BOX, "rlnPixelSize": PIXEL, "rlnNrClasses": k},
              "model_classes": classes}
    for c in range(k):
        blocks[f"model_class_{c + 1}"] = pd.DataFrame({"rlnSpectralIndex": np.arange(3), "rlnAngstromResolution": [999.0, 192.0, 96.0],
                                                       "rlnSsnrMap": [10.0, 2.0, 0.5]})
    write_star(folder / "run_it010_model.star", blocks)
    rng = np.random.default_rng(1)
    cls = rng.permutation(np.repeat(np.arange(1, k + 1), COUNTS))
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [PIXEL],
                           "rlnImageSize": [BOX], "rlnImageDimensionality": [2], "rlnVoltage": [300.0]})
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@Particles/stack.mrcs" for i in range(N)], "rlnOpticsGroup": 1,
                          "rlnClassNumber": cls, "rlnAnglePsi": rng.uniform(0, 360, N)})
    write_star(folder / "run_it010_data.star", {"optics": optics, "particles": parts})
    write_star(folder / "run_it010_optimiser.star", {"optimiser_general": {
        "rlnOutputRootName": "run", "rlnModelStarFile": "run_it010_model.star", "rlnExperimentalDataStarFile": "run_it010_data.star",
        "rlnParticleDiameter": DIAMETER, "rlnDoCorrectCtf": do_ctf, "rlnCurrentIteration": 10}})
    return folder / "run_it010_optimiser.star"


def feature_model() -> ClassRankerNet:
    """A network whose score is normalised feature 6 (protein stddev): images ignored."""
    net = ClassRankerNet()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        head = net.classifier_images_and_features
        head[1].weight[0, 48 + 6] = 1.0
        head[1].bias[0] = 10.0  # stays positive through the ReLU
        head[4].weight[0, 0] = 1.0
        head[4].bias[0] = -10.0
    return net.eval()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("rankjob")
    opt = write_2d_job(root / "Class2D")
    model = root / "feature_model.ckpt"
    save_checkpoint(model, {"model_definition": MODEL_DEFINITION, "model_state_dict": feature_model().state_dict()})
    return {"root": root, "opt": opt, "model": model}


def _expected_inputs() -> F.JobInputs:
    return F.job_inputs(torch.from_numpy(_classes()).double(), torch.tensor(COUNTS / N), torch.tensor(ACC_ROT),
                        torch.tensor([1.0, 1.5, 999.0, 3.0, 999.0]), torch.tensor(RES), N, PIXEL, DIAMETER)


def test_rank_writes_relions_files(job, tmp_path) -> None:
    out = tmp_path / "Select"
    assert main(["rank", "--opt", str(job["opt"]), "--o", str(out), "--model", str(job["model"])]) == 0
    assert not (out / "particles.star").exists()  # no --auto_select: scores only
    model = read_star(out / "rank_model.star")["model_classes"]
    scores = model["rlnClassScore"].to_numpy()
    exp = _expected_inputs()
    assert exp.kept.tolist() == [True, True, True, True, False]
    assert np.allclose(np.load(out / "features.npy"), exp.features.numpy(), atol=1e-6)
    assert np.load(out / "images.npy").shape == (4, 64, 64)
    assert np.allclose(scores[:4], exp.features[:, 6].numpy(), atol=1e-5)  # the model's score is feature 6
    assert scores[4] == -999.0
    assert scores[0] > scores[2]  # the clean disc beats pure noise
    assert list(model.columns) == ["rlnReferenceImage", "rlnClassScore", "rlnClassDistribution", "rlnAccuracyRotations",
                                   "rlnAccuracyTranslationsAngst", "rlnEstimatedResolution", "rlnOverallFourierCompleteness",
                                   "rlnClassPriorOffsetX", "rlnClassPriorOffsetY"]
    # the reference images point to the class averages from anywhere
    idx, stack = model["rlnReferenceImage"].iloc[1].split("@")
    assert np.allclose(read_mrc(stack)[0][int(idx) - 1], _classes()[1])

    thr = float(np.median(scores[:4]))
    assert main(["rank", "--opt", str(job["opt"]), "--o", str(out), "--model", str(job["model"]), "--auto_select",
                 "--min_score", repr(thr)]) == 0
    want = np.array([s >= thr for s in scores[:4]] + [False])
    sel = read_star(out / "backup_selection.star")[""]["rlnSelected"].to_numpy()
    assert sel.tolist() == want.astype(int).tolist()
    data = read_star(job["opt"].parent / "run_it010_data.star")["particles"]
    parts = read_star(out / "particles.star")
    kept_rows = data[np.isin(data["rlnClassNumber"], np.flatnonzero(want) + 1)]
    assert parts["particles"]["rlnImageName"].tolist() == kept_rows["rlnImageName"].tolist()  # original order
    assert len(parts["optics"]) == 1
    avg = read_star(out / "class_averages.star")[""]
    assert sorted(int(r.split("@")[0]) for r in avg["rlnReferenceImage"]) == (np.flatnonzero(want) + 1).tolist()
    assert np.all(np.diff(avg["rlnPredictedClassScore"].to_numpy()) <= 0)  # sorted by score
    assert np.allclose(np.sort(avg["rlnPredictedClassScore"].to_numpy()), np.sort(scores[want]))
    ranked = read_star(out / "rank_data.star")["particles"]
    assert ranked["rlnSortedIndex"].tolist() == list(range(N))
    opt = read_star(out / "rank_optimiser.star")["optimiser_general"]
    assert opt["rlnModelStarFile"].endswith("rank_model.star") and opt["rlnExperimentalDataStarFile"].endswith("rank_data.star")
    png = (out / "rank_classes.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_quantile_minimum_particles_and_overrides(job, tmp_path) -> None:
    out = tmp_path / "q"
    res = run_rank(RankOptions(str(job["opt"]), str(out), model=str(job["model"]), quantile=0.5))
    order = np.argsort(-np.where(res.scored, res.scores, -np.inf))
    assert res.selected.tolist() == [bool(c in order[:2]) for c in range(5)]  # top half of the 4 scored classes
    assert res.threshold is None
    more = run_rank(RankOptions(str(job["opt"]), str(out), model=str(job["model"]), min_score=998.0, select_min_nr_particles=200))
    best = order[:2]  # walk from the best class until >= 200 particles
    assert more.selected.tolist() == [bool(c in best) for c in range(5)] and COUNTS[best].sum() >= 200 > COUNTS[best[0]]
    ovr = tmp_path / "overrides.txt"
    ovr.write_text(f"# keep the small class, drop the best one\n+5\n{order[0] + 1} 0\n")
    forced = run_rank(RankOptions(str(job["opt"]), str(out), model=str(job["model"]), min_score=-1e9, overrides=str(ovr)))
    assert forced.selected[4] and not forced.selected[order[0]] and forced.selected.sum() == 4
    parts = read_star(out / "particles.star")["particles"]
    assert len(parts) == N - COUNTS[order[0]] == forced.n_particles_selected
    # RELION's backup_selection.star works as an overrides file too
    backup = out / "backup_selection.star"
    again = run_rank(RankOptions(str(job["opt"]), str(tmp_path / "b"), model=str(job["model"]), min_score=998.0, overrides=str(backup)))
    assert again.selected.tolist() == forced.selected.tolist()


def test_selection_rule() -> None:
    scores = np.array([0.9, 0.2, 0.6, -999.0, 0.4])
    scored = np.array([True, True, True, False, True])
    counts = np.array([100, 50, 30, 5, 20])
    assert select_classes(scores, scored, counts, 0.5).tolist() == [True, False, True, False, False]
    assert select_classes(scores, scored, counts, 0.3, max_score=0.7).tolist() == [False, False, True, False, True]
    assert select_classes(scores, scored, counts, 0.95, min_classes=2).tolist() == [True, False, True, False, False]
    assert select_classes(scores, scored, counts, 0.95, min_particles=120).tolist() == [True, False, True, False, False]
    assert select_classes(scores, scored, counts, 0.0, quantile=0.5).tolist() == [True, False, True, False, False]
    assert select_classes(scores, scored, counts, 0.5, overrides={4: True, 1: False}).tolist() == [False, False, True, True, False]


def test_bad_input_is_one_line_and_exit_1(job, tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    assert main(["rank", "--opt", str(tmp_path / "missing_optimiser.star"), "--o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and err[0].startswith("autospa rank: error:")
    assert not out.exists()
    # a good run, then a bad overrides file: the earlier outputs stay as they were
    assert main(["rank", "--opt", str(job["opt"]), "--o", str(out), "--model", str(job["model"]), "--auto_select"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    bad = tmp_path / "bad_overrides.txt"
    bad.write_text("99 1\n")
    assert main(["rank", "--opt", str(job["opt"]), "--o", str(out), "--model", str(job["model"]), "--auto_select",
                 "--overrides", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside 1..5" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    junk_model = tmp_path / "junk.pt"
    junk_model.write_text("no")
    assert main(["rank", "--opt", str(job["opt"]), "--o", str(out), "--model", str(junk_model)]) == 1
    assert main(["rank", "--opt", str(job["opt"]), "--o", str(out), "--select_quantile", "1.5"]) == 1
    no_ctf = write_2d_job(tmp_path / "noctf", do_ctf=0)
    assert main(["rank", "--opt", str(no_ctf), "--o", str(tmp_path / "n"), "--model", str(job["model"])]) == 1
    assert "without CTF correction" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_select_job_with_class_ranker_runs_from_the_registry(job, tmp_path) -> None:
    options = {"do_class_ranker": "Yes", "fn_model": "Class2D/run_it010_optimiser.star", "rank_threshold": "-100",
               "select_nr_parts": "-1", "select_nr_classes": "-1", "other_args": f"--model {job['model']}"}
    label = resolve_job_type("relion.select", options)
    assert label == "relion.select.class2dauto"
    spec = get_job(label)
    assert set(spec.outputs) == {"particles.star", "class_averages.star", "rank_optimiser.star"}
    project = job["root"]
    job_dir = project / "Select" / "job007"
    job_dir.mkdir(parents=True)
    spec.func(job_dir, options, False)
    assert (job_dir / "RELION_JOB_EXIT_SUCCESS").exists()
    assert read_star(job_dir / "backup_selection.star")[""]["rlnSelected"].tolist() == [1, 1, 1, 1, 0]
    assert len(read_star(job_dir / "particles.star")["particles"]) == N - COUNTS[4]


def test_shipped_model_is_the_default(job, tmp_path) -> None:
    res = run_rank(RankOptions(str(job["opt"]), str(tmp_path / "d")))
    assert res.threshold == pytest.approx(load_ranker().default_threshold)
    assert np.all(np.isfinite(res.scores[res.scored])) and np.all(res.scores[~res.scored] == -999.0)
    assert res.selected.tolist() == list(res.scored & (res.scores >= res.threshold))
    from autospa.jobs.rank import options_from_job

    auto = options_from_job(tmp_path / "Select" / "job001", {"fn_model": str(job["opt"]), "rank_threshold": "auto"})
    assert auto.min_score is None  # the calibrated default
    assert options_from_job(tmp_path / "Select" / "job001", {"fn_model": str(job["opt"]), "rank_threshold": "0.45"}).min_score == 0.45
