"""The model state of an iterative 2D/3D job: a small value the driver holds and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class ModelState:
    """References, noise, priors and optimiser moments.

    Attributes
    ----------
    refs
        ``(K, D, D)`` real references (class averages).
    sigma2
        ``(G, S)`` noise variance per component, per optics group and shell (S = D//2 + 1),
        on RELION's scale (forward FFT divided by the number of pixels).
    class_prior
        ``(K,)`` class distribution pi_k (sums to 1).
    sigma_offset_a
        Standard deviation of the prior on offsets, Angstrom.
    pixel_size_a
        Pixel size of the model.
    current_size
        Even Fourier window (pixels) of the next E-step.
    iteration
        Last completed iteration (0 after initialisation).
    tau2
        ``(K, S)`` signal power per shell of each reference (per component).
    data_vs_prior
        ``(K, S)`` SSNR per class and shell (rlnSsnrMap).
    completeness
        ``(K, S)`` Fourier completeness per class and shell.
    moment1
        ``(2, K, P*D, P*D)`` complex VDAM first moments per pseudo half-set (None for EM).
    moment2
        ``(K, P*D, P*D)`` real VDAM second moment (None for EM).
    pad
        Padding factor of the reference grids.
    """

    refs: torch.Tensor
    sigma2: torch.Tensor
    class_prior: torch.Tensor
    sigma_offset_a: float
    pixel_size_a: float
    current_size: int
    iteration: int = 0
    tau2: torch.Tensor | None = None
    data_vs_prior: torch.Tensor | None = None
    completeness: torch.Tensor | None = None
    moment1: torch.Tensor | None = None
    moment2: torch.Tensor | None = None
    pad: int = 2
    log_likelihood: float = 0.0
    average_pmax: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return self.refs.shape[0]

    @property
    def box(self) -> int:
        return self.refs.shape[-1]

    def replace(self, **changes) -> "ModelState":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dict of tensors and numbers (for ``torch.save`` checkpoints)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def from_dict(d: dict) -> "ModelState":
        return ModelState(**d)
