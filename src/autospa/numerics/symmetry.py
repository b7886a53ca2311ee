"""Point-group rotation matrices in RELION's axis conventions (L1, pure torch).

RELION (src/symmetries.cpp, SymList::fill_symmetry_class) defines each group by generators:

=========  =====================================================================================
group      generators (rotation axis, fold)
=========  =====================================================================================
Cn         n-fold about z
Dn         n-fold about z, 2-fold about x
T          3-fold about z, 2-fold about (0, 0.816496, 0.577350)
O          3-fold about (1, 1, 1)/sqrt(3), 4-fold about z
I (=I2)    2-fold about z, 5-fold about (0.525731114, 0, 0.850650807),
           3-fold about (0, 0.356822076, 0.934172364)
I1         2-fold about x, 5-fold about (0.85065080702670, 0, -0.5257311142635),
           3-fold about (0.9341723640, 0.3568220765, 0)
I3         2-fold about (-0.5257311143, 0, 0.8506508070), 5-fold about z,
           3-fold about (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)
I4         2-fold about (0.5257311143, 0, 0.8506508070),
           5-fold about (0.8944271932547096, 0, 0.4472135909903704),
           3-fold about (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)
=========  =====================================================================================

The group is the closure of the generators under multiplication. Matrices act on column vectors
``(x, y, z)``; the identity comes first (as RELION's R_repository), the order of the others is
ours (RELION's enumeration order differs; the set is the same). Groups with mirrors or inversion
(Ci, Cs, Cnv, Cnh, Sn, Dnv, Dnh, Td, Th, Oh, Ih) are not provided: a single-particle map of a
chiral molecule never has them.
"""

from __future__ import annotations

import math
import re

import torch

__all__ = ["point_group_matrices", "point_group_order", "axis_angle_matrix"]

_GENERATORS: dict[str, list[tuple[int, tuple[float, float, float]]]] = {
    "T": [(3, (0.0, 0.0, 1.0)), (2, (0.0, 0.816496, 0.577350))],
    "O": [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0.0, 0.0, 1.0))],
    "I2": [
        (2, (0.0, 0.0, 1.0)),
        (5, (0.525731114, 0.0, 0.850650807)),
        (3, (0.0, 0.356822076, 0.934172364)),
    ],
    "I1": [
        (2, (1.0, 0.0, 0.0)),
        (5, (0.85065080702670, 0.0, -0.5257311142635)),
        (3, (0.9341723640, 0.3568220765, 0.0)),
    ],
    "I3": [
        (2, (-0.5257311143, 0.0, 0.8506508070)),
        (5, (0.0, 0.0, 1.0)),
        (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ],
    "I4": [
        (2, (0.5257311143, 0.0, 0.8506508070)),
        (5, (0.8944271932547096, 0.0, 0.4472135909903704)),
        (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ],
}
_GENERATORS["I"] = _GENERATORS["I2"]


def axis_angle_matrix(axis: tuple[float, float, float], angle_deg: float) -> torch.Tensor:
    """Right-handed rotation by ``angle_deg`` about ``axis`` (normalised here), float64 ``(3, 3)``."""
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / torch.linalg.norm(a)
    t = math.radians(angle_deg)
    k = torch.tensor([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(t) * k + (1.0 - math.cos(t)) * (k @ k)


def _closure(generators: list[torch.Tensor], max_order: int = 120, tol: float = 1e-4) -> torch.Tensor:
    elements = [torch.eye(3, dtype=torch.float64)]
    frontier = [elements[0]]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                m = h @ g
                if all(torch.max(torch.abs(m - e)) > tol for e in elements):
                    elements.append(m)
                    new.append(m)
                    if len(elements) > max_order:
                        raise ValueError("generators do not close into a finite point group")
        frontier = new
    out = torch.stack(elements)
    # re-orthonormalise (the generators are given to ~9 digits)
    u, _, vh = torch.linalg.svd(out)
    return u @ vh


def _parse(name: str) -> tuple[str, int]:
    s = name.strip().upper()
    m = re.fullmatch(r"([CD])(\d+)", s)
    if m:
        n = int(m.group(2))
        if n < 1:
            raise ValueError(f"symmetry {name!r}: order must be >= 1")
        return m.group(1), n
    if s in ("T", "O", "I", "I1", "I2", "I3", "I4"):
        return s, 0
    raise ValueError(f"unknown or unsupported point group {name!r} (C<n>, D<n>, T, O, I, I1-I4)")


def point_group_order(name: str) -> int:
    """Number of rotations of a point group: Cn n, Dn 2n, T 12, O 24, I 60."""
    kind, n = _parse(name)
    return {"C": n, "D": 2 * n, "T": 12, "O": 24}.get(kind, 60)


def point_group_matrices(
    name: str, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """All rotations of a point group in RELION's axis conventions.

    Parameters
    ----------
    name
        ``"C1"``, ``"C<n>"``, ``"D<n>"``, ``"T"``, ``"O"``, ``"I"`` (= ``"I2"``), ``"I1"`` .. ``"I4"``
        (case-insensitive).

    Returns
    -------
    torch.Tensor
        ``(S, 3, 3)`` rotation matrices acting on ``(x, y, z)``, identity first, closed under
        multiplication; S = :func:`point_group_order`.
    """
    kind, n = _parse(name)
    if kind == "C":
        # the n-fold rotations in angle order
        mats = torch.stack([axis_angle_matrix((0.0, 0.0, 1.0), 360.0 * j / n) for j in range(n)])
        return mats.to(dtype=dtype, device=device)
    if kind == "D":
        cz = [axis_angle_matrix((0.0, 0.0, 1.0), 360.0 * j / n) for j in range(n)]
        x2 = axis_angle_matrix((1.0, 0.0, 0.0), 180.0)
        mats = torch.stack(cz + [c @ x2 for c in cz])
        return mats.to(dtype=dtype, device=device)
    gens = [axis_angle_matrix(axis, 360.0 / fold) for fold, axis in _GENERATORS[kind]]
    mats = _closure(gens)
    expected = point_group_order(name)
    if mats.shape[0] != expected:
        raise ValueError(f"point group {name}: closure gave {mats.shape[0]} elements, expected {expected}")
    return mats.to(dtype=dtype, device=device)
