"""STAR files through ``starfile``: RELION 3.1+ layout, exact round trips, RELION's version line.

``read_star`` returns every data block of a file, loops as :class:`pandas.DataFrame` and single-row
blocks as ``dict``; ``write_star`` writes them back atomically, with ``# version 30001`` before each
block (RELION's pipeline and scheme readers check it; ``starfile`` does not write it).

Exactness: floats are written with Python's shortest round-trip representation (not starfile's
default ``%.6f``), integers as integers, and labels that RELION declares as strings are never
turned into numbers (``"00012"`` stays ``"00012"``), so read -> write -> read gives identical
values. Labels this module does not know are kept as they are.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from autospa.errors import InputError
from autospa.io.atomic import write_text

log = logging.getLogger(__name__)

#: One STAR data block: a loop (DataFrame) or a single-row block (dict label -> value).
StarBlock = pd.DataFrame | dict

#: RELION's version tag (RELION 3.1 / 4.0).
RELION_VERSION_LINE = "# version 30001"

#: Labels RELION stores as strings (src/metadata_label.h, EMDL_STRING); read without numeric
#: conversion so that names such as ``"00012"`` survive a round trip.
STRING_LABELS: frozenset[str] = frozenset(
    {
        "rlnImageName",
        "rlnImageOriginalName",
        "rlnReconstructImageName",
        "rlnMicrographName",
        "rlnMicrographNameNoDW",
        "rlnMicrographMovieName",
        "rlnMicrographMetadata",
        "rlnMicrographGainName",
        "rlnMicrographDefectFile",
        "rlnMicrographOriginalName",
        "rlnMtfFileName",
        "rlnOpticsGroupName",
        "rlnGroupName",
        "rlnCtfImage",
        "rlnCtfPowerSpectrum",
        "rlnCtfValuesFile",
        "rlnReferenceImage",
        "rlnMaskName",
        "rlnSolventMaskName",
        "rlnSolventMask2Name",
        "rlnCoordinateFile",
        "rlnClassReferenceImage",  # not RELION's, harmless
        "rlnTomoName",
        "rlnTomoParticleName",
        "rlnPipeLineJobName",
        "rlnPipeLineNodeName",
        "rlnPipeLineProcessName",
        "rlnPipeLineProcessAlias",
        "rlnPipeLineEdgeFromNode",
        "rlnPipeLineEdgeProcess",
        "rlnPipeLineEdgeToNode",
        "rlnJobTypeLabel",
        "rlnJobOptionVariable",
        "rlnJobOptionValue",
        "rlnSchemeName",
        "rlnSchemeCurrentNodeName",
        "rlnSchemeOriginalStartNode",
        "rlnSchemeEmailAddress",
        "rlnSchemeFloatVariableName",
        "rlnSchemeBooleanVariableName",
        "rlnSchemeStringVariableName",
        "rlnSchemeStringVariableValue",
        "rlnSchemeStringVariableResetValue",
        "rlnSchemeOperatorName",
        "rlnSchemeOperatorType",
        "rlnSchemeOperatorOutput",
        "rlnSchemeOperatorInput1",
        "rlnSchemeOperatorInput2",
        "rlnSchemeJobName",
        "rlnSchemeJobNameOriginal",
        "rlnSchemeJobMode",
        "rlnSchemeEdgeInputNodeName",
        "rlnSchemeEdgeOutputNodeName",
        "rlnSchemeEdgeOutputNodeNameIfTrue",
        "rlnSchemeEdgeBooleanVariable",
    }
)


def is_string_label(label: str) -> bool:
    """Whether a STAR label holds strings (RELION's string labels, and any ``...Name``/``...File``)."""
    return label in STRING_LABELS or label.endswith(("Name", "File", "FileName"))


def read_star(path: str | Path) -> dict[str, StarBlock]:
    """Read every data block of a STAR file.

    Parameters
    ----------
    path
        The STAR file.

    Returns
    -------
    dict
        Block name (without ``data_``; ``""`` for a bare ``data_``) -> DataFrame (loops) or dict
        (single-row blocks), in file order. String labels (:func:`is_string_label`) are strings;
        other columns are int64, float64 or strings as ``starfile`` infers them.

    Raises
    ------
    InputError
        Missing, empty, binary or unparsable file, no ``data_`` block, or a loop row with fewer
        values than the loop has labels (a truncated line).
    """
    path = Path(path)
    text = _read_text(path)
    labels = _labels_in(text)
    string_labels = sorted(lab for lab in labels if is_string_label(lab))
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=string_labels)
    except pd.errors.EmptyDataError:
        # starfile cannot parse an empty loop followed by a comment line (our own version lines);
        # parse the same text with the comment lines removed.
        blocks = _read_without_comments(path, text, string_labels)
    except InputError:
        raise
    except Exception as exc:  # starfile/pandas raise many types for malformed text
        raise InputError(path, f"cannot parse STAR file: {_one_line(exc)}") from exc
    if not blocks:
        raise InputError(path, "not a STAR file (no data_ block)")
    out: dict[str, StarBlock] = {}
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            _check_complete_rows(path, name, block)
            block = block.reset_index(drop=True)
            for col in block.columns:
                if is_string_label(col) and len(block) and not _is_string_column(block[col]):
                    block[col] = block[col].astype(str)
        elif block is None:
            block = {}
        out[name] = block
    return out


