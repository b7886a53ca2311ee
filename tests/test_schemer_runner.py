"""The scheme runner without Prefect (``--engine plain``): RELION's proc graph over several passes,
job directories and modes, cross-scheme paths, failures, changed options, locks, abort and resuming
after a runner died."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from scheme_testjobs import PARTICLES_PER_MIC, PROC_JOBS, read_runs, write_table

from autospa.errors import InputError
from autospa.io.scheme_files import (
    LockError,
    read_exit_status,
    read_pipeline,
    read_scheme,
    scheme_lock,
    write_exit_status,
    write_job_template,
    write_scheme,
)
from autospa.jobs.registry import temporary_jobs
from autospa.orchestration.it import install_schemes
from autospa.orchestration.runner import RunSettings, run_scheme
from autospa.orchestration.scheme_commands import (
    abort_scheme,
    edit_job_option,
    reset_scheme,
    scheme_status,
    set_current_node,
    set_has_started,
    set_variable,
)
from autospa.scheme.model import (
    Edge,
    JobMode,
    JobTemplate,
    JobVisit,
    Operator,
    RunStatus,
    Scheme,
    SchemeJob,
    Variable,
    VarKind,
)

SHIPPED = Path(__file__).resolve().parents[1] / "schemes"
FAST = RunSettings(lock_wait_s=0.5, input_wait_s=1.0)

PASS_NODES = [
    "EXIT_maxtime", "HAS_ctffind", "select_mics", "COUNT_mics", "HAS_mics_increased", "SET_prev_nr_mics",
    "SET_do_topaz", "autopick", "extract", "class2d", "select_parts", "COUNT_parts", "CHECK_do_3d",
]
TAIL_INIMODEL = ["CHECK_iniref", "inimodel3d", "SET_myref_inimodel", "refine3d", "WAIT", "EXIT_maxtime"]
IDLE_PASS = ["EXIT_maxtime", "HAS_ctffind", "select_mics", "COUNT_mics", "HAS_mics_increased", "WAIT", "EXIT_maxtime"]


def _ctf_star(project: Path, resolutions: list[float]) -> None:
    write_table(
        project / "CtfFind" / "job001" / "micrographs_ctf.star",
        {
            "optics": (["rlnOpticsGroupName", "rlnOpticsGroup"], [["opticsGroup1", 1]]),
            "micrographs": (
                ["rlnMicrographName", "rlnCtfMaxResolution"],
                [[f"MotionCorr/job000/Movies/m{i:02d}.mrc", r] for i, r in enumerate(resolutions)],
            ),
        },
    )


@pytest.fixture
def proc_project(tmp_path: Path) -> Path:
    """A project with our prep and proc schemes; prep's ctffind has run in CtfFind/job001/ (5
    micrographs, 4 of them better than 6 A); proc loops once per run (maxtime 0), without waiting."""
    install_schemes(tmp_path, source=SHIPPED)
    prep = read_scheme(tmp_path / "Schemes" / "prep")
    write_scheme(tmp_path / "Schemes" / "prep", prep.with_job("ctffind", current_name="CtfFind/job001/", has_started=True))
    _ctf_star(tmp_path, [4.0, 5.0, 7.0, 3.0, 5.5])
    for var, value in (("wait_sec", "0"), ("maxtime_hr", "0"), ("min_nr_parts_3d", "300")):
        set_variable("proc", var, value, value, project_dir=tmp_path)
    return tmp_path


def _dirs(result) -> dict[str, str]:
    return {j.node: j.job_dir for j in result.jobs}


def test_proc_graph_over_several_passes(proc_project: Path) -> None:
    project = proc_project
    with temporary_jobs(PROC_JOBS):
        # pass 1: everything runs, 3D from an initial model
        r1 = run_scheme("proc", project, FAST)
        assert r1.status is RunStatus.EXITED and r1.exit_code == 0 and r1.node == "EXIT_maxtime"
        assert list(r1.visits) == ["WAIT"] + PASS_NODES + TAIL_INIMODEL
        d1 = _dirs(r1)
        assert d1 == {
            "select_mics": "Select/job001/", "autopick": "AutoPick/job002/", "extract": "Extract/job003/",
            "class2d": "Class2D/job004/", "select_parts": "Select/job005/", "inimodel3d": "InitialModel/job006/",
            "refine3d": "Refine3D/job007/",
        }
        runs = {d: (c, o) for d, c, o in read_runs(project)}
        # cross-scheme path: prep's ctffind node -> its job directory
        assert runs["Select/job001/"][1]["fn_mic"] == "CtfFind/job001/micrographs_ctf.star"
        # $$ substitution of bools and floats; own-scheme paths -> job directories
        assert runs["AutoPick/job002/"][1]["do_log"] == "Yes" and runs["AutoPick/job002/"][1]["do_topaz"] == "No"
        assert runs["Class2D/job004/"][1]["nr_iter_grad"] == "200"
        assert runs["Select/job005/"][1]["fn_model"] == "Class2D/job004/run_it200_optimiser.star"
        assert runs["Refine3D/job007/"][1]["fn_ref"] == "InitialModel/job006/initial_model.mrc"
        proc = read_scheme(project / "Schemes" / "proc")
        assert proc.variables["current_nr_mics"].value == 4.0
        assert proc.variables["current_nr_parts"].value == 4.0 * PARTICLES_PER_MIC
        assert proc.variables["myref"].value == "InitialModel/job006/initial_model.mrc"  # operator inputs are rewritten
        assert proc.current_node == "EXIT_maxtime" and proc.status is RunStatus.EXITED
        assert read_exit_status(project / "Schemes" / "proc") == "SUCCESS"

        # pass 2: no new micrographs -> select_mics continues in its directory, nothing else runs
        r2 = run_scheme("proc", project, FAST)
        assert list(r2.visits) == IDLE_PASS
        assert [(j.node, j.job_dir, j.action) for j in r2.jobs] == [("select_mics", "Select/job001/", "continue")]

        # pass 3: three more micrographs (two good): continue jobs process only the new ones, the
        # new-mode jobs get fresh directories and 3D runs again
        _ctf_star(project, [4.0, 5.0, 7.0, 3.0, 5.5, 2.0, 3.0, 9.0])
        r3 = run_scheme("proc", project, FAST)
        assert list(r3.visits) == PASS_NODES + TAIL_INIMODEL
        d3 = _dirs(r3)
        for node in ("select_mics", "autopick", "extract"):
            assert d3[node] == d1[node]
        assert d3 == {**d3, "class2d": "Class2D/job008/", "select_parts": "Select/job009/",
                      "inimodel3d": "InitialModel/job010/", "refine3d": "Refine3D/job011/"}
        assert (project / "AutoPick/job002/picked_this_run.txt").read_text().split() == [
            "MotionCorr/job000/Movies/m05.mrc", "MotionCorr/job000/Movies/m06.mrc"]
        proc = read_scheme(project / "Schemes" / "proc")
        assert proc.variables["current_nr_parts"].value == 6.0 * PARTICLES_PER_MIC
        assert proc.variables["prev_nr_mics"].value == 6.0

        # pass 4: a user reference that exists -> no initial model
        (project / "my_ref.mrc").write_text("user map\n")
        set_variable("proc", "iniref", "my_ref.mrc", "my_ref.mrc", project_dir=project)
        _ctf_star(project, [4.0, 5.0, 7.0, 3.0, 5.5, 2.0, 3.0, 9.0, 1.0])
        r4 = run_scheme("proc", project, FAST)
        assert list(r4.visits) == PASS_NODES + ["CHECK_iniref", "SET_myref_user", "refine3d", "WAIT", "EXIT_maxtime"]
        assert _dirs(r4)["refine3d"] == "Refine3D/job014/"
        assert read_runs(project)[-1][2]["fn_ref"] == "my_ref.mrc"

    pipeline = read_pipeline(project)
    assert pipeline.job_counter == 15
    assert {p.status for p in pipeline.processes} == {"Succeeded"}
    assert ("Class2D/job004/run_it200_optimiser.star", "Select/job005/") in pipeline.input_edges
    status = scheme_status("proc", project)
    assert not status.running and status.status == "exited" and status.current_node == "EXIT_maxtime"
    assert {j.name: j.job_dir for j in status.jobs}["refine3d"] == "Refine3D/job014/"


# ------------------------------------------------------------------------------------------------
# small schemes built here
# ------------------------------------------------------------------------------------------------
def _mini(project: Path, jobs: dict[str, tuple[str, dict[str, str]]], variables=(), operators=(), edges=None,
          name: str = "mini") -> Path:
    """A scheme of ``test.make`` jobs (node -> (mode, options)), chained in order and ending at an
    ``exit`` operator ``END``, unless ``edges`` are given."""
    sdir = project / "Schemes" / name
    nodes = list(jobs)
    if edges is None:
        operators = [*operators, Operator("END", "exit")]
        nodes.append("END")
    scheme = Scheme(
        name=f"Schemes/{name}/",
        variables={v.name: v for v in variables},
        operators={o.name: o for o in operators},
        jobs={n: SchemeJob(n, n, JobMode(m)) for n, (m, _) in jobs.items()},
        edges=tuple(edges if edges is not None else (Edge(a, b) for a, b in zip(nodes, nodes[1:]))),
    ).reset()
    write_scheme(sdir, scheme)
    for n, (_, opts) in jobs.items():
        write_job_template(sdir / n / "job.star", JobTemplate("test.make", opts))
    return sdir


def test_failed_job_stops_the_scheme_with_a_nonzero_exit(tmp_path: Path) -> None:
    sdir = _mini(tmp_path, {"a": ("continue", {"out": "a.txt"}), "b": ("new", {"out": "b.txt", "fail": "Yes"}),
                            "c": ("new", {"out": "c.txt"})})
    r = run_scheme("mini", tmp_path, FAST)
    assert r.status is RunStatus.FAILED and r.exit_code == 1
    assert r.node == "b" and "job b (External/job002/, test.make) failed: asked to fail" in r.message
    assert read_exit_status(tmp_path / "External/job002") == "FAILURE"
    assert read_exit_status(sdir) == "FAILURE"
    s = read_scheme(sdir)
    assert s.current_node == "b" and s.status is RunStatus.FAILED and s.jobs["b"].visit is JobVisit.FAILED
    assert read_pipeline(tmp_path).process("External/job002/").status == "Failed"
    # fix the template and run again: b runs afresh (mode new), a is not re-run
    edit_job_option(sdir / "b", "fail", "No")
    r = run_scheme("mini", tmp_path, FAST)
    assert r.status is RunStatus.EXITED and [j.node for j in r.jobs] == ["b", "c"]
    assert _dirs(r) == {"b": "External/job003/", "c": "External/job004/"}
    assert (tmp_path / "External/job004/c.txt").exists()


def test_changed_options_start_a_continue_job_afresh(tmp_path: Path) -> None:
    sdir = _mini(
        tmp_path,
        {"a": ("continue", {"out": "a.txt", "text": "$$size", "nr_threads": "4"})},
        variables=[Variable("size", VarKind.FLOAT, 100.0, 100.0)],
    )
    run_scheme("mini", tmp_path, FAST)
    set_current_node("mini", "a", tmp_path)
    r = run_scheme("mini", tmp_path, FAST)  # same options: continues in its directory
    assert [(j.job_dir, j.action) for j in r.jobs] == [("External/job001/", "continue")]
    edit_job_option(sdir / "a", "nr_threads", "16")  # a resource option: still the same job
    set_current_node("mini", "a", tmp_path)
    r = run_scheme("mini", tmp_path, FAST)
    assert [(j.job_dir, j.action) for j in r.jobs] == [("External/job001/", "continue")]
    set_variable("mini", "size", "150", project_dir=tmp_path)  # a parameter: a fresh job directory
    set_current_node("mini", "a", tmp_path)
    r = run_scheme("mini", tmp_path, FAST)
    assert [(j.job_dir, j.action) for j in r.jobs] == [("External/job002/", "fresh")]
    assert (tmp_path / "External/job002/a.txt").read_text() == "150\n"
    edit_job_option(sdir / "a", "text", "other")  # RELION's behaviour when asked: continue anyway
    set_current_node("mini", "a", tmp_path)
    r = run_scheme("mini", tmp_path, RunSettings(input_wait_s=1.0, detect_option_changes=False))
    assert [(j.job_dir, j.action) for j in r.jobs] == [("External/job002/", "continue")]
    assert [c for _, c, _ in read_runs(tmp_path)] == [False, True, True, False, True]


def test_set_has_started_false_and_reset_start_jobs_afresh(tmp_path: Path) -> None:
    _mini(tmp_path, {"a": ("continue", {"out": "a.txt"})}, variables=[Variable("n", VarKind.FLOAT, 1.0, 1.0)])
    run_scheme("mini", tmp_path, FAST)
    set_has_started("mini", "a", "False", tmp_path)
    set_current_node("mini", "a", tmp_path)
    r = run_scheme("mini", tmp_path, FAST)
    assert _dirs(r) == {"a": "External/job002/"}
    set_variable("mini", "n", "5", project_dir=tmp_path)
    s = reset_scheme("mini", tmp_path)
    assert s.current_node == "a" and s.jobs["a"].current_name == "a" and not s.jobs["a"].has_started
    assert s.variables["n"].value == 1.0
    assert (tmp_path / "Schemes/mini/scheme.star.bck").exists()
    assert _dirs(run_scheme("mini", tmp_path, FAST)) == {"a": "External/job003/"}


def test_missing_input_file_fails_after_waiting(tmp_path: Path) -> None:
    _mini(tmp_path, {"a": ("new", {"out": "a.txt"}), "b": ("new", {"in": "Schemes/mini/a/a_missing.txt"})})
    t0 = time.monotonic()
    r = run_scheme("mini", tmp_path, RunSettings(input_wait_s=0.5))
    assert r.status is RunStatus.FAILED and "External/job001/a_missing.txt did not appear within 0.5 s" in r.message
    assert 0.4 < time.monotonic() - t0 < 5


def test_lock_stops_a_second_runner_and_a_dead_owner_is_taken_over(tmp_path: Path) -> None:
    _mini(tmp_path, {"a": ("new", {"out": "a.txt"})})
    lock = scheme_lock(tmp_path, "mini")
    lock.acquire()  # held by this (live) process
    try:
        with pytest.raises(LockError, match=r"scheme mini is locked by pid \d+"):
            run_scheme("mini", tmp_path, FAST)
        with pytest.raises(LockError):
            set_variable("mini", "x", "1", project_dir=tmp_path, lock_wait_s=0.2)
    finally:
        lock.release()
    # a lock left by a process that died (kill -9): taken over
    lock.directory.mkdir()
    (lock.directory / "lock_scheme").write_text(f"pid={_dead_pid()}\nhost={os.uname().nodename}\nstart=1.0\n")
    r = run_scheme("mini", tmp_path, FAST)
    assert r.status is RunStatus.EXITED and not lock.directory.exists()
    # a RELION lock (no owner record) is respected
    lock.directory.mkdir()
    with pytest.raises(LockError, match="another program"):
        run_scheme("mini", tmp_path, FAST)
    lock.directory.rmdir()


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_abort_during_a_job(tmp_path: Path) -> None:
    _mini(tmp_path, {"a": ("new", {"out": "a.txt"}), "b": ("new", {"out": "b.txt", "sleep": "20"}),
                     "c": ("new", {"out": "c.txt"})})
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", run_scheme("mini", tmp_path, FAST)))
    t0 = time.monotonic()
    t.start()
    def b_started() -> bool:  # the job's folder exists before scheme.star records it as started
        if not (tmp_path / "External/job002").exists():
            return False
        try:
            s = read_scheme(tmp_path / "Schemes" / "mini")
        except Exception:  # being replaced at this moment
            return False
        return s.current_node == "b" and s.jobs["b"].has_started

    while not b_started():
        time.sleep(0.05)
        assert time.monotonic() - t0 < 10
    made = abort_scheme("mini", tmp_path)
    assert {p.name for p in made} == {"RELION_JOB_ABORT_NOW"} and len(made) == 2
    t.join(10)
    r = result["r"]
    assert r.status is RunStatus.ABORTED and r.exit_code == 3 and r.node == "b"
    assert time.monotonic() - t0 < 10
    assert read_exit_status(tmp_path / "External/job002") == "ABORTED"
    assert read_exit_status(tmp_path / "Schemes/mini") == "ABORTED"
    assert not (tmp_path / "External/job003").exists()


def test_resume_after_the_runner_died(tmp_path: Path) -> None:
    """What kill -9 leaves behind: a job recorded as launched. If its directory says SUCCESS it is
    not run again; otherwise it is continued in the same directory."""
    sdir = _mini(tmp_path, {"a": ("new", {"out": "a.txt"}), "b": ("new", {"out": "b.txt"})})
    run_scheme("mini", tmp_path, FAST)
    s = read_scheme(sdir)
    # as if the runner died right after job a finished, before it moved on
    write_scheme(sdir, s.with_current_node("a").with_job("a", visit=JobVisit.LAUNCHED).with_status(RunStatus.RUNNING))
    r = run_scheme("mini", tmp_path, FAST)
    assert [(j.node, j.job_dir, j.action) for j in r.jobs] == [("a", "External/job001/", "skip"), ("b", "External/job003/", "fresh")]
    # as if it died while job a ran
    s = read_scheme(sdir)
    (tmp_path / "External/job001/RELION_JOB_EXIT_SUCCESS").unlink()
    write_scheme(sdir, s.with_current_node("a").with_job("a", visit=JobVisit.LAUNCHED).with_status(RunStatus.RUNNING))
    r = run_scheme("mini", tmp_path, FAST)
    assert [(j.node, j.job_dir, j.action) for j in r.jobs][0] == ("a", "External/job001/", "resume")
    assert read_runs(tmp_path)[-2][:2] == ("External/job001/", True)
    assert scheme_status("mini", tmp_path).status == "exited"


def test_forks_and_loops_with_operators(tmp_path: Path) -> None:
    """count up to 3 in a loop: a job runs each time round, then the fork leaves the loop."""
    variables = [
        Variable("i", VarKind.FLOAT, 0.0, 0.0), Variable("n", VarKind.FLOAT, 3.0, 3.0),
        Variable("more", VarKind.BOOL, True, True),
    ]
    operators = [Operator("INC", "float=plus", "i", "i", "1"), Operator("CHECK", "bool=lt", "more", "i", "n"),
                 Operator("DONE", "exit")]
    edges = [Edge("INC", "job"), Edge("job", "CHECK"), Edge("CHECK", "DONE", True, "INC", "more")]
    _mini(tmp_path, {"job": ("continue", {"out": "x.txt", "text": "$$i"})}, variables, operators, edges)
    r = run_scheme("mini", tmp_path, FAST)
    assert list(r.visits) == ["INC", "job", "CHECK"] * 3 + ["DONE"]
    assert r.status is RunStatus.EXITED and r.node == "DONE"
    assert [o["text"] for _, _, o in read_runs(tmp_path)] == ["1", "2", "3"]
    assert [c for _, c, _ in read_runs(tmp_path)] == [False, False, False]  # text changed: fresh each time
    assert read_scheme(tmp_path / "Schemes/mini").variables["i"].value == 3.0


def test_runner_refuses_invalid_schemes_before_running(tmp_path: Path) -> None:
    _mini(tmp_path, {"a": ("new", {"out": "a.txt", "text": "$$nothing"})})
    with pytest.raises(InputError, match=r"a/job.star uses \$\$nothing"):
        run_scheme("mini", tmp_path, FAST)
    assert read_runs(tmp_path) == []
    with pytest.raises(InputError, match="no such scheme"):
        run_scheme("nope", tmp_path, FAST)


def test_job_type_without_implementation_fails_cleanly(tmp_path: Path) -> None:
    sdir = _mini(tmp_path, {"a": ("new", {"out": "a.txt"})})
    write_job_template(sdir / "a" / "job.star", JobTemplate("relion.localres", {"x": "1"}))
    r = run_scheme("mini", tmp_path, FAST)
    assert r.status is RunStatus.FAILED and "no implementation of job type 'relion.localres'" in r.message
    assert read_exit_status(tmp_path / "LocalRes/job001") == "FAILURE"
    write_exit_status(tmp_path / "LocalRes/job001", "SUCCESS")  # sentinels are the truth for status
    assert read_exit_status(tmp_path / "LocalRes/job001") == "SUCCESS"
