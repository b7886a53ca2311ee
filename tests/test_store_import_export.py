"""RELION particles -> store -> RELION: exact round trips, the CLI, and every kind of bad input."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from autospa.cli.main import main
from autospa.errors import InputError
from autospa.io.mrc import read_mrc_header, read_stack_images, write_mrc
from autospa.io.particles_star import read_particles_star
from autospa.io.relion_particles import export_particles, import_particles
from autospa.io.star import read_star, write_star
from autospa.io.zarr_store import open_store
from test_io_data import make_project, optics_table, write_raw_mrc


@pytest.fixture(autouse=True)
def _in_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RELION runs in its project directory; image names are relative to it."""
    monkeypatch.chdir(tmp_path)


def _source_images(star: Path) -> np.ndarray:
    t = read_particles_star(star)
    idx, names = t.image_indices_and_paths()
    return np.concatenate([read_stack_images(t.resolve(n), [i]) for i, n in zip(idx, names, strict=True)])


def test_import_export_import_is_exact_float32(tmp_path: Path) -> None:
    star, stacks, parts = make_project(tmp_path, n_mics=4, per_mic=(5, 9, 3, 6), groups=2)
    s1 = import_particles(star, tmp_path / "s1.zarr", dtype="float32", chunk_size=8)
    a = open_store(s1)
    # the store equals the MRCS it came from, particle for particle
    assert np.array_equal(a.images.compute(), _source_images(star))
    assert np.array_equal(a.read(5, 14), stacks["Extract/job007/MotionCorr/mic_001.mrcs"])
    assert a.metadata["ImageName"].tolist() == parts["rlnImageName"].tolist()  # the original names
    assert a.optics.to_dict("records") == optics_table(16, 1.5, 2).to_dict("records")

    out = tmp_path / "export"
    star_out = export_particles(s1, out)
    assert star_out == out / "particles.star"
    exported = read_star(star_out)["particles"]
    # one stack per micrograph, names relative to the export folder
    names = exported["rlnImageName"].tolist()
    assert names[0] == "000001@Particles/MotionCorr/job002/Movies/mic_000.mrcs"
    assert names[5] == "000001@Particles/MotionCorr/job002/Movies/mic_001.mrcs"
    assert read_mrc_header(out / "Particles/MotionCorr/job002/Movies/mic_001.mrcs").mode == 2
    # every original column comes back, in order, with the same values (except the image names)
    assert list(exported.columns) == list(parts.columns)
    for col in parts.columns.drop("rlnImageName"):
        x, y = parts[col].to_numpy(), exported[col].to_numpy()
        assert (np.array_equal(x, y) if x.dtype.kind in "fi" else [str(v) for v in x] == [str(v) for v in y]), col

    b = open_store(import_particles(star_out, tmp_path / "s2.zarr", dtype="float32", chunk_size=8))
    assert np.array_equal(a.images.compute(), b.images.compute())
    pd.testing.assert_frame_equal(a.metadata.drop(columns="ImageName"), b.metadata.drop(columns="ImageName"))
    assert a.optics.equals(b.optics)


def test_exported_names_resolve_from_the_export_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    star, _, _ = make_project(tmp_path, n_mics=2)
    s = import_particles(star, tmp_path / "s.zarr", dtype="float32")
    export_particles(s, tmp_path / "exp", per="chunk")
    monkeypatch.chdir(tmp_path / "exp")  # where relion_display --i particles.star runs
    t = read_particles_star("particles.star")
    idx, paths = t.image_indices_and_paths()
    assert set(paths) == {"Particles/particles_000000.mrcs"}
    assert all(Path(p).exists() for p in paths)  # relative to the current directory too
    assert np.array_equal(read_stack_images(paths[0], idx), open_store(tmp_path / "s.zarr").images.compute())


