"""``autospa demo``, scaled down: a simulated EPU session through MDCatch, prep and proc (Prefect
flows, real jobs) to a refined map, scored against the simulator's phantom."""

from __future__ import annotations

import math

from autospa.cli.main import main
from autospa.io.postprocess_files import read_postprocess_star, read_volume
from autospa.io.star import read_star
from autospa.jobs.demo import PipelineDemoSettings, run_pipeline_demo


def test_movies_to_map_on_a_small_session(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    settings = PipelineDemoSettings(n_movies=10, particles_per_micrograph=25, class2d_iter=8, class2d_classes=5,
                                    inimodel_iter=15, refine3d_iter=6, min_particles_3d=50, seed=2)
    messages = []
    res = run_pipeline_demo(tmp_path / "demo", settings, engine="prefect", announce=messages.append)
    assert res.scheme_status["prep"].startswith("exited") and res.scheme_status["proc"].startswith("exited"), res.scheme_status
    project = res.project
    # every stage ran with RELION's outputs
    assert len(read_star(project / "Import/job001/movies.star")["movies"]) == 10
    ctf = read_star(project / "CtfFind/job003/micrographs_ctf.star")["micrographs"]
    assert len(ctf) == 10 and (ctf["rlnDefocusU"] > 0).all()
    assert res.n_particles_refined >= 100
    general, fsc_table, _ = read_postprocess_star(res.postprocess_star)
    assert math.isfinite(general["rlnFinalResolution"]) and general["rlnFinalResolution"] < 40.0
    # the map is the phantom: FSC 0.143 against the truth (after alignment) within 3x Nyquist
    _, pixel_a = read_volume(res.final_map)  # the down-scaled particles' pixel
    print(f"demo: {res.n_particles_refined} particles, rlnFinalResolution {general['rlnFinalResolution']:.1f} A, "
          f"against the truth {res.resolution_vs_truth_a:.1f} A, pixel {pixel_a:.2f} A, stages {res.stage_seconds}")
    nyquist = 2 * float(pixel_a)
    assert res.resolution_vs_truth_a <= 3 * nyquist, (res.resolution_vs_truth_a, nyquist, general["rlnFinalResolution"])
    assert any("MDCatch" in m for m in messages)
    # the report of the project
    assert main(["report", "--project", str(project)]) == 0
    assert (project / "report" / "index.html").stat().st_size > 1000
