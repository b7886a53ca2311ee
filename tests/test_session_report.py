"""``autospa report`` on a project made by the real pipeline: a simulated SerialEM session ingested by
MDCatch (session.json), then the prep and proc schemes with the real jobs (import, motion
correction, CTF estimation, CTF selection, LoG picking, extraction, VDAM 2D classification, the
class ranker), then 3D outputs (an initial model, a refined map with half maps, and the real
post-processing job on them). The numbers on the page must be the numbers in the files."""

from __future__ import annotations

import argparse
import io as _io
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from autospa.cli import main as cli_main
from autospa.errors import InputError
from autospa.io.mrc import write_mrc
from autospa.io.postprocess_files import read_postprocess_star
from autospa.io.preprocess_files import read_coordinate_index, read_coordinates
from autospa.io.scheme_files import read_pipeline, write_exit_status, write_job_template
from autospa.io.session_files import link_movies, read_session_json
from autospa.io.star import read_star
from autospa.report import class_gallery as cg
from autospa.report import session_report as sr
from autospa.scheme.model import JobTemplate

PIXEL = 2.0
BOX3D = 32


class _Ids(HTMLParser):
    """Text of every element with an ``id``; the ``src`` of every image; table cells by table id."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}
        self.images: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._open: list[tuple[str, str, list[str]]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
            return
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []
        if tag == "tr" and self._table:
            self.tables[self._table].append([])
        if tag in ("td", "th") and self._table:
            self._cell = []
        if a.get("id"):
            self._open.append((tag, a["id"], []))

    def handle_data(self, data):
        for _, _, buf in self._open:
            buf.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self._table = None
        if self._open and self._open[-1][0] == tag:
            _, ident, buf = self._open.pop()
            self.ids[ident] = "".join(buf).strip()


def _parse(html_text: str) -> _Ids:
    p = _Ids()
    p.feed(html_text)
    return p


def _rows(table: list[list[str]]) -> list[dict[str, str]]:
    head = table[0]
    return [dict(zip(head, r, strict=True)) for r in table[1:]]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project after prep and proc (no 3D job yet), with MDCatch's session.json."""
    from autospa.mdcatch.detectors import load_config
    from autospa.mdcatch.session import SessionWatcher, WatchSettings
    from autospa.simulate.phantoms import phantom_set
    from autospa.simulate.session import simulate_session

    root = tmp_path_factory.mktemp("report")
    session, proj = root / "session", root / "project"
    volumes = phantom_set(1, 1, box=32, pixel_size_a=PIXEL, seed=0)
    files = simulate_session(session, volumes, n_movies=3, software="SerialEM", shape=(192, 192), n_frames=4,
                             pixel_size_a=PIXEL, dose_per_frame_e_a2=1.5, particles_per_micrograph=10, seed=3)
    watcher = SessionWatcher(session, proj, load_config(use_user_config=False), WatchSettings(particle_diameter_a=56.0))
    watcher.poll()
    watcher.poll()
    assert watcher.n_movies == 3
    link_movies(proj / "Movies", files.movies[0].parent)
    common = ["--project", str(proj), "--engine", "plain", "--maxtime_hr", "0", "--wait_sec", "0"]
    cwd = Path.cwd()
    try:
        assert cli_main.main([
            "it", *common, "--no_proc", "--movies", "Movies/*.mrc", "--gain", str(files.gain), "--angpix", str(PIXEL),
            "--dose_per_frame", "1.5", "--kv", "300", "--cs", "2.7", "--particle_diameter", "56", "--ctf_max_res", "30",
            "--class2d_iter", "3", "--class2d_classes", "3", "--class_threshold", "0.1", "--min_particles_3d", "100000",
            "--input_wait", "5",
        ]) == 0  # fmt: skip
        assert cli_main.main(["schemer", "--scheme", "proc", "--project", str(proj), "--run", "--engine", "plain",
                              "--input_wait", "5"]) == 0
    finally:
        os.chdir(cwd)
    names = {p.name for p in read_pipeline(proj).processes}
    assert {"CtfFind/job003/", "Extract/job006/", "Class2D/job007/", "Select/job008/"} <= names
    return proj