def test_float16_store_and_mode12_export(tmp_path: Path) -> None:
    star, _, _ = make_project(tmp_path, n_mics=3)
    src = _source_images(star)
    s = open_store(import_particles(star, tmp_path / "h.zarr"))  # float16 by default
    assert s.dtype == np.float16
    assert np.array_equal(s.images.compute(), src.astype(np.float16))
    export_particles(tmp_path / "h.zarr", tmp_path / "e16")
    t = read_particles_star(tmp_path / "e16/particles.star")
    idx, names = t.image_indices_and_paths()
    first = tmp_path / "e16" / names[0]
    assert read_mrc_header(first).mode == 12
    with mrcfile.open(first) as mrc:
        assert mrc.data.dtype == np.float16 and np.array_equal(mrc.data, src[:5].astype(np.float16))
    s32 = open_store(import_particles(tmp_path / "e16/particles.star", tmp_path / "h2.zarr", dtype="float16"))
    assert np.array_equal(s32.images.compute(), s.images.compute())


def test_export_refuses_to_overwrite(tmp_path: Path) -> None:
    star, _, _ = make_project(tmp_path, n_mics=1)
    s = import_particles(star, tmp_path / "s.zarr")
    export_particles(s, tmp_path / "e")
    with pytest.raises(InputError, match="already exists"):
        export_particles(s, tmp_path / "e")
    export_particles(s, tmp_path / "e", overwrite=True)


# ------------------------------------------------------------------------------------------ the CLI
def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_cli_import_and_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    star, _, parts = make_project(tmp_path, n_mics=2)
    rc = main(["import", str(star), "--o", str(tmp_path / "c.zarr"), "--dtype", "float32", "--chunk", "4"])
    assert rc == 0
    assert "12 particles, box 16, float32, 3 chunks" in capsys.readouterr().out
    rc = main(["export", str(tmp_path / "c.zarr"), "--o", str(tmp_path / "cx"), "--mode", "12"])
    assert rc == 0
    assert read_mrc_header(next((tmp_path / "cx/Particles").rglob("*.mrcs"))).mode == 12
    assert len(read_star(tmp_path / "cx/particles.star")["particles"]) == len(parts)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str, Path]]:
    """name -> (STAR file, expected message fragment, file the message must name)."""
    out = {}
    # truncated stack
    d = tmp_path / "trunc"
    star, _, _ = make_project(d, n_mics=2, names_relative_to="star")
    stk = d / "Extract/job007/MotionCorr/mic_001.mrcs"
    stk.write_bytes(stk.read_bytes()[:-300])
    out["truncated"] = (star, "truncated MRC file", stk)
    # unreadable mode (complex)
    d = tmp_path / "mode"
    star, _, _ = make_project(d, n_mics=1, names_relative_to="star")
    stk = d / "Extract/job007/MotionCorr/mic_000.mrcs"
    write_raw_mrc(stk, np.zeros((5, 16, 16), np.complex64))
    out["mode"] = (star, "unsupported MRC mode 4", stk)
    # missing required label
    d = tmp_path / "label"
    star, _, parts = make_project(d, n_mics=1, names_relative_to="star")
    write_star(star, {"optics": optics_table().drop(columns="rlnImageSize"), "particles": parts})
    out["label"] = (star, "lacks the required label rlnImageSize", star)
    # box does not match the optics group
    d = tmp_path / "box"
    star, _, _ = make_project(d, n_mics=1, names_relative_to="star")
    stk = d / "Extract/job007/MotionCorr/mic_000.mrcs"
    write_mrc(stk, np.zeros((5, 20, 20), np.float32), 1.5)
    out["box"] = (star, "images are 20 x 20 pixels but optics group 1", stk)
    # NaN image
    d = tmp_path / "nan"
    star, stacks, _ = make_project(d, n_mics=1, names_relative_to="star")
    stk = d / "Extract/job007/MotionCorr/mic_000.mrcs"
    imgs = next(iter(stacks.values())).copy()
    imgs[2, 3, 3] = np.inf
    write_mrc(stk, imgs, 1.5)
    out["nan"] = (star, "image 3 contains NaN or infinite values", stk)
    # empty stack file
    d = tmp_path / "emptystack"
    star, _, _ = make_project(d, n_mics=2, names_relative_to="star")
    stk = d / "Extract/job007/MotionCorr/mic_001.mrcs"
    stk.write_bytes(b"")
    out["empty stack"] = (star, "empty file", stk)
    # empty STAR file
    d = tmp_path / "empty"
    d.mkdir()
    star = d / "particles.star"
    star.write_bytes(b"")
    out["empty"] = (star, "empty file", star)
    # missing stack
    d = tmp_path / "missing"
    star, _, _ = make_project(d, n_mics=1, names_relative_to="star")
    (d / "Extract/job007/MotionCorr/mic_000.mrcs").unlink()
    out["missing"] = (star, "image stack MotionCorr/mic_000.mrcs not found", star)
    return out


