"""RELION's STAR text layout for scheme, job and pipeline files: parse and write, no file access.

RELION's ``MetaDataTable::write`` lays a block out as follows (measured on RELION-4.0's shipped
``Schemes/*/scheme.star`` and ``job.star`` files):

- every block starts with an empty line, ``# version 30001``, an empty line, ``data_NAME`` and an
  empty line;
- a *list* block (one row) writes one ``_label value`` line per label, the label left-aligned in a
  field 12 characters wider than the longest label, and ends with a line holding one space;
- a *loop* block writes ``loop_ `` and ``_label #i `` lines, then one line per row in which every
  value is followed by one space: strings right-aligned in 10 characters, integers and booleans
  (``0``/``1``) in 12, doubles ``%12.6f`` (``%12.6e`` when ``0 < |x| < 0.001`` or ``|x| > 100000``);
  it ends with a line holding one space;
- an empty string is written ``""``; a string holding white space is written in double quotes.

Reading accepts any white space, ``#`` comment lines, double-quoted values and blocks in any
order. Values come back as strings; the models in :mod:`autospa.scheme.model` type them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from autospa.errors import InputError

#: The version line RELION-4.0 writes before every block (and checks when reading pipelines).
VERSION_LINE = "# version 30001"

#: A value as written: strings, integers, floats or booleans (booleans are written 0/1).
StarValue = str | int | float | bool

_TOKEN = re.compile(r'"([^"]*)"|(\S+)')


@dataclass
class StarBlock:
    """One ``data_`` block.

    Attributes
    ----------
    name
        The block name without ``data_`` (``"scheme_general"``).
    loop
        ``True`` for a ``loop_`` table, ``False`` for a list of ``_label value`` pairs.
    labels
        Column labels without the leading underscore (``"rlnSchemeName"``).
    rows
        The rows; a list block has exactly one.
    """

    name: str
    loop: bool
    labels: list[str] = field(default_factory=list)
    rows: list[list[StarValue]] = field(default_factory=list)

    def column(self, label: str) -> list[StarValue]:
        """The values of one label, one per row (``[]`` if the block has no such label)."""
        if label not in self.labels:
            return []
        i = self.labels.index(label)
        return [row[i] for row in self.rows]

    def records(self) -> list[dict[str, StarValue]]:
        """The rows as ``{label: value}`` dictionaries."""
        return [dict(zip(self.labels, row, strict=True)) for row in self.rows]


def _tokens(line: str) -> list[str]:
    return [m.group(1) if m.group(1) is not None else m.group(2) for m in _TOKEN.finditer(line)]


def parse_star_text(text: str, source: str | None = None) -> dict[str, StarBlock]:
    """Parse STAR text into its blocks.

    Parameters
    ----------
    text
        The file's content.
    source
        The file name used in error messages.

    Returns
    -------
    dict
        Block name -> :class:`StarBlock`, in file order. Values are strings (``""`` for ``""``).

    Raises
    ------
    InputError
        A label or value outside a block, a loop row with the wrong number of values, or a label
        without a value in a list block.
    """
    blocks: dict[str, StarBlock] = {}
    block: StarBlock | None = None
    in_loop_header = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            name = line[5:].split()[0] if len(line) > 5 else ""
            block = StarBlock(name=name, loop=False)
            blocks[name] = block
            in_loop_header = False
            continue
        if block is None:
            raise InputError(source, f"line {lineno}: text before the first data_ block")
        if line.startswith("loop_"):
            if block.labels:
                raise InputError(source, f"line {lineno}: second loop_ in block data_{block.name}")
            block.loop = True
            in_loop_header = True
            continue
        if line.startswith("_"):
            parts = _tokens(line[1:])
            label = parts[0]
            if block.loop:
                if not in_loop_header:
                    raise InputError(source, f"line {lineno}: label _{label} after the rows of data_{block.name}")
                block.labels.append(label)
            else:
                if len(parts) < 2:
                    raise InputError(source, f"line {lineno}: label _{label} has no value")
                block.labels.append(label)
                if not block.rows:
                    block.rows.append([])
                block.rows[0].append(parts[1])
            continue
        if not block.loop:
            raise InputError(source, f"line {lineno}: value {line!r} outside a loop in data_{block.name}")
        in_loop_header = False
        values: list[StarValue] = list(_tokens(line))
        if len(values) != len(block.labels):
            raise InputError(
                source,
                f"line {lineno}: {len(values)} values for the {len(block.labels)} labels of data_{block.name}",
            )
        block.rows.append(values)
    return blocks


def _format_float(x: float) -> str:
    ax = abs(x)
    if (0.0 < ax < 0.001) or ax > 100000.0:
        return f"{x:12.6e}"
    return f"{x:12.6f}"


def _quote(s: str) -> str:
    if s == "":
        return '""'
    if any(c.isspace() for c in s) or s.startswith(("#", "_", "data_", "loop_")) or s.startswith('"'):
        return f'"{s}"'
    return s


def format_value(value: StarValue, in_loop: bool) -> str:
    """One value as RELION writes it (padded in loops, see the module docstring)."""
    if isinstance(value, bool):
        return f"{int(value):>12d}"
    if isinstance(value, int):
        return f"{value:>12d}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return f"{value!s:>12}"
        return _format_float(value)
    s = _quote(str(value))
    return f"{s:>10}" if in_loop else s


def format_block(block: StarBlock) -> str:
    """One block in RELION's layout, version line included."""
    out = [f"\n{VERSION_LINE}\n\ndata_{block.name}\n\n"]
    if block.loop:
        out.append("loop_ \n")
        out.extend(f"_{label} #{i} \n" for i, label in enumerate(block.labels, start=1))
        for row in block.rows:
            out.append("".join(format_value(v, True) + " " for v in row) + "\n")
    else:
        width = max((len(lab) + 1 for lab in block.labels), default=0) + 12
        row = block.rows[0] if block.rows else []
        for label, value in zip(block.labels, row, strict=True):
            out.append(f"{'_' + label:<{width}}{format_value(value, False)}\n")
    out.append(" \n")
    return "".join(out)


def format_star(blocks: Sequence[StarBlock]) -> str:
    """Several blocks in RELION's layout (each with its version line)."""
    return "".join(format_block(b) for b in blocks)
