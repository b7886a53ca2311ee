"""Runs one job function in its directory and turns what happened into a RELION exit status.

The job function (from :mod:`autospa.jobs.registry`) should write ``RELION_JOB_EXIT_SUCCESS`` or
``..._FAILURE`` itself. When it raises, this module writes FAILURE (or ABORTED for
:class:`~autospa.jobs.registry.JobAborted`) with the message, and the traceback into ``run.err``;
when it returns without writing any exit file, that is a FAILURE too. A job type with no
implementation fails the same way, with a message saying so.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from autospa.errors import AutospaError
from autospa.io.scheme_files import exit_message, read_exit_status, write_exit_status, write_job_note
from autospa.jobs.registry import JobAborted, get_job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    """How a job run ended: ``status`` is ``SUCCESS``, ``FAILURE`` or ``ABORTED``."""

    status: str
    message: str = ""


def execute_job(type_label: str, job_dir: Path, options: Mapping[str, str], continue_: bool) -> JobOutcome:
    """Run the job function registered for ``type_label`` in ``job_dir`` and read its exit file.

    Parameters
    ----------
    type_label
        Full job type (``relion.ctffind.ctffind4``).
    job_dir
        Absolute job directory (exists, holds job.star, no exit file yet).
    options
        Resolved options.
    continue_
        Continue in the old directory (only new inputs / from the last checkpoint).
    """
    try:
        spec = get_job(type_label)
        log.info("running %s (%s%s)", job_dir, type_label, ", continue" if continue_ else "")
        spec.func(Path(job_dir), dict(options), continue_)
    except JobAborted as exc:
        write_exit_status(job_dir, "ABORTED", _one_line(exc))
    except AutospaError as exc:
        write_exit_status(job_dir, "FAILURE", _one_line(exc))
    except Exception as exc:  # a job's bug must stop the scheme cleanly, with the traceback kept
        write_job_note(job_dir, "run.err", traceback.format_exc())
        write_exit_status(job_dir, "FAILURE", f"{type(exc).__name__}: {_one_line(exc)} (traceback in run.err)")
    status = read_exit_status(job_dir)
    if status is None:
        msg = f"the {type_label} job returned without writing RELION_JOB_EXIT_SUCCESS or _FAILURE"
        write_exit_status(job_dir, "FAILURE", msg)
        return JobOutcome("FAILURE", msg)
    return JobOutcome(status, exit_message(job_dir))


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (the exit file and the scheme's message hold one line)."""
    return " ".join(str(exc).split())