def test_cli_bad_input_exit_1_one_line_and_nothing_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good, _, _ = make_project(tmp_path / "good", n_mics=1, names_relative_to="star")
    store = tmp_path / "existing.zarr"
    assert main(["import", str(good), "--o", str(store)]) == 0
    capsys.readouterr()
    digest = _digest(store)
    for name, (star, fragment, named) in _bad_inputs(tmp_path).items():
        rc = main(["import", str(star), "--o", str(store), "--overwrite"])
        err = capsys.readouterr().err.strip()
        assert rc == 1, name
        assert err.count("\n") == 0, (name, err)
        assert fragment in err and str(named) in err, (name, err)
        assert _digest(store) == digest, name  # the existing store is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("existing")) == ["existing.zarr"]
    # refusing to overwrite without --overwrite is also exit code 1
    assert main(["import", str(good), "--o", str(store)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert _digest(store) == digest


def test_cli_export_bad_input_exit_1_and_nothing_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    star, _, _ = make_project(tmp_path, n_mics=2)
    assert main(["import", str(star), "--o", str(tmp_path / "s.zarr")]) == 0
    assert main(["export", str(tmp_path / "s.zarr"), "--o", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    digest = _digest(tmp_path / "out")
    # an existing export is not replaced without --overwrite
    assert main(["export", str(tmp_path / "s.zarr"), "--o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err and str(tmp_path / "out") in err
    # not a store: one line naming it, exit 1, the export untouched
    (tmp_path / "notastore.zarr").mkdir()
    assert main(["export", str(tmp_path / "notastore.zarr"), "--o", str(tmp_path / "out"), "--overwrite"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"autospa export: error: {tmp_path / 'notastore.zarr'}: not a Zarr v3 particle store (no zarr.json)"
    assert _digest(tmp_path / "out") == digest


def test_console_script_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "bad.star"
    bad.write_text("this is not a STAR file\n")
    exe = Path(sys.executable).parent / "autospa"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "autospa"]
    r = subprocess.run([*cmd, "import", str(bad), "--o", str(tmp_path / "x.zarr")], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [f"autospa import: error: {bad}: not a STAR file (no data_ block)"]
    assert not (tmp_path / "x.zarr").exists()


def test_job_store_is_reimported_when_the_star_file_or_a_stack_changes(tmp_path: Path) -> None:
    """A job's ``<root>_particles.zarr`` is reused only while the STAR file and its stacks are the
    ones it was made from (re-extraction into the same paths must not reuse stale images)."""
    from autospa.jobs.refine_common import input_store

    star, stacks, _ = make_project(tmp_path, n_mics=2, per_mic=(4, 3))
    store = input_store(star, tmp_path / "Class2D" / "run")
    first = open_store(store).read(0, 7)
    assert np.array_equal(first, _source_images(star))
    made = os.stat(store / "zarr.json" if (store / "zarr.json").exists() else store).st_mtime_ns
    assert input_store(star, tmp_path / "Class2D" / "run") == store  # unchanged: reused, not rewritten
    assert os.stat(store / "zarr.json" if (store / "zarr.json").exists() else store).st_mtime_ns == made
    # the same paths, new images (one stack rewritten, the STAR file untouched)
    name = "Extract/job007/MotionCorr/mic_001.mrcs"
    new = stacks[name] + 1.0
    write_mrc(tmp_path / name, new, 1.5)
    os.utime(tmp_path / name, ns=(made + 10**9, made + 10**9))
    again = open_store(input_store(star, tmp_path / "Class2D" / "run")).read(0, 7)
    assert np.array_equal(again[4:], new) and np.array_equal(again[:4], first[:4])
