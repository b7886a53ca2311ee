"""Every RELION-4.0 scheme operator, as a registry of small functions.

Each operator type (``bool=gt``, ``float=count_images``, ``wait``...) is an :class:`OperatorSpec`:
the variable kinds its output and inputs take (checked when a scheme loads, see
:mod:`autospa.scheme.validate`) and a function from resolved input values to a result. Operators
never touch the file system themselves: they ask an :class:`OperatorEnvironment` (the real one is
:class:`autospa.io.scheme_files.FileSystemEnvironment`), so this module stays pure. No operator
runs a shell command.

Semantics follow RELION-4.0.1 (``src/schemer.cpp``), with its bugs fixed; each fix is marked
``FIX:`` where it applies:

- FIX (numeric input2): a literal number as input2 is used as that number (RELION reads 0).
- FIX (path rewriting): input1 and input2 are rewritten independently (RELION writes a rewritten
  input2 over input1).
- FIX (validation): ``bool=not``'s input1, the comparisons' input1 and ``wait``'s input1 are
  checked like every other input (RELION does not check them).
- FIX (read_star): the value read goes to the operator's output variable, converted to its kind
  (RELION stores it in whichever namespace matches the STAR label's type, silently creating or
  overwriting a variable there).
- FIX (nth_word): a negative N counts from the end (-1 = last word); RELION returns ``undefined``.
- FIX (star_table_sort_idx): the code's meaning is kept (k = 1 is the row of the smallest value,
  k = -1 of the largest, 0-based) and stated correctly (RELION's error message says the opposite).
- FIX (star_table_max_idx / star_table_min_idx): implemented (declared but missing in RELION).
- FIX (divide): division by zero stops the scheme with an error instead of storing inf.
- FIX (copy_file / move_file / delete_file): done in Python on glob matches, no shell; files are
  only created, moved or deleted inside the project directory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from autospa.scheme.model import UNDEFINED, Scheme, SchemeError, VarKind, VarValue, coerce_value
from autospa.scheme.paths import rewrite_scheme_paths

F, B, S = VarKind.FLOAT, VarKind.BOOL, VarKind.STRING


class OperatorEnvironment(Protocol):
    """What operators may ask of the world. Paths are relative to the project directory."""

    def file_exists(self, path: str) -> bool:
        """Whether ``path`` is an existing file."""

    def star_table_rows(self, path: str, table: str) -> int | None:
        """Rows of table ``table`` in STAR file ``path``; ``None`` if the file does not exist, 0 if
        the table does not."""

    def star_column(self, path: str, table: str, label: str) -> list[VarValue]:
        """The values of ``label`` in ``table`` of STAR file ``path`` (raises if any is missing)."""

    def glob(self, pattern: str) -> list[str]:
        """Sorted paths matching ``pattern``."""

    def touch(self, path: str) -> None:
        """Create ``path`` (empty) or update its time stamp."""

    def copy(self, source: str, destination: str) -> None:
        """Copy the files matching ``source`` to ``destination``."""

    def move(self, source: str, destination: str) -> None:
        """Move the files matching ``source`` to ``destination``."""

    def delete(self, pattern: str) -> None:
        """Delete the files matching ``pattern``."""

    def send_email(self, to: str, subject: str, body: str) -> None:
        """Send a mail (failures are logged, not raised)."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""

    def sleep(self, seconds: float) -> bool:
        """Sleep, checking for an abort; ``False`` if the sleep was cut short by an abort."""

    def scheme_jobs(self, scheme: str) -> Mapping[str, str]:
        """``{job node: current job name}`` of another scheme (``Schemes/<scheme>/``)."""


@dataclass
class OperatorClock:
    """The timers RELION keeps per process (not persisted): the ``wait`` anchor and the
    ``exit_maxtime`` deadline. A new runner process starts with fresh timers, as in RELION."""

    wait_anchor: float | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class Slot:
    """What an operator accepts in one slot.

    Attributes
    ----------
    kinds
        Variable kinds accepted (empty: the slot must be unused).
    required
        Whether the slot must be given.
    number
        Whether a literal number is accepted instead of a variable.
    any_kind
        Any variable (``email``).
    """

    kinds: frozenset[VarKind] = frozenset()
    required: bool = False
    number: bool = False
    any_kind: bool = False

    @property
    def used(self) -> bool:
        """Whether the slot takes anything."""
        return bool(self.kinds) or self.any_kind


