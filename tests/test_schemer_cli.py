"""``autospa schemer`` and ``autospa it`` through the console script's ``main`` (in this process,
``--engine plain``): relion_schemer's options, one-line errors with exit 1, and relion_it-style
configuration of the shipped schemes."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml
from scheme_testjobs import PREP_JOBS, PROC_JOBS, read_runs

from autospa.cli import main as cli_main
from autospa.io.scheme_files import read_job_template, read_scheme, write_job_template
from autospa.jobs.registry import temporary_jobs
from autospa.orchestration.it import box_sizes, config_from_mapping, derive_options, load_it_config
from autospa.scheme.model import JobMode, JobTemplate, RunStatus

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "schemes"
RELION = Path("/work/shared/reference/relion-4.0-schemes")


@pytest.fixture
def cli(monkeypatch, capsys):
    """``cli(*argv) -> (exit code, stdout, stderr)`` through autospa.cli.main.main."""
    monkeypatch.chdir(Path.cwd())  # --run and it change into the project directory: restored afterwards
    # the console script registers every subcommand module; use those present in this checkout
    present = tuple(m for m in cli_main.SUBCOMMAND_MODULES if importlib.util.find_spec(m) is not None)
    monkeypatch.setattr(cli_main, "SUBCOMMAND_MODULES", present)

    def call(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli_main.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse errors
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.fixture
def prep(tmp_path: Path) -> Path:
    shutil.copytree(RELION / "prep", tmp_path / "Schemes" / "prep")
    return tmp_path


# ------------------------------------------------------------------------------------------------
# relion_schemer's editing options
# ------------------------------------------------------------------------------------------------
def test_set_var_reset_and_status(cli, prep: Path) -> None:
    code, out, _ = cli("schemer", "--scheme", "prep", "--project", prep, "--set_var", "do_at_most", "--value", "20")
    assert code == 0 and "do_at_most = 20.0 (reset value 50.0)" in out
    code, _, _ = cli("schemer", "--scheme", "prep", "--project", prep, "--set_var", "wait_sec",
                     "--value", "60", "--original_value", "60")
    s = read_scheme(prep / "Schemes" / "prep")
    assert s.variables["do_at_most"].value == 20.0 and s.variables["wait_sec"].reset_value == 60.0
    assert (prep / "Schemes/prep/scheme.star.bck").exists()
    code, out, _ = cli("schemer", "--scheme", "prep", "--project", prep, "--set_current_node", "ctffind")
    assert code == 0 and read_scheme(prep / "Schemes/prep").current_node == "ctffind"
    code, _, _ = cli("schemer", "--scheme", "prep", "--project", prep, "--set_has_started", "motioncorr", "--value", "True")
    code, _, _ = cli("schemer", "--scheme", "prep", "--project", prep, "--set_job_mode", "ctffind", "--value", "new")
    s = read_scheme(prep / "Schemes/prep")
    assert s.jobs["motioncorr"].has_started and s.jobs["ctffind"].mode is JobMode.NEW
    code, out, _ = cli("schemer", "--scheme", "prep", "--project", prep, "--status")
    assert code == 0 and "scheme prep: not running; last run: not run; current node: ctffind" in out
    code, out, _ = cli("schemer", "--scheme", "prep", "--project", prep, "--reset")
    s = read_scheme(prep / "Schemes/prep")
    assert code == 0 and s.current_node == "WAIT" and s.variables["do_at_most"].value == 50.0
    assert s.variables["wait_sec"].value == 60.0  # --original_value changed the reset value
    assert not s.jobs["motioncorr"].has_started and s.jobs["ctffind"].mode is JobMode.NEW  # modes kept
    code, out, _ = cli("schemer", "--scheme", "prep", "--project", prep, "--abort")
    assert code == 0 and (prep / "Schemes/prep/RELION_JOB_ABORT_NOW").exists()


def test_scheme_given_as_a_path(cli, prep: Path, monkeypatch) -> None:
    monkeypatch.chdir(prep)
    code, out, _ = cli("schemer", "--scheme", "Schemes/prep/", "--set_var", "maxtime_hr", "--value", "2")
    assert code == 0 and read_scheme(prep / "Schemes/prep").variables["maxtime_hr"].value == 2.0
    code, out, _ = cli("schemer", "--scheme", "prep", "--set_var", "maxtime_hr", "--value", "3",
                       "--pipeline_control", "Schemes/prep/")  # relion_it's spelling is accepted
    assert code == 0 and read_scheme(prep / "Schemes/prep").variables["maxtime_hr"].value == 3.0


def test_set_job_option_edits_the_template(cli, prep: Path) -> None:
    code, out, _ = cli("schemer", "--scheme", "prep", "--project", prep, "--set_job_option", "motioncorr",
                       "--option", "do_dose_weighting", "--value", "False")
    assert code == 0
    tpl = read_job_template(prep / "Schemes/prep/motioncorr")
    assert tpl.options["do_dose_weighting"] == "No" and tpl.options["bfactor"] == "150"
    code, _, err = cli("schemer", "--scheme", "prep", "--project", prep, "--set_job_option", "motioncorr",
                       "--option", "no_such_option", "--value", "1")
    assert code == 1 and "has no option 'no_such_option'" in err and err.count("\n") == 1
    code, _, err = cli("schemer", "--scheme", "prep", "--project", prep, "--set_job_option", "class2d",
                       "--option", "nr_classes", "--value", "1")
    assert code == 1 and "the scheme has no job 'class2d'" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set_var", "nothing", "--value", "1"], "no variable named 'nothing'"),
        (["--set_var", "do_at_most", "--value", "many"], "variable 'do_at_most' is a float"),
        (["--set_current_node", "NOWHERE"], "'NOWHERE' is not a node of Schemes/prep/"),
        (["--set_has_started", "motioncorr", "--value", "maybe"], "not a boolean"),
        (["--set_job_mode", "motioncorr", "--value", "overwrite"], "job mode 'overwrite' is not 'new' or 'continue'"),
    ],
)
def test_bad_edits_are_one_line_errors(cli, prep: Path, argv: list[str], message: str) -> None:
    before = (prep / "Schemes/prep/scheme.star").read_text()
    code, out, err = cli("schemer", "--scheme", "prep", "--project", prep, *argv)
    assert code == 1 and message in err and err.startswith("autospa schemer: error: ") and err.count("\n") == 1
    assert (prep / "Schemes/prep/scheme.star").read_text() == before  # nothing written


@pytest.mark.parametrize(
    "argv, message",
    [([], "no action"), (["--run", "--reset"], "more than one action"), (["--set_var", "x"], "--set_var needs --value")],
)
def test_usage_errors(cli, prep: Path, argv: list[str], message: str) -> None:
    code, _, err = cli("schemer", "--scheme", "prep", "--project", prep, *argv)
    assert code == 2 and message in err


# ------------------------------------------------------------------------------------------------
# --run: validation before anything runs, failures give a non-zero exit
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "old, new, message",
    [
        ("EXIT_maxtime exit_maxtime", "EXIT_maxtime run_shell_cmd", "operator EXIT_maxtime has unknown type 'run_shell_cmd'"),
        ("motioncorr    ctffind ", "motioncorr    gctf ", "goes to 'gctf', which is not a node of the scheme"),
        ("ctffind WAIT            0  undefined  undefined", "ctffind WAIT            1  motioncorr  do_at_most",
         "fork at ctffind: variable 'do_at_most' is a float, not a bool"),
        ("importmovies motioncorr            0", "importmovies    ctffind            0",
         "node(s) motioncorr cannot be reached from the start node WAIT"),
    ],
)
def test_run_refuses_invalid_schemes(cli, prep: Path, old: str, new: str, message: str) -> None:
    path = prep / "Schemes/prep/scheme.star"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    code, out, err = cli("schemer", "--scheme", "prep", "--project", prep, "--run", "--engine", "plain")
    assert code == 1 and message in err and err.count("\n") == 1
    assert not (prep / "default_pipeline.star").exists() and read_runs(prep) == []
    assert not (prep / ".relion_lock_scheme_prep").exists()  # the lock is released on errors


def test_run_exit_codes(cli, tmp_path: Path) -> None:
    """A job failure stops the scheme with exit 1 (RELION exits 0); a normal end exits 0."""
    sdir = tmp_path / "Schemes" / "two"
    shutil.copytree(RELION / "prep", sdir)
    text = (sdir / "scheme.star").read_text().replace("Schemes/prep/", "Schemes/two/")
    (sdir / "scheme.star").write_text(text)
    for job, opts in (("importmovies", {"out": "a.txt"}), ("motioncorr", {"out": "b.txt", "fail": "Yes"}),
                      ("ctffind", {"out": "c.txt"})):
        write_job_template(sdir / job / "job.star", JobTemplate("test.make", opts))
    cli("schemer", "--scheme", "two", "--project", tmp_path, "--set_var", "maxtime_hr", "--value", "0")
    cli("schemer", "--scheme", "two", "--project", tmp_path, "--set_var", "wait_sec", "--value", "0")
    code, out, err = cli("schemer", "--scheme", "two", "--project", tmp_path, "--run", "--engine", "plain")
    assert code == 1 and "scheme two: failed at motioncorr: job motioncorr (External/job002/, test.make) failed: asked to fail" in err
    assert "importmovies     External/job001/" in out
    write_job_template(sdir / "motioncorr" / "job.star", JobTemplate("test.make", {"out": "b.txt"}))
    code, out, err = cli("schemer", "--scheme", "two", "--project", tmp_path, "--run", "--engine", "plain")
    assert code == 0 and "scheme two: exited at EXIT_maxtime" in out
    # the failed job's options changed: a fresh directory; after the first EXIT_maxtime of this run
    # (which only sets the deadline) the loop goes round once more, continuing its jobs
    assert [(d, c) for d, c, _ in read_runs(tmp_path)] == [
        ("External/job001/", False), ("External/job002/", False),  # run 1: import, failed motioncorr
        ("External/job003/", False), ("External/job004/", False),  # run 2: motioncorr, ctffind
        ("External/job001/", True), ("External/job003/", True), ("External/job004/", True),  # next pass
    ]


# ------------------------------------------------------------------------------------------------
# autospa it
# ------------------------------------------------------------------------------------------------
def test_it_box_sizes_follow_relion_it() -> None:
    # relion_it: box = ceil(1.5 d / px) rounded up to even; small box: first size with px < 3.75 A
    assert box_sizes(config_from_mapping({"particle_diameter_a": 200, "pixel_size_a": 0.885})) == pytest.approx((220.0, 340, 96))
    assert box_sizes(config_from_mapping({"particle_diameter_a": 180, "pixel_size_a": 1.0})) == pytest.approx((198.0, 270, 96))
    # super-resolution: the pixel size for boxes doubles
    assert box_sizes(config_from_mapping({"particle_diameter_a": 100, "pixel_size_a": 0.5, "super_resolution": True}))[1:] == (150, 48)
    # small particles: the small box is never larger than the box
    assert box_sizes(config_from_mapping({"particle_diameter_a": 40, "pixel_size_a": 1.0}))[1:] == (60, 48)
    assert box_sizes(config_from_mapping({"particle_diameter_a": 20, "pixel_size_a": 1.0}))[1:] == (30, 30)
    opts = derive_options(config_from_mapping({"picker": "topaz", "gpus": "0,1", "particle_diameter_a": 180}))
    assert opts["proc__autopick__use_gpu"] == "Yes" and opts["proc__extract__do_fom_threshold"] == "Yes"
    assert opts["proc__autopick__gpu_ids"] == "0" and opts["proc__refine3d__gpu_ids"] == "0:1"
    assert opts["proc__do_log"] == "False" and opts["proc__autopick__log_diam_max"] == "180"


def test_it_only_save_writes_the_settings(cli, tmp_path: Path) -> None:
    cfg = tmp_path / "session.yaml"
    cfg.write_text(yaml.safe_dump({
        "movies": "Movies/*.tiff", "pixel_size_a": 1.06, "dose_per_frame": 1.2, "voltage_kv": 300, "cs_mm": 2.7,
        "particle_diameter_a": 160, "symmetry": "D2", "class_score_threshold": 0.3, "min_particles_3d": 2000,
        "options": {"proc__class2d__nr_classes": 50},
    }))
    code, out, err = cli("it", "--project", tmp_path, "--config", cfg, "--only_save", "--kv", "200",
                         "--set", "prep__do_at_most=20", "--set", "class2d_iterations=100")
    assert code == 0, err
    prep, proc = read_scheme(tmp_path / "Schemes/prep"), read_scheme(tmp_path / "Schemes/proc")
    assert prep.variables["do_at_most"].value == 20.0 and prep.variables["do_at_most"].reset_value == 20.0
    imp = read_job_template(tmp_path / "Schemes/prep/importmovies")
    assert imp.options["kV"] == "200" and imp.options["angpix"] == "1.06" and imp.options["Cs"] == "2.7"
    assert read_job_template(tmp_path / "Schemes/prep/motioncorr").options["dose_per_frame"] == "1.2"
    assert proc.variables["min_nr_parts_3d"].value == 2000.0 and proc.variables["do_log"].value is True
    assert proc.variables["class2d_iter"].value == 100.0
    assert proc.variables["class2d_optimiser"].value == "Schemes/proc/class2d/run_it100_optimiser.star"
    assert read_job_template(tmp_path / "Schemes/proc/class2d").options["nr_classes"] == "50"
    assert read_job_template(tmp_path / "Schemes/proc/select_parts").options["rank_threshold"] == "0.3"
    ex = read_job_template(tmp_path / "Schemes/proc/extract")
    assert (ex.options["extract_size"], ex.options["rescale"]) == ("228", "96")  # 1.5 x 160 / 1.06 -> 228
    assert read_job_template(tmp_path / "Schemes/proc/refine3d").options["sym_name"] == "D2"
    recorded = yaml.safe_load((tmp_path / "autospa_it.yaml").read_text())
    assert recorded["voltage_kv"] == 200.0 and recorded["options"]["prep__do_at_most"] == "20"
    code, out, _ = cli("it", "--project", tmp_path, "--status")
    assert code == 0 and "scheme prep: not running; last run: not run; current node: WAIT" in out
    assert "scheme proc: not running" in out


def test_it_reads_relion_it_options_files(tmp_path: Path) -> None:
    path = tmp_path / "relion_it_options.py"
    path.write_text("{\n'prep__importmovies__angpix' : '0.65',\n'do_prep' : 'True',\n'proc__iniref' : 'None',\n}\n")
    cfg = load_it_config(path)
    assert cfg.do_prep is True and cfg.options["prep__importmovies__angpix"] == "0.65"
    assert derive_options(cfg)["prep__importmovies__angpix"] == "0.65"  # raw keys win


@pytest.mark.parametrize(
    "content, message",
    [
        ("particle_diameter: big\n", "unknown setting 'particle_diameter'"),
        ("particle_diameter_a: big\n", "particle_diameter_a: 'big' is not a valid float"),
        ("picker: cryolo\n", "picker must be 'log' or 'topaz'"),
        ("options:\n  proc__class2d__no_such_option: 1\n", "the job has no option 'no_such_option'"),
        ("options:\n  proc__no_such_variable: 1\n", "the scheme has no variable 'no_such_variable'"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_it_config_errors(cli, tmp_path: Path, content: str, message: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    code, _, err = cli("it", "--project", tmp_path, "--config", cfg, "--only_save")
    assert code == 1 and message in err and err.count("\n") == 1


def test_it_runs_prep_and_proc_together(cli, tmp_path: Path) -> None:
    """Both schemes at once on test jobs: prep imports, corrects and CTF-fits the movies; proc
    (which may find prep's output on its first pass or only on the relaunch) picks, extracts,
    classifies and refines them. A relaunch resumes both schemes where they stopped."""
    (tmp_path / "Movies").mkdir()
    for i in range(6):
        (tmp_path / "Movies" / f"mov{i:02d}.tiff").write_bytes(b"")
    args = ("it", "--project", tmp_path, "--engine", "plain", "--input_wait", "2", "--maxtime_hr", "0",
            "--wait_sec", "0", "--movies_per_pass", "4", "--min_particles_3d", "300", "--angpix", "1.1")
    with temporary_jobs({**PREP_JOBS, **PROC_JOBS}):
        code, out, err = cli(*args)
        assert code == 0, err
        code, out, err = cli(*args)
        assert code == 0, err
    runs = read_runs(tmp_path)
    dirs = [d for d, _, _ in runs]
    # prep: continue jobs stay in their directories; motioncorr did at most 4 movies per pass
    assert dirs.count("Import/job001/") == 2 or sorted(set(d for d in dirs if d.startswith("Import/"))) == ["Import/job001/"]
    mc = [d for d in dirs if d.startswith("MotionCorr/")]
    assert len(set(mc)) == 1 and len(mc) == 2
    mics = (tmp_path / mc[0] / "corrected_micrographs.star").read_text().count("Movies/mov")
    assert mics == 6
    imp = [o for d, _, o in runs if d.startswith("Import/")][0]
    assert imp["fn_in_raw"] == "Movies/*.tiff" and imp["angpix"] == "1.1"
    # proc ran one productive pass per growth of the micrograph count, ending in a refinement
    refine = [o for d, _, o in runs if d.startswith("Refine3D/")]
    assert 1 <= len(refine) <= 2 and refine[-1]["fn_ref"].startswith("InitialModel/job")
    proc = read_scheme(tmp_path / "Schemes/proc")
    assert proc.status is RunStatus.EXITED and proc.variables["current_nr_parts"].value > 0
    sel = [o for d, _, o in runs if d.startswith("Select/")][0]
    assert sel["fn_mic"].startswith("CtfFind/job") and sel["fn_mic"].endswith("/micrographs_ctf.star")


def test_jobs_send_their_work_to_the_dask_cluster(cli, tmp_path: Path) -> None:
    """--scheduler-address: the run's jobs get that cluster as their default dask client."""
    from distributed import LocalCluster

    sdir = tmp_path / "Schemes" / "two"
    shutil.copytree(RELION / "prep", sdir)
    (sdir / "scheme.star").write_text((sdir / "scheme.star").read_text().replace("Schemes/prep/", "Schemes/two/"))
    for job in ("importmovies", "motioncorr", "ctffind"):
        write_job_template(sdir / job / "job.star", JobTemplate("test.dask_sum", {"n": "$$do_at_most"}))
    for var in ("maxtime_hr", "wait_sec"):
        cli("schemer", "--scheme", "two", "--project", tmp_path, "--set_var", var, "--value", "0")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        code, out, err = cli("schemer", "--scheme", "two", "--project", tmp_path, "--run", "--engine", "plain",
                             "--scheduler-address", cluster.scheduler_address)
    assert code == 0, err
    assert (tmp_path / "External/job001/sum.txt").read_text().split() == [str(sum(i * i for i in range(1, 51))), "1"]
    # without a cluster the job finds no client and fails cleanly
    cli("schemer", "--scheme", "two", "--project", tmp_path, "--set_current_node", "importmovies")
    code, out, err = cli("schemer", "--scheme", "two", "--project", tmp_path, "--run", "--engine", "plain")
    assert code == 1 and "No clients found" in err


def test_it_accepts_the_configuration_mdcatch_writes(cli, tmp_path: Path) -> None:
    """``autospa mdcatch watch --launch`` writes it_config.yaml with relion_it's keys (see
    autospa.mdcatch.derive): every one of them names a variable or job option of our schemes."""
    cfg = {
        "do_prep": True, "do_proc": True, "prep__do_at_most": 15,
        "prep__importmovies__fn_in_raw": "Movies/*.tiff", "prep__importmovies__is_multiframe": True,
        "prep__importmovies__angpix": 0.83, "prep__importmovies__kV": 300.0, "prep__importmovies__Cs": 2.7,
        "prep__importmovies__Q0": 0.1, "prep__importmovies__optics_group_name": "opticsGroup1",
        "prep__importmovies__fn_mtf": "", "prep__motioncorr__fn_gain_ref": "gain.mrc", "prep__motioncorr__gain_rot": 0,
        "prep__motioncorr__gain_flip": 0, "prep__motioncorr__fn_defect": "", "prep__motioncorr__bin_factor": 1,
        "prep__motioncorr__dose_per_frame": 1.1, "prep__motioncorr__group_frames": 1,
        "prep__motioncorr__eer_grouping": 20, "prep__motioncorr__patch_x": 5, "prep__motioncorr__patch_y": 5,
        "prep__ctffind__do_phaseshift": False, "proc__autopick__log_diam_min": 150.0,
        "proc__autopick__log_diam_max": 180.0, "proc__autopick__topaz_particle_diameter": 180.0,
        "proc__extract__extract_size": 326, "proc__extract__do_rescale": True, "proc__extract__rescale": 96,
        "proc__class2d__particle_diameter": 198.0, "proc__inimodel3d__particle_diameter": 198.0,
        "proc__refine3d__particle_diameter": 198.0, "proc__inimodel3d__sym_name": "C1", "proc__refine3d__sym_name": "C1",
    }
    (tmp_path / "it_config.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = cli("it", "--project", tmp_path, "--config", tmp_path / "it_config.yaml", "--only_save")
    assert code == 0, err
    mc = read_job_template(tmp_path / "Schemes/prep/motioncorr")
    assert (mc.options["fn_gain_ref"], mc.options["dose_per_frame"], mc.options["gain_rot"]) == ("gain.mrc", "1.1", "0")
    assert read_job_template(tmp_path / "Schemes/prep/ctffind").options["do_phaseshift"] == "No"
    ex = read_job_template(tmp_path / "Schemes/proc/extract")
    assert (ex.options["extract_size"], ex.options["rescale"], ex.options["do_rescale"]) == ("326", "96", "Yes")
    assert read_scheme(tmp_path / "Schemes/prep").variables["do_at_most"].value == 15.0
