"""``autospa schemer``: relion_schemer's command line, so scripts written for it (relion_it,
MDCatch) work unchanged.

Exactly one action per call::

    autospa schemer --scheme NAME --run [--pipeline_control Schemes/NAME/]
    autospa schemer --scheme NAME --abort
    autospa schemer --scheme NAME --reset
    autospa schemer --scheme NAME --set_var VAR --value V [--original_value W]
    autospa schemer --scheme NAME --set_current_node NODE
    autospa schemer --scheme NAME --set_has_started JOB --value True|False
    autospa schemer --scheme NAME --set_job_mode JOB --value new|continue
    autospa schemer --scheme NAME --set_job_option JOB --option KEY --value V
    autospa schemer --scheme NAME --status

``--scheme`` is a name (the folder ``Schemes/NAME`` of the project directory, the current
directory unless ``--project`` says otherwise) or a path to a scheme folder. ``--run`` runs the
scheme as a Prefect flow (each node visit a task run named after the node; ephemeral mode unless
``PREFECT_API_URL`` names a server); ``--engine plain`` runs it without Prefect. It runs in the
project directory (as RELION does), so relative paths in job options are relative to it. Exit status of
``--run``: 0 when the scheme ended normally (dead end, ``exit`` or ``exit_maxtime``), 1 when a job
failed or an operator could not run (RELION exits 0 there), 3 when it was aborted.

``--set_job_option`` is relion_pipeliner's ``--editJob FILE --editOption KEY --editValue V`` on
the job's template (True/False become Yes/No); the runner notices the changed options and starts
the job in a fresh directory on its next visit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from autospa.cli.common import add_cluster_arguments, client_from_args
from autospa.errors import InputError
from autospa.io.scheme_files import read_scheme
from autospa.orchestration.it import prefect_environment
from autospa.orchestration.runner import RunResult, RunSettings, locate_scheme, run_scheme
from autospa.orchestration.scheme_commands import (
    SchemeStatus,
    abort_scheme,
    edit_job_option,
    reset_scheme,
    scheme_status,
    set_current_node,
    set_has_started,
    set_job_mode,
    set_variable,
)

#: The actions, exactly one of which a call performs.
ACTIONS = (
    "run",
    "abort",
    "reset",
    "set_var",
    "set_current_node",
    "set_has_started",
    "set_job_mode",
    "set_job_option",
    "status",
)

def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``autospa schemer``."""
    p = subparsers.add_parser(
        "schemer",
        help="run and edit RELION-compatible schemes (relion_schemer's options)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_schemer_arguments(p)
    p.set_defaults(func=run)


def add_schemer_arguments(p: argparse.ArgumentParser) -> None:
    """relion_schemer's options plus autospa's (shared with :mod:`autospa.cli.it`)."""
    p.add_argument("--scheme", required=True, help="scheme name (Schemes/NAME) or path to a scheme folder")
    p.add_argument("--project", default=None, metavar="DIR", help="project directory (default: the current directory)")
    a = p.add_argument_group("actions (exactly one)")
    a.add_argument("--run", action="store_true", help="run the scheme from its current node")
    a.add_argument("--abort", action="store_true", help="ask a running scheme (and its current job) to stop")
    a.add_argument("--reset", action="store_true", help="variables to reset values, jobs unstarted, back to the start node")
    a.add_argument("--set_var", default=None, metavar="VAR", help="set a variable (with --value, --original_value)")
    a.add_argument("--set_current_node", default=None, metavar="NODE", help="set the node the next --run starts at")
    a.add_argument("--set_has_started", default=None, metavar="JOB", help="set a job's HasStarted (with --value)")
    a.add_argument("--set_job_mode", default=None, metavar="JOB", help="set a job's mode (with --value new|continue)")
    a.add_argument("--set_job_option", default=None, metavar="JOB", help="edit an option of a job's template (with --option, --value)")
    a.add_argument("--status", action="store_true", help="print where the scheme is")
    v = p.add_argument_group("values")
    v.add_argument("--value", default=None, help="the new value")
    v.add_argument("--original_value", default=None, help="--set_var: also the value --reset restores")
    v.add_argument("--option", default=None, metavar="KEY", help="--set_job_option: the option key")
    r = p.add_argument_group("running")
    r.add_argument("--engine", choices=("prefect", "plain"), default="prefect", help="run as a Prefect flow (default) or without Prefect")
    r.add_argument("--lock_wait", type=float, default=None, metavar="S", help="seconds to wait for a runner holding the scheme (run: 10, edits: 60)")
    r.add_argument("--input_wait", type=float, default=50.0, metavar="S", help="seconds a job waits for its input files (default 50, as RELION)")
    r.add_argument("--no_change_detection", action="store_true", help="RELION's behaviour: a started continue job continues even if its options changed")
    r.add_argument("--allow_unreachable", action="store_true", help="run a scheme with nodes no edge reaches (RELION's proc has one)")
    add_cluster_arguments(p)
    c = p.add_argument_group("relion_schemer compatibility (accepted, no effect)")
    c.add_argument("--pipeline_control", default=None, metavar="DIR", help="the scheme folder is always the control directory")
    c.add_argument("--run_pipeline", default=None, metavar="NAME", help="the pipeline is always default_pipeline.star")
    c.add_argument("--verb", type=int, default=None, help="use autospa -v / -vv")


def chosen_action(args: argparse.Namespace) -> str:
    """The one action requested (raises SystemExit through argparse-like message otherwise)."""
    chosen = [a for a in ACTIONS if getattr(args, a) not in (None, False)]
    if len(chosen) != 1:
        flags = ", ".join(f"--{a}" for a in ACTIONS)
        what = "no action" if not chosen else "more than one action (" + ", ".join(f"--{a}" for a in chosen) + ")"
        raise SchemerUsageError(f"{what}: give exactly one of {flags}")
    return chosen[0]


class SchemerUsageError(Exception):
    """A command line that asks for no action, several, or lacks a value."""


def _need_value(args: argparse.Namespace, action: str) -> str:
    if args.value is None:
        raise SchemerUsageError(f"--{action} needs --value")
    return args.value


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """Runner settings from the parsed options (the dask client, if any, is the CLI's: see
    :func:`dask_client`)."""
    return RunSettings(
        lock_wait_s=10.0 if args.lock_wait is None else args.lock_wait,
        input_wait_s=args.input_wait,
        detect_option_changes=not args.no_change_detection,
        allow_unreachable=args.allow_unreachable,
    )


@contextlib.contextmanager
def dask_client(args: argparse.Namespace) -> Iterator[object]:
    """The dask cluster the cluster options ask for (``--j``, ``--gpu``, ``--scheduler-address``,
    ``--cluster slurm``...), as the default client of the run: jobs send their heavy work there.
    Without any of them, jobs use dask's threads in this process."""
    asked = (args.j, args.gpu, args.scheduler_address)
    if all(a is None for a in asked) and args.cluster == "local":
        yield None
        return
    with client_from_args(args) as client:
        yield client


def run_one(scheme: str, project: str | None, settings: RunSettings, engine: str) -> RunResult:
    """Run one scheme with the chosen engine."""
    if engine == "plain":
        return run_scheme(scheme, project, settings)
    with prefect_environment():
        from autospa.orchestration.prefect_flows import run_scheme_flow  # imports Prefect (about 1 s)

        return run_scheme_flow(scheme, project, settings)


def print_result(result: RunResult) -> None:
    """One line per job visit, then how the run ended."""
    for j in result.jobs:
        print(f"  {j.node:<16} {j.job_dir:<22} {j.action:<9} {j.status}")
    line = f"scheme {result.scheme}: {result.status.value} at {result.node}"
    print(line + (f": {result.message}" if result.message else ""), file=sys.stdout if result.ok else sys.stderr)


def print_status(st: SchemeStatus) -> None:
    """A scheme's status as a few aligned lines."""
    if not st.exists:
        print(f"scheme {st.name}: not installed")
        return
    running = f"running ({st.runner})" if st.running else "not running"
    print(f"scheme {st.name}: {running}; last run: {st.status}; current node: {st.current_node}")
    if st.message:
        print(f"  {st.message}")
    for j in st.jobs:
        started = "started" if j.has_started else "not started"
        print(f"  {j.name:<16} {j.mode:<9} {started:<12} {j.job_dir or '-':<22} {j.pipeline_status or '-'}")


def run(args: argparse.Namespace) -> int:
    """Perform the one action; returns the exit status."""
    try:
        action = chosen_action(args)
        scheme, project = args.scheme, args.project
        edit_wait = 60.0 if args.lock_wait is None else args.lock_wait
        if action == "run":
            # jobs run in the project directory, as RELION's do (relative paths in options and STAR
            # files are relative to it)
            loc = locate_scheme(scheme, project)
            os.chdir(loc.project_dir)
            with dask_client(args):
                result = run_one(loc.name, str(loc.project_dir), settings_from_args(args), args.engine)
            print_result(result)
            return result.exit_code
        if action == "abort":
            for path in abort_scheme(scheme, project):
                print(f"created {path}")
            return 0
        if action == "reset":
            s = reset_scheme(scheme, project, edit_wait)
            print(f"scheme {s.short_name}: reset; current node {s.current_node}")
            return 0
        if action == "set_var":
            s = set_variable(scheme, args.set_var, _need_value(args, action), args.original_value, project, edit_wait)
            var = s.variables[args.set_var]
            print(f"scheme {s.short_name}: {var.name} = {var.value} (reset value {var.reset_value})")
            return 0
        if action == "set_current_node":
            s = set_current_node(scheme, args.set_current_node, project, edit_wait)
            print(f"scheme {s.short_name}: current node {s.current_node}")
            return 0
        if action == "set_has_started":
            s = set_has_started(scheme, args.set_has_started, _need_value(args, action), project, edit_wait)
            print(f"scheme {s.short_name}: {args.set_has_started} has_started = {s.jobs[args.set_has_started].has_started}")
            return 0
        if action == "set_job_mode":
            s = set_job_mode(scheme, args.set_job_mode, _need_value(args, action), project, edit_wait)
            print(f"scheme {s.short_name}: {args.set_job_mode} mode = {s.jobs[args.set_job_mode].mode.value}")
            return 0
        if action == "set_job_option":
            if args.option is None:
                raise SchemerUsageError("--set_job_option needs --option KEY and --value V")
            loc = locate_scheme(scheme, project)
            if args.set_job_option not in read_scheme(loc.scheme_dir).jobs:
                raise InputError(loc.scheme_dir / "scheme.star", f"the scheme has no job {args.set_job_option!r}")
            path = edit_job_option(loc.scheme_dir / args.set_job_option, args.option, _need_value(args, action))
            print(f"{path}: {args.option} = {args.value}")
            return 0
        print_status(scheme_status(scheme, project))
        return 0
    except SchemerUsageError as exc:
        print(f"autospa schemer: error: {exc}", file=sys.stderr)
        return 2
