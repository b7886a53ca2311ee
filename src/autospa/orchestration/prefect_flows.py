"""Prefect flows: a scheme run as a flow whose every node visit is a task run named after the node,
and ``it`` (prep and proc together, as sub-flows).

Works in Prefect's ephemeral mode (no server started by hand: the first flow run of a process
starts a temporary one) and against a running ``prefect server`` (``PREFECT_API_URL``). Job
visits whose job fails end as Failed task runs (no traceback: the job's message), and a scheme
run that stops on a failure or an abort ends as a Failed flow run carrying its
:class:`~autospa.orchestration.runner.RunResult`.

Heavy work: jobs run inside their task, in this process, and send their numerics to the dask
cluster (``dask_scheduler`` connects a client for them); Prefect's DaskTaskRunner is not used
(in ephemeral mode every dask worker would start its own Prefect server).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from autospa.orchestration.it import IT_SCHEMES, ItConfig, config_from_mapping, prepare_it, run_together
from autospa.orchestration.runner import RunResult, RunSettings, run_scheme

log = logging.getLogger(__name__)
T = TypeVar("T")


def prefect_visit(node: str, kind: str, fn: Callable[[], T]) -> T:
    """Run one node visit as a Prefect task run called ``node``."""

    box: list[Any] = []  # the visit's value, handed back without going through Prefect's results

    def body() -> Any:
        result = fn()
        box.append(result)
        if kind == "job":
            _scheme, outcome = result  # type: ignore[misc]
            logger = get_run_logger()
            if outcome.status != "SUCCESS":
                logger.error("%s", outcome.message)
                return Failed(message=outcome.message)
            logger.info("job %s succeeded", node)
        return None

    t = task(body, name=f"scheme {kind}", task_run_name=node, persist_result=False, cache_policy=NO_CACHE)
    state = t(return_state=True)
    if not box:  # the visit raised: re-raise it here, where the runner handles it
        value = state.result(raise_on_failure=False)
        if isinstance(value, BaseException):
            raise value
        raise RuntimeError(f"node {node}: the Prefect task ended in state {state.type.value} without a result")
    return box[0]  # type: ignore[no-any-return]


def _settings(
    lock_wait_s: float, input_wait_s: float, detect_option_changes: bool, allow_unreachable: bool,
    dask_scheduler: str | None,
) -> RunSettings:
    return RunSettings(
        lock_wait_s=lock_wait_s,
        input_wait_s=input_wait_s,
        detect_option_changes=detect_option_changes,
        allow_unreachable=allow_unreachable,
        dask_scheduler=dask_scheduler or None,
    )


@flow(name="autospa-scheme", flow_run_name="{scheme}", persist_result=False, validate_parameters=False)
def scheme_flow(
    scheme: str,
    project_dir: str | None = None,
    lock_wait_s: float = 10.0,
    input_wait_s: float = 50.0,
    detect_option_changes: bool = True,
    allow_unreachable: bool = False,
    dask_scheduler: str | None = None,
) -> Any:
    """Run a scheme (``autospa schemer --scheme NAME --run``) as a flow; see :func:`run_scheme`."""
    settings = _settings(lock_wait_s, input_wait_s, detect_option_changes, allow_unreachable, dask_scheduler)
    result = run_scheme(scheme, project_dir, settings, visit=prefect_visit)
    logger = get_run_logger()
    if not result.ok:
        logger.error("scheme %s %s at %s: %s", result.scheme, result.status.value, result.node, result.message)
        return Failed(message=f"scheme {result.scheme} {result.status.value}: {result.message}", data=result)
    logger.info("scheme %s %s at %s", result.scheme, result.status.value, result.node)
    return result


def run_scheme_flow(scheme: str | Path, project_dir: str | Path | None = None, settings: RunSettings | None = None) -> RunResult:
    """Call :func:`scheme_flow` and return its :class:`RunResult` (exceptions are re-raised)."""
    s = settings or RunSettings()
    state = scheme_flow(
        str(scheme),
        None if project_dir is None else str(project_dir),
        s.lock_wait_s,
        s.input_wait_s,
        s.detect_option_changes,
        s.allow_unreachable,
        s.dask_scheduler,
        return_state=True,
    )
    value = state.result(raise_on_failure=False)
    if isinstance(value, BaseException):
        raise value
    return value


@flow(name="autospa-it", persist_result=False, validate_parameters=False)
def it_flow(
    project_dir: str,
    config: Mapping[str, Any] | None = None,
    reset: bool = False,
    lock_wait_s: float = 10.0,
    input_wait_s: float = 50.0,
    detect_option_changes: bool = True,
    dask_scheduler: str | None = None,
) -> Any:
    """``autospa it``: write the settings into prep and proc, then run both as sub-flows at once.

    Parameters
    ----------
    project_dir
        The project directory (schemes are installed into its ``Schemes/`` if missing).
    config
        :class:`~autospa.orchestration.it.ItConfig` fields (and raw relion_it keys).
    reset
        Reset both schemes before running them.
    """
    cfg = config if isinstance(config, ItConfig) else config_from_mapping(dict(config or {}), "it_flow config")
    names = task(prepare_it, name="configure", persist_result=False, cache_policy=NO_CACHE)(project_dir, cfg, reset)
    settings = _settings(lock_wait_s, input_wait_s, detect_option_changes, False, dask_scheduler)
    results = run_together(names, lambda n: run_scheme_flow(n, project_dir, settings))
    bad = {n: r for n, r in results.items() if isinstance(r, BaseException) or not r.ok}
    if bad:
        what = "; ".join(
            f"{n}: {r}" if isinstance(r, BaseException) else f"{n}: {r.status.value} ({r.message})" for n, r in bad.items()
        )
        return Failed(message=what, data=results)
    return results


def run_it_flow(project_dir: str | Path, cfg: ItConfig, reset: bool = False, settings: RunSettings | None = None) -> dict:
    """Call :func:`it_flow`; returns scheme -> RunResult (or the exception that stopped it)."""
    s = settings or RunSettings()
    state = it_flow(
        str(project_dir), dataclasses.asdict(cfg), reset, s.lock_wait_s, s.input_wait_s, s.detect_option_changes, s.dask_scheduler,
        return_state=True,
    )
    value = state.result(raise_on_failure=False)
    if isinstance(value, BaseException):
        raise value
    return value


def named_scheme_flow(name: str):
    """:func:`scheme_flow` under the flow name ``name`` (the ``prep`` and ``proc`` entry points)."""
    return scheme_flow.with_options(name=name)


__all__ = ["IT_SCHEMES", "it_flow", "named_scheme_flow", "prefect_visit", "run_it_flow", "run_scheme_flow", "scheme_flow"]
