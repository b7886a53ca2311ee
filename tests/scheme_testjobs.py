"""Small real job functions for the scheme runner tests (not mocks: they read their inputs, write
RELION-named outputs and their exit files through the job registry's helpers).

Every job appends one line to ``<project>/job_runs.log``: ``job_dir<TAB>continue<TAB>options``, so
tests can see what ran, where, and with which resolved options.

``TEST_JOBS`` maps type labels to functions for :func:`autospa.jobs.registry.temporary_jobs`.
Importing this module as a job module (``AUTOSPA_JOB_MODULES=scheme_testjobs``) registers the
``test.*`` types, so a runner in a subprocess can use them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from autospa.io.atomic import write_text
from autospa.io.star import read_star
from autospa.jobs.registry import (
    check_abort,
    fail,
    option_float,
    option_int,
    project_dir_of,
    register_job,
    resolve_path,
    succeed,
)
from autospa.scheme.star_format import StarBlock, format_star

LOG = "job_runs.log"
PARTICLES_PER_MIC = 100


def log_run(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    project = project_dir_of(job_dir)
    rel = str(Path(job_dir).resolve().relative_to(project)) + "/"
    with open(project / LOG, "a", encoding="utf-8") as fh:  # test bookkeeping, appended line by line
        fh.write(f"{rel}\t{int(continue_)}\t{json.dumps(options, sort_keys=True)}\n")


def read_runs(project: Path) -> list[tuple[str, bool, dict[str, str]]]:
    """The log: (job_dir, continue_, options) per run, in order."""
    path = Path(project) / LOG
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        d, c, o = line.split("\t")
        out.append((d, c == "1", json.loads(o)))
    return out


def write_table(path: Path, blocks: dict[str, tuple[list[str], list[list]]]) -> None:
    write_text(path, format_star([StarBlock(n, True, labels, rows) for n, (labels, rows) in blocks.items()]))


def _rows(path: Path, table: str) -> list[dict]:
    block = read_star(path)[table]
    return block.to_dict("records") if hasattr(block, "to_dict") else [block]


OPTICS = (["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographPixelSize"], [["opticsGroup1", 1, 1.0]])


# ------------------------------------------------------------------------------------------------
# generic test jobs
# ------------------------------------------------------------------------------------------------
def make_file(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Write ``options['out']`` in the job directory (holding ``options['text']``), after checking
    that ``options['in']`` (if given) exists; sleeps ``options['sleep']`` seconds first, checking
    for an abort; fails when ``options['fail']`` is Yes."""
    log_run(job_dir, options, continue_)
    end = time.monotonic() + float(options.get("sleep", "0") or 0)
    while time.monotonic() < end:
        check_abort(job_dir)
        time.sleep(0.05)
    if options.get("fail") == "Yes":
        fail(job_dir, "asked to fail")
        return
    if options.get("in"):
        src = resolve_path(job_dir, options["in"])
        if not src.exists():
            fail(job_dir, f"input {options['in']} does not exist")
            return
    write_text(Path(job_dir) / options.get("out", "out.txt"), options.get("text", "done") + "\n")
    succeed(job_dir)


