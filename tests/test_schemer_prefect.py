"""Schemes as Prefect flows, against a real (temporary) Prefect server: every node visit is a task
run named after the node; a failed job is a Failed task and flow run; ``autospa schemer --run`` in a
subprocess, killed with SIGKILL after a job finished, resumes without re-running it; ``autospa it``
runs prep and proc as two flows at once.

One server is started for the module (``prefect_test_harness``: about 15 s on 2 idle cores with a
fresh database, then about 1 s per flow run); subprocesses reach it through ``PREFECT_API_URL``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scheme_testjobs import PREP_JOBS, PROC_JOBS, read_runs

from autospa.cli import main as cli_main
from autospa.io.scheme_files import read_scheme, scheme_lock, write_job_template, write_scheme
from autospa.jobs.registry import temporary_jobs
from autospa.orchestration.scheme_commands import edit_job_option, scheme_status
from autospa.scheme.model import Edge, JobMode, JobTemplate, JobVisit, Operator, RunStatus, Scheme, SchemeJob, Variable, VarKind

TESTS = Path(__file__).resolve().parent

#: The console script, with the subcommand modules this checkout has.
CLI = (
    "import importlib.util, sys\n"
    "import autospa.cli.main as m\n"
    "m.SUBCOMMAND_MODULES = tuple(x for x in m.SUBCOMMAND_MODULES if importlib.util.find_spec(x))\n"
    "sys.exit(m.main(sys.argv[1:]))\n"
)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A temporary Prefect server for this module; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect_home")
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    t0 = time.monotonic()
    try:
        with prefect_test_harness(server_startup_timeout=120):
            print(f"prefect test server up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
            yield PREFECT_API_URL.value()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _flow_runs_and_tasks(n: int = 1) -> list[tuple[str, str, str, list[tuple[str, str]]]]:
    """The last ``n`` flow runs, newest first: (name, state, message, [(task run name, state)...])."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    out = []
    with get_client(sync_client=True) as client:
        for fr in client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=n):
            trs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [fr.id]}), sort=TaskRunSort.EXPECTED_START_TIME_ASC)
            tasks = [(t.name, t.state.type.value) for t in sorted(trs, key=lambda t: (t.start_time or t.expected_start_time))]
            out.append((fr.name, fr.state.type.value, fr.state.message or "", tasks))
    return out


def _mini(project: Path, name: str = "mini", fail_b: bool = False, sleep_b: float = 0.0) -> Path:
    """a -> LOOP(i < 2 ? a : b) ... : a runs twice, then b, then END (exit)."""
    sdir = project / "Schemes" / name
    scheme = Scheme(
        name=f"Schemes/{name}/",
        variables={"i": Variable("i", VarKind.FLOAT, 0.0, 0.0), "again": Variable("again", VarKind.BOOL, False, False)},
        operators={"INC": Operator("INC", "float=plus", "i", "i", "1"), "AGAIN": Operator("AGAIN", "bool=lt", "again", "i", "2"),
                   "END": Operator("END", "exit")},
        jobs={"a": SchemeJob("a", "a", JobMode.CONTINUE), "b": SchemeJob("b", "b", JobMode.NEW)},
        edges=(Edge("a", "INC"), Edge("INC", "AGAIN"), Edge("AGAIN", "b", True, "a", "again"), Edge("b", "END")),
    ).reset()
    write_scheme(sdir, scheme)
    write_job_template(sdir / "a" / "job.star", JobTemplate("test.make", {"out": "a.txt"}))
    b = {"out": "b.txt", "in": "Schemes/mini/a/a.txt", "sleep": f"{sleep_b:g}"}
    if fail_b:
        b["fail"] = "Yes"
    write_job_template(sdir / "b" / "job.star", JobTemplate("test.make", b))
    return sdir


def test_each_node_visit_is_a_task_run_named_after_the_node(prefect_api: str, tmp_path: Path) -> None:
    from autospa.orchestration.prefect_flows import run_scheme_flow

    _mini(tmp_path)
    t0 = time.monotonic()
    r = run_scheme_flow("mini", tmp_path)
    elapsed = time.monotonic() - t0
    assert r.status is RunStatus.EXITED and r.exit_code == 0
    expected = ["a", "INC", "AGAIN", "a", "INC", "AGAIN", "b", "END"]
    assert list(r.visits) == expected
    name, state, _, tasks = _flow_runs_and_tasks()[0]
    assert name == "mini" and state == "COMPLETED"
    assert [t for t, _ in tasks] == expected and {s for _, s in tasks} == {"COMPLETED"}
    print(f"scheme flow with {len(expected)} node visits: {elapsed:.2f} s", file=sys.stderr)


def test_failed_job_fails_its_task_and_the_flow(prefect_api: str, tmp_path: Path) -> None:
    from autospa.orchestration.prefect_flows import run_scheme_flow

    _mini(tmp_path, fail_b=True)
    r = run_scheme_flow("mini", tmp_path)
    assert r.status is RunStatus.FAILED and r.exit_code == 1 and r.node == "b"
    name, state, message, tasks = _flow_runs_and_tasks()[0]
    assert state == "FAILED" and "job b (External/job002/, test.make) failed: asked to fail" in message
    assert tasks[-1] == ("b", "FAILED") and [s for _, s in tasks[:-1]] == ["COMPLETED"] * 6