def _add_3d(proj: Path) -> dict:
    """An initial model, a refinement (map and half maps) and a real post-processing job."""
    from autospa.orchestration.executor import execute_job
    from autospa.simulate.phantoms import phantom_set

    vol = phantom_set(1, 1, box=BOX3D, pixel_size_a=PIXEL, seed=5)[0].numpy()
    rng = np.random.default_rng(0)
    ini = proj / "InitialModel/job009"
    write_job_template(ini / "job.star", JobTemplate("relion.initialmodel", {"nr_classes": "3", "sym_name": "C1"}))
    write_mrc(ini / "initial_model.mrc", (vol + 0.05 * rng.standard_normal(vol.shape)).astype(np.float32), PIXEL)
    write_exit_status(ini, "SUCCESS")
    ref = proj / "Refine3D/job010"
    write_job_template(ref / "job.star", JobTemplate("relion.refine3d", {"fn_img": "Select/job008/particles.star"}))
    noise = 0.3 * float(vol.std())
    for half in (1, 2):
        write_mrc(ref / f"run_half{half}_class001_unfil.mrc",
                  (vol + noise * rng.standard_normal(vol.shape)).astype(np.float32), PIXEL)
    write_mrc(ref / "run_class001.mrc", vol.astype(np.float32), PIXEL)
    write_exit_status(ref, "SUCCESS")
    ax = np.arange(BOX3D) - BOX3D // 2
    r = np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
    mask = np.clip((14.0 - r) / 3.0, 0.0, 1.0).astype(np.float32)
    write_mrc(proj / "mask.mrc", mask, PIXEL)
    post = proj / "PostProcess/job011"
    options = {"fn_in": str(ref / "run_half1_class001_unfil.mrc"), "fn_mask": str(proj / "mask.mrc"), "angpix": str(PIXEL),
               "do_auto_bfac": "No", "do_adhoc_bfac": "No"}
    write_job_template(post / "job.star", JobTemplate("relion.postprocess", options))
    outcome = execute_job("relion.postprocess", post, options, False)
    assert outcome.status == "SUCCESS", outcome.message
    return {"volume": vol, "postprocess": post / "postprocess.star"}


def _png_shape(path: Path) -> tuple[int, int]:
    img = mpimg.imread(_io.BytesIO(path.read_bytes()), format="png")
    return int(img.shape[0]), int(img.shape[1])


