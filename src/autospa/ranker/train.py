"""Training and evaluating the class ranker (L2, pure torch; no files).

The recipe is relion-classranker's ``training/train.py`` (reference/relion-schemes-and-ranker.md
B10): MSE loss, Adam (weight decay 5e-4), batch 32, dropout 0.3, each batch rotated by one random
angle (bilinear ``grid_sample``, zero padding) and flipped with probability 0.5, the granulometry
entries of the feature vector zeroed in every batch. RELION's learning rate is 5e-5 over 200
epochs of 12,000 examples; our corpora are smaller, so the defaults here are a larger rate with a
cosine decay over fewer epochs (both are arguments).

Selection metrics (:func:`selection_rates`) follow the paper's Figure 7: with ``T`` the particles
that should be kept (the simulator's real particles) and ``S`` those the ranker selects,
FPR = |S \\ T| / |T| and FNR = |T \\ S| / |T|.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from autospa.ranker.features import GRANULO_FEATURES
from autospa.ranker.network import ClassRankerNet


@dataclass
class TrainConfig:
    """Hyper-parameters (RELION's values where they make sense for a small corpus).

    Attributes
    ----------
    epochs, batch_size, lr, weight_decay, dropout, seed
        Optimisation.
    augment
        Random rotation + flip per batch.
    zero_granulo
        Zero entries 15-20 of the features in every batch (RELION's ``MASK_FEATURE_IDX``).
    cosine
        Cosine decay of the learning rate to 5 % over the epochs.
    keep_best
        Return the weights of the epoch with the lowest validation MSE instead of the last epoch's
        (the validation MSE then no longer measures held-out performance).
    """

    epochs: int = 60
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 5e-4
    dropout: float = 0.3
    seed: int = 12
    augment: bool = True
    zero_granulo: bool = True
    cosine: bool = True
    keep_best: bool = False


@dataclass
class TrainHistory:
    """Per-epoch training and validation MSE, and the epoch whose weights were kept."""

    train_mse: list[float] = field(default_factory=list)
    val_mse: list[float] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0


def rotate_flip(images: torch.Tensor, angle_rad: float, flip: bool) -> torch.Tensor:
    """Rotate ``(B, 1, n, n)`` images by one angle (bilinear, zero padding), then optionally flip
    them left-right."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    theta = images.new_tensor([[c, -s, 0.0], [s, c, 0.0]]).expand(images.shape[0], 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.flip(out, dims=(-1,)) if flip else out


def _mask_features(features: torch.Tensor, zero_granulo: bool) -> torch.Tensor:
    if not zero_granulo:
        return features
    f = features.clone()
    f[:, list(GRANULO_FEATURES)] = 0.0
    return f


@torch.no_grad()
def evaluate_mse(model: torch.nn.Module, images: torch.Tensor, features: torch.Tensor, targets: torch.Tensor,
                 zero_granulo: bool = False, batch_size: int = 256) -> float:
    """Mean squared error of the model on a set (eval mode; ``images (n, 64, 64)``)."""
    if images.shape[0] == 0:
        return float("nan")
    model.eval()
    device = next(model.parameters()).device
    se = 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size, None].to(device)
        y = _mask_features(features[i : i + batch_size], zero_granulo).to(device)
        p = model(x, y).reshape(-1)
        se += float(((p - targets[i : i + batch_size].to(device)) ** 2).sum())
    return se / images.shape[0]


def train_network(
    images: torch.Tensor,
    features: torch.Tensor,
    targets: torch.Tensor,
    val_images: torch.Tensor | None = None,
    val_features: torch.Tensor | None = None,
    val_targets: torch.Tensor | None = None,
    config: TrainConfig | None = None,
    progress: Callable[[int, float, float], None] | None = None,
    device: str | torch.device | None = None,
) -> tuple[ClassRankerNet, TrainHistory]:
    """Train a :class:`ClassRankerNet` from scratch.

    Parameters
    ----------
    images, features, targets
        Training set: ``(n, 64, 64)``, ``(n, 24)`` normalised features, ``(n,)`` targets.
    val_images, val_features, val_targets
        Validation set (optional); with it, the weights of the epoch with the lowest validation
        MSE are returned.
    config
        Hyper-parameters.
    progress
        Called after each epoch with ``(epoch, train_mse, val_mse)``.
    device
        Where to train (default: the images' device).

    Returns
    -------
    (ClassRankerNet, TrainHistory)
        The model in eval mode with dropout 0 (on ``device``) and the loss history.
    """
    import time

    cfg = config or TrainConfig()
    dev = torch.device(device) if device is not None else images.device
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = ClassRankerNet(p_dropout=cfg.dropout).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = images.shape[0]
    steps = max(1, math.ceil(n / cfg.batch_size)) * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))) if cfg.cosine else (lambda s: 1.0)
    )
    has_val = val_images is not None and val_images.shape[0] > 0
    hist = TrainHistory()
    best_state, best = None, math.inf
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        se = torch.zeros((), device=dev)  # summed on the device: no synchronisation per step
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            x = images[idx, None].to(dev, torch.float32)
            if cfg.augment:
                angle = float(torch.rand(1, generator=gen)) * 2 * math.pi
                flip = bool(torch.rand(1, generator=gen) < 0.5)
                x = rotate_flip(x, angle, flip)
            y = _mask_features(features[idx], cfg.zero_granulo).to(dev, torch.float32)
            t = targets[idx].to(dev, torch.float32)
            pred = model(x, y).reshape(-1)
            loss = torch.mean((pred - t) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            se += loss.detach() * idx.numel()
        hist.train_mse.append(float(se) / n)
        vm = evaluate_mse(model, val_images, val_features, val_targets, cfg.zero_granulo) if has_val else float("nan")
        hist.val_mse.append(vm)
        score = vm if has_val else hist.train_mse[-1]
        if not cfg.keep_best:
            score = -epoch  # the last epoch
        if score < best:
            best = score
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            hist.best_epoch = epoch
        if progress is not None:
            progress(epoch, hist.train_mse[-1], vm)
    hist.seconds = time.perf_counter() - t0
    final = ClassRankerNet(p_dropout=0.0).to(dev)
    final.load_state_dict(best_state if best_state is not None else model.state_dict())
    return final.eval(), hist


def selection_rates(selected: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Particle FPR and FNR of a selection against a reference selection (paper, Figure 7).

    Parameters
    ----------
    selected, reference
        ``(P,)`` bool.

    Returns
    -------
    (float, float)
        FPR = |selected and not reference| / |reference|, FNR = |reference and not selected| /
        |reference| (both 0 when the reference is empty and nothing is selected).
    """
    n_ref = int(reference.sum())
    fp = int((selected & ~reference).sum())
    fn = int((reference & ~selected).sum())
    if n_ref == 0:
        return (0.0 if fp == 0 else math.inf), 0.0
    return fp / n_ref, fn / n_ref


def pooled_rates(jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], threshold: float) -> tuple[float, float]:
    """FPR and FNR over several jobs at one score threshold.

    Parameters
    ----------
    jobs
        Per job: ``(class_numbers (n,), scores (n,), particle_class (P,), particle_real (P,))``
        (classes not in ``class_numbers`` are never selected).
    threshold
        Classes with ``score >= threshold`` are selected.
    """
    fp = fn = ref = 0
    for classes, scores, pclass, real in jobs:
        chosen = classes[scores >= threshold]
        sel = torch.isin(pclass, chosen)
        fp += int((sel & ~real).sum())
        fn += int((real & ~sel).sum())
        ref += int(real.sum())
    return (fp / ref, fn / ref) if ref else (0.0, 0.0)


def calibrate_threshold(jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                        candidates: torch.Tensor | None = None) -> tuple[float, float, float]:
    """The threshold minimising max(FPR, FNR) over ``jobs`` (ties: the smaller FPR + FNR).

    Returns
    -------
    (threshold, fpr, fnr)
    """
    cands = candidates if candidates is not None else torch.arange(0.0, 1.0001, 0.01)
    best = None
    for t in cands.tolist():
        fpr, fnr = pooled_rates(jobs, t)
        key = (max(fpr, fnr), fpr + fnr)
        if best is None or key < best[0]:
            best = (key, t, fpr, fnr)
    assert best is not None
    return float(round(best[1], 4)), best[2], best[3]


def oracle_mse(train_key: torch.Tensor, train_targets: torch.Tensor, train_job_score: torch.Tensor,
               val_key: torch.Tensor, val_targets: torch.Tensor, val_job_score: torch.Tensor,
               n_bins: int = 100, low: float = -1.0, high: float = 1.0) -> float:
    """Validation MSE of a predictor that knows one truth quantity of every class exactly and the
    job score, and nothing else: what is left of the targets when that quantity is known perfectly
    (a model that only estimates it from the class average does no better, unless it also reads
    something else that the targets depend on).

    The per-class part of the target (``target / job_score``) is averaged over the training
    classes in ``n_bins`` equal bins of ``key`` over ``[low, high]``; a validation class is
    predicted as its bin's mean times its job score (bins without training classes predict 0;
    training jobs with a job score below 0.05 are left out of the means).

    Parameters
    ----------
    train_key, val_key
        ``(n,)`` and ``(m,)`` the quantity the oracle knows (template match or purity).
    train_targets, val_targets
        ``(n,)`` and ``(m,)`` target scores.
    train_job_score, val_job_score
        ``(n,)`` and ``(m,)`` each class's job score.

    Returns
    -------
    float
        Mean squared error over the ``m`` validation classes.
    """
    def bins(key: torch.Tensor) -> torch.Tensor:
        return ((key.double() - low) / (high - low) * n_bins).floor().clamp(0, n_bins - 1).long()

    ok = train_job_score > 0.05
    b = bins(train_key[ok])
    q = train_targets[ok].double() / train_job_score[ok].double()
    sums = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, q)
    counts = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, torch.ones_like(q))
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    pred = means[bins(val_key)] * val_job_score.double()
    return float(((pred - val_targets.double()) ** 2).mean()) if val_targets.numel() else float("nan")


__all__ = ["TrainConfig", "TrainHistory", "calibrate_threshold", "evaluate_mse", "oracle_mse", "pooled_rates", "rotate_flip",
           "selection_rates", "train_network"]
