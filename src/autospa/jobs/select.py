"""Job relion.select.onvalue: keep the micrographs (or particles) whose label lies in a range (L5).

The proc scheme's ``select_mics`` uses it to keep micrographs whose CTF fit reaches
``rlnCtfMaxResolution <= 6`` Angstrom (RELION: ``select_label rlnCtfMaxResolution``,
``select_minval -9999``, ``select_maxval 6``). Output, as RELION writes it: ``DIR/micrographs.star``
(from a micrographs STAR file, ``fn_mic``) or ``DIR/particles.star`` (from a particles STAR file,
``fn_data``), with the input's data_optics and the selected rows in their original order.
RELION keeps rows with ``minval <= value <= maxval``.

Selection is recomputed over the whole input every time (RELION's Select ignores ``continue``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from autospa.errors import InputError
from autospa.io.star import read_star, write_star
from autospa.jobs.preprocess_common import resolve
from autospa.jobs.registry import option_float, project_dir_of, register_job, resolve_path, succeed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectValueParams:
    """Options of the selection job (RELION's job.star names in brackets).

    Attributes
    ----------
    input_star
        micrographs STAR [fn_mic] or particles STAR [fn_data].
    output_dir
        Job directory.
    label
        The label compared [select_label], default rlnCtfMaxResolution.
    minval, maxval
        Inclusive range [select_minval, select_maxval].
    """

    input_star: str
    output_dir: str
    label: str = "rlnCtfMaxResolution"
    minval: float = -9999.0
    maxval: float = 6.0


def select_on_value(rows: pd.DataFrame, label: str, minval: float, maxval: float) -> np.ndarray:
    """Boolean mask of the rows with ``minval <= rows[label] <= maxval``.

    Raises
    ------
    KeyError
        ``label`` is not a column.
    """
    values = pd.to_numeric(rows[label], errors="coerce").to_numpy(np.float64)
    return (values >= minval) & (values <= maxval)


def run_select_on_value(params: SelectValueParams, project_dir: str | Path | None = None) -> Path:
    """Write the selected rows of ``params.input_star``; returns the output STAR file.

    Raises
    ------
    InputError
        No data_micrographs / data_particles block, or the label is missing.
    """
    project = Path(project_dir or Path.cwd()).resolve()
    in_star = resolve(params.input_star, project)
    out_dir = resolve(params.output_dir, project)
    blocks = read_star(in_star)
    block = next((b for b in ("micrographs", "particles") if isinstance(blocks.get(b), pd.DataFrame)), None)
    if block is None:
        raise InputError(in_star, "no data_micrographs or data_particles loop to select from")
    rows = blocks[block]
    if params.label not in rows.columns:
        raise InputError(in_star, f"data_{block} has no {params.label} column")
    keep = select_on_value(rows, params.label, params.minval, params.maxval)
    out = {name: blk for name, blk in blocks.items() if name != block}
    out[block] = rows[keep].reset_index(drop=True)
    out_star = out_dir / f"{block}.star"
    write_star(out_star, out)
    log.info("select: %d of %d %s with %g <= %s <= %g", int(keep.sum()), len(rows), block, params.minval, params.label, params.maxval)
    return out_star


def params_from_options(job_dir: Path, options: dict[str, str]) -> SelectValueParams:
    """SelectValueParams from RELION's job.star option names."""
    src = str(options.get("fn_mic", "")).strip().strip('"') or str(options.get("fn_data", "")).strip().strip('"')
    if not src:
        raise InputError(job_dir, "relion.select.onvalue needs fn_mic or fn_data")
    return SelectValueParams(
        input_star=str(resolve_path(job_dir, src)),
        output_dir=str(job_dir),
        label=str(options.get("select_label", "rlnCtfMaxResolution")).strip() or "rlnCtfMaxResolution",
        minval=option_float(options, "select_minval", -9999.0),
        maxval=option_float(options, "select_maxval", 9999.0),
    )


@register_job("relion.select.onvalue")
def job_select_onvalue(job_dir: Path, options: dict[str, str], continue_: bool) -> None:
    """Registry entry: select on a value (``continue_`` makes no difference, as in RELION)."""
    run_select_on_value(params_from_options(job_dir, options), project_dir_of(job_dir))
    succeed(job_dir)


__all__ = ["SelectValueParams", "params_from_options", "run_select_on_value", "select_on_value"]

# The class-ranker variant of relion.select (relion.select.class2dauto) is registered by its own
# module; importing it here makes the lazy "select" family lookup find it.
from autospa.jobs import rank as _rank  # noqa: E402,F401
