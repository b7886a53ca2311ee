"""Rewriting ``Schemes/NAME/<job>/file`` into the job's current directory (RELION's
``changeStringForJobnames``), shared by operators and job templates.

``Schemes/proc/extract/particles.star`` becomes ``Extract/job007/particles.star`` once the proc
scheme's ``extract`` node has run in ``Extract/job007/``; ``Schemes/prep/ctffind/...`` in the proc
scheme is looked up in the prep scheme's ``scheme.star`` (through ``other_scheme_jobs``).

Differences from RELION-4.0 (fixes):

- every ``Schemes/NAME/<node>/`` occurrence in a value is rewritten, not only the first;
- the node is the first path segment after ``Schemes/NAME/`` (RELION takes everything up to the
  *last* ``/``, which breaks on deeper paths);
- a node that has not run yet (or is not a job) leaves the text unchanged; RELION glues the node
  name to the file name (``extractparticles.star``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from autospa.scheme.model import UNDEFINED, Scheme

#: ``other_scheme_jobs(name)`` -> ``{job node: current job name}`` of scheme ``Schemes/name/``.
JobLookup = Callable[[str], Mapping[str, str]]

_SCHEME_PATH = re.compile(r"Schemes/([^/\s,]+)/([^/\s,]+)/")


def _job_dir(node: str, current: str) -> str | None:
    if not current or current in (node, UNDEFINED):
        return None
    return current if current.endswith("/") else current + "/"


def rewrite_scheme_paths(value: str, scheme: Scheme, other_scheme_jobs: JobLookup) -> str:
    """Replace every ``Schemes/NAME/<node>/`` in ``value`` by that job's current directory.

    Parameters
    ----------
    value
        An option value or a string variable's value.
    scheme
        The scheme the value belongs to (its own jobs are looked up here).
    other_scheme_jobs
        Looks up the jobs of another scheme by its short name; may raise
        :class:`autospa.scheme.model.SchemeError` if that scheme does not exist.

    Returns
    -------
    str
        The rewritten value.
    """
    if "Schemes/" not in value:
        return value
    own = scheme.short_name
    cache: dict[str, Mapping[str, str]] = {}

    def repl(m: re.Match[str]) -> str:
        name, node = m.group(1), m.group(2)
        if name == own:
            job = scheme.jobs.get(node)
            new = _job_dir(node, job.current_name) if job is not None else None
        else:
            if name not in cache:
                cache[name] = other_scheme_jobs(name)
            new = _job_dir(node, cache[name].get(node, ""))
        return new if new is not None else m.group(0)

    return _SCHEME_PATH.sub(repl, value)


def scheme_references(value: str) -> list[tuple[str, str]]:
    """Every ``(scheme, node)`` that ``value`` refers to through ``Schemes/NAME/<node>/``."""
    return [(m.group(1), m.group(2)) for m in _SCHEME_PATH.finditer(value)]