NONE = Slot()


def _req(*kinds: VarKind, number: bool = False) -> Slot:
    return Slot(frozenset(kinds), required=True, number=number)


def _optional(*kinds: VarKind, number: bool = False) -> Slot:
    return Slot(frozenset(kinds), required=False, number=number)


@dataclass(frozen=True)
class OperatorCall:
    """The resolved arguments of one operator evaluation.

    ``input1`` / ``input2`` hold values (strings already path-rewritten), ``None`` when unused;
    ``input1_name`` / ``input2_name`` the variable names (or the literal text).
    """

    name: str
    type: str
    input1: VarValue | None
    input2: VarValue | None
    input1_name: str | None
    input2_name: str | None
    scheme: Scheme
    env: OperatorEnvironment
    clock: OperatorClock


@dataclass(frozen=True)
class OperatorResult:
    """An operator's result: the output value (``None``: no output) and whether the scheme stops."""

    output: VarValue | None = None
    stop: bool = False


OperatorFunction = Callable[[OperatorCall], OperatorResult]


@dataclass(frozen=True)
class OperatorSpec:
    """One operator type: its slots and its function."""

    type: str
    output: Slot
    input1: Slot
    input2: Slot
    func: OperatorFunction = field(repr=False)


#: The registry: operator type string -> spec.
OPERATORS: dict[str, OperatorSpec] = {}


def operator(type_: str, output: Slot = NONE, input1: Slot = NONE, input2: Slot = NONE):
    """Register ``func`` as the implementation of operator type ``type_``."""

    def deco(func: OperatorFunction) -> OperatorFunction:
        if type_ in OPERATORS:
            raise ValueError(f"operator {type_!r} registered twice")
        OPERATORS[type_] = OperatorSpec(type_, output, input1, input2, func)
        return func

    return deco


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _err(c: OperatorCall, msg: str) -> SchemeError:
    return SchemeError(f"{c.scheme.name}: operator {c.name} ({c.type}): {msg}")


def _f(c: OperatorCall, v: VarValue | None, which: str) -> float:
    if v is None:
        raise _err(c, f"{which} is missing")
    if isinstance(v, bool):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        raise _err(c, f"{which} = {v!r} is not a number") from None


def _star_spec(c: OperatorCall) -> tuple[str, str, str]:
    text = str(c.input1)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(parts):
        raise _err(c, f"input1 = {text!r} must be 'starfile,table,rlnLabel'")
    path, table, label = parts
    if label.startswith("_"):
        label = label[1:]
    return path, table, label


def _column(c: OperatorCall) -> tuple[str, list[VarValue]]:
    path, table, label = _star_spec(c)
    if not c.env.file_exists(path):
        raise _err(c, f"STAR file {path} does not exist")
    return path, c.env.star_column(path, table, label)


def _numbers(c: OperatorCall) -> list[float]:
    path, col = _column(c)
    try:
        return [float(v) for v in col]
    except (TypeError, ValueError):
        raise _err(c, f"column in {path} is not numeric") from None


def _round_half_away(x: float) -> float:
    return float(math.floor(x + 0.5)) if x >= 0 else -float(math.floor(-x + 0.5))


# ------------------------------------------------------------------------------------------------
# bool=...
# ------------------------------------------------------------------------------------------------
@operator("bool=set", _req(B), _req(B))
def _bool_set(c: OperatorCall) -> OperatorResult:
    return OperatorResult(bool(c.input1))


@operator("bool=and", _req(B), _req(B), _req(B))
def _bool_and(c: OperatorCall) -> OperatorResult:
    return OperatorResult(bool(c.input1) and bool(c.input2))


@operator("bool=or", _req(B), _req(B), _req(B))
def _bool_or(c: OperatorCall) -> OperatorResult:
    return OperatorResult(bool(c.input1) or bool(c.input2))


# FIX (validation): input1 must be a bool variable (RELION does not check it).
@operator("bool=not", _req(B), _req(B))
def _bool_not(c: OperatorCall) -> OperatorResult:
    return OperatorResult(not bool(c.input1))


