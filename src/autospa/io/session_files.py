"""Session metadata files written by ``autospa mdcatch`` (L3): every write is atomic.

- ``session.json``: the whole session state (reference metadata, derived values, movies, drift);
- ``session_params.txt``: MDCatch's ``<Software>_session_params`` layout: a ``Movies dir:`` line,
  a blank line, then ``key = value`` lines sorted by key;
- ``movies.star``: RELION's import output (``data_optics`` + ``data_movies``), through
  :func:`autospa.io.star.write_star`;
- the ``it`` pipeline configuration (YAML or JSON, by suffix);
- the project's ``Movies`` link to the session's movies folder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from autospa.errors import InputError
from autospa.io.atomic import write_text
from autospa.io.star import write_star

#: Columns of RELION's import optics table for movies (relion_import output).
OPTICS_COLUMNS = (
    "rlnOpticsGroupName",
    "rlnOpticsGroup",
    "rlnMtfFileName",
    "rlnMicrographOriginalPixelSize",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def write_session_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write the session state as indented JSON (keys in insertion order)."""
    path = Path(path)
    write_text(path, json.dumps(_jsonable(data), indent=2) + "\n")
    return path


def read_session_json(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`write_session_json`.

    Raises
    ------
    InputError
        Unreadable file or not a JSON object.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise InputError(path, "session file does not hold a JSON object")
    return data


def _kv_value(v: Any) -> str:
    if v is None:
        return "None"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list | tuple):
        return " ".join(_kv_value(x) for x in v)
    return str(v)


def format_key_values(items: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    """``header`` lines, a blank line when there is a header, then ``key = value`` sorted by key."""
    lines = list(header)
    if lines:
        lines.append("")
    for k in sorted(items):
        lines.append(f"{k} = {_kv_value(items[k])}")
    return "\n".join(lines) + "\n"


def write_key_values(path: str | Path, items: Mapping[str, Any], header: Sequence[str] = ()) -> Path:
    """Write :func:`format_key_values` text atomically."""
    path = Path(path)
    write_text(path, format_key_values(items, header))
    return path


def read_key_values(path: str | Path) -> dict[str, str]:
    """Read back ``key = value`` lines (other lines are skipped)."""
    out: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if " = " in line:
            k, v = line.split(" = ", 1)
            out[k.strip()] = v.strip()
    return out


def write_movies_star(path: str | Path, optics: Sequence[Mapping[str, Any]], movies: Sequence[Mapping[str, Any]]) -> Path:
    """Write RELION's movie import table.

    Parameters
    ----------
    path
        Destination (``movies.star``).
    optics
        One dict per optics group with the :data:`OPTICS_COLUMNS` labels (``rlnMtfFileName`` None
        or empty when there is no MTF; the column is left out when no group has one).
    movies
        One dict per movie with ``rlnMicrographMovieName`` and ``rlnOpticsGroup``.

    Returns
    -------
    Path
    """
    cols = list(OPTICS_COLUMNS)
    if all(not o.get("rlnMtfFileName") for o in optics):
        cols.remove("rlnMtfFileName")  # as relion_import: no column without an MTF
    opt = pd.DataFrame([{c: o[c] for c in cols} for o in optics], columns=cols)
    mov = pd.DataFrame(
        [{"rlnMicrographMovieName": m["rlnMicrographMovieName"], "rlnOpticsGroup": int(m["rlnOpticsGroup"])}
         for m in movies],
        columns=["rlnMicrographMovieName", "rlnOpticsGroup"],
    )
    return write_star(path, {"optics": opt, "movies": mov})


def write_pipeline_config(path: str | Path, options: Mapping[str, Any]) -> Path:
    """Write the ``it`` pipeline options: YAML for ``.yaml``/``.yml``, JSON for ``.json``."""
    path = Path(path)
    suffix = path.suffix.lower()
    data = _jsonable(dict(options))
    if suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=True, default_flow_style=False)
    elif suffix == ".json":
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    else:
        raise InputError(path, "pipeline configuration must be .yaml, .yml or .json")
    write_text(path, text)
    return path


def read_pipeline_config(path: str | Path) -> dict[str, Any]:
    """Read a mapping written by :func:`write_pipeline_config` (or by hand): YAML or JSON.

    Raises
    ------
    InputError
        Missing or unparsable file, or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError(path, f"cannot parse: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(path, "must hold a mapping of settings")
    return data


def link_movies(link: str | Path, target: str | Path) -> Path:
    """Make ``link`` a symbolic link to the folder ``target`` (a project's ``Movies``), atomically.

    An existing link (or folder) that already leads to ``target`` is kept.

    Raises
    ------
    InputError
        ``link`` exists and leads elsewhere, or the link cannot be made.
    """
    link, target = Path(link), Path(target).resolve()
    if link.exists() or link.is_symlink():
        if link.resolve() == target:
            return link
        raise InputError(link, f"exists and is not a link to the movies folder {target}")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(target, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError as exc:
        raise InputError(link, f"cannot link to the movies folder: {exc.strerror or exc}") from None
    return link


def open_log(path: str | Path):  # noqa: ANN201 - a binary file object
    """Open a log file for appending (a stream: not atomic), creating its folder.

    Used for the output of a launched pipeline process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")  # noqa: SIM115 - handed to a subprocess, closed by the caller
