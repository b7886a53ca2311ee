"""CUDA check of the preprocessing numerics that the benchmark does not time: particle extraction
(crop, Fourier rescale, background normalisation, inversion) gives the same images on the GPU as
on the CPU. Run on a GPU machine with ``PYTHONPATH=src python benchmarks/preprocess_cuda_check.py``.
"""

from __future__ import annotations

import torch

from autospa.preprocess.extract import extract_particles


def main() -> None:
    g = torch.Generator().manual_seed(0)
    mic = torch.randn(1024, 1024, generator=g)
    xy = torch.rand(50, 2, generator=g, dtype=torch.float64) * 800 + 100
    a, ia = extract_particles(mic, xy, 128, scaled_box=64)
    b, ib = extract_particles(mic.cuda(), xy.cuda(), 128, scaled_box=64)
    diff = float((a - b.cpu()).abs().max())
    print(f"extract cuda vs cpu max diff {diff:.3g} ({b.device})")
    assert diff < 1e-4 and torch.equal(ia.cpu(), ib.cpu())


if __name__ == "__main__":
    main()