def _compare(test: Callable[[float, float], bool]) -> OperatorFunction:
    def fn(c: OperatorCall) -> OperatorResult:
        return OperatorResult(test(_f(c, c.input1, "input1"), _f(c, c.input2, "input2")))

    return fn


# FIX (validation): input1 must be a float variable; FIX (numeric input2): literals are used.
for _t, _test in {
    "bool=gt": lambda a, b: a > b,
    "bool=lt": lambda a, b: a < b,
    "bool=ge": lambda a, b: a >= b,
    "bool=le": lambda a, b: a <= b,
    "bool=eq": lambda a, b: abs(a - b) < 1e-8,
}.items():
    operator(_t, _req(B), _req(F), _req(F, number=True))(_compare(_test))


@operator("bool=file_exists", _req(B), _req(S))
def _file_exists(c: OperatorCall) -> OperatorResult:
    return OperatorResult(c.env.file_exists(str(c.input1)))


def _read_star(kind: VarKind) -> OperatorFunction:
    # FIX (read_star): the value goes to this operator's output variable, converted to its kind.
    def fn(c: OperatorCall) -> OperatorResult:
        path, col = _column(c)
        row = 0 if c.input2 is None else int(_f(c, c.input2, "input2"))
        if not 0 <= row < len(col):
            raise _err(c, f"row {row} does not exist in {path} ({len(col)} rows)")
        value = col[row]
        try:
            return OperatorResult(coerce_value(kind, value))
        except ValueError:
            raise _err(c, f"value {value!r} read from {path} is not a {kind.value}") from None

    return fn


operator("bool=read_star", _req(B), _req(S), _optional(F, number=True))(_read_star(B))
operator("float=read_star", _req(F), _req(S), _optional(F, number=True))(_read_star(F))
operator("string=read_star", _req(S), _req(S), _optional(F, number=True))(_read_star(S))


# ------------------------------------------------------------------------------------------------
# float=...
# ------------------------------------------------------------------------------------------------
@operator("float=set", _req(F), _req(F))
def _float_set(c: OperatorCall) -> OperatorResult:
    return OperatorResult(_f(c, c.input1, "input1"))


def _divide(a: float, b: float) -> float:
    if b == 0.0:
        raise ZeroDivisionError
    return a / b


for _t, _fn in {
    "float=plus": lambda a, b: a + b,
    "float=minus": lambda a, b: a - b,
    "float=mult": lambda a, b: a * b,
    "float=divide": _divide,
}.items():

    def _arith(c: OperatorCall, _fn=_fn) -> OperatorResult:
        try:
            return OperatorResult(_fn(_f(c, c.input1, "input1"), _f(c, c.input2, "input2")))
        except ZeroDivisionError:  # FIX (divide): RELION stores inf
            raise _err(c, f"division by zero ({c.input2_name} = 0)") from None

    operator(_t, _req(F), _req(F), _req(F, number=True))(_arith)


@operator("float=round", _req(F), _req(F))
def _float_round(c: OperatorCall) -> OperatorResult:
    # RELION rounds half away from zero (Python's round() rounds half to even).
    return OperatorResult(_round_half_away(_f(c, c.input1, "input1")))


@operator("float=count_images", _req(F), _req(S), _optional(S))
def _count_images(c: OperatorCall) -> OperatorResult:
    table = "particles" if c.input2 in (None, "", UNDEFINED) else str(c.input2)
    n = c.env.star_table_rows(str(c.input1), table)
    return OperatorResult(float(n or 0))


@operator("float=count_words", _req(F), _req(S))
def _count_words(c: OperatorCall) -> OperatorResult:
    text = str(c.input1)
    if text in ("", UNDEFINED):
        return OperatorResult(0.0)
    return OperatorResult(float(len(text.split(","))))


@operator("float=star_table_max", _req(F), _req(S))
def _table_max(c: OperatorCall) -> OperatorResult:
    xs = _numbers(c)
    if not xs:
        raise _err(c, "the column is empty")
    return OperatorResult(max(xs))


@operator("float=star_table_min", _req(F), _req(S))
def _table_min(c: OperatorCall) -> OperatorResult:
    xs = _numbers(c)
    if not xs:
        raise _err(c, "the column is empty")
    return OperatorResult(min(xs))


