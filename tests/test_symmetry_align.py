"""Symmetry alignment and point-group detection (refinement/symmetry_align.py, jobs/symmetry.py,
``autospa align-symmetry``), on pseudo-atomic phantoms rotated and shifted by known amounts.

Inputs are rendered from rotated atom positions (no interpolation), so the truth is exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autospa.cli.main import main
from autospa.io.mrc import read_mrc, write_mrc
from autospa.numerics.symmetry import axis_angle_matrix, point_group_matrices
from autospa.refinement.symmetry_align import (
    align_symmetry,
    apply_alignment,
    rank_point_groups,
    resample_volume,
    rotation_axis_angle,
    shift_volume,
    symmetrise,
    symmetry_agreement,
)
from autospa.simulate.phantoms import phantom_atoms, render_atoms

BOX, PIX = 32, 3.0


def _random_rotation(seed: int) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def phantom_pair(sym: str, seed: int = 0, rot_seed: int = 1, shift_px=(1.3, -0.7, 0.9)):
    """The phantom in RELION's standard orientation, and the same rotated by R and shifted by t (pixels):
    ``moved(y) = truth(R^T (y - t))``."""
    radius = 0.28 * BOX * PIX
    n = max(200, int(4 / 3 * math.pi * (radius / PIX) ** 3 / 8))
    pos, w = phantom_atoms(n_atoms=n, radius_a=radius, symmetry=sym, seed=seed)
    sigma = 1.1 * PIX
    rot = _random_rotation(rot_seed)
    t = np.asarray(shift_px, dtype=float)
    truth = render_atoms(pos, w, BOX, PIX, sigma)
    moved = render_atoms(pos @ rot.T + t * PIX, w, BOX, PIX, sigma)
    return truth, moved, torch.tensor(rot), torch.tensor(t)


def _normaliser_error(sym: str, matrix: torch.Tensor, rot: torch.Tensor) -> float:
    """Largest matrix-element error of the recovered group: ``N = R^T A`` must map G onto itself."""
    g = point_group_matrices(sym)
    n = rot.T @ matrix.double()
    conj = n @ g @ n.T
    return float((conj[:, None] - g[None]).abs().amax((-1, -2)).min(1).values.max())


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def test_rotation_axis_angle_round_trip() -> None:
    for sym in ("D7", "O", "I"):
        mats = point_group_matrices(sym)[1:]
        axes, ang = rotation_axis_angle(mats)
        rebuilt = torch.stack([axis_angle_matrix(tuple(a.tolist()), float(t)) for a, t in zip(axes, ang)])
        assert torch.allclose(rebuilt, mats, atol=1e-6)
        assert float(ang.min()) > 0 and float(ang.max()) <= 180.0 + 1e-6


def test_resample_and_shift_conventions() -> None:
    truth, _, _, _ = phantom_pair("C1")
    # u(x) = v(c + M x): with M = I and c = t the content at t comes to the centre
    t = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)
    moved = shift_volume(truth, t)
    back = resample_volume(moved, torch.eye(3, dtype=torch.float64), t, pad=2)
    assert _corr(back[4:-4, 4:-4, 4:-4], truth[4:-4, 4:-4, 4:-4]) > 0.999
    # a rotation by 90 degrees about z is exact on the grid
    rz = axis_angle_matrix((0.0, 0.0, 1.0), 90.0)
    r = resample_volume(truth, rz, pad=1)
    # u(x, y, z) = v(-y, x, z): index [z, y, x] of u is v[z, x, -y]
    expect = torch.roll(truth.flip(2).transpose(1, 2), 1, dims=1)
    assert _corr(r, expect) > 0.9999


def test_symmetrise_is_a_projection_and_keeps_symmetric_maps() -> None:
    truth, _, _, _ = phantom_pair("D7")
    s = symmetrise(truth, "D7")
    assert _corr(s, truth) > 0.999  # the phantom is D7-symmetric in the standard orientation
    asym, _, _, _ = phantom_pair("C1")
    s1 = symmetrise(asym, "O", pad=1)
    s2 = symmetrise(s1, "O", pad=1)  # O's operators are exact on the grid
    assert torch.allclose(s1, s2, atol=1e-5 * float(s1.abs().max()))
    assert symmetry_agreement(truth, "D7") > 0.98
    assert symmetry_agreement(asym, "D7") < 0.3


@pytest.mark.parametrize(
    "sym",
    ["C4", "D7", "O", pytest.param("C2", marks=pytest.mark.slow), pytest.param("D2", marks=pytest.mark.slow),
     pytest.param("T", marks=pytest.mark.slow)],
)
def test_align_recovers_axes_and_centre(sym: str) -> None:
    truth, moved, rot, t = phantom_pair(sym)
    al = align_symmetry(moved, sym)
    assert _normaliser_error(sym, al.matrix, rot) < 0.03  # ~1.7 degrees
    err = al.center_px - t
    if sym.startswith("C"):  # along the axis the centre is free
        axis = rot @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        err = err - (err @ axis) * axis
    assert float(err.norm()) < 0.5
    assert al.agreement > 0.9
    aligned = apply_alignment(moved, al)
    assert symmetry_agreement(aligned, sym) > 0.9
    # the output is the phantom up to an element of the group's normaliser: compare with the best
    # symmetry-equivalent placement (for C4: any rotation about z, tested through the agreement only)
    if not sym.startswith("C"):
        n = (rot.T @ al.matrix.double())
        best = _corr(aligned[4:-4, 4:-4, 4:-4], resample_volume(truth, n)[4:-4, 4:-4, 4:-4])
        assert best > 0.97


@pytest.mark.parametrize(
    "sym",
    ["C1", "C4", "D7", "O", pytest.param("C2", marks=pytest.mark.slow), pytest.param("D2", marks=pytest.mark.slow),
     pytest.param("T", marks=pytest.mark.slow)],
)
def test_auto_picks_the_true_group(sym: str) -> None:
    _, moved, rot, _ = phantom_pair(sym, seed=1, rot_seed=7)
    ranking = rank_point_groups(moved)
    top = ranking[0]
    assert top.group == sym, [(r.group, round(r.score, 2)) for r in ranking[:5]]
    assert [r.score for r in ranking] == sorted((r.score for r in ranking), reverse=True)
    if sym != "C1":
        assert top.agreement > 0.9
        assert _normaliser_error(sym, top.alignment.matrix, rot) < 0.03
        # the winner beats its best rival by a margin
        assert top.score - ranking[1].score > 0.4


def test_cli_align_symmetry_writes_aligned_map(tmp_path, capsys) -> None:
    truth, moved, rot, t = phantom_pair("D7")
    src = tmp_path / "map.mrc"
    write_mrc(src, moved.numpy(), PIX)
    out = tmp_path / "aligned.mrc"
    assert main(["align-symmetry", "--i", str(src), "--o", str(out), "--sym", "D7"]) == 0
    data, px = read_mrc(out)
    assert px == pytest.approx(PIX)
    aligned = torch.as_tensor(data)
    assert symmetry_agreement(aligned, "D7") > 0.95
    # auto: prints a ranked table and writes the best-aligned map
    out2 = tmp_path / "auto.mrc"
    rc = main(["align-symmetry", "--i", str(src), "--o", str(out2), "--sym", "auto",
               "--sym_candidates", "C2,C7,C14,D2,D7,D14,T,O"])
    assert rc == 0
    text = capsys.readouterr().out
    table = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert table[0][1] == "D7"
    assert len(table) == 9  # C1 + 8 candidates
    assert symmetry_agreement(torch.as_tensor(read_mrc(out2)[0]), "D7") > 0.95


def test_cli_align_symmetry_bad_input(tmp_path, capsys) -> None:
    out = tmp_path / "aligned.mrc"
    assert main(["align-symmetry", "--i", str(tmp_path / "missing.mrc"), "--o", str(out), "--sym", "C2"]) == 1
    assert not out.exists()
    src = tmp_path / "map.mrc"
    write_mrc(src, np.zeros((16, 16, 16), np.float32) + 1.0, 2.0)
    assert main(["align-symmetry", "--i", str(src), "--o", str(out), "--sym", "Q5"]) == 1
    assert not out.exists()
    err = capsys.readouterr().err
    assert "Q5" in err and len(err.strip().splitlines()) == 2