def dask_sum(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Sum of squares 1..n computed as dask tasks on the run's default client; writes the result
    and the number of workers that answered."""
    from distributed import default_client

    log_run(job_dir, options, continue_)
    client = default_client()  # raises ValueError when the runner gave the job no cluster
    n = option_int(options, "n")
    total = sum(client.gather(client.map(lambda i: i * i, range(1, n + 1))))
    write_text(Path(job_dir) / "sum.txt", f"{total} {len(client.scheduler_info()['workers'])}\n")
    succeed(job_dir)


# ------------------------------------------------------------------------------------------------
# proc's job types, tiny versions
# ------------------------------------------------------------------------------------------------
def select_on_value(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    log_run(job_dir, options, continue_)
    label = options["select_label"]
    lo, hi = option_float(options, "select_minval"), option_float(options, "select_maxval")
    rows = [r for r in _rows(resolve_path(job_dir, options["fn_mic"]), "micrographs") if lo <= float(r[label]) <= hi]
    labels = ["rlnMicrographName", label]
    write_table(Path(job_dir) / "micrographs.star", {"optics": OPTICS, "micrographs": (labels, [[r[x] for x in labels] for r in rows])})
    succeed(job_dir)


def autopick(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    log_run(job_dir, options, continue_)
    if options["do_log"] != "Yes" or options["do_topaz"] != "No":
        fail(job_dir, f"expected LoG picking, got do_log={options['do_log']} do_topaz={options['do_topaz']}")
        return
    mics = [r["rlnMicrographName"] for r in _rows(resolve_path(job_dir, options["fn_input_autopick"]), "micrographs")]
    out = Path(job_dir) / "autopick.star"
    done = [r["rlnMicrographName"] for r in _rows(out, "coordinate_files")] if (continue_ and out.exists()) else []
    new = [m for m in mics if m not in done]
    names = done + new
    write_table(out, {"coordinate_files": (["rlnMicrographName", "rlnMicrographCoordinates"], [[m, f"{m}.pick"] for m in names])})
    write_text(Path(job_dir) / "picked_this_run.txt", "\n".join(new) + "\n")
    succeed(job_dir)


def extract(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    log_run(job_dir, options, continue_)
    coords = [r["rlnMicrographName"] for r in _rows(resolve_path(job_dir, options["coords_suffix"]), "coordinate_files")]
    out = Path(job_dir) / "particles.star"
    old = _rows(out, "particles") if (continue_ and out.exists()) else []
    done = {r["rlnMicrographName"] for r in old}
    rows = [[r["rlnImageName"], r["rlnMicrographName"]] for r in old]
    for m in coords:
        if m not in done:
            rows += [[f"{i:06d}@{m}.mrcs", m] for i in range(1, PARTICLES_PER_MIC + 1)]
    write_table(out, {"optics": OPTICS, "particles": (["rlnImageName", "rlnMicrographName"], rows)})
    succeed(job_dir)


def class2d(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    log_run(job_dir, options, continue_)
    n_iter = option_int(options, "nr_iter_grad")
    parts = _rows(resolve_path(job_dir, options["fn_img"]), "particles")
    rel = str(Path(job_dir).resolve().relative_to(project_dir_of(job_dir)))
    data = f"{rel}/run_it{n_iter:03d}_data.star"
    write_table(Path(job_dir) / f"run_it{n_iter:03d}_data.star",
                {"optics": OPTICS, "particles": (["rlnImageName", "rlnClassNumber"], [[p["rlnImageName"], 1] for p in parts])})
    write_table(Path(job_dir) / f"run_it{n_iter:03d}_optimiser.star",
                {"optimiser_general": (["rlnDataStarFile", "rlnNumberOfIterations"], [[data, n_iter]])})
    succeed(job_dir)


def select_ranked(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    log_run(job_dir, options, continue_)
    opt = resolve_path(job_dir, options["fn_model"])
    if not opt.exists():
        fail(job_dir, f"no optimiser file {options['fn_model']}")
        return
    data = _rows(opt, "optimiser_general")[0]["rlnDataStarFile"]
    parts = _rows(resolve_path(job_dir, data), "particles")
    write_table(Path(job_dir) / "particles.star", {"optics": OPTICS, "particles": (["rlnImageName"], [[p["rlnImageName"]] for p in parts])})
    succeed(job_dir)


def initial_model(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    log_run(job_dir, options, continue_)
    write_text(Path(job_dir) / "initial_model.mrc", f"model of {options['fn_img']}\n")
    succeed(job_dir)


def refine3d(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    log_run(job_dir, options, continue_)
    ref = resolve_path(job_dir, options["fn_ref"])
    if not ref.exists():
        fail(job_dir, f"reference {options['fn_ref']} does not exist")
        return
    write_text(Path(job_dir) / "run_class001.mrc", f"refined from {options['fn_ref']}\n")
    succeed(job_dir)


# ------------------------------------------------------------------------------------------------
# prep's job types, tiny versions
# ------------------------------------------------------------------------------------------------
def import_movies(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    log_run(job_dir, options, continue_)
    project = project_dir_of(job_dir)
    movies = sorted(str(p.relative_to(project)) for p in project.glob(options["fn_in_raw"]))
    optics = (["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage"],
              [[options["optics_group_name"], 1, float(options["angpix"]), float(options["kV"])]])
    write_table(Path(job_dir) / "movies.star",
                {"optics": optics, "movies": (["rlnMicrographMovieName", "rlnOpticsGroup"], [[m, 1] for m in movies])})
    succeed(job_dir)


def motioncorr(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Honours ``--do_at_most N`` in other_args (after $$ substitution) and processes only new movies."""
    log_run(job_dir, options, continue_)
    args = options.get("other_args", "").split()
    at_most = int(args[args.index("--do_at_most") + 1]) if "--do_at_most" in args else 10**9
    movies = [r["rlnMicrographMovieName"] for r in _rows(resolve_path(job_dir, options["input_star_mics"]), "movies")]
    out = Path(job_dir) / "corrected_micrographs.star"
    done = [r["rlnMicrographName"] for r in _rows(out, "micrographs")] if (continue_ and out.exists()) else []
    rel = str(Path(job_dir).resolve().relative_to(project_dir_of(job_dir)))
    todo = [m for m in movies if f"{rel}/{Path(m).with_suffix('.mrc')}" not in done][:at_most]
    names = done + [f"{rel}/{Path(m).with_suffix('.mrc')}" for m in todo]
    write_table(out, {"optics": OPTICS, "micrographs": (["rlnMicrographName", "rlnOpticsGroup"], [[n, 1] for n in names])})
    succeed(job_dir)


def ctffind(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Max resolution 4 A for every micrograph (a number taken from the name would do as well)."""
    log_run(job_dir, options, continue_)
    mics = [r["rlnMicrographName"] for r in _rows(resolve_path(job_dir, options["input_star_mics"]), "micrographs")]
    write_table(Path(job_dir) / "micrographs_ctf.star",
                {"optics": OPTICS, "micrographs": (["rlnMicrographName", "rlnCtfMaxResolution"], [[m, 4.0] for m in mics])})
    succeed(job_dir)


PREP_JOBS = {
    "relion.import.movies": import_movies,
    "relion.motioncorr.own": motioncorr,
    "relion.ctffind.ctffind4": ctffind,
}

PROC_JOBS = {
    "relion.select.onvalue": select_on_value,
    "relion.autopick.log": autopick,
    "relion.extract": extract,
    "relion.class2d": class2d,
    "relion.select.class2dauto": select_ranked,
    "relion.initialmodel": initial_model,
    "relion.refine3d": refine3d,
}

TEST_JOBS = {"test.make": make_file, "test.dask_sum": dask_sum}

for _label, _func in TEST_JOBS.items():
    # "sleep" only says how long the job takes: changing it does not make it a different job
    register_job(_label, replace=True, volatile_options=("sleep",))(_func)