@operator("float=star_table_avg", _req(F), _req(S))
def _table_avg(c: OperatorCall) -> OperatorResult:
    xs = _numbers(c)
    return OperatorResult(sum(xs) / len(xs) if xs else 0.0)


@operator("float=star_table_sort_idx", _req(F), _req(S), _req(F, number=True))
def _table_sort_idx(c: OperatorCall) -> OperatorResult:
    # FIX (sort_idx): k = 1 -> row (0-based) of the smallest value, k = 2 the second smallest,
    # k = -1 the largest: the code's meaning, stated correctly.
    xs = _numbers(c)
    k = int(_f(c, c.input2, "input2"))
    if k == 0 or abs(k) > len(xs):
        raise _err(c, f"k = {k} must be 1..{len(xs)} (k-th smallest) or -1..-{len(xs)} (k-th largest)")
    order = sorted(range(len(xs)), key=lambda i: (xs[i], i))
    return OperatorResult(float(order[k - 1] if k > 0 else order[k]))


# FIX (max_idx / min_idx): declared in RELION-4.0 but not implemented there.
@operator("float=star_table_max_idx", _req(F), _req(S))
def _table_max_idx(c: OperatorCall) -> OperatorResult:
    xs = _numbers(c)
    if not xs:
        raise _err(c, "the column is empty")
    return OperatorResult(float(max(range(len(xs)), key=lambda i: (xs[i], -i))))


@operator("float=star_table_min_idx", _req(F), _req(S))
def _table_min_idx(c: OperatorCall) -> OperatorResult:
    xs = _numbers(c)
    if not xs:
        raise _err(c, "the column is empty")
    return OperatorResult(float(min(range(len(xs)), key=lambda i: (xs[i], i))))


# ------------------------------------------------------------------------------------------------
# string=...
# ------------------------------------------------------------------------------------------------
@operator("string=set", _req(S), _req(S))
def _string_set(c: OperatorCall) -> OperatorResult:
    return OperatorResult(str(c.input1))


@operator("string=join", _req(S), _req(S), _req(S))
def _string_join(c: OperatorCall) -> OperatorResult:
    return OperatorResult(str(c.input1) + str(c.input2))


def _split(first: bool, before: bool) -> OperatorFunction:
    def fn(c: OperatorCall) -> OperatorResult:
        text, delim = str(c.input1), str(c.input2)
        i = (text.find(delim) if first else text.rfind(delim)) if delim else -1
        if i < 0:  # RELION: an absent delimiter gives back the whole input
            return OperatorResult(text)
        return OperatorResult(text[:i] if before else text[i + len(delim) :])

    return fn


operator("string=before_first", _req(S), _req(S), _req(S))(_split(True, True))
operator("string=after_first", _req(S), _req(S), _req(S))(_split(True, False))
operator("string=before_last", _req(S), _req(S), _req(S))(_split(False, True))
operator("string=after_last", _req(S), _req(S), _req(S))(_split(False, False))


@operator("string=glob", _req(S), _req(S))
def _string_glob(c: OperatorCall) -> OperatorResult:
    matches = c.env.glob(str(c.input1))
    return OperatorResult(",".join(matches) if matches else UNDEFINED)


@operator("string=nth_word", _req(S), _req(S), _req(F, number=True))
def _nth_word(c: OperatorCall) -> OperatorResult:
    text = str(c.input1)
    words = [] if text in ("", UNDEFINED) else text.split(",")
    n = int(_f(c, c.input2, "input2"))
    # FIX (nth_word): negative N counts from the end (-1 = last word).
    if 1 <= n <= len(words):
        return OperatorResult(words[n - 1])
    if -len(words) <= n <= -1:
        return OperatorResult(words[n])
    return OperatorResult(UNDEFINED)


# ------------------------------------------------------------------------------------------------
# files, time, mail, exit
# ------------------------------------------------------------------------------------------------
@operator("touch_file", NONE, _req(S))
def _touch(c: OperatorCall) -> OperatorResult:
    c.env.touch(str(c.input1))
    return OperatorResult()


@operator("copy_file", NONE, _req(S), _req(S))
def _copy(c: OperatorCall) -> OperatorResult:
    c.env.copy(str(c.input1), str(c.input2))
    return OperatorResult()


