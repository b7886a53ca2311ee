"""The job-type registry: RELION job type label -> the Python function that runs such a job.

A job module registers its function with a decorator::

    from autospa.jobs.registry import register_job, succeed

    @register_job("relion.ctffind.ctffind4")
    def run_ctffind(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
        ...                      # read options, write outputs into job_dir
        succeed(job_dir)         # writes RELION_JOB_EXIT_SUCCESS

The contract of a job function ``run_job(job_dir, options, continue_)``:

- ``job_dir`` is the absolute job directory (``<project>/CtfFind/job003/``), already created and
  holding the job's ``job.star``; paths in ``options`` are relative to the project directory
  (``job_dir.parent.parent``, see :func:`project_dir_of` / :func:`resolve_path`), as in RELION;
- ``options`` are the job.star option values after ``$$`` substitution and job-name rewriting
  (strings; booleans are ``Yes``/``No``: use :func:`option_bool`, :func:`option_float`...);
- ``continue_`` is True when the job runs again in its old directory: it must then process only
  inputs it has not processed yet (RELION's ``--only_do_unfinished``), or resume from its last
  checkpoint;
- it writes ``RELION_JOB_EXIT_SUCCESS`` (:func:`succeed`) or ``RELION_JOB_EXIT_FAILURE``
  (:func:`fail`) before returning; raising instead is also fine (the executor writes FAILURE with
  the message); it should call :func:`check_abort` between units of work, which raises
  :class:`JobAborted` when the user asked for an abort (the executor then writes
  ``RELION_JOB_EXIT_ABORTED``);
- its heavy work goes through :mod:`autospa.distributed` (the runner may have connected a dask
  client for it).

Importing this module is cheap: job modules are imported only when their type is first needed.
A type is looked up in the registry, then in :data:`LAZY_JOB_MODULES` (job type family ->
module, e.g. ``relion.ctffind.*`` -> ``autospa.jobs.ctffind``), then in the modules named by the
environment variable ``AUTOSPA_JOB_MODULES`` (comma-separated; a way to add site-specific jobs
without a shell command). A type nobody implements makes the job fail with a clear message.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from autospa.errors import AutospaError
from autospa.io.scheme_files import abort_requested, write_exit_status
from autospa.scheme.pipeline import process_directory

log = logging.getLogger(__name__)

#: ``run_job(job_dir, options, continue_) -> None``.
JobFunction = Callable[[Path, dict[str, str], bool], None]

#: Job type family (``relion.<family>...``) -> module that registers its implementations.
LAZY_JOB_MODULES: dict[str, str] = {
    "import": "autospa.jobs.importmovies",
    "motioncorr": "autospa.jobs.motioncorr",
    "ctffind": "autospa.jobs.ctffind",
    "autopick": "autospa.jobs.autopick",
    "extract": "autospa.jobs.extract",
    "select": "autospa.jobs.select",
    "class2d": "autospa.jobs.class2d",
    "initialmodel": "autospa.jobs.initialmodel",
    "refine3d": "autospa.jobs.refine3d",
    "postprocess": "autospa.jobs.postprocess",
}

#: Options that say how a job runs, not what it computes; they are left out of the fingerprint
#: that decides whether a job's parameters changed.
RESOURCE_OPTIONS: frozenset[str] = frozenset(
    {
        "nr_mpi",
        "nr_threads",
        "nr_pool",
        "gpu_ids",
        "use_gpu",
        "do_queue",
        "queuename",
        "qsub",
        "qsubscript",
        "qsub_extra1",
        "qsub_extra2",
        "qsub_extra3",
        "qsub_extra4",
        "min_dedicated",
        "scratch_dir",
        "do_parallel_discio",
        "do_preread_images",
        "do_combine_thru_disc",
    }
)

#: Output files recorded as pipeline nodes after a job succeeds, per job type family (glob
#: patterns relative to the job directory; for ``run_it*`` the last iteration is taken).
DEFAULT_OUTPUTS: dict[str, tuple[str, ...]] = {
    "import": ("movies.star", "micrographs.star"),
    "motioncorr": ("corrected_micrographs.star", "logfile.pdf"),
    "ctffind": ("micrographs_ctf.star", "logfile.pdf"),
    "autopick": ("autopick.star", "logfile.pdf"),
    "extract": ("particles.star",),
    "select": ("micrographs.star", "particles.star", "class_averages.star", "rank_optimiser.star"),
    "class2d": ("run_it*_data.star", "run_it*_optimiser.star"),
    "initialmodel": ("initial_model.mrc", "run_it*_data.star", "run_it*_optimiser.star"),
    "refine3d": ("run_data.star", "run_class001.mrc", "run_half1_class001_unfil.mrc", "run_optimiser.star"),
}


class JobNotImplemented(AutospaError):
    """No function is registered for a job type."""


class JobAborted(AutospaError):
    """Raised inside a job function when ``RELION_JOB_ABORT_NOW`` appeared in its directory."""


@dataclass(frozen=True)
class JobSpec:
    """A registered job type.

    Attributes
    ----------
    type_label
        RELION's full label (``relion.motioncorr.own``).
    func
        The job function.
    directory
        The job directory name (``MotionCorr``), RELION's by default.
    outputs
        Output file patterns recorded as pipeline nodes.
    volatile_options
        Options (beyond :data:`RESOURCE_OPTIONS`) that do not change results.
    """

    type_label: str
    func: JobFunction
    directory: str
    outputs: tuple[str, ...]
    volatile_options: frozenset[str]


_REGISTRY: dict[str, JobSpec] = {}
_IMPORTED: set[str] = set()


def _family(type_label: str) -> str:
    parts = type_label.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "relion" else ""


def register_job(
    type_label: str,
    *,
    directory: str | None = None,
    outputs: Iterable[str] | None = None,
    volatile_options: Iterable[str] = (),
    replace: bool = False,
) -> Callable[[JobFunction], JobFunction]:
    """Decorator registering a job function for ``type_label``.

    Parameters
    ----------
    type_label
        RELION's full job type label (``relion.import.movies``, ``relion.ctffind.ctffind4``...).
    directory
        Job directory name; RELION's for the type by default (``External`` for unknown types).
    outputs
        Output file patterns for the pipeline; :data:`DEFAULT_OUTPUTS` of the family by default.
    volatile_options
        Options that do not change the job's results (added to :data:`RESOURCE_OPTIONS`).
    replace
        Allow replacing an existing registration (otherwise a second registration raises).
    """

    def deco(func: JobFunction) -> JobFunction:
        existing = _REGISTRY.get(type_label)
        if existing is not None and existing.func is not func and not replace:
            raise ValueError(f"job type {type_label!r} is already registered ({existing.func.__module__})")
        _REGISTRY[type_label] = JobSpec(
            type_label=type_label,
            func=func,
            directory=directory or process_directory(type_label),
            outputs=tuple(outputs) if outputs is not None else DEFAULT_OUTPUTS.get(_family(type_label), ()),
            volatile_options=frozenset(volatile_options),
        )
        return func

    return deco


@contextlib.contextmanager
def temporary_jobs(jobs: Mapping[str, JobFunction], **kwargs: object) -> Iterator[None]:
    """Register ``jobs`` (type label -> function) for the duration of a block, then restore what
    was registered before (test jobs, one-off pipelines). ``kwargs`` go to :func:`register_job`."""
    saved = {label: _REGISTRY.get(label) for label in jobs}
    try:
        for label, func in jobs.items():
            register_job(label, replace=True, **kwargs)(func)  # type: ignore[arg-type]
        yield
    finally:
        for label, spec in saved.items():
            if spec is None:
                _REGISTRY.pop(label, None)
            else:
                _REGISTRY[label] = spec


def unregister_job(type_label: str) -> None:
    """Remove a registration (for tests and plugins that replace a job)."""
    _REGISTRY.pop(type_label, None)


def registered_job_types() -> list[str]:
    """Labels registered so far (without importing lazy modules)."""
    return sorted(_REGISTRY)


def _import(module: str) -> None:
    if module in _IMPORTED:
        return
    _IMPORTED.add(module)
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            log.debug("job module %s does not exist", module)
            return
        raise


def get_job(type_label: str) -> JobSpec:
    """The registration of ``type_label``, importing its module if needed.

    Raises
    ------
    JobNotImplemented
        No module registers it.
    """
    if type_label in _REGISTRY:
        return _REGISTRY[type_label]
    family = _family(type_label)
    if family in LAZY_JOB_MODULES:
        _import(LAZY_JOB_MODULES[family])
    if type_label not in _REGISTRY:
        for module in filter(None, (m.strip() for m in os.environ.get("AUTOSPA_JOB_MODULES", "").split(","))):
            _import(module)
    if type_label not in _REGISTRY:
        # A sub-type nobody registers runs on its parent's implementation, if there is one:
        # relion.autopick.topaz.pick -> relion.autopick.topaz -> relion.autopick.
        parts = type_label.split(".")
        for n in range(len(parts) - 1, 1, -1):
            parent = ".".join(parts[:n])
            if parent in _REGISTRY:
                return _REGISTRY[parent]
        raise JobNotImplemented(
            f"no implementation of job type {type_label!r} is registered "
            f"(looked in {LAZY_JOB_MODULES.get(family, 'no module for this family')}"
            f"{' and AUTOSPA_JOB_MODULES' if os.environ.get('AUTOSPA_JOB_MODULES') else ''})"
        )
    return _REGISTRY[type_label]


def job_directory_name(type_label: str) -> str:
    """The directory name jobs of this type get (registered one, else RELION's)."""
    spec = _find(type_label)
    return spec.directory if spec is not None else process_directory(type_label)


def fingerprint_ignores(type_label: str) -> frozenset[str]:
    """Options left out of the parameter-change fingerprint for this type."""
    spec = _find(type_label)
    return RESOURCE_OPTIONS | (spec.volatile_options if spec is not None else frozenset())


def _find(type_label: str) -> JobSpec | None:
    """The registration (importing its module if needed), or ``None`` when nobody implements it."""
    try:
        return get_job(type_label)
    except JobNotImplemented:
        return None


# ------------------------------------------------------------------------------------------------
# RELION's job sub-types
# ------------------------------------------------------------------------------------------------
def _yes(options: Mapping[str, str], key: str) -> bool:
    return str(options.get(key, "No")).strip().lower() in ("yes", "true", "1")


def resolve_job_type(label: str, options: Mapping[str, str]) -> str:
    """RELION-4.0's full job type from a template's label and its (resolved) options.

    Templates written by RELION's GUI carry the family only (``relion.autopick``); the pipeliner
    picks the sub-type from the options (``do_log`` -> ``relion.autopick.log``). Labels that are
    already complete (or not RELION's) are returned unchanged.
    """
    if label in _REGISTRY:
        return label
    parts = label.split(".")
    if len(parts) != 2 or parts[0] != "relion":
        return label
    family = parts[1]
    if family == "import":
        return "relion.import.movies" if _yes(options, "do_raw") else "relion.import.other"
    if family == "motioncorr":
        return "relion.motioncorr.own" if _yes(options, "do_own_motioncor") else "relion.motioncorr.motioncor2"
    if family == "ctffind":
        return "relion.ctffind.gctf" if _yes(options, "use_gctf") else "relion.ctffind.ctffind4"
    if family == "autopick":
        if _yes(options, "do_log"):
            return "relion.autopick.log"
        if _yes(options, "do_topaz"):
            return "relion.autopick.topaz.train" if _yes(options, "do_topaz_train") else "relion.autopick.topaz.pick"
        return "relion.autopick.ref3d" if _yes(options, "do_ref3d") else "relion.autopick.ref2d"
    if family == "select":
        if _yes(options, "do_class_ranker"):
            return "relion.select.class2dauto"
        if _yes(options, "do_select_values") or _yes(options, "do_discard"):
            return "relion.select.onvalue"
        if _yes(options, "do_split"):
            return "relion.select.split"
        if _yes(options, "do_remove_duplicates"):
            return "relion.select.removeduplicates"
        return "relion.select.interactive"
    if family == "extract":
        return "relion.extract.reextract" if _yes(options, "do_reextract") else "relion.extract"
    return label


# ------------------------------------------------------------------------------------------------
# helpers for job functions
# ------------------------------------------------------------------------------------------------
def project_dir_of(job_dir: str | Path) -> Path:
    """The project directory of a job directory (``<project>/Type/jobNNN/`` -> ``<project>``)."""
    return Path(job_dir).resolve().parent.parent


def resolve_path(job_dir: str | Path, value: str) -> Path:
    """An option value naming a file, as an absolute path (relative values are relative to the
    project directory, as in RELION)."""
    p = Path(value)
    return p if p.is_absolute() else project_dir_of(job_dir) / p


def option_bool(options: Mapping[str, str], key: str, default: bool = False) -> bool:
    """A ``Yes``/``No`` option."""
    if key not in options:
        return default
    v = str(options[key]).strip().lower()
    if v in ("yes", "true", "1"):
        return True
    if v in ("no", "false", "0", ""):
        return False
    raise AutospaError(f"option {key} = {options[key]!r} is not Yes or No")


def job_device(options: Mapping[str, str]) -> str:
    """The E-step device of a refinement job: ``"auto"`` (each worker's GPU where it has CUDA,
    else its CPU) when the job says ``use_gpu Yes``, ``"cpu"`` otherwise. Which GPUs exist is the
    cluster's business (``--gpu`` workers), not the job's: ``gpu_ids`` is not read here."""
    return "auto" if option_bool(options, "use_gpu", False) else "cpu"


def option_float(options: Mapping[str, str], key: str, default: float | None = None) -> float:
    """A numeric option."""
    if key not in options or str(options[key]).strip() == "":
        if default is None:
            raise AutospaError(f"option {key} is missing")
        return default
    try:
        return float(options[key])
    except ValueError:
        raise AutospaError(f"option {key} = {options[key]!r} is not a number") from None


def option_int(options: Mapping[str, str], key: str, default: int | None = None) -> int:
    """An integer option (``"200"`` or ``"200.0"``)."""
    x = option_float(options, key, None if default is None else float(default))
    if x != int(x):
        raise AutospaError(f"option {key} = {options[key]!r} is not an integer")
    return int(x)


def check_abort(job_dir: str | Path) -> None:
    """Raise :class:`JobAborted` if the user asked to abort this job (``RELION_JOB_ABORT_NOW``)."""
    if abort_requested(job_dir):
        raise JobAborted(f"{job_dir}: aborted by the user")


def succeed(job_dir: str | Path) -> None:
    """Write ``RELION_JOB_EXIT_SUCCESS``."""
    write_exit_status(job_dir, "SUCCESS")


def fail(job_dir: str | Path, message: str) -> None:
    """Write ``RELION_JOB_EXIT_FAILURE`` holding ``message``."""
    write_exit_status(job_dir, "FAILURE", message)
