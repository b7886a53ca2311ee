"""Additive sufficient statistics of one E-step (DESIGN.md section 2).

Every field is a sum over particles, so statistics from any partition of the data combine with
``+`` in any order (a dask tree reduction, or one process).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class SufficientStats:
    """Sums over the particles of one E-step.

    Attributes
    ----------
    data
        ``(2, K, P*D, P*D)`` (2D) or ``(2, K, P*D, P*D, P*D)`` (3D) complex: back-projected
        CTF-weighted data ``sum G C X / sigma2`` per half-set and class on the padded, centred
        reference grid (Hermitian-complete).
    weight
        Same shape, real: ``sum G C^2 / sigma2`` on the same grid.
    class_weight
        ``(2, K)`` summed posterior per half-set and class.
    noise_power
        ``(G, S)`` weighted squared residual per optics group and shell (half-plane pixels).
    noise_weight
        ``(G,)`` number of particles per optics group.
    offset_sq
        ``()`` sum of G * |offset|^2 in pixels^2 (total offsets from the box centre).
    offset_weight
        ``()`` sum of G over the same hypotheses.
    log_likelihood
        ``()`` summed log-likelihood contributions.
    max_posterior
        ``()`` summed per-particle max posterior (for rlnAveragePmax).
    n_particles
        ``()`` number of particles.
    """

    data: torch.Tensor
    weight: torch.Tensor
    class_weight: torch.Tensor
    noise_power: torch.Tensor
    noise_weight: torch.Tensor
    offset_sq: torch.Tensor
    offset_weight: torch.Tensor
    log_likelihood: torch.Tensor
    max_posterior: torch.Tensor
    n_particles: torch.Tensor

    def __add__(self, other: "SufficientStats") -> "SufficientStats":
        return SufficientStats(**{f.name: getattr(self, f.name) + getattr(other, f.name).to(getattr(self, f.name).device) for f in fields(self)})

    __radd__ = __add__

    def to(self, device: torch.device | str) -> "SufficientStats":
        """A copy with every tensor on ``device``."""
        return SufficientStats(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @staticmethod
    def zeros(n_halves: int, n_classes: int, padded_box: int, n_groups: int, n_shells: int, device=None,
              ndim: int = 2) -> "SufficientStats":
        """Empty statistics (the identity of ``+``); ``ndim`` 2 for images, 3 for maps."""
        z = lambda *s, dt=torch.float64: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        grid = (padded_box,) * ndim
        return SufficientStats(
            data=z(n_halves, n_classes, *grid, dt=torch.complex64),
            weight=z(n_halves, n_classes, *grid, dt=torch.float32),
            class_weight=z(n_halves, n_classes),
            noise_power=z(n_groups, n_shells),
            noise_weight=z(n_groups),
            offset_sq=z(()),
            offset_weight=z(()),
            log_likelihood=z(()),
            max_posterior=z(()),
            n_particles=z(()),
        )


def reduce_stats(items: list[SufficientStats]) -> SufficientStats:
    """Sum a list of statistics pairwise (a balanced tree, like the distributed reduction)."""
    items = list(items)
    if not items:
        raise ValueError("no statistics to reduce")
    while len(items) > 1:
        items = [items[i] + items[i + 1] if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]