@operator("move_file", NONE, _req(S), _req(S))
def _move(c: OperatorCall) -> OperatorResult:
    c.env.move(str(c.input1), str(c.input2))
    return OperatorResult()


@operator("delete_file", NONE, _req(S))
def _delete(c: OperatorCall) -> OperatorResult:
    c.env.delete(str(c.input1))
    return OperatorResult()


# FIX (validation): input1 must be a float variable or a number.
@operator("wait", _optional(F), _req(F, number=True))
def _wait(c: OperatorCall) -> OperatorResult:
    seconds = _f(c, c.input1, "input1")
    now = c.env.now()
    if c.clock.wait_anchor is None:  # first wait of this process: no sleep, start the clock
        c.clock.wait_anchor = now
        return OperatorResult(0.0)
    remaining = c.clock.wait_anchor + seconds - now
    if remaining > 0:
        c.env.sleep(remaining)  # an abort cuts it short; the runner sees the abort next
    end = c.env.now()
    elapsed = end - c.clock.wait_anchor
    c.clock.wait_anchor = end
    return OperatorResult(elapsed)


@operator("email", NONE, Slot(any_kind=True), Slot(any_kind=True))
def _email(c: OperatorCall) -> OperatorResult:
    var = c.scheme.variables.get("email")
    if var is None or var.kind is not S or str(var.value) in ("", UNDEFINED):
        return OperatorResult()
    lines = [time.strftime("%Y-%m-%d %H:%M:%S")]
    for name, value in ((c.input1_name, c.input1), (c.input2_name, c.input2)):
        if name is not None:
            lines.append(f"{name} = {value}")
    c.env.send_email(str(var.value), f"Schemer: {c.scheme.short_name}", "\n".join(lines) + "\n")
    return OperatorResult()


@operator("exit_maxtime", NONE, _req(F, number=True))
def _exit_maxtime(c: OperatorCall) -> OperatorResult:
    hours = _f(c, c.input1, "input1")
    now = c.env.now()
    if c.clock.deadline is None:  # first call of this process sets the deadline
        c.clock.deadline = now + hours * 3600.0
        return OperatorResult()
    return OperatorResult(stop=now > c.clock.deadline)


@operator("exit")
def _exit(c: OperatorCall) -> OperatorResult:
    return OperatorResult(stop=True)


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _resolve(scheme: Scheme, ref: str | None, slot: Slot, env: OperatorEnvironment) -> VarValue | None:
    if ref is None or not slot.used:
        return None
    var = scheme.variables.get(ref)
    if var is None:
        if slot.number and _is_number(ref):
            return float(ref)  # FIX (numeric input2): the literal's value, not 0
        raise SchemeError(f"{scheme.name}: no variable named {ref!r}")
    if var.kind is S:
        # FIX (path rewriting): each input is rewritten on its own.
        return rewrite_scheme_paths(str(var.value), scheme, env.scheme_jobs)
    return var.value


def evaluate_operator(
    scheme: Scheme, name: str, env: OperatorEnvironment, clock: OperatorClock
) -> tuple[Scheme, bool]:
    """Run operator node ``name``.

    Parameters
    ----------
    scheme
        The scheme (validated).
    name
        An operator node of ``scheme``.
    env
        Where files, clocks and other schemes are.
    clock
        The process's ``wait`` / ``exit_maxtime`` timers (updated in place).

    Returns
    -------
    (Scheme, bool)
        The scheme with the output variable set, and whether the scheme goes on (``False`` after
        ``exit``, or ``exit_maxtime`` past its deadline).

    Raises
    ------
    SchemeError
        Unknown operator type, missing variable, or an operator that cannot compute its result.
    """
    op = scheme.operators[name]
    spec = OPERATORS.get(op.type)
    if spec is None:
        raise SchemeError(f"{scheme.name}: operator {name} has unknown type {op.type!r}")
    call = OperatorCall(
        name=name,
        type=op.type,
        input1=_resolve(scheme, op.input1, spec.input1, env),
        input2=_resolve(scheme, op.input2, spec.input2, env),
        input1_name=op.input1,
        input2_name=op.input2,
        scheme=scheme,
        env=env,
        clock=clock,
    )
    result = spec.func(call)
    if op.output is not None and result.output is not None and spec.output.used:
        scheme = scheme.with_value(op.output, result.output)
    return scheme, not result.stop

