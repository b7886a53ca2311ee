"""Class-ranker network (RELION's architecture and model files), targets and selection metrics."""

from __future__ import annotations

import math
import types

import pytest
import torch

from autospa.errors import InputError
from autospa.io.ranker_files import load_model_file, save_checkpoint, save_torchscript
from autospa.jobs.rank import load_ranker
from autospa.ranker.network import MODEL_DEFINITION, ClassRankerNet, checkpoint_payload, model_from_payload, predict_scores
from autospa.ranker.targets import class_categories, job_score_from_truth, target_scores, template_match
from autospa.ranker.train import calibrate_threshold, oracle_mse, pooled_rates, rotate_flip, selection_rates

#: relion-classranker training/model.py layer names and shapes (B7): conv indices in cnn_layers.
RELION_SHAPES = {
    "cnn_layers.0.weight": (16, 1, 3, 3), "cnn_layers.3.weight": (16, 16, 3, 3), "cnn_layers.5.weight": (32, 16, 3, 3),
    "cnn_layers.7.weight": (32, 32, 3, 3), "cnn_layers.10.weight": (32, 32, 3, 3), "cnn_layers.12.weight": (64, 32, 3, 3),
    "cnn_layers.14.weight": (64, 64, 3, 3), "cnn_layers.17.weight": (64, 64, 3, 3), "cnn_layers.19.weight": (128, 64, 3, 3),
    "feature_extractor.0.weight": (48, 8192), "classifier_images_and_features.1.weight": (48, 72),
    "classifier_images_and_features.4.weight": (1, 48), "classifier_images.1.weight": (1, 48),
    "classifier_features.0.weight": (12, 24), "classifier_features.3.weight": (1, 12),
}  # fmt: skip


def _relion_model_class():
    """RELION 5.0's loader: execute the checkpoint's model_definition and take ``Model``."""
    mod = types.ModuleType("classranker_model_test")
    exec(MODEL_DEFINITION, mod.__dict__)  # noqa: S102 - our own source text, as RELION's loader does
    return mod.Model


def test_architecture_matches_relion() -> None:
    net = ClassRankerNet()
    state = net.state_dict()
    for name, shape in RELION_SHAPES.items():
        assert tuple(state[name].shape) == shape, name
    assert sum(p.numel() for p in net.parameters()) == 589003  # "about 589k" (B7)
    out = net(torch.randn(5, 1, 64, 64), torch.randn(5, 24))
    assert out.shape == (5, 1)
    # no ReLU after the stride-2 convolutions: cnn_layers 5, 12, 19 are followed by Dropout
    assert isinstance(net.cnn_layers[6], torch.nn.Dropout) and isinstance(net.cnn_layers[20], torch.nn.Dropout)
    assert list(state) == list(_relion_model_class()().state_dict())


def test_relion_checkpoint_with_random_weights_loads_and_scores_identically(tmp_path) -> None:
    torch.manual_seed(7)
    relion_model = _relion_model_class()().eval()  # a randomly initialised RELION model
    path = tmp_path / "classranker_v1.0.ckpt"
    save_checkpoint(path, {"model_definition": MODEL_DEFINITION, "model_state_dict": relion_model.state_dict(), "epoch": 0})
    ranker = load_ranker(path)
    assert ranker.kind == "checkpoint" and ranker.default_threshold is None
    x, y = torch.randn(7, 64, 64), torch.randn(7, 24)
    expected = relion_model(x[:, None], y).reshape(-1)
    assert torch.allclose(predict_scores(ranker.model, x, y), expected, atol=1e-6)
    # and our own checkpoints load in RELION's loader (exec + strict load_state_dict)
    ours = ClassRankerNet()
    payload = checkpoint_payload(ours, autospa_default_threshold=0.2)
    again = _relion_model_class()()
    again.load_state_dict(payload["model_state_dict"], strict=True)
    assert torch.allclose(again.eval()(x[:, None], y), ours.eval()(x[:, None], y), atol=1e-6)


def test_relion_4_torchscript_model_loads(tmp_path) -> None:
    torch.manual_seed(3)
    net = ClassRankerNet().eval()
    path = tmp_path / "relion_class_ranker_default_model.pt"
    save_torchscript(path, net)
    ranker = load_ranker(path)
    assert ranker.kind == "torchscript"
    x, y = torch.randn(4, 64, 64), torch.randn(4, 24)
    assert torch.allclose(predict_scores(ranker.model, x, y), net(x[:, None], y).reshape(-1), atol=1e-6)


def test_bad_model_files_raise_input_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_ranker(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a class-ranker model"):
        load_ranker(junk)
    wrong = tmp_path / "wrong.ckpt"
    state = ClassRankerNet().state_dict()
    state["feature_extractor.0.weight"] = torch.zeros(512, 8192)  # the July 2021 variant
    save_checkpoint(wrong, {"model_state_dict": state})
    with pytest.raises(InputError, match="do not fit"):
        load_ranker(wrong)
    with pytest.raises(InputError, match="model_state_dict"):
        model_from_payload({"something": 1})
    assert isinstance(load_model_file(wrong), dict)


def test_rotate_flip_augmentation() -> None:
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rotate_flip(x, 0.0, False), x, atol=1e-5)
    assert torch.equal(rotate_flip(x, 0.0, True), torch.flip(rotate_flip(x, 0.0, False), dims=(-1,)))
    quarter = rotate_flip(x, math.pi / 2, False)
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-4) or torch.allclose(
        quarter, torch.rot90(x, -1, dims=(-2, -1)), atol=1e-4)


