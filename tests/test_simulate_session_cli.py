"""simulate.session (EPU / SerialEM sessions read by our MDCatch parsers) and ``autospa simulate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autospa.cli import main as cli_main
from autospa.io.mrc import read_mrc
from autospa.io.preprocess_files import read_coordinates, read_motion_metadata, read_movie
from autospa.io.particles_star import read_particles_star
from autospa.io.star import read_star
from autospa.mdcatch.detectors import load_config
from autospa.mdcatch.parsers.epu_xml import parse_epu_xml
from autospa.mdcatch.parsers.mdoc import parse_mdoc
from autospa.mdcatch.session import SessionWatcher
from autospa.simulate.phantoms import phantom_set, pseudo_atomic_phantom
from autospa.simulate.session import simulate_session


@pytest.fixture(scope="module")
def volumes():
    return phantom_set(1, 1, box=24, pixel_size_a=2.0, seed=0)


@pytest.mark.parametrize("software", ["EPU", "SerialEM"])
def test_session_metadata_matches_truth(tmp_path, volumes, software) -> None:
    files = simulate_session(
        tmp_path / "session", volumes, n_movies=2, software=software, shape=(96, 128), n_frames=4,
        pixel_size_a=2.0, dose_per_frame_e_a2=1.5, particles_per_micrograph=4, seed=1,
    )
    mics = read_star(files.micrographs_star)["micrographs"]
    assert len(files.movies) == 2 and len(mics) == 2
    for movie, meta_file, (_, row) in zip(files.movies, files.metadata, mics.iterrows()):
        assert meta_file.parent == movie.parent  # metadata beside the movie
        meta = parse_epu_xml(meta_file) if software == "EPU" else parse_mdoc(meta_file)
        assert meta.pixel_size_a == pytest.approx(2.0)
        assert meta.voltage_kv == pytest.approx(300.0)
        assert meta.total_dose_e_a2 == pytest.approx(6.0)
        assert meta.n_frames == 4
        assert meta.target_defocus_a == pytest.approx(0.5 * (row.rlnDefocusU + row.rlnDefocusV), rel=1e-9)
        frames = read_movie(movie)
        assert frames.shape == (4, 96, 128)
        gain, _ = read_mrc(files.gain)
        electrons = frames.astype(np.float64) * gain
        clean, _ = read_mrc(files.outdir / row.rlnMicrographName)
        assert abs(electrons.sum(0).mean() / clean.mean() - 1) < 0.02  # dose per pixel as simulated
        motion = read_motion_metadata(files.outdir / row.rlnMicrographMetadata)
        assert motion.global_shifts_px.shape == (4, 2) and np.all(motion.global_shifts_px[0] == 0)
        path = np.linalg.norm(np.diff(motion.global_shifts_px, axis=0), axis=1).sum()
        assert path * 2.0 == pytest.approx(row.rlnAccumMotionTotal)
        coords = read_coordinates(files.outdir / row.rlnAutospaCoordinatesFile)
        assert len(coords) == row.rlnAutospaNumberOfParticles == 4
    parts = read_star(files.particles_star)["particles"]
    assert len(parts) == 8 and set(parts["rlnClassNumber"]) == {1}
    # the MDCatch watcher finds exactly the simulated movies, with their metadata
    watcher = SessionWatcher(files.outdir, tmp_path / "watch", load_config(use_user_config=False))
    watcher.poll()
    report = watcher.poll()
    assert watcher.software == software
    assert sorted(r["movie"] for r in report.ingested) == sorted(str(m.resolve()) for m in files.movies)


def _run(monkeypatch, argv: list[str]) -> int:
    monkeypatch.setattr(cli_main, "SUBCOMMAND_MODULES", ("autospa.cli.simulate",))
    return cli_main.main(argv)


def test_cli_particles(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "sim"
    rc = _run(monkeypatch, ["simulate", "particles", "--o", str(out), "--n", "240", "--box", "32", "--pixel_size",
                            "4.0", "--classes", "2", "--snr", "0.1", "--junk", "0.1", "--seed", "0"])
    assert rc == 0
    assert "measured SNR" in capsys.readouterr().out
    table = read_particles_star(out / "particles.star")
    assert len(table.particles) == 240 and int(table.optics["rlnImageSize"].iloc[0]) == 32
    truth = read_particles_star(out / "truth.star").particles
    assert set(truth["rlnClassNumber"]) <= {0, 1, 2} and truth["rlnAutospaIsJunk"].sum() > 0
    assert ((truth["rlnClassNumber"] == 0) == (truth["rlnAutospaIsJunk"] == 1)).all()
    maps = sorted((out / "phantoms").glob("class_*.mrc"))
    assert [m.name for m in maps] == ["class_001.mrc", "class_002.mrc"]
    vol, apix = read_mrc(maps[0])
    assert vol.shape == (32, 32, 32) and apix == pytest.approx(4.0)
    ref = phantom_set(2, 1, box=32, pixel_size_a=4.0, seed=0)[0]
    np.testing.assert_allclose(vol, ref.numpy(), atol=1e-6)


def test_cli_bad_input_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "bad"
    assert _run(monkeypatch, ["simulate", "particles", "--o", str(out), "--n", "10", "--snr", "-1"]) == 1
    err = capsys.readouterr().err
    assert "snr" in err.lower() and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert _run(monkeypatch, ["simulate", "particles", "--o", str(out), "--map", str(tmp_path / "missing.mrc")]) == 1
    assert not out.exists()
    assert _run(monkeypatch, ["simulate", "volume", "--o", str(tmp_path / "v.mrc"), "--symmetry", "X9"]) == 1
    assert not (tmp_path / "v.mrc").exists()


def test_cli_volume_and_movies(tmp_path, monkeypatch) -> None:
    assert _run(monkeypatch, ["simulate", "volume", "--o", str(tmp_path / "d7.mrc"), "--box", "40", "--symmetry", "D7",
                              "--shape", "ring", "--seed", "3"]) == 0
    vol, _ = read_mrc(tmp_path / "d7.mrc")
    ref = pseudo_atomic_phantom(box=40, pixel_size_a=2.0, symmetry="D7", seed=3, shape="ring")
    assert torch.allclose(torch.as_tensor(vol), ref)
    assert _run(monkeypatch, ["simulate", "movies", "--o", str(tmp_path / "mov"), "--n", "1", "--size", "96", "--frames",
                              "3", "--box", "24", "--pixel_size", "2.0", "--software", "SerialEM", "--particles", "3"]) == 0
    assert len(list((tmp_path / "mov" / "Movies").glob("*.mrc.mdoc"))) == 1