def test_report_of_a_whole_run_shows_the_numbers_of_its_files(project: Path, tmp_path: Path, capsys) -> None:
    proj = tmp_path / "project"
    shutil.copytree(project, proj, symlinks=True)  # copy2 keeps the files' times
    made = _add_3d(proj)
    out = tmp_path / "web"
    assert cli_main.main(["report", "--project", str(proj), "--o", str(out)]) == 0
    assert "final resolution" in capsys.readouterr().out
    page = _parse((out / "index.html").read_text())
    ids = page.ids

    # every figure is linked by a bare relative name and written beside the page, nothing more
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert sorted(page.images) == pngs
    assert set(pngs) == set(sr.FIGURES.values())
    assert all("/" not in s for s in page.images)

    # acquisition: MDCatch's reference movie
    state = read_session_json(proj / "session.json")
    meta = state["reference"]["metadata"]
    assert float(ids["acq-voltage"]) == meta["voltage_kv"] == 300.0
    assert float(ids["acq-pixel-size"]) == meta["pixel_size_a"] == PIXEL
    assert int(ids["acq-n-movies"]) == len(state["movies"]) == 3
    assert float(ids["acq-dose-per-frame"]) == pytest.approx(state["derived"]["dose_per_frame_e_a2"], rel=1e-3)

    # motion and CTF: every micrograph, means as in the STAR files
    ctf = read_star(proj / "CtfFind/job003/micrographs_ctf.star")["micrographs"]
    mc = read_star(proj / "MotionCorr/job002/corrected_micrographs.star")["micrographs"]
    assert int(ids["n-micrographs"]) == len(ctf) == len(mc) == 3
    assert int(ids["n-movies"]) == 3
    assert float(ids["mean-defocus"]) == pytest.approx(float((0.5 * (ctf["rlnDefocusU"] + ctf["rlnDefocusV"])).mean()), abs=0.5)
    assert float(ids["mean-motion"]) == pytest.approx(float(mc["rlnAccumMotionTotal"].mean()), abs=0.005)
    assert float(ids["mean-ctf-resolution"]) == pytest.approx(float(ctf["rlnCtfMaxResolution"].mean()), abs=0.005)
    sel = read_star(proj / "Select/job004/micrographs.star")["micrographs"]
    assert int(ids["n-selected-micrographs"]) == len(sel)
    table = _rows(page.tables["micrograph-table"])
    assert [r["micrograph"] for r in table] == mc["rlnMicrographName"].tolist()
    for r, (_, row) in zip(table, ctf.set_index("rlnMicrographName").loc[mc["rlnMicrographName"]].iterrows(), strict=True):
        assert float(r["defocus U (A)"]) == pytest.approx(row["rlnDefocusU"], abs=0.5)
        assert float(r["CTF max. res. (A)"]) == pytest.approx(row["rlnCtfMaxResolution"], abs=0.005)

    # picks and particles
    index = read_coordinate_index(proj / "AutoPick/job005/autopick.star")
    counts = {m: len(read_coordinates(proj / c)) for m, c in zip(index["rlnMicrographName"], index["rlnMicrographCoordinates"],
                                                                   strict=True)}
    assert int(ids["n-picks"]) == sum(counts.values()) > 0
    assert [int(r["picks"]) for r in table] == [counts[m] for m in mc["rlnMicrographName"]]
    first = next(m for m in index["rlnMicrographName"] if counts[m] > 0)
    assert int(ids["picks-shown"]) == counts[first]
    assert int(ids["n-particles"]) == len(read_star(proj / "Extract/job006/particles.star")["particles"])

    # 2D classes: gallery in descending ranker score, selection as the ranker wrote it
    model = read_star(proj / "Select/job008/rank_model.star")["model_classes"]
    scores = model["rlnClassScore"].to_numpy()
    expected_order = (np.argsort(-scores, kind="stable") + 1).tolist()
    assert [int(k) for k in ids["class-order"].split()] == expected_order
    chosen = next(iter(read_star(proj / "Select/job008/backup_selection.star").values()))["rlnSelected"].to_numpy() == 1
    classes = _rows(page.tables["class-table"])
    assert [int(r["class"]) for r in classes] == expected_order
    shown = [-999.0 if r["score"] == "-" else float(r["score"]) for r in classes]  # "-": too few particles to be scored
    assert shown == pytest.approx(scores[np.array(expected_order) - 1], abs=5e-4)
    assert [r["selected"] == "yes" for r in classes] == chosen[np.array(expected_order) - 1].tolist()
    assert int(ids["n-classes"]) == len(model) == 3
    assert int(ids["n-selected-classes"]) == int(chosen.sum())
    assert int(ids["n-selected-particles"]) == len(read_star(proj / "Select/job008/particles.star").get("particles", []))

    # FSC: the resolution printed is postprocess.star's
    general, fsc, _ = read_postprocess_star(made["postprocess"])
    res = float(general["rlnFinalResolution"])
    assert ids["final-resolution"] == ids["fsc-resolution"] == f"{res:.2f}"
    assert 2 * PIXEL <= res < 30.0

    # time per stage: launch (job.star) to exit file, for every job of the project
    jobs = _rows(page.tables["job-table"])
    assert [r["job"] for r in jobs] == [f"{d.parent.name}/{d.name}/" for d in sorted(
        (p.parent for p in proj.glob("*/job*/job.star")), key=lambda d: d.name)]
    for r in jobs:
        d = proj / r["job"]
        t = (d / "RELION_JOB_EXIT_SUCCESS").stat().st_mtime - (d / "job.star").stat().st_mtime
        assert float(r["seconds"]) == pytest.approx(t, abs=0.051)
        assert r["status"] == "Succeeded"
    nodes = {r["job"]: r["scheme node"] for r in jobs}
    assert nodes["CtfFind/job003/"] == "prep/ctffind" and nodes["Select/job008/"] == "proc/select_parts"
    assert nodes["PostProcess/job011/"] == "-"
    stages = _rows(page.tables["stage-table"])  # one stage per scheme node, or per job type outside the schemes
    assert [r["stage"] for r in stages] == [nodes[r["job"]] if nodes[r["job"]] != "-" else r["type"] for r in jobs]
    assert sum(float(r["seconds"]) for r in stages) == pytest.approx(sum(float(r["seconds"]) for r in jobs), abs=0.1 * len(jobs))

    # figure sizes (pixels) follow from the figure sizes and the number of classes / jobs
    assert _png_shape(out / "motion_ctf.png") == (sr.MOTION_CTF_SIZE_IN[1] * sr.DPI, sr.MOTION_CTF_SIZE_IN[0] * sr.DPI)
    slices = (round(sr.MAP_SLICES_SIZE_IN[1] * sr.DPI), round(sr.MAP_SLICES_SIZE_IN[0] * sr.DPI))
    assert _png_shape(out / "initial_model.png") == _png_shape(out / "final_map.png") == slices
    assert _png_shape(out / "fsc.png") == (460, 700)
    assert _png_shape(out / "picks.png") == (600, 600)  # a square micrograph
    assert _png_shape(out / "timing.png") == (round(100 * (1.2 + 0.35 * len(stages))), 800)
    k = len(model)
    cell_h, cell_w = cg.TILE_PX + cg.LABEL_PX + 2 * cg.MARGIN_PX, cg.TILE_PX + 2 * cg.MARGIN_PX
    assert _png_shape(out / "class_gallery.png") == (cell_h + 24, k * cell_w)  # one row of k tiles under a title


