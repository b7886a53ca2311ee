"""The scheme runner (``relion_schemer --run``): walks a scheme node by node, persisting after every
step, until it exits, reaches a dead end, a job fails or the user aborts.

Run loop (RELION-4.0's, see the reference notes, with autospa's changes marked):

1. take the scheme lock (held for the whole run; a lock whose owner died is taken over);
2. read and validate ``scheme.star`` and every job template; remove old sentinels;
3. at an **operator**: evaluate it; ``exit`` / ``exit_maxtime`` past its deadline stop the run;
4. at a **job**: re-read its template, substitute ``$$variables``, rewrite ``Schemes/`` paths,
   decide (``new``: fresh ``Type/jobNNN/``; started ``continue``: same directory with
   ``continue_``; autospa: changed options start afresh, a launched-but-unfinished visit resumes,
   a visit whose directory says SUCCESS is not run again), record it as launched and save, wait
   for its input files, run it, read ``RELION_JOB_EXIT_*``;
5. move to the next node (forks read their bool now) and save ``scheme.star`` atomically;
6. stop on a job failure (autospa: exit code 1, RELION exits 0) or abort (the current node stays
   on the job, as in RELION), writing ``Schemes/NAME/RELION_JOB_EXIT_*``.

Each node visit goes through a ``visit`` wrapper; :mod:`autospa.orchestration.prefect_flows`
passes one that makes every visit a Prefect task run named after the node.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from autospa.errors import AutospaError, InputError
from autospa.io.scheme_files import (
    FileSystemEnvironment,
    abort_requested,
    clear_abort,
    clear_exit_status,
    read_exit_status,
    read_job_template,
    read_job_templates,
    read_scheme,
    scheme_lock,
    update_pipeline,
    write_exit_status,
    write_job_template,
    write_scheme,
)
from autospa.jobs.registry import (
    DEFAULT_OUTPUTS,
    fingerprint_ignores,
    get_job,
    job_directory_name,
    resolve_job_type,
)
from autospa.orchestration.executor import JobOutcome, execute_job
from autospa.scheme.interpreter import JobAction, next_node, options_fingerprint, plan_job_visit, resolve_job_options
from autospa.scheme.model import UNDEFINED, JobTemplate, JobVisit, RunStatus, Scheme
from autospa.scheme.operators import OperatorClock, evaluate_operator
from autospa.scheme.pipeline import (
    ABORTED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    Pipeline,
    add_input_edge,
    add_output_node,
    add_process,
    node_type_label,
    set_process,
)
from autospa.scheme.validate import validate_job_templates, validate_scheme

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``visit(node, kind, fn)`` runs ``fn`` (one node visit, kind ``"operator"`` or ``"job"``).
VisitWrapper = Callable[[str, str, Callable[[], T]], T]

_JOB_FILE_VALUE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*/job\d{3,}/\S+$")
_PIPELINE_STATUS = {"SUCCESS": SUCCEEDED, "FAILURE": FAILED, "ABORTED": ABORTED}


@dataclass(frozen=True)
class RunSettings:
    """How a runner behaves.

    Attributes
    ----------
    lock_wait_s
        How long to wait for another process's scheme lock before giving up.
    input_wait_s
        How long a job waits for its input files to appear (RELION: about 50 s).
    detect_option_changes
        A started ``continue`` job whose options changed starts in a fresh directory.
    allow_unreachable
        Run a scheme that has nodes no path reaches (RELION's own proc scheme has one).
    dask_scheduler
        Address of a running dask scheduler; jobs' dask work goes there (a client is connected as
        the default for the run).
    """

    lock_wait_s: float = 10.0
    input_wait_s: float = 50.0
    detect_option_changes: bool = True
    allow_unreachable: bool = False
    dask_scheduler: str | None = None


@dataclass(frozen=True)
class JobVisitRecord:
    """One job visit of a run: node, job directory, what was done, how it ended."""

    node: str
    job_dir: str
    action: str
    status: str


@dataclass(frozen=True)
class RunResult:
    """How a run ended.

    Attributes
    ----------
    scheme
        Short name (``prep``).
    status
        finished (dead end), exited (exit operator), failed, aborted.
    node
        The current node when it stopped.
    message
        Why it stopped (for failures: which job and its message).
    visits
        Every node visited, in order.
    jobs
        The job visits.
    """

    scheme: str
    status: RunStatus
    node: str
    message: str = ""
    visits: tuple[str, ...] = ()
    jobs: tuple[JobVisitRecord, ...] = ()

    @property
    def ok(self) -> bool:
        """Finished or exited normally."""
        return self.status in (RunStatus.FINISHED, RunStatus.EXITED)

    @property
    def exit_code(self) -> int:
        """0 when it ended normally, 1 when a job failed or an operator raised, 3 when aborted."""
        return 0 if self.ok else (3 if self.status is RunStatus.ABORTED else 1)


@dataclass(frozen=True)
class SchemeLocation:
    """Where a scheme lives: the project directory, its folder, its short name."""

    project_dir: Path
    scheme_dir: Path
    name: str


def locate_scheme(scheme: str | Path, project_dir: str | Path | None = None) -> SchemeLocation:
    """Resolve ``--scheme``: a name (``prep`` -> ``<project>/Schemes/prep``) or a folder path.

    The project directory is ``project_dir``, else the parent of the ``Schemes`` folder a path
    points into, else the current directory.
    """
    text = str(scheme).rstrip("/")
    if not text:
        raise InputError(None, "--scheme is empty")
    project = Path(project_dir).resolve() if project_dir is not None else None
    if "/" not in text and not Path(text).is_absolute():
        base = project or Path.cwd().resolve()
        return SchemeLocation(base, base / "Schemes" / text, text)
    p = Path(text)
    if not p.is_absolute():
        p = (project or Path.cwd().resolve()) / p
    p = p.resolve()
    if project is None:
        project = p.parent.parent if p.parent.name == "Schemes" else Path.cwd().resolve()
    return SchemeLocation(project, p, p.name)


def _plain_visit(node: str, kind: str, fn: Callable[[], T]) -> T:
    return fn()


@contextlib.contextmanager
def _dask_client(address: str | None) -> Iterator[object]:
    if not address:
        yield None
        return
    from autospa.distributed.cluster import get_client  # imported here: dask only when asked for

    with get_client(scheduler_address=address) as client:
        yield client


@dataclass
class _Run:
    loc: SchemeLocation
    settings: RunSettings
    env: FileSystemEnvironment
    clock: OperatorClock = field(default_factory=OperatorClock)
    jobs: list[JobVisitRecord] = field(default_factory=list)

    def save(self, scheme: Scheme) -> None:
        write_scheme(self.loc.scheme_dir, scheme)

    def aborted(self) -> bool:
        return abort_requested(self.loc.scheme_dir)


def run_scheme(
    scheme: str | Path,
    project_dir: str | Path | None = None,
    settings: RunSettings | None = None,
    visit: VisitWrapper | None = None,
) -> RunResult:
    """Run a scheme until it stops (``relion_schemer --scheme NAME --run``).

    Parameters
    ----------
    scheme
        Scheme name or folder (see :func:`locate_scheme`).
    project_dir
        The project directory (default: see :func:`locate_scheme`).
    settings
        Runner settings.
    visit
        Wrapper around each node visit (Prefect tasks); plain call by default.

    Returns
    -------
    RunResult
        How it stopped. A job failure is a result (``status = failed``), not an exception.

    Raises
    ------
    InputError
        The scheme or a template cannot be read or does not validate.
    LockError
        Another live runner holds the scheme.
    """
    settings = settings or RunSettings()
    loc = locate_scheme(scheme, project_dir)
    if not (loc.scheme_dir / "scheme.star").exists():
        raise InputError(loc.scheme_dir / "scheme.star", "no such scheme (scheme.star is missing)")
    lock = scheme_lock(loc.project_dir, loc.name)
    lock.acquire(settings.lock_wait_s)
    try:
        with _dask_client(settings.dask_scheduler):
            return _run_locked(loc, settings, visit or _plain_visit)
    finally:
        lock.release()


def _run_locked(loc: SchemeLocation, settings: RunSettings, visit: VisitWrapper) -> RunResult:
    clear_abort(loc.scheme_dir)
    clear_exit_status(loc.scheme_dir)
    scheme = read_scheme(loc.scheme_dir)
    source = str(loc.scheme_dir / "scheme.star")
    validate_scheme(scheme, source, allow_unreachable=settings.allow_unreachable)
    validate_job_templates(scheme, read_job_templates(loc.scheme_dir, scheme), str(loc.scheme_dir))
    if scheme.current_node == UNDEFINED:
        scheme = scheme.with_current_node(scheme.start_node)
    env = FileSystemEnvironment(loc.project_dir, abort_check=lambda: abort_requested(loc.scheme_dir))
    run = _Run(loc, settings, env)
    scheme = scheme.with_status(RunStatus.RUNNING)
    run.save(scheme)
    log.info("scheme %s: running from %s", loc.name, scheme.current_node)
    visits: list[str] = []

    def stop(s: Scheme, status: RunStatus, message: str = "") -> RunResult:
        s = s.with_status(status, message)
        run.save(s)
        sentinel = {RunStatus.FAILED: "FAILURE", RunStatus.ABORTED: "ABORTED"}.get(status, "SUCCESS")
        write_exit_status(loc.scheme_dir, sentinel, message)
        (log.info if status in (RunStatus.FINISHED, RunStatus.EXITED) else log.warning)(
            "scheme %s: %s at %s%s", loc.name, status.value, s.current_node, f": {message}" if message else ""
        )
        return RunResult(loc.name, status, s.current_node, message, tuple(visits), tuple(run.jobs))

    try:
        while True:
            if run.aborted():
                return stop(scheme, RunStatus.ABORTED, "aborted by the user")
            node = scheme.current_node
            visits.append(node)
            if node in scheme.operators:
                current = scheme
                scheme, go_on = visit(node, "operator", lambda: evaluate_operator(current, node, env, run.clock))
                if not go_on:
                    return stop(scheme, RunStatus.EXITED, f"stopped by operator {node}")
            else:
                current = scheme
                scheme, outcome = visit(node, "job", lambda: _visit_job(run, current, node))
                if outcome.status == "ABORTED":
                    return stop(scheme, RunStatus.ABORTED, outcome.message or f"job {node} was aborted")
                if outcome.status != "SUCCESS":
                    return stop(scheme, RunStatus.FAILED, outcome.message)
            nxt = next_node(scheme, node)
            scheme = scheme.with_current_node(nxt)
            run.save(scheme)
            if nxt is None:
                return stop(scheme, RunStatus.FINISHED, f"no edge leaves {node}")
    except AutospaError as exc:
        return stop(scheme, RunStatus.FAILED, str(exc))
    except BaseException as exc:  # keep the state readable, then let it propagate (Ctrl-C, bugs)
        with contextlib.suppress(Exception):
            run.save(scheme.with_status(RunStatus.FAILED, f"runner stopped: {type(exc).__name__}: {exc}"))
        raise


# ------------------------------------------------------------------------------------------------
# job nodes
# ------------------------------------------------------------------------------------------------
def _input_files(options: dict[str, str]) -> list[str]:
    return sorted({v for v in options.values() if _JOB_FILE_VALUE.match(v)})


def _wait_for(project: Path, files: list[str], timeout_s: float, aborted: Callable[[], bool]) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [f for f in files if not (project / f).exists()]
        if not missing or time.monotonic() >= deadline or aborted():
            return missing
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def _output_nodes(job_dir: Path, type_label: str) -> list[str]:
    try:
        patterns = get_job(type_label).outputs
    except AutospaError:
        parts = type_label.split(".")
        patterns = DEFAULT_OUTPUTS.get(parts[1] if len(parts) > 1 else "", ())
    found = []
    for pattern in patterns:
        matches = sorted(p for p in job_dir.glob(pattern) if p.is_file())
        if matches:
            found.extend(matches[-1:] if "*" in pattern else matches)
    return [p.name for p in found]


def _visit_job(run: _Run, scheme: Scheme, node: str) -> tuple[Scheme, JobOutcome]:
    loc, settings = run.loc, run.settings
    project = loc.project_dir
    template = read_job_template(loc.scheme_dir / node)
    options = resolve_job_options(template, scheme, run.env.scheme_jobs, node)
    type_label = resolve_job_type(template.type_label, options)
    fingerprint = options_fingerprint(options, fingerprint_ignores(type_label))
    job = scheme.jobs[node]
    old_dir = job.job_dir
    dir_exists = bool(old_dir) and (project / old_dir).is_dir()
    plan = plan_job_visit(
        job,
        fingerprint,
        dir_exists=dir_exists,
        exit_status=read_exit_status(project / old_dir) if dir_exists else None,
        detect_changes=settings.detect_option_changes,
    )
    log.info("scheme %s: job %s: %s (%s)", loc.name, node, plan.action.value, plan.reason)
    if plan.action is JobAction.SKIP:
        run.jobs.append(JobVisitRecord(node, old_dir or "", plan.action.value, "SUCCESS"))
        return scheme.with_job(node, visit=JobVisit.SUCCEEDED), JobOutcome("SUCCESS", plan.reason)

    if plan.action is JobAction.FRESH:

        def allocate(p: Pipeline) -> tuple[Pipeline, str]:
            return add_process(
                p, job_directory_name(type_label), type_label, RUNNING, taken=lambda n: (project / n).exists()
            )

        job_dir_name = update_pipeline(project, allocate)
    else:
        job_dir_name = old_dir or ""
        update_pipeline(project, lambda p: (set_process(p, job_dir_name, RUNNING, type_label), None))
    job_dir = project / job_dir_name
    write_job_template(job_dir / "job.star", JobTemplate(type_label, options, is_continue=plan.continue_))
    clear_exit_status(job_dir)
    clear_abort(job_dir)
    scheme = scheme.with_job(
        node, current_name=job_dir_name, has_started=True, fingerprint=fingerprint, visit=JobVisit.LAUNCHED
    )
    run.save(scheme)

    inputs = _input_files(options)
    inputs = [f for f in inputs if not f.startswith(job_dir_name)]
    missing = _wait_for(project, inputs, settings.input_wait_s, run.aborted)
    if run.aborted() and missing:
        write_exit_status(job_dir, "ABORTED", "aborted while waiting for input files")
        outcome = JobOutcome("ABORTED", "aborted while waiting for input files")
    elif missing:
        msg = f"input file(s) {', '.join(missing)} did not appear within {settings.input_wait_s:g} s"
        write_exit_status(job_dir, "FAILURE", msg)
        outcome = JobOutcome("FAILURE", msg)
    else:
        outcome = execute_job(type_label, job_dir, options, plan.continue_)

    outputs = _output_nodes(job_dir, type_label) if outcome.status == "SUCCESS" else []

    def record(p: Pipeline) -> tuple[Pipeline, None]:
        for f in inputs:
            if f not in missing:
                p = add_input_edge(p, f, job_dir_name, node_type_label(f))
        for name in outputs:
            p = add_output_node(p, job_dir_name, job_dir_name + name, node_type_label(name, type_label))
        return set_process(p, job_dir_name, _PIPELINE_STATUS[outcome.status], type_label), None

    update_pipeline(project, record)
    visit_state = {"SUCCESS": JobVisit.SUCCEEDED, "ABORTED": JobVisit.ABORTED}.get(outcome.status, JobVisit.FAILED)
    scheme = scheme.with_job(node, visit=visit_state)
    run.jobs.append(JobVisitRecord(node, job_dir_name, plan.action.value, outcome.status))
    if outcome.status != "SUCCESS":
        what = "was aborted" if outcome.status == "ABORTED" else "failed"
        outcome = JobOutcome(
            outcome.status, f"job {node} ({job_dir_name}, {type_label}) {what}: {outcome.message or 'no message'}"
        )
    return scheme, outcome
