"""``autospa it`` on a simulated SerialEM session with the real jobs (slow: motion correction, CTF
estimation, picking, extraction ... on small movies).

prep runs one pass (import, motion correction, CTF estimation); proc then runs as far as the jobs
that exist take it: a job type nobody has registered yet stops it with a clear "no implementation"
failure, and every job before it must have succeeded with RELION's outputs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from autospa.cli import main as cli_main
from autospa.io.scheme_files import read_exit_status, read_scheme
from autospa.io.star import read_star
from autospa.scheme.model import RunStatus

pytestmark = pytest.mark.slow


def test_it_on_a_simulated_session(tmp_path: Path, monkeypatch, capsys) -> None:
    from autospa.simulate.phantoms import phantom_set
    from autospa.simulate.session import simulate_session

    monkeypatch.chdir(Path.cwd())
    monkeypatch.setattr(cli_main, "SUBCOMMAND_MODULES",
                        tuple(m for m in cli_main.SUBCOMMAND_MODULES if importlib.util.find_spec(m)))
    volumes = phantom_set(1, 1, box=32, pixel_size_a=2.0, seed=0)
    files = simulate_session(
        tmp_path, volumes, n_movies=3, software="SerialEM", shape=(256, 256), n_frames=6, pixel_size_a=2.0,
        dose_per_frame_e_a2=1.5, particles_per_micrograph=12, seed=3,
    )
    movies = files.movies[0].parent.relative_to(tmp_path)
    common = ["--project", str(tmp_path), "--engine", "plain", "--maxtime_hr", "0", "--wait_sec", "0"]
    code = cli_main.main([
        "it", *common, "--no_proc", "--movies", f"{movies}/*.mrc", "--gain", "gain.mrc", "--angpix", "2.0",
        "--dose_per_frame", "1.5", "--kv", "300", "--cs", "2.7", "--particle_diameter", "56", "--ctf_max_res", "30",
        "--class2d_iter", "3", "--class2d_classes", "2", "--min_particles_3d", "20", "--input_wait", "5",
    ])
    out, err = capsys.readouterr()
    assert code == 0, err
    prep = read_scheme(tmp_path / "Schemes/prep")
    assert prep.status is RunStatus.EXITED
    dirs = {n: j.job_dir for n, j in prep.jobs.items()}
    assert dirs == {"importmovies": "Import/job001/", "motioncorr": "MotionCorr/job002/", "ctffind": "CtfFind/job003/"}
    assert len(read_star(tmp_path / "Import/job001/movies.star")["movies"]) == 3
    assert len(read_star(tmp_path / "MotionCorr/job002/corrected_micrographs.star")["micrographs"]) == 3
    ctf = read_star(tmp_path / "CtfFind/job003/micrographs_ctf.star")["micrographs"]
    assert len(ctf) == 3 and (ctf["rlnDefocusU"] > 0).all()

    code = cli_main.main(["schemer", "--scheme", "proc", "--project", str(tmp_path), "--run", "--engine", "plain",
                          "--input_wait", "5"])
    out, err = capsys.readouterr()
    proc = read_scheme(tmp_path / "Schemes/proc")
    ran = [(n, j.job_dir) for n, j in proc.jobs.items() if j.job_dir]
    print(f"proc: {proc.status.value} at {proc.current_node}: {proc.message}; jobs run: {ran}")
    assert ("select_mics", "Select/job004/") in ran
    for node, job_dir in ran:
        status = read_exit_status(tmp_path / job_dir)
        if node == proc.current_node and proc.status is RunStatus.FAILED:
            assert status == "FAILURE" and "no implementation of job type" in proc.message, proc.message
            assert code == 1
        else:
            assert status == "SUCCESS", (node, job_dir)
    if proc.status is not RunStatus.FAILED:
        assert code == 0 and proc.status is RunStatus.EXITED
    if proc.jobs["extract"].job_dir:
        parts = read_star(tmp_path / proc.jobs["extract"].job_dir / "particles.star")["particles"]
        assert len(parts) > 0