def test_map_slices_are_the_central_planes() -> None:
    vol = np.zeros((BOX3D, BOX3D + 2, BOX3D + 4), np.float32)  # (z, y, x), all sizes different
    vol[BOX3D // 2, 4:10, 20:26] = 1.0  # a block in the plane z = D/2 only
    vol[3, (BOX3D + 2) // 2, 7] = 2.0  # a voxel in the plane y = D/2
    vol[5, 9, (BOX3D + 4) // 2] = 3.0  # a voxel in the plane x = D/2
    xy, xz, yz = sr.central_slices(vol)
    assert xy.shape == (BOX3D + 2, BOX3D + 4) and xz.shape == (BOX3D, BOX3D + 4) and yz.shape == (BOX3D, BOX3D + 2)
    assert xy.sum() == 36 and xy[4:10, 20:26].min() == 1.0
    assert xz.sum() == 2.0 and xz[3, 7] == 2.0
    assert yz[5, 9] == 3.0 and yz.sum() == 3.0
    png = sr.map_slices_png(vol, "test", PIXEL)
    assert mpimg.imread(_io.BytesIO(png), format="png").shape[:2] == (round(sr.MAP_SLICES_SIZE_IN[1] * sr.DPI),
                                                                     round(sr.MAP_SLICES_SIZE_IN[0] * sr.DPI))
    with pytest.raises(InputError):
        sr.central_slices(np.zeros((4, 4)))


def test_time_per_stage_sums_the_jobs_of_a_stage() -> None:
    J = sr.JobInfo
    jobs = [
        J("Class2D/job012/", "relion.class2d", "Succeeded", "proc/class2d", 100.0, 160.0),
        J("Import/job001/", "relion.import.movies", "Succeeded", "prep/importmovies", 0.0, 2.5),
        J("Class2D/job007/", "relion.class2d", "Succeeded", "proc/class2d", 50.0, 90.0),
        J("Select/job008/", "relion.select.class2dauto", "Running", "proc/select_parts", 95.0, None),  # still running
        J("PostProcess/job013/", "relion.postprocess", "Failed", None, 200.0, 203.0),
    ]
    assert sr.stage_times(jobs) == [("prep/importmovies", 1, 2.5), ("proc/class2d", 2, 100.0), ("relion.postprocess", 1, 3.0)]
    assert [j.seconds for j in jobs] == [60.0, 2.5, 40.0, None, 3.0]
    assert [j.family for j in jobs] == ["class2d", "import", "class2d", "select", "postprocess"]
    assert [j.number for j in jobs] == [12, 1, 7, 8, 13]


def test_stages_that_have_not_run_are_one_line_notes(project: Path, tmp_path: Path) -> None:
    rep = sr.session_report(project)
    page = _parse(rep.html)
    for key in ("initial-model", "final-map"):
        assert f"{key}-not-run" in page.ids and "not run" in page.ids[f"{key}-not-run"]
    assert {"initial_model.png", "final_map.png", "fsc.png"}.isdisjoint(rep.figures)
    assert {"motion_ctf.png", "picks.png", "class_gallery.png", "timing.png"} <= set(rep.figures)
    assert "final-resolution" not in page.ids
    assert rep.data.initial_model is None and rep.data.fsc is None

    # without the ranker's outputs the gallery is the last 2D iteration, largest class first
    proj = tmp_path / "p"
    shutil.copytree(project, proj, symlinks=True)
    shutil.rmtree(proj / "Select/job008")
    rep = sr.session_report(proj)
    model = read_star(proj / "Class2D/job007/run_it003_model.star")["model_classes"]
    order = np.argsort(-model["rlnClassDistribution"].to_numpy(), kind="stable") + 1
    page = _parse(rep.html)
    assert [int(k) for k in page.ids["class-order"].split()] == order.tolist()
    assert rep.data.classes.scores is None and rep.data.classes.iteration == 3
    assert "n-selected-classes" not in page.ids

    # only the acquisition metadata: everything else is a note
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(project / "session.json", only / "session.json")
    page = _parse(sr.session_report(only).html)
    assert page.ids["acq-voltage"] == "300"
    for key in ("micrographs", "picks", "classes", "initial-model", "final-map", "timing"):
        assert f"{key}-not-run" in page.ids, key


def test_fsc_of_a_refinement_without_postprocessing(project: Path, tmp_path: Path) -> None:
    """A Refine3D job's run_model.star (gold-standard FSC, rlnCurrentResolution) when no post-processing ran."""
    import pandas as pd

    from autospa.io.star import write_star

    proj = tmp_path / "p"
    shutil.copytree(project, proj, symlinks=True)
    ref = proj / "Refine3D/job009"
    write_job_template(ref / "job.star", JobTemplate("relion.refine3d", {}))
    shells = np.arange(BOX3D // 2 + 1)
    fsc = 1.0 / (1.0 + np.exp((shells - 9.3) / 1.2))
    write_star(ref / "run_model.star", {
        "model_general": {"rlnReferenceDimensionality": 3, "rlnPixelSize": PIXEL, "rlnCurrentResolution": 7.11},
        "model_class_1": pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": shells / (BOX3D * PIXEL),
                                       "rlnGoldStandardFsc": fsc}),
    })  # fmt: skip
    write_exit_status(ref, "SUCCESS")
    rep = sr.session_report(proj)
    page = _parse(rep.html)
    assert page.ids["final-resolution"] == page.ids["fsc-resolution"] == "7.11"
    assert rep.data.fsc.job == "Refine3D/job009/" and list(rep.data.fsc.curves) == ["gold-standard FSC"]
    np.testing.assert_allclose(rep.data.fsc.curves["gold-standard FSC"], fsc)
    assert "fsc.png" in rep.figures and "final_map.png" not in rep.figures  # no run_class001.mrc yet
    assert rep.data.initial_model is None and "initial-model-not-run" in page.ids

    # our refine3d job post-processes its half maps into its own folder: that postprocess.star wins
    corrected = np.clip(fsc + 0.05, 0.0, 1.0)
    write_star(ref / "postprocess.star", {
        "general": {"rlnFinalResolution": 6.4321, "rlnBfactorUsedForSharpening": 0.0},
        "fsc": pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": shells / (BOX3D * PIXEL),
                             "rlnFourierShellCorrelationCorrected": corrected, "rlnFourierShellCorrelationUnmaskedMaps": fsc}),
    })  # fmt: skip
    rep = sr.session_report(proj)
    assert _parse(rep.html).ids["final-resolution"] == "6.43" and rep.data.fsc.source.name == "postprocess.star"
    assert list(rep.data.fsc.curves) == ["corrected (solvent mask)", "unmasked maps"]
    np.testing.assert_allclose(rep.data.fsc.curves["corrected (solvent mask)"], corrected)


def test_bad_project_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        sr.gather_report_data(tmp_path / "missing")
    with pytest.raises(InputError, match="not a project directory"):
        sr.gather_report_data(tmp_path)
    args = argparse.Namespace(project=str(tmp_path), output=None, session=None, title=None)
    from autospa.cli.report import run

    with pytest.raises(InputError):
        run(args)
    assert cli_main.main(["report", "--project", str(tmp_path / "missing")]) == 1