def _cli_env(prefect_api: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["AUTOSPA_JOB_MODULES"] = "scheme_testjobs"
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env


@pytest.mark.parametrize("engine", ["plain", pytest.param("prefect", marks=pytest.mark.slow)])
def test_kill_9_and_restart_does_not_rerun_finished_jobs(engine: str, request, tmp_path: Path) -> None:
    """``autospa schemer --run`` in a subprocess, killed with SIGKILL while job b runs (after job a
    finished twice), then started again. The default set runs it without Prefect (the state
    handling is the same code; about 4 s less per process); ``-m slow`` runs it as Prefect flows."""
    prefect_api = request.getfixturevalue("prefect_api") if engine == "prefect" else None
    sdir = _mini(tmp_path, sleep_b=60)
    cmd = [sys.executable, "-c", CLI, "schemer", "--scheme", "mini", "--project", str(tmp_path), "--run", "--engine", engine]
    env = _cli_env(prefect_api)
    with open(tmp_path / "run1.out", "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:  # until job a has run twice and b has been launched (and is sleeping)
            s = read_scheme(sdir)
            if s.jobs["b"].visit is JobVisit.LAUNCHED:
                break
            assert proc.poll() is None, (tmp_path / "run1.out").read_text()
            assert time.monotonic() < deadline, "the runner did not reach job b"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # what kill -9 leaves: a readable scheme.star (atomic writes) on node b, and the runner's lock
    s = read_scheme(sdir)
    assert s.current_node == "b" and s.status is RunStatus.RUNNING and s.variables["i"].value == 2.0
    assert scheme_lock(tmp_path, "mini").directory.exists()
    assert [(d, c) for d, c, _ in read_runs(tmp_path)] == [
        ("External/job001/", False), ("External/job001/", True), ("External/job002/", False)]
    edit_job_option(sdir / "b", "sleep", "0")  # b now finishes at once ("sleep" does not change results)

    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    restart_s = time.monotonic() - t0
    assert done.returncode == 0, done.stdout + done.stderr
    assert "scheme mini: exited at END" in done.stdout
    # a is not run again; b is resumed in the directory it was launched in
    assert [(d, c) for d, c, _ in read_runs(tmp_path)] == [
        ("External/job001/", False), ("External/job001/", True), ("External/job002/", False), ("External/job002/", True)]
    assert (tmp_path / "External/job002/b.txt").exists()
    s = read_scheme(sdir)
    assert s.current_node == "END" and s.status is RunStatus.EXITED
    assert not scheme_lock(tmp_path, "mini").directory.exists()  # the dead runner's lock was taken over and released
    if engine == "prefect":
        runs = _flow_runs_and_tasks(2)
        assert runs[0][1] == "COMPLETED" and [t for t, _ in runs[0][3]] == ["b", "END"]
    st = scheme_status("mini", tmp_path)
    assert (st.running, st.status, st.current_node) == (False, "exited", "END")
    print(f"restart through the CLI (process start, Prefect, 2 node visits): {restart_s:.1f} s", file=sys.stderr)


def test_autospa_it_runs_prep_and_proc_as_flows(prefect_api: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(Path.cwd())  # autospa it changes into the project directory: restored afterwards
    monkeypatch.setattr(cli_main, "SUBCOMMAND_MODULES",
                        tuple(m for m in cli_main.SUBCOMMAND_MODULES if importlib.util.find_spec(m)))
    (tmp_path / "Movies").mkdir()
    for i in range(3):
        (tmp_path / "Movies" / f"mov{i}.tiff").write_bytes(b"")
    with temporary_jobs({**PREP_JOBS, **PROC_JOBS}):
        # prep alone first (without Prefect), so that proc's first pass finds its output
        code = cli_main.main(["it", "--project", str(tmp_path), "--maxtime_hr", "0", "--wait_sec", "0",
                              "--min_particles_3d", "100", "--input_wait", "5", "--no_proc", "--engine", "plain"])
        assert code == 0, capsys.readouterr().err
        code = cli_main.main(["it", "--project", str(tmp_path), "--maxtime_hr", "0", "--wait_sec", "0",
                              "--min_particles_3d", "100", "--input_wait", "5"])
        assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "scheme prep: exited at EXIT_maxtime" in out and "scheme proc: exited at EXIT_maxtime" in out
    runs = _flow_runs_and_tasks(2)
    names = [r[0] for r in runs]
    assert sorted(names[:2]) == ["prep", "proc"] and all(r[1] == "COMPLETED" for r in runs[:2])
    proc_tasks = [t for t, _ in next(r for r in runs[:2] if r[0] == "proc")[3]]
    assert proc_tasks[:4] == ["WAIT", "EXIT_maxtime", "HAS_ctffind", "select_mics"] and "refine3d" in proc_tasks
    refine = [o for d, _, o in read_runs(tmp_path) if d.startswith("Refine3D/")]
    assert len(refine) == 1 and refine[0]["fn_ref"].endswith("/initial_model.mrc")


def test_flow_entry_points_and_deployments() -> None:
    """flows/prefect.yaml's deployments point at flows that load, with parameters they accept."""
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    repo = TESTS.parent
    spec = yaml.safe_load((repo / "flows" / "prefect.yaml").read_text())
    names = {}
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        fl = load_flow_from_entrypoint(f"{repo / path}:{func}")
        names[d["name"]] = fl.name
        assert set(d["parameters"]) <= set(fl.parameters.properties), d["name"]
        assert d["work_pool"]["name"] == "autospa"
    assert names == {"autospa-prep": "prep", "autospa-proc": "proc", "autospa-it": "autospa-it"}
