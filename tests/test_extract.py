"""Particle extraction (preprocess/extract.py, jobs/extract.py): sizes, normalisation, RELION layout, store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from autospa.errors import InputError
from autospa.io.mrc import read_mrc_header, read_stack_images
from autospa.io.particles_star import parse_image_name
from autospa.io.preprocess_files import write_coordinate_index, write_coordinates, write_micrograph, write_micrograph_table
from autospa.io.star import read_star
from autospa.io.zarr_store import open_store, read_store_images
from autospa.jobs.extract import ExtractParams, run_extract
from autospa.preprocess.extract import (
    background_mask,
    choose_box_sizes,
    crop_boxes,
    extract_particles,
    fourier_rescale,
    good_box_size,
    is_fft_friendly,
)
from test_preprocess_simdata import simulate_micrograph

PIXEL = 1.0
DIAMETER = 120.0


def test_box_sizes_are_relion_style() -> None:
    assert good_box_size(181) == 192 and is_fft_friendly(192) and not is_fft_friendly(202)
    for diameter, pixel in [(150.0, 0.83), (180.0, 1.06), (100.0, 1.4), (300.0, 0.65), (120.0, 1.0)]:
        c = choose_box_sizes(diameter, pixel)
        assert c.extract_box % 2 == 0 and is_fft_friendly(c.extract_box)
        assert c.extract_box * pixel >= 1.5 * diameter > (c.extract_box - 2 * 8) * pixel  # the smallest friendly size
        assert c.scaled_box % 2 == 0 and is_fft_friendly(c.scaled_box)
        assert 2.8 - 1e-9 <= c.scaled_pixel_a <= 3.5 + 1e-9, c
    coarse = choose_box_sizes(150.0, 4.0)  # already coarser than 3.5 A: no upscaling
    assert coarse.scaled_box == coarse.extract_box and coarse.scaled_pixel_a == 4.0


def test_crop_rescale_normalise_invert() -> None:
    gen = torch.Generator().manual_seed(0)
    mic = torch.randn(200, 300, generator=gen) * 3.0 + 7.0
    mic[100, 150] = 100.0  # a bright dot at (x=150, y=100)
    boxes, inside = crop_boxes(mic, torch.tensor([[150.0, 100.0], [5.0, 5.0], [299.4, 100.0]]), 64)
    assert inside.tolist() == [True, False, False]
    assert float(boxes[0, 32, 32]) == 100.0  # the coordinate lands on pixel box // 2
    # Fourier rescaling keeps the mean and band-limited content
    img = torch.randn(4, 64, 64, generator=gen)
    small = fourier_rescale(img, 32)
    np.testing.assert_allclose(small.mean(dim=(-2, -1)).numpy(), img.mean(dim=(-2, -1)).numpy(), atol=1e-5)
    np.testing.assert_allclose(fourier_rescale(fourier_rescale(small, 64), 32).numpy(), small.numpy(), atol=1e-4)
    # normalisation: background (outside the circle) mean 0 and std 1, after removing a ramp
    yy, xx = torch.meshgrid(torch.arange(200.0), torch.arange(300.0), indexing="ij")
    ramp_mic = mic + 0.05 * xx - 0.03 * yy
    out, _ = extract_particles(ramp_mic, torch.tensor([[150.0, 100.0], [80.0, 60.0]]), 64, invert_contrast=False)
    bg = background_mask(64, 0.75 * 32)
    np.testing.assert_allclose(out[:, bg].mean(1).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[:, bg].std(1, unbiased=False).numpy(), 1.0, atol=1e-5)
    inverted, _ = extract_particles(ramp_mic, torch.tensor([[150.0, 100.0], [80.0, 60.0]]), 64, invert_contrast=True)
    np.testing.assert_allclose(inverted.numpy(), -out.numpy(), atol=1e-6)
    assert float(inverted[0, 32, 32]) < -10  # the bright dot is dark after inversion


def test_extracted_particles_are_centred_on_simulated_particles() -> None:
    m = simulate_micrograph(n=512, pixel_size_a=PIXEL, n_particles=6, diameter_a=DIAMETER, noise=0.0, gradient=0.3, seed=2)
    imgs, inside = extract_particles(m.image, torch.as_tensor(m.coords_px), 144, scaled_box=64)
    assert bool(inside.all()) and imgs.shape == (len(m.coords_px), 64, 64) and len(m.coords_px) >= 4
    # white particles after inversion: a low-passed average is brightest near the centre
    avg = imgs.mean(0)
    k2 = torch.fft.rfftfreq(64)[None, :] ** 2 + torch.fft.fftfreq(64)[:, None] ** 2
    smooth = torch.fft.irfft2(torch.fft.rfft2(avg) * torch.exp(-k2 * 400), s=(64, 64))
    iy, ix = divmod(int(torch.argmax(smooth)), 64)
    assert abs(iy - 32) <= 2 and abs(ix - 32) <= 2


def _fits(coords: np.ndarray, box: int, size: int = 512) -> np.ndarray:
    """The coordinates whose box lies inside a ``size`` x ``size`` micrograph (RELION skips the others)."""
    c0 = np.round(coords).astype(int) - box // 2
    return coords[(c0 >= 0).all(1) & (c0 + box <= size).all(1)]


def _inputs(root: Path, seeds: list[int]) -> dict[str, np.ndarray]:
    truth, names = {}, []
    for s in seeds:
        m = simulate_micrograph(n=512, pixel_size_a=PIXEL, n_particles=8, diameter_a=DIAMETER, noise=1.0, seed=20 + s)
        mic = f"MotionCorr/job002/Movies/mic{s:03d}.mrc"
        write_micrograph(root / mic, m.image.numpy(), PIXEL)
        coords = np.vstack([m.coords_px, [[3.0, 3.0]]])  # the last pick reaches outside: skipped
        fom = np.arange(len(coords), dtype=np.float64)
        write_coordinates(root / f"AutoPick/job004/Movies/mic{s:03d}_autopick.star", coords, fom)
        truth[mic] = m.coords_px
        names.append(mic)
    optics = pd.DataFrame(
        {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnMicrographOriginalPixelSize": [PIXEL],
         "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1], "rlnMicrographPixelSize": [PIXEL]}
    )  # fmt: skip
    rows = pd.DataFrame(
        {"rlnMicrographName": names, "rlnOpticsGroup": [1] * len(names), "rlnDefocusU": [15000.0 + 100 * i for i in range(len(names))],
         "rlnDefocusV": [14000.0] * len(names), "rlnDefocusAngle": [30.0] * len(names), "rlnCtfMaxResolution": [4.0] * len(names),
         "rlnCtfFigureOfMerit": [0.5] * len(names)}
    )  # fmt: skip
    write_micrograph_table(root / "CtfFind/job003/micrographs_ctf.star", optics, rows)
    write_coordinate_index(
        root / "AutoPick/job004/autopick.star", names, [f"AutoPick/job004/Movies/mic{s:03d}_autopick.star" for s in seeds]
    )
    return truth


def test_extract_job_writes_particles_star_stacks_and_store(tmp_path: Path) -> None:
    truth = _inputs(tmp_path, [0, 1])
    params = ExtractParams(
        mics_star="CtfFind/job003/micrographs_ctf.star",
        coords_star="AutoPick/job004/autopick.star",
        output_dir="Extract/job005",
        extract_size=0,
        rescale=-1,
        particle_diameter=DIAMETER,
        chunk_size=4,
    )
    out = run_extract(params, tmp_path)
    blocks = read_star(out)
    optics, parts = blocks["optics"], blocks["particles"]
    sizes = choose_box_sizes(DIAMETER, PIXEL)
    assert int(optics["rlnImageSize"].iloc[0]) == sizes.scaled_box
    assert float(optics["rlnImagePixelSize"].iloc[0]) == pytest.approx(sizes.scaled_pixel_a)
    assert 2.8 <= float(optics["rlnImagePixelSize"].iloc[0]) <= 3.5
    assert int(optics["rlnImageDimensionality"].iloc[0]) == 2 and int(optics["rlnCtfDataAreCtfPremultiplied"].iloc[0]) == 0
    truth = {mic: _fits(c, sizes.extract_box) for mic, c in truth.items()}
    n_true = sum(len(t) for t in truth.values())
    assert n_true >= 4 and len(parts) == n_true  # picks whose box reaches outside are skipped
    for label in ("rlnCoordinateX", "rlnCoordinateY", "rlnImageName", "rlnMicrographName", "rlnOpticsGroup", "rlnDefocusU",
                  "rlnDefocusV", "rlnDefocusAngle", "rlnCtfMaxResolution", "rlnAutopickFigureOfMerit"):  # fmt: skip
        assert label in parts.columns, label
    for mic, coords in truth.items():
        sel = parts[parts["rlnMicrographName"] == mic]
        np.testing.assert_allclose(sel[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), coords)
        index, stack = zip(*(parse_image_name(n) for n in sel["rlnImageName"]), strict=True)
        assert list(index) == list(range(len(coords)))  # parse_image_name gives 0-based indices
        assert set(stack) == {mic.replace("MotionCorr/job002", "Extract/job005")[:-4] + ".mrcs"}
        info = read_mrc_header(tmp_path / stack[0])
        assert info.mode == 12 and info.shape == (len(coords), sizes.scaled_box, sizes.scaled_box)
        assert info.voxel_size_a == pytest.approx(sizes.scaled_pixel_a, rel=1e-3)
        # the CTF of the micrograph is copied to its particles
        assert set(sel["rlnDefocusU"]) == {15000.0 + 100 * int(mic[-7:-4])}
        imgs = read_stack_images(tmp_path / stack[0])
        bg = background_mask(sizes.scaled_box, 0.75 * sizes.scaled_box / 2)
        np.testing.assert_allclose(imgs[:, bg].mean(1), 0.0, atol=2e-3)
        np.testing.assert_allclose(imgs[:, bg].std(1), 1.0, atol=2e-3)
    # the Zarr store holds exactly the MRCS images and the particle metadata
    store = tmp_path / "Extract/job005/particles.zarr"
    stack = open_store(store)
    assert stack.n_particles == n_true
    first = parts["rlnImageName"].iloc[0].split("@")[1]
    k = int((parts["rlnImageName"].str.split("@").str[1] == first).sum())
    np.testing.assert_allclose(read_store_images(store, np.arange(k)), read_stack_images(tmp_path / first), atol=0)

    # continue: a third micrograph; the old stacks stay, the store grows
    old_stack = tmp_path / first
    stamp = old_stack.stat().st_mtime_ns
    truth = _inputs(tmp_path, [0, 1, 2])
    out = run_extract(params, tmp_path, continue_=True)
    parts2 = read_star(out)["particles"]
    assert len(parts2) == sum(len(_fits(t, sizes.extract_box)) for t in truth.values())
    assert old_stack.stat().st_mtime_ns == stamp
    assert open_store(store).n_particles == len(parts2)
    # continue with nothing new: nothing is rewritten
    stamp_star = out.stat().st_mtime_ns
    assert run_extract(params, tmp_path, continue_=True) == out and out.stat().st_mtime_ns == stamp_star


def test_extract_rejects_odd_boxes_and_keeps_old_outputs(tmp_path: Path) -> None:
    _inputs(tmp_path, [0])
    good = ExtractParams(mics_star="CtfFind/job003/micrographs_ctf.star", coords_star="AutoPick/job004/autopick.star",
                         output_dir="Extract/job005", extract_size=128, rescale=64)  # fmt: skip
    out = run_extract(good, tmp_path)
    before = out.read_bytes()
    bad = ExtractParams(**{**good.__dict__, "extract_size": 127})
    with pytest.raises(InputError, match="even"):
        run_extract(bad, tmp_path)
    bigger = ExtractParams(**{**good.__dict__, "rescale": 256})
    with pytest.raises(InputError, match="at most the extraction box"):
        run_extract(bigger, tmp_path)
    assert out.read_bytes() == before


@pytest.mark.parametrize("layout", ["coords_suffix", "folder"])
def test_extract_reads_relion3_per_micrograph_coordinate_files(tmp_path: Path, layout: str) -> None:
    # RELION 3 had no autopick.star: the picking job left coords_suffix_autopick.star (holding the
    # micrographs STAR's name) beside Movies/NAME_autopick.star files that mirror the micrographs
    truth = _inputs(tmp_path, [0, 1])
    (tmp_path / "AutoPick/job004/autopick.star").unlink()
    (tmp_path / "AutoPick/job004/coords_suffix_autopick.star").write_text("CtfFind/job003/micrographs_ctf.star\n")
    coords = "AutoPick/job004/coords_suffix_autopick.star" if layout == "coords_suffix" else "AutoPick/job004/"
    params = ExtractParams(mics_star="CtfFind/job003/micrographs_ctf.star", coords_star=coords,
                           output_dir="Extract/job005", extract_size=128, rescale=64)  # fmt: skip
    parts = read_star(run_extract(params, tmp_path))["particles"]
    for mic, c in truth.items():
        sel = parts[parts["rlnMicrographName"] == mic]
        np.testing.assert_allclose(sel[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), _fits(c, 128))
    # a folder without any coordinate file of these micrographs is a clear error
    (tmp_path / "Empty").mkdir()
    with pytest.raises(InputError, match=r"no coordinate file for any micrograph \(looked for e\.g\. .*Empty/Movies/mic000_autopick\.star"):
        run_extract(ExtractParams(**{**params.__dict__, "coords_star": "Empty"}), tmp_path)
