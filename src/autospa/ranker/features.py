"""The class ranker's inputs (L2, pure torch): RELION-4.0's 24 features and the 64 x 64 image.

Everything follows ``relion_class_ranker`` 4.0.1 (reference/relion-schemes-and-ranker.md B3-B6):

- image features are computed on the class average Fourier-rescaled to 4 Angstrom/pixel
  (:func:`fourier_rescale`, RELION's ``resizeMap``: the mean is preserved), with integer
  coordinates from the centre pixel and the mask radius ``R = min(N4 / 2, diameter / 8)``;
- moments are population moments (``stddev = sqrt(sum d^2 / n)``, ``skew``, non-excess
  ``kurt``); the 25 Angstrom low-pass has a raised-cosine edge two shells wide;
- protein / solvent masks come from a flood fill of the low-pass image above 5 % of its standard
  deviation, seeded in the central disc ``r <= 0.6 R``; islands holding more than 10 % of the
  central disc are protein, the others scattered signal;
- granulometry is the sum of the morphological opening with discs of radius 1..6;
- metadata features: accuracies (fallback 5 degrees / 8 when RELION's 999 marks them unknown),
  ``weighted_resolution = 1 / (d^2 ln N)``, ``relative_resolution = d / (box * pixel)``;
- normalisation: entries 0-20 with RELION's fixed training-set constants
  (:data:`FEATURE_MEAN`, :data:`FEATURE_STD`), 21-23 with the job's own mean and population
  standard deviation (0 where that is below 1e-10).

The CNN image (:func:`network_image`) is the class average at its own pixel size, cut to the square
of side ``ceil(diameter / pixel) + 1`` (rounded up to even, zero-padded when larger than the box)
and Fourier-rescaled to 64 x 64, with no intensity normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Names of the 24 entries of the feature vector, in RELION's order (B5).
FEATURE_NAMES: tuple[str, ...] = (
    "accuracy_rotation", "accuracy_translation", "weighted_resolution", "relative_resolution",
    "ring_mean", "ring_stddev", "protein_stddev", "solvent_mean", "solvent_stddev",
    "scattered_signal", "edge_signal", "lowpass_mean", "lowpass_stddev", "lowpass_min", "lowpass_max",
    "granulo_1", "granulo_2", "granulo_3", "granulo_4", "granulo_5", "granulo_6",
    "protein_sum", "solvent_sum", "relative_signal_intensity",
)  # fmt: skip
N_FEATURES = 24
#: RELION's fixed normalisation constants for entries 0-20 (B5).
FEATURE_MEAN: tuple[float, ...] = (
    4.352, 3.871, 0.001, 0.061, -0.199, 0.424, 0.744, -0.380, 0.292, 0.024, 0.047, 0.116, 0.638, -1.112, 2.990,
    837.576, 726.097, 602.175, 483.469, 328.014, 196.059,
)  # fmt: skip
FEATURE_STD: tuple[float, ...] = (
    4.759, 3.019, 0.002, 0.088, 0.283, 0.629, 0.585, 0.378, 0.485, 0.075, 0.075, 0.182, 0.429, 1.087, 1.758,
    1958.823, 2845.330, 3605.858, 4001.972, 4399.578, 4709.751,
)  # fmt: skip
#: Entries normalised per job (B5).
LOCAL_FEATURES = (21, 22, 23)
#: Granulometry entries (zeroed in RELION's training batches, B5).
GRANULO_FEATURES = (15, 16, 17, 18, 19, 20)
#: Pixel size of the image features (Angstrom).
FEATURE_PIXEL_A = 4.0
#: Low-pass of the mask and low-pass statistics (Angstrom).
LOWPASS_A = 25.0
#: Side of the network image.
NETWORK_SIZE = 64
#: Accuracies at or above this are RELION's "unknown" marker (999); the fallback values replace them.
ACCURACY_UNKNOWN = 99.0
FALLBACK_ACCURACY_ROT = 5.0
FALLBACK_ACCURACY_TRANS = 8.0


def fourier_rescale(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize images by cropping or zero-padding their centred Fourier transform (RELION's
    ``resizeMap``); the mean intensity is preserved.

    Parameters
    ----------
    images
        ``(..., n, n)`` real images.
    size
        Output side (even or odd).

    Returns
    -------
    torch.Tensor
        ``(..., size, size)`` real images, same dtype and device.
    """
    n = images.shape[-1]
    if size == n:
        return images.clone()
    ft = torch.fft.fftshift(torch.fft.fft2(images.to(torch.float64)), dim=(-2, -1))
    c_in, c_out = n // 2, size // 2
    m = min(n, size)
    lo_in, lo_out = c_in - m // 2, c_out - m // 2
    out = ft.new_zeros((*images.shape[:-2], size, size))
    out[..., lo_out : lo_out + m, lo_out : lo_out + m] = ft[..., lo_in : lo_in + m, lo_in : lo_in + m]
    res = torch.fft.ifft2(torch.fft.ifftshift(out, dim=(-2, -1))).real * (size * size) / (n * n)
    return res.to(images.dtype)


