"""Symmetry alignment of a map as a job (L5): ``autospa align-symmetry`` (relion_align_symmetry).

Reads a map, finds where the axes of a given point group lie (or ranks candidate groups with
``--sym auto``), writes the aligned (and symmetrised) map in RELION's standard orientation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from autospa.errors import InputError
from autospa.io.postprocess_files import read_volume, write_volume
from autospa.numerics.symmetry import point_group_order
from autospa.refinement.symmetry_align import (
    GroupScore,
    SymmetryAlignment,
    SymmetrySearchOptions,
    align_symmetry,
    apply_alignment,
    default_candidate_groups,
    rank_point_groups,
)

log = logging.getLogger(__name__)

__all__ = ["AlignSymmetryJob", "AlignSymmetryResult", "run_align_symmetry"]


@dataclass(frozen=True)
class AlignSymmetryJob:
    """What ``autospa align-symmetry`` asks for.

    Attributes
    ----------
    input, output
        Input map and output map (MRC).
    symmetry
        Point group (``D7``...) or ``auto``.
    candidates
        Groups ``auto`` considers (default :func:`default_candidate_groups`).
    apply_symmetry
        Symmetrise the aligned map (RELION's ``--apply_sym``).
    pixel_size_a
        Overrides the header (0: use the header).
    options
        Search parameters.
    """

    input: str
    output: str
    symmetry: str
    candidates: tuple[str, ...] | None = None
    apply_symmetry: bool = True
    pixel_size_a: float = 0.0
    options: SymmetrySearchOptions = field(default_factory=SymmetrySearchOptions)


@dataclass(frozen=True)
class AlignSymmetryResult:
    """The alignment written, and the ranking for ``auto`` (best first; empty otherwise)."""

    alignment: SymmetryAlignment
    ranking: list[GroupScore]
    output: str


def run_align_symmetry(job: AlignSymmetryJob) -> AlignSymmetryResult:
    """Align (and symmetrise) a map; with ``symmetry="auto"`` choose the group first.

    Raises
    ------
    InputError
        Unreadable map, unknown group name, no pixel size.
    """
    vol, px = read_volume(job.input)
    if job.pixel_size_a > 0:
        px = job.pixel_size_a
    if px <= 0:
        raise InputError(job.input, "the header holds no pixel size: give --angpix")
    sym = job.symmetry.strip()
    ranking: list[GroupScore] = []
    if sym.lower() == "auto":
        candidates = list(job.candidates) if job.candidates else default_candidate_groups()
        try:
            ranking = rank_point_groups(vol, candidates, job.options)
        except ValueError as exc:
            raise InputError(None, f"--sym_candidates: {exc}") from exc
        alignment = ranking[0].alignment
    else:
        try:
            point_group_order(sym)
        except ValueError as exc:
            raise InputError(None, f"--sym {sym}: {exc}") from exc
        alignment = align_symmetry(vol, sym, job.options)
    out = apply_alignment(vol, alignment, apply_symmetry=job.apply_symmetry, pad=job.options.pad)
    write_volume(job.output, out, px)
    log.info("align-symmetry: %s, agreement %.3f -> %s", alignment.group, alignment.agreement, job.output)
    return AlignSymmetryResult(alignment=alignment, ranking=ranking, output=job.output)