def test_template_match_finds_rotated_shifted_copies() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 48
    blob = torch.zeros(n, n)
    blob[18:30, 20:26] = 1.0
    blob[14:20, 24:34] = 0.7
    other = torch.zeros(n, n)
    other[20:28, 16:32] = 1.0
    moved = torch.roll(torch.rot90(blob, 1), (2, -3), (0, 1))
    noise = torch.randn(n, n, generator=gen)
    m = template_match(torch.stack([moved, noise]), torch.stack([blob, other]), radius_px=20, pixel_size_a=3.0)
    assert m.shape == (2, 2)
    assert float(m[0, 0]) > 0.95
    assert float(m[0, 0]) > float(m[0, 1]) + 0.1
    assert float(m[1].max()) < 0.5


def test_targets_follow_relions_formula() -> None:
    cats = torch.tensor([1, 1, 5, 2, 3, 4, 0, 6])
    res = torch.tensor([10.0, 20.0, 10.0, 20.0, 10.0, 5.0, 10.0, 10.0])
    t = target_scores(cats, res, 0.8)
    w = torch.tensor([1.0, 0.25, 1.0, 0.25, 1.0, 1.0, 1.0, 1.0])  # minRes = 10 (best red), w capped at 1
    base = torch.tensor([0.75, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0])
    expected = (base + 0.25 * w) * 0.8
    expected[6:] = 0.0
    assert torch.allclose(t, expected.double())
    assert class_categories(torch.tensor([0.9, 0.9, 0.7, 0.55, 0.4, 0.1]), torch.tensor([0.9, 0.7, 0.7, 0.6, 0.4, 0.9])).tolist() == [
        1, 5, 5, 2, 3, 0]
    assert job_score_from_truth(0.95, 1.0) == 1.0 and job_score_from_truth(0.3, 1.0) == 0.0
    assert job_score_from_truth(0.9, 0.0) == pytest.approx(0.5)


def test_selection_rates_and_threshold_calibration() -> None:
    ref = torch.tensor([True, True, True, True, False, False])
    sel = torch.tensor([True, True, False, False, True, False])
    assert selection_rates(sel, ref) == (0.25, 0.5)
    # job: classes 1..3 with scores 0.9 (real), 0.5 (half real), 0.1 (junk)
    pclass = torch.tensor([1, 1, 1, 1, 2, 2, 3, 3, 3, 3])
    real = torch.tensor([True, True, True, True, True, False, False, False, False, False])
    job = (torch.tensor([1, 2, 3]), torch.tensor([0.9, 0.5, 0.1]), pclass, real)
    assert pooled_rates([job], 0.6) == (0.0, 0.2)
    assert pooled_rates([job], 0.4) == (0.2, 0.0)
    assert pooled_rates([job], 0.05) == (1.0, 0.0)
    thr, fpr, fnr = calibrate_threshold([job])
    assert 0.1 < thr <= 0.9 and max(fpr, fnr) == pytest.approx(0.2)


def test_oracle_mse_is_zero_when_the_key_decides_the_target_and_the_variance_when_it_does_not() -> None:
    gen = torch.Generator().manual_seed(3)
    key = torch.rand(4000, generator=gen)
    js = 0.5 + 0.5 * torch.rand(4000, generator=gen)
    # the per-class part is a step function of the key (constant within the oracle's bins)
    q = torch.where(key >= 0.8, 1.0, torch.where(key >= 0.5, 0.5, 0.0))
    t = q * js
    assert oracle_mse(key[:3000], t[:3000], js[:3000], key[3000:], t[3000:], js[3000:], n_bins=20, low=0.0, high=1.0) \
        == pytest.approx(0.0, abs=1e-12)
    # a key that says nothing: the floor is the variance of the per-class part (times js^2)
    noise = torch.rand(4000, generator=gen)
    floor = oracle_mse(noise[:3000], t[:3000], js[:3000], noise[3000:], t[3000:], js[3000:], n_bins=1, low=0.0, high=1.0)
    mean_q = float((t[:3000] / js[:3000]).mean())
    assert floor == pytest.approx(float(((mean_q * js[3000:] - t[3000:]) ** 2).mean()), rel=1e-6)
    assert floor > 0.05


def test_shipped_weights_load_with_a_calibrated_threshold() -> None:
    ranker = load_ranker()
    assert ranker.kind == "checkpoint"
    assert ranker.default_threshold is not None and 0.0 < ranker.default_threshold < 1.0
    s = predict_scores(ranker.model, torch.zeros(2, 64, 64), torch.zeros(2, 24))
    assert s.shape == (2,) and torch.isfinite(s).all()