def centred_coordinates(n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer coordinates ``(i, j)`` (rows, columns) of an ``n x n`` grid measured from the centre
    pixel ``n // 2``, each ``(n, n)`` float64."""
    ax = torch.arange(n, dtype=torch.float64, device=device) - n // 2
    return ax[:, None].expand(n, n), ax[None, :].expand(n, n)


def moments(values: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """RELION's moments of the pixels ``values[mask]``: sum, mean, population stddev, skew and
    (non-excess) kurtosis; skew and kurt are 0 when all values are equal, everything 0 for an empty
    mask.

    Parameters
    ----------
    values, mask
        ``(h, w)`` image and boolean mask.
    """
    x = values[mask].to(torch.float64)
    n = x.numel()
    if n == 0:
        return {"sum": 0.0, "mean": 0.0, "stddev": 0.0, "skew": 0.0, "kurt": 0.0}
    mean = x.mean()
    d = x - mean
    s2, s3, s4 = (d**2).sum(), (d**3).sum(), (d**4).sum()
    skew = float(s3 * math.sqrt(n) / s2**1.5) if s2 > 0 else 0.0
    kurt = float(s4 * n / s2**2) if s2 > 0 else 0.0
    return {"sum": float(x.sum()), "mean": float(mean), "stddev": float(torch.sqrt(s2 / n)), "skew": skew, "kurt": kurt}


def lowpass_raised_cosine(image: torch.Tensor, shell: float, width: float = 2.0) -> torch.Tensor:
    """Low-pass ``(n, n)`` with a raised-cosine edge ``width`` shells wide centred on ``shell``
    (Fourier radius in pixels of this grid)."""
    n = image.shape[-1]
    f = torch.fft.fftfreq(n, device=image.device, dtype=torch.float64) * n
    r = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    lo, hi = shell - width / 2, shell + width / 2
    w = torch.where(r <= lo, 1.0, torch.where(r >= hi, 0.0, 0.5 + 0.5 * torch.cos(math.pi * (r - lo) / width)))
    return torch.fft.ifft2(torch.fft.fft2(image.to(torch.float64)) * w).real.to(image.dtype)


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected components of a boolean image: ``(h, w)`` int64 labels, 0 outside ``mask``, and
    every component labelled by its largest pixel index + 1 (label propagation, pure torch)."""
    h, w = mask.shape
    lab = torch.where(mask, torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float64).reshape(h, w), 0.0)
    while True:
        new = lab.clone()
        new[1:] = torch.maximum(new[1:], lab[:-1])
        new[:-1] = torch.maximum(new[:-1], lab[1:])
        new[:, 1:] = torch.maximum(new[:, 1:], lab[:, :-1])
        new[:, :-1] = torch.maximum(new[:, :-1], lab[:, 1:])
        new = torch.where(mask, new, 0.0)
        if torch.equal(new, lab):
            return lab.long()
        lab = new


def morphological_opening_sum(image: torch.Tensor, radius: int) -> float:
    """Sum of the opening (erosion = minimum, then dilation = maximum) of ``(n, n)`` with a disc of
    ``radius`` pixels; out-of-image neighbours are skipped (RELION's granulometry)."""
    n = image.shape[-1]
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if dy * dy + dx * dx <= radius * radius]
    x = image.to(torch.float64)

    def _filter(img: torch.Tensor, fill: float, op) -> torch.Tensor:
        p = torch.nn.functional.pad(img[None, None], (radius,) * 4, value=fill)[0, 0]
        out = torch.full_like(img, fill)
        for dy, dx in offsets:
            out = op(out, p[radius + dy : radius + dy + n, radius + dx : radius + dx + n])
        return out

    eroded = _filter(x, math.inf, torch.minimum)
    opened = _filter(eroded, -math.inf, torch.maximum)
    return float(opened.sum())


@dataclass(frozen=True)
class ImageFeatures:
    """The image-derived features of one class average (B3), plus the masks' sizes."""

    values: dict[str, float]
    protein_pixels: int
    solvent_pixels: int
    radius_px: float
    size_4a: int


def image_features(image: torch.Tensor, pixel_size_a: float, particle_diameter_a: float,
                   radius_ratio: float = 0.95, granularity: bool = True) -> ImageFeatures:
    """RELION's image features of one class average (B3).

    Parameters
    ----------
    image
        ``(n, n)`` class average at ``pixel_size_a``.
    pixel_size_a
        Its pixel size (Angstrom).
    particle_diameter_a
        The 2D job's mask diameter (Angstrom).
    radius_ratio
        Inner radius of the ring over R (``--radius_ratio``).
    granularity
        Compute the granulometry (``--do_granularity_features``, always on in the pipeline).

    Returns
    -------
    ImageFeatures
    """
    n = image.shape[-1]
    n4 = int(round(n * pixel_size_a / FEATURE_PIXEL_A))
    n4 -= n4 % 2
    n4 = max(n4, 2)
    img = fourier_rescale(image.to(torch.float64), n4)
    radius = min(n4 / 2.0, particle_diameter_a / (2.0 * FEATURE_PIXEL_A))
    ii, jj = centred_coordinates(n4, img.device)
    r2 = ii**2 + jj**2
    disc = r2 <= radius**2
    ring = (r2 >= (radius_ratio * radius) ** 2) & disc
    lp = lowpass_raised_cosine(img, float(round(n4 * FEATURE_PIXEL_A / LOWPASS_A)))
    lp_std = float(lp.std(unbiased=False))
    white = (lp > 0.05 * lp_std) & disc
    labels = connected_components(white)
    central = r2 <= 0.36 * radius**2
    protein = torch.zeros_like(disc)
    scattered = 0
    limit = 0.1 * 3.14 * 0.36 * radius**2
    for lab in torch.unique(labels[central & white]).tolist():
        island = labels == lab
        if int((island & central).sum()) > limit:
            protein |= island
        else:
            scattered += int(island.sum())
    solvent = disc & ~protein
    n_prot, n_solv = int(protein.sum()), int(solvent.sum())
    ring_m, prot_m, solv_m = moments(img, ring), moments(img, protein), moments(img, solvent)
    edge = torch.round(torch.sqrt(r2)) == round(radius)
    edge_signal = float((protein & edge).sum()) / max(1, int(edge.sum()))
    v = {
        "ring_mean": ring_m["mean"], "ring_stddev": ring_m["stddev"], "protein_stddev": prot_m["stddev"],
        "solvent_mean": solv_m["mean"], "solvent_stddev": solv_m["stddev"],
        "scattered_signal": scattered / (scattered + n_prot + 1.0), "edge_signal": edge_signal,
        "lowpass_mean": float(lp.mean()), "lowpass_stddev": lp_std, "lowpass_min": float(lp.min()), "lowpass_max": float(lp.max()),
        "protein_sum": prot_m["sum"], "solvent_sum": solv_m["sum"],
        "relative_signal_intensity": prot_m["sum"] - solv_m["mean"] * n_prot,
    }  # fmt: skip
    for g in range(1, 7):
        v[f"granulo_{g}"] = morphological_opening_sum(img, g) if granularity and n4 >= 15 else 0.0
    return ImageFeatures(v, n_prot, n_solv, radius, n4)


def metadata_features(accuracy_rotation: float, accuracy_translation_a: float, estimated_resolution_a: float,
                      particle_number: float, box: int, pixel_size_a: float) -> dict[str, float]:
    """RELION's features from model.star (B4).

    Parameters
    ----------
    accuracy_rotation, accuracy_translation_a
        rlnAccuracyRotations (degrees) and rlnAccuracyTranslationsAngst; values > 99 (RELION's
        999 for unknown) are replaced by 5 degrees and 8.
    estimated_resolution_a
        The class's resolution d (Angstrom, > 0).
    particle_number
        pdf x total particles (> 1).
    box, pixel_size_a
        rlnOriginalImageSize and rlnPixelSize.
    """
    rot = FALLBACK_ACCURACY_ROT if accuracy_rotation > ACCURACY_UNKNOWN else accuracy_rotation
    trans = FALLBACK_ACCURACY_TRANS if accuracy_translation_a > ACCURACY_UNKNOWN else accuracy_translation_a
    d = float(estimated_resolution_a)
    return {
        "accuracy_rotation": float(rot), "accuracy_translation": float(trans),
        "weighted_resolution": 1.0 / (d * d * math.log(max(particle_number, 1.0 + 1e-9))),
        "relative_resolution": d / (box * pixel_size_a),
    }  # fmt: skip


def resolution_from_ssnr(ssnr: torch.Tensor, resolution_a: torch.Tensor, pixel_size_a: float) -> float:
    """RELION's fallback resolution when rlnEstimatedResolution is not positive: the resolution of
    the shell before the first shell (index >= 1) with SSNR < 1, else 2 x pixel size.

    Parameters
    ----------
    ssnr, resolution_a
        ``(S,)`` rlnSsnrMap and rlnAngstromResolution of the class's spectral table.
    """
    for i in range(1, int(ssnr.shape[0])):
        if float(ssnr[i]) < 1.0:
            return float(resolution_a[i - 1])
    return 2.0 * pixel_size_a


def feature_vector(values: dict[str, float]) -> torch.Tensor:
    """The raw 24-vector ``(24,)`` float64 in RELION's order from a name -> value mapping."""
    return torch.tensor([float(values[name]) for name in FEATURE_NAMES], dtype=torch.float64)


def normalise_features(raw: torch.Tensor) -> torch.Tensor:
    """RELION's normalisation of the feature vectors of one job (B5).

    Parameters
    ----------
    raw
        ``(n, 24)`` raw features of the job's kept classes.

    Returns
    -------
    torch.Tensor
        ``(n, 24)`` float32: entries 0-20 z-scored with the fixed constants, 21-23 with the job's
        mean and population standard deviation (0 where that is below 1e-10).
    """
    raw = raw.to(torch.float64)
    mean = torch.tensor(FEATURE_MEAN, dtype=torch.float64, device=raw.device)
    std = torch.tensor(FEATURE_STD, dtype=torch.float64, device=raw.device)
    out = torch.empty_like(raw)
    out[:, :21] = (raw[:, :21] - mean) / std
    for i in LOCAL_FEATURES:
        col = raw[:, i]
        sd = col.std(unbiased=False) if col.numel() > 0 else torch.tensor(0.0)
        out[:, i] = (col - col.mean()) / sd if col.numel() > 0 and float(sd) >= 1e-10 else 0.0
    return out.to(torch.float32)


def network_image(image: torch.Tensor, pixel_size_a: float, particle_diameter_a: float, size: int = NETWORK_SIZE) -> torch.Tensor:
    """The CNN input of one class average (B6).

    Parameters
    ----------
    image
        ``(n, n)`` class average at ``pixel_size_a``.
    pixel_size_a, particle_diameter_a
        Pixel size and mask diameter (Angstrom).
    size
        Output side (64).

    Returns
    -------
    torch.Tensor
        ``(size, size)`` float32.
    """
    n = image.shape[-1]
    side = int(math.ceil(particle_diameter_a / pixel_size_a)) + 1
    side += side % 2
    c = n // 2
    if side <= n:
        lo = c - side // 2
        crop = image[lo : lo + side, lo : lo + side]
    else:
        crop = image.new_zeros((side, side))
        lo = side // 2 - c
        crop[lo : lo + n, lo : lo + n] = image
    return fourier_rescale(crop.to(torch.float32), size).to(torch.float32)


@dataclass
class JobInputs:
    """The network inputs of one 2D job.

    Attributes
    ----------
    kept
        ``(K,)`` bool: classes with more than ``min_particles`` particles (the only ones scored).
    raw
        ``(n, 24)`` float64 raw features of the kept classes.
    features
        ``(n, 24)`` float32 normalised features.
    images
        ``(n, 64, 64)`` float32 network images.
    extra
        Per kept class: protein/solvent pixel counts and the mask radius (for diagnostics).
    """

    kept: torch.Tensor
    raw: torch.Tensor
    features: torch.Tensor
    images: torch.Tensor
    extra: list[dict]


def job_inputs(classes: torch.Tensor, class_distribution: torch.Tensor, accuracy_rotation: torch.Tensor,
               accuracy_translation_a: torch.Tensor, estimated_resolution_a: torch.Tensor, n_particles_total: int,
               pixel_size_a: float, particle_diameter_a: float, min_particles: float = 10.0,
               fallback_resolution: torch.Tensor | None = None) -> JobInputs:
    """Features and images of every class of a 2D job with more than ``min_particles`` particles.

    Parameters
    ----------
    classes
        ``(K, n, n)`` class averages.
    class_distribution, accuracy_rotation, accuracy_translation_a, estimated_resolution_a
        ``(K,)`` model.star columns.
    n_particles_total
        Particles in data.star.
    pixel_size_a, particle_diameter_a
        Model pixel size and the job's mask diameter.
    min_particles
        Classes need ``pdf * total > min_particles`` (RELION: 10).
    fallback_resolution
        ``(K,)`` resolution to use where rlnEstimatedResolution is not positive
        (:func:`resolution_from_ssnr`); default 2 x pixel size.

    Returns
    -------
    JobInputs
    """
    k, n = classes.shape[0], classes.shape[-1]
    counts = class_distribution.to(torch.float64) * float(n_particles_total)
    kept = counts > min_particles
    raws, imgs, extra = [], [], []
    for c in torch.nonzero(kept).flatten().tolist():
        img_f = image_features(classes[c], pixel_size_a, particle_diameter_a)
        d = float(estimated_resolution_a[c])
        if not d > 0:
            d = float(fallback_resolution[c]) if fallback_resolution is not None else 2.0 * pixel_size_a
        meta = metadata_features(float(accuracy_rotation[c]), float(accuracy_translation_a[c]), d, float(counts[c]), n, pixel_size_a)
        raws.append(feature_vector({**img_f.values, **meta}))
        imgs.append(network_image(classes[c], pixel_size_a, particle_diameter_a))
        extra.append({"protein_pixels": img_f.protein_pixels, "solvent_pixels": img_f.solvent_pixels, "radius_px": img_f.radius_px})
    raw = torch.stack(raws) if raws else torch.zeros((0, N_FEATURES), dtype=torch.float64)
    images = torch.stack(imgs) if imgs else torch.zeros((0, NETWORK_SIZE, NETWORK_SIZE))
    return JobInputs(kept=kept, raw=raw, features=normalise_features(raw), images=images, extra=extra)


__all__ = [
    "FEATURE_MEAN", "FEATURE_NAMES", "FEATURE_STD", "GRANULO_FEATURES", "ImageFeatures", "JobInputs", "LOCAL_FEATURES",
    "N_FEATURES", "NETWORK_SIZE", "centred_coordinates", "connected_components", "feature_vector", "fourier_rescale",
    "image_features", "job_inputs", "lowpass_raised_cosine", "metadata_features", "moments", "morphological_opening_sum",
    "network_image", "normalise_features", "resolution_from_ssnr",
]  # fmt: skip
