"""Class-ranker features (reference/relion-schemes-and-ranker.md B3-B6): values on images whose
features are known by construction."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from autospa.ranker import features as F


def test_fourier_rescale_keeps_mean_and_band_limited_content() -> None:
    gen = torch.Generator().manual_seed(0)
    small = F.fourier_rescale(torch.randn(3, 16, 16, generator=gen, dtype=torch.float64), 16)  # band-limited at 16
    big = F.fourier_rescale(small, 40)
    assert big.shape == (3, 40, 40)
    assert torch.allclose(big.mean((-2, -1)), small.mean((-2, -1)), atol=1e-12)
    back = F.fourier_rescale(big, 16)
    # padding then cropping returns the image except for the Nyquist row/column (split on padding)
    ft_err = (torch.fft.fft2(back) - torch.fft.fft2(small)).abs()
    ft_err[:, 8, :] = 0
    ft_err[:, :, 8] = 0
    assert float(ft_err.max()) < 1e-9
    const = torch.full((1, 30, 30), 2.5)
    assert torch.allclose(F.fourier_rescale(const, 64), torch.full((1, 64, 64), 2.5), atol=1e-5)


def test_moments_are_relion_population_moments() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = F.moments(x, torch.ones(2, 2, dtype=torch.bool))
    assert m["sum"] == pytest.approx(10.0)
    assert m["mean"] == pytest.approx(2.5)
    assert m["stddev"] == pytest.approx(math.sqrt(1.25))
    assert m["skew"] == pytest.approx(0.0, abs=1e-12)
    assert m["kurt"] == pytest.approx((0.0625 * 2 * 1.5**4 / 0.0625 + 2 * 0.5**4) * 4 / 5.0**2)  # sum d^4 * n / (sum d^2)^2
    skewed = F.moments(torch.tensor([0.0, 0.0, 0.0, 4.0]), torch.ones(4, dtype=torch.bool))
    d = torch.tensor([-1.0, -1.0, -1.0, 3.0])
    assert skewed["skew"] == pytest.approx(float((d**3).sum() * 2 / (d**2).sum() ** 1.5))
    assert F.moments(x, torch.zeros(2, 2, dtype=torch.bool)) == {"sum": 0.0, "mean": 0.0, "stddev": 0.0, "skew": 0.0, "kurt": 0.0}
    flat = F.moments(torch.ones(3, 3), torch.ones(3, 3, dtype=torch.bool))
    assert flat["skew"] == 0.0 and flat["kurt"] == 0.0


def test_connected_components_counts_4_connected_islands() -> None:
    m = torch.tensor([
        [1, 1, 0, 0, 1],
        [0, 1, 0, 1, 1],
        [0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 0, 0, 1, 1],
    ], dtype=torch.bool)  # fmt: skip
    lab = F.connected_components(m)
    assert int((lab[~m] != 0).sum()) == 0
    assert len(torch.unique(lab[m])) == 5  # (0,0)-(1,1) | (0,4)-(1,3) | (3,0)-(4,0) | (3,2) | (4,3)-(4,4); diagonals do not connect
    assert lab[0, 0] == lab[1, 1] and lab[0, 4] == lab[1, 3] and lab[3, 2] != lab[4, 3]


def _opening_sum_brute(x: torch.Tensor, r: int) -> float:
    n = x.shape[0]
    off = [(a, b) for a in range(-r, r + 1) for b in range(-r, r + 1) if a * a + b * b <= r * r]
    er = torch.empty_like(x)
    for i, j in itertools.product(range(n), range(n)):
        er[i, j] = min(x[i + a, j + b] for a, b in off if 0 <= i + a < n and 0 <= j + b < n)
    di = torch.empty_like(x)
    for i, j in itertools.product(range(n), range(n)):
        di[i, j] = max(er[i + a, j + b] for a, b in off if 0 <= i + a < n and 0 <= j + b < n)
    return float(di.sum())


@pytest.mark.parametrize("radius", [1, 2])
def test_granulometry_opening_matches_brute_force(radius: int) -> None:
    x = torch.randn(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(radius))
    assert F.morphological_opening_sum(x, radius) == pytest.approx(_opening_sum_brute(x, radius), rel=1e-12)


def _disc_image(n: int, radius_px: float, value: float = 1.0) -> torch.Tensor:
    i, j = F.centred_coordinates(n)
    return torch.where(i**2 + j**2 <= radius_px**2, value, 0.0).to(torch.float64)


def test_image_features_of_a_centred_disc() -> None:
    # at 4 A/px already: no rescaling; a disc of radius 8 px in a mask of radius 16 px (diameter 128 A)
    img = _disc_image(40, 8.0, 2.0)
    res = F.image_features(img, 4.0, 128.0)
    v = res.values
    assert res.size_4a == 40 and res.radius_px == pytest.approx(16.0)
    disc_px = int((_disc_image(40, 8.0) > 0).sum())
    # the low-passed disc spreads by about one 25 A (6 px) wavelength: protein covers the disc plus a rim
    assert disc_px <= res.protein_pixels <= int((_disc_image(40, 11.0) > 0).sum())
    assert res.protein_pixels + res.solvent_pixels == int((_disc_image(40, 16.0) > 0).sum())
    assert v["scattered_signal"] == 0.0 and v["edge_signal"] == 0.0
    assert v["ring_mean"] == 0.0 and v["ring_stddev"] == 0.0
    assert v["solvent_mean"] == 0.0 and v["solvent_sum"] == 0.0
    assert v["protein_sum"] == pytest.approx(2.0 * disc_px)
    assert v["relative_signal_intensity"] == pytest.approx(2.0 * disc_px)
    assert v["lowpass_mean"] == pytest.approx(2.0 * disc_px / 1600, rel=1e-9)
    assert v["lowpass_max"] < 2.0 * 1.2 and v["lowpass_min"] > -0.5
    # granulometry: opening a (digital) disc of radius 8 with a radius-1 disc keeps it; larger discs
    # shave pixels off its digital boundary only
    assert v["granulo_1"] == pytest.approx(2.0 * disc_px)
    g = [v[f"granulo_{r}"] for r in range(1, 7)]
    assert all(0.9 * 2.0 * disc_px < x <= 2.0 * disc_px for x in g)


def test_image_features_of_empty_and_off_centre_images() -> None:
    empty = F.image_features(torch.zeros(40, 40, dtype=torch.float64), 4.0, 128.0)
    assert empty.protein_pixels == 0 and all(x == 0.0 for x in empty.values.values())
    # a noisy class: invariants between the features (masks partition the disc, RSI definition)
    img = torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.3 + 0.5 * _disc_image(40, 6.0)
    res = F.image_features(img, 4.0, 128.0)
    v = res.values
    assert res.protein_pixels + res.solvent_pixels == int((_disc_image(40, 16.0) > 0).sum())
    assert 0.0 <= v["scattered_signal"] < 1.0 and 0.0 <= v["edge_signal"] <= 1.0
    assert v["relative_signal_intensity"] == pytest.approx(v["protein_sum"] - v["solvent_sum"] / res.solvent_pixels * res.protein_pixels)
    assert v["lowpass_min"] <= v["lowpass_mean"] <= v["lowpass_max"]


def test_image_features_rescale_to_4_angstrom() -> None:
    img = _disc_image(64, 12.0)  # 2 A/px: disc radius 24 A, box 128 A -> 32 px at 4 A/px
    res = F.image_features(img, 2.0, 100.0)
    assert res.size_4a == 32
    assert res.radius_px == pytest.approx(12.5)  # min(32 / 2, 100 / 8)
    assert res.values["lowpass_mean"] == pytest.approx(float(img.mean()), rel=1e-9)  # rescaling keeps the mean


def test_metadata_features_and_fallbacks() -> None:
    m = F.metadata_features(3.0, 2.0, 10.0, 200.0, 64, 3.0)
    assert m["accuracy_rotation"] == 3.0 and m["accuracy_translation"] == 2.0
    assert m["weighted_resolution"] == pytest.approx(1.0 / (100.0 * math.log(200.0)))
    assert m["relative_resolution"] == pytest.approx(10.0 / 192.0)
    unknown = F.metadata_features(999.0, 999.0, 10.0, 200.0, 64, 3.0)
    assert unknown["accuracy_rotation"] == 5.0 and unknown["accuracy_translation"] == 8.0
    ssnr = torch.tensor([50.0, 9.0, 3.0, 0.8, 0.2])
    res = torch.tensor([999.0, 40.0, 20.0, 13.3, 10.0])
    assert F.resolution_from_ssnr(ssnr, res, 2.5) == 20.0
    assert F.resolution_from_ssnr(torch.tensor([5.0, 4.0]), torch.tensor([999.0, 10.0]), 2.5) == 5.0


def test_normalisation_uses_relion_constants_and_local_statistics() -> None:
    raw = torch.zeros(3, 24, dtype=torch.float64)
    raw[:, 0] = torch.tensor([4.352, 4.352 + 4.759, 0.0])
    raw[:, 15] = 837.576 + 1958.823
    raw[:, 21] = torch.tensor([1.0, 2.0, 3.0])
    raw[:, 22] = 7.0  # constant within the job -> 0
    out = F.normalise_features(raw)
    assert out.dtype == torch.float32
    assert out[0, 0] == pytest.approx(0.0, abs=1e-6) and out[1, 0] == pytest.approx(1.0)
    assert out[2, 0] == pytest.approx(-4.352 / 4.759, rel=1e-5)
    assert torch.allclose(out[:, 15], torch.ones(3))
    assert torch.allclose(out[:, 21], torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2.0 / 3.0))
    assert torch.all(out[:, 22] == 0)
    assert F.FEATURE_NAMES[21:] == ("protein_sum", "solvent_sum", "relative_signal_intensity")


def test_network_image_crops_to_the_mask_and_rescales_to_64() -> None:
    img = _disc_image(100, 20.0)
    out = F.network_image(img, 2.0, 101.0)  # side ceil(101 / 2) + 1 = 52 -> even 52
    assert out.shape == (64, 64) and out.dtype == torch.float32
    crop = img[50 - 26 : 50 + 26, 50 - 26 : 50 + 26]
    assert float(out.mean()) == pytest.approx(float(crop.mean()), rel=1e-5)
    # a mask larger than the box zero-pads: the mean falls by the area ratio
    small = torch.ones(20, 20, dtype=torch.float64)
    padded = F.network_image(small, 3.0, 120.0)  # side 41 -> 42
    assert float(padded.mean()) == pytest.approx(400.0 / 42**2, rel=1e-5)


def test_job_inputs_keep_classes_with_more_than_10_particles() -> None:
    classes = torch.stack([_disc_image(48, 8.0), torch.zeros(48, 48, dtype=torch.float64), _disc_image(48, 6.0)])
    dist = torch.tensor([0.6, 0.39, 0.01])
    ji = F.job_inputs(classes, dist, torch.tensor([2.0, 999.0, 3.0]), torch.tensor([1.0, 999.0, 1.0]), torch.tensor([10.0, 0.0, 12.0]),
                      1000, 4.0, 160.0, fallback_resolution=torch.tensor([0.0, 30.0, 0.0]))
    assert ji.kept.tolist() == [True, True, False]  # 600, 390 and 10 particles: 10 is not > 10
    assert ji.raw.shape == (2, 24) and ji.features.shape == (2, 24) and ji.images.shape == (2, 64, 64)
    assert ji.raw[1, 0] == 5.0 and ji.raw[1, 1] == 8.0  # unknown accuracies
    assert float(ji.raw[1, 3]) == pytest.approx(30.0 / (48 * 4.0))  # fallback resolution used
    assert float(ji.raw[0, 2]) == pytest.approx(1.0 / (100.0 * math.log(600.0)))