def write_star(
    path: str | Path,
    blocks: Mapping[str, StarBlock],
    version_line: bool = True,
) -> Path:
    """Write data blocks to a STAR file atomically.

    Parameters
    ----------
    path
        Destination (replaced only once the new file is complete).
    blocks
        Block name (without ``data_``) -> DataFrame (written as a loop) or dict (single-row block).
    version_line
        Write RELION's ``# version 30001`` line before each block.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    write_text(path, star_to_string(blocks, version_line=version_line))
    return path


def star_to_string(blocks: Mapping[str, StarBlock], version_line: bool = True) -> str:
    """The text :func:`write_star` writes."""
    parts: list[str] = []
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            block = _prepare_frame(block)
        elif isinstance(block, Mapping):
            block = {k: _py_scalar(v) for k, v in block.items()}
        else:
            raise TypeError(f"STAR block {name!r} must be a DataFrame or a dict, not {type(block).__name__}")
        text = starfile.to_string({name: block}, float_format=None)
        text = text[text.index("data_") :]  # drop starfile's "# Created by" header
        sep = "\n" if parts else ""
        parts.append(f"{sep}{RELION_VERSION_LINE}\n\n" if version_line else sep)
        parts.append(text)
    return "".join(parts)


# ------------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not a STAR file")
    raw = path.read_bytes()
    if not raw.strip():
        raise InputError(path, "empty file")
    if b"\x00" in raw[:65536]:
        raise InputError(path, "not a STAR file (binary content)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not a STAR file (not UTF-8 text at byte {exc.start})") from exc
    if not any(line.lstrip().startswith("data_") for line in text.splitlines()):
        raise InputError(path, "not a STAR file (no data_ block)")
    return text


def _labels_in(text: str) -> set[str]:
    out = set()
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("_") and len(s) > 1:
            out.add(s.split()[0][1:])
    return out


def _read_without_comments(path: Path, text: str, string_labels: list[str]) -> dict:
    cleaned = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")) + "\n"
    fd, tmp = tempfile.mkstemp(suffix=".star")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(cleaned)
        try:
            return starfile.read(tmp, always_dict=True, parse_as_string=string_labels)
        except Exception as exc:
            raise InputError(path, f"cannot parse STAR file: {_one_line(exc)}") from exc
    finally:
        os.unlink(tmp)


def _check_complete_rows(path: Path, name: str, df: pd.DataFrame) -> None:
    """A row whose last values are missing came from a line with too few fields."""
    if df.empty or df.shape[1] < 2:
        return
    missing = df.isna().to_numpy()
    if not missing.any():
        return
    rows = np.flatnonzero(missing.any(axis=1))
    for r in rows:
        m = missing[r]
        first = int(np.argmax(m))
        if m[first:].all():  # a suffix of the labels is missing: the line was short
            raise InputError(
                path,
                f"data_{name} row {r + 1} has {first} values for {df.shape[1]} labels "
                f"(truncated or malformed line; first missing label {df.columns[first]})",
            )


def _is_string_column(col: pd.Series) -> bool:
    return pd.api.types.is_string_dtype(col.dtype) or col.dtype == object


def _prepare_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Columns starfile writes exactly: numpy numbers, Python strings, no bools."""
    out = {}
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_bool_dtype(s.dtype):
            s = s.astype(np.int64)
        elif pd.api.types.is_float_dtype(s.dtype):
            s = s.astype(np.float64)
        elif pd.api.types.is_integer_dtype(s.dtype):
            s = s.astype(np.int64)
        out[str(col)] = s.reset_index(drop=True)
    return pd.DataFrame(out)


def _py_scalar(v):
    if isinstance(v, np.generic):
        return v.item()
    return v


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


__all__ = [
    "RELION_VERSION_LINE",
    "STRING_LABELS",
    "StarBlock",
    "is_string_label",
    "read_star",
    "star_to_string",
    "write_star",
]
