"""The scheme state machine, without side effects.

- :func:`next_node`: where the program counter goes after a node (forks read their bool now).
- :func:`resolve_job_options`: a job template's options with ``$$variables`` substituted and
  ``Schemes/NAME/<job>/`` paths rewritten to job directories (RELION's ``prepareJob``).
- :func:`options_fingerprint` and :func:`plan_job_visit`: whether a job node runs in a fresh
  directory, continues its old one, resumes a visit that a killed runner left unfinished, or is
  skipped because that visit had in fact finished.

The runner (:mod:`autospa.orchestration.runner`) does the I/O around these.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from autospa.scheme.model import JobMode, JobTemplate, JobVisit, Scheme, SchemeError, SchemeJob, value_to_text
from autospa.scheme.paths import JobLookup, rewrite_scheme_paths

#: How many ``$$`` substitutions one option value may need before we call it a loop.
MAX_SUBSTITUTIONS = 64


def outgoing_edge(scheme: Scheme, node: str):
    """The edge leaving ``node`` (the last one in file order, as RELION picks), or ``None``."""
    found = None
    for e in scheme.edges:
        if e.source == node:
            found = e
    return found


def next_node(scheme: Scheme, node: str) -> str | None:
    """The node after ``node``: a fork's true or false target by its bool variable's current value,
    a plain edge's target, or ``None`` at a dead end."""
    edge = outgoing_edge(scheme, node)
    if edge is None:
        return None
    if edge.is_fork:
        flag = scheme.value(edge.bool_variable or "")
        return edge.target_if_true if bool(flag) else edge.target
    return edge.target


def substitute_variables(value: str, scheme: Scheme, where: str = "") -> str:
    """RELION's ``$$`` substitution: repeatedly, the word after the first ``$$`` names a variable
    and is replaced by its value (bool -> ``Yes``/``No``, float -> ``%g``, string verbatim); the
    rest of the text after that word is kept, words joined by single spaces.

    Raises
    ------
    SchemeError
        An unknown variable, an empty name, or a substitution that never ends.
    """
    for _ in range(MAX_SUBSTITUTIONS):
        if "$$" not in value:
            return value
        before, after = value.split("$$", 1)
        words = after.split()
        if not words:
            raise SchemeError(f"{scheme.name}: {where}: '$$' without a variable name in {value!r}")
        name, rest = words[0], words[1:]
        var = scheme.variables.get(name)
        if var is None:
            raise SchemeError(f"{scheme.name}: {where}: $${name} is not a variable of the scheme")
        value = before + value_to_text(var.value) + ("" if not rest else " " + " ".join(rest))
    raise SchemeError(f"{scheme.name}: {where}: $$ substitution does not end (a variable refers to itself?)")


def resolve_job_options(
    template: JobTemplate, scheme: Scheme, other_scheme_jobs: JobLookup, node: str = ""
) -> dict[str, str]:
    """The options a job node runs with: ``$$`` substitution, then job-name rewriting.

    Parameters
    ----------
    template
        The node's ``job.star`` template (always re-read before a visit, as RELION does).
    scheme
        The scheme, with the current variable values and job directories.
    other_scheme_jobs
        Looks up another scheme's jobs (for ``Schemes/OTHER/<job>/`` references).
    node
        The job node's name (for messages).
    """
    out: dict[str, str] = {}
    for key, value in template.options.items():
        v = substitute_variables(value, scheme, f"{node}/job.star option {key}")
        out[key] = rewrite_scheme_paths(v, scheme, other_scheme_jobs)
    return out


def options_fingerprint(options: Mapping[str, str], ignore: Iterable[str] = ()) -> str:
    """A short stable hash of a job's options, leaving out ``ignore`` (resource options such as
    thread counts, which do not change a job's results)."""
    skip = set(ignore)
    items = sorted((k, v) for k, v in options.items() if k not in skip)
    digest = hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()
    return digest[:16]


class JobAction(str, enum.Enum):
    """What to do at a job node."""

    FRESH = "fresh"  # a new job directory, continue_ = False
    CONTINUE = "continue"  # the same directory, continue_ = True (only new inputs)
    RESUME = "resume"  # the same directory, continue_ = True: a killed runner left it unfinished
    SKIP = "skip"  # that unfinished-looking visit had finished: do not run it again


@dataclass(frozen=True)
class JobPlan:
    """The decision for one job visit and why."""

    action: JobAction
    reason: str

    @property
    def continue_(self) -> bool:
        """The ``continue_`` flag the job function gets."""
        return self.action in (JobAction.CONTINUE, JobAction.RESUME)


def plan_job_visit(
    job: SchemeJob,
    fingerprint: str,
    *,
    dir_exists: bool,
    exit_status: str | None,
    detect_changes: bool = True,
) -> JobPlan:
    """Decide how a job node runs.

    Parameters
    ----------
    job
        The node's record in the scheme.
    fingerprint
        :func:`options_fingerprint` of the options it would run with now.
    dir_exists
        Whether its current job directory exists.
    exit_status
        ``"SUCCESS"``, ``"FAILURE"``, ``"ABORTED"`` (the ``RELION_JOB_EXIT_*`` file in that
        directory) or ``None``.
    detect_changes
        Start afresh when the options differ from those of its last run (RELION never does).

    Returns
    -------
    JobPlan
        RELION's rule (``new`` or unstarted -> fresh directory; started ``continue`` -> same
        directory), plus: a visit recorded as launched but never finished is resumed in its
        directory, or skipped if its directory says it succeeded; and (``detect_changes``) changed
        options start a fresh directory.
    """
    d = job.job_dir
    if not (job.has_started and d and dir_exists):
        why = "not started yet" if not job.has_started else f"its directory {d} is missing"
        return JobPlan(JobAction.FRESH, why if job.mode is JobMode.CONTINUE or not job.has_started else "mode new")
    same = (not detect_changes) or (not job.fingerprint) or job.fingerprint == fingerprint
    if job.visit is JobVisit.LAUNCHED and exit_status in (None, "SUCCESS"):
        if not same:
            return JobPlan(JobAction.FRESH, f"options changed since {d} was launched")
        if exit_status == "SUCCESS":
            return JobPlan(JobAction.SKIP, f"{d} finished before the runner stopped")
        return JobPlan(JobAction.RESUME, f"{d} was left unfinished by a stopped runner")
    if job.mode is JobMode.CONTINUE:
        if not same:
            return JobPlan(JobAction.FRESH, f"options changed since {d} last ran")
        return JobPlan(JobAction.CONTINUE, f"continues {d}")
    return JobPlan(JobAction.FRESH, "mode new")
