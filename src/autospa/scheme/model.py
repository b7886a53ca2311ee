"""The typed Schemes model: variables, operators, jobs, edges and forks, and their STAR text.

A :class:`Scheme` is an immutable value holding both the graph and its live state (current node,
variable values, each job's current directory and ``HasStarted``), exactly the content of RELION's
``Schemes/NAME/scheme.star``. Changes return a new value (``scheme.with_...``). Text conversion
(:func:`scheme_from_text`, :func:`scheme_to_text`) follows RELION-4.0's file: seven blocks, tables
sorted by name (edges in order), ``undefined`` for empty slots, forks stored with the *false*
target in ``rlnSchemeEdgeOutputNodeName``.

autospa adds two optional blocks that RELION's reader ignores (it seeks its seven blocks by name):
``data_autospa_scheme_general`` (the run status: finished, failed, aborted...) and
``data_autospa_scheme_jobs`` (per job: a fingerprint of the options it last ran with, and whether
its last visit was launched or finished). They are written only when they hold something, so a
RELION file read and written again keeps RELION's blocks only.

Job templates (``Schemes/NAME/<job>/job.star``) are :class:`JobTemplate` values.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from autospa.errors import AutospaError, InputError
from autospa.scheme.star_format import StarBlock, format_star, parse_star_text

#: RELION's marker for an empty slot (unused operator input, plain edge's fork columns...).
UNDEFINED = "undefined"


class SchemeError(AutospaError):
    """A scheme that cannot run on: an operator with bad input, a missing variable, ..."""


class VarKind(str, enum.Enum):
    """The three variable namespaces of a scheme."""

    FLOAT = "float"
    BOOL = "bool"
    STRING = "string"


class JobMode(str, enum.Enum):
    """How a job node runs once it has started: a fresh directory per visit, or the same one."""

    NEW = "new"
    CONTINUE = "continue"


class JobVisit(str, enum.Enum):
    """autospa's record of a job node's last visit (persisted so a killed runner resumes)."""

    NONE = ""
    LAUNCHED = "launched"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"


class RunStatus(str, enum.Enum):
    """autospa's record of how the last run of a scheme ended (``running`` while it runs)."""

    NONE = ""
    RUNNING = "running"
    FINISHED = "finished"  # reached a dead end (no outgoing edge)
    EXITED = "exited"  # an exit / exit_maxtime operator stopped it
    FAILED = "failed"  # a job failed or an operator raised
    ABORTED = "aborted"  # --abort


VarValue = float | bool | str

_BOOL_TRUE = {"true", "True", "TRUE", "1", "yes", "Yes", "YES"}
_BOOL_FALSE = {"false", "False", "FALSE", "0", "no", "No", "NO"}


def parse_bool(text: str) -> bool:
    """``true/True/1/yes`` -> True, ``false/False/0/no`` -> False (anything else raises ValueError)."""
    t = text.strip()
    if t in _BOOL_TRUE:
        return True
    if t in _BOOL_FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def coerce_value(kind: VarKind, value: VarValue) -> VarValue:
    """Convert ``value`` (text or a Python value) to a variable of ``kind``.

    Raises
    ------
    ValueError
        A float that does not parse, a boolean that is not one of the accepted spellings.
    """
    if kind is VarKind.BOOL:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        return parse_bool(str(value))
    if kind is VarKind.FLOAT:
        if isinstance(value, bool):
            return float(value)
        x = float(value)
        return x
    return "" if value is None else str(value)


def format_float(x: float) -> str:
    """RELION's ``floatToString`` (C++ stream default, like ``%g``): ``50``, ``0.25``, ``1e+06``."""
    if not math.isfinite(x):
        return str(x)
    return f"{x:g}"


def value_to_text(value: VarValue) -> str:
    """A variable value as it is substituted into job options: ``Yes``/``No``, ``%g``, text."""
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if isinstance(value, float):
        return format_float(value)
    return str(value)


@dataclass(frozen=True)
class Variable:
    """A scheme variable: name, namespace, current value, value restored by ``--reset``."""

    name: str
    kind: VarKind
    value: VarValue
    reset_value: VarValue


@dataclass(frozen=True)
class Operator:
    """An operator node: its type (``bool=gt``...), output and input variable names (``None`` = unused)."""

    name: str
    type: str
    output: str | None = None
    input1: str | None = None
    input2: str | None = None


@dataclass(frozen=True)
class SchemeJob:
    """A job node.

    Attributes
    ----------
    name
        The node name, also the template folder ``Schemes/NAME/<name>/``.
    current_name
        The pipeline job directory it last ran in (``Class2D/job012/``), or ``name`` before that.
    mode
        ``new``: a fresh directory each visit; ``continue``: the same directory once started.
    has_started
        RELION's ``HasStarted``.
    fingerprint
        autospa: a hash of the resolved options it last ran with ("" if unknown).
    visit
        autospa: how its last visit ended (``launched`` while it runs).
    """

    name: str
    current_name: str
    mode: JobMode
    has_started: bool = False
    fingerprint: str = ""
    visit: JobVisit = JobVisit.NONE

    @property
    def job_dir(self) -> str | None:
        """The job directory (``"Class2D/job012/"``) once the job has one, else ``None``."""
        if self.current_name == self.name or self.current_name in ("", UNDEFINED):
            return None
        return self.current_name if self.current_name.endswith("/") else self.current_name + "/"


@dataclass(frozen=True)
class Edge:
    """A control-flow edge; a fork goes to ``target_if_true`` when ``bool_variable`` is true, else ``target``."""

    source: str
    target: str
    is_fork: bool = False
    target_if_true: str | None = None
    bool_variable: str | None = None


def _frozen(d: Mapping) -> Mapping:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Scheme:
    """A whole scheme: graph plus live state (see the module docstring).

    Attributes
    ----------
    name
        RELION's ``rlnSchemeName``: the scheme folder with a trailing slash, ``Schemes/prep/``.
    current_node
        The program counter (``undefined`` before the first run or after a dead end).
    variables, operators, jobs
        By name.
    edges
        In file order; the first edge's source is the start node.
    status, message
        autospa: how the last run ended and why.
    """

    name: str
    current_node: str = UNDEFINED
    variables: Mapping[str, Variable] = field(default_factory=dict)
    operators: Mapping[str, Operator] = field(default_factory=dict)
    jobs: Mapping[str, SchemeJob] = field(default_factory=dict)
    edges: tuple[Edge, ...] = ()
    status: RunStatus = RunStatus.NONE
    message: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "variables", _frozen(self.variables))
        object.__setattr__(self, "operators", _frozen(self.operators))
        object.__setattr__(self, "jobs", _frozen(self.jobs))
        object.__setattr__(self, "edges", tuple(self.edges))

    # -- naming ---------------------------------------------------------------------------------
    @property
    def short_name(self) -> str:
        """``prep`` for ``Schemes/prep/``."""
        return scheme_short_name(self.name)

    @property
    def start_node(self) -> str:
        """The first edge's input node (``undefined`` without edges)."""
        return self.edges[0].source if self.edges else UNDEFINED

    def node_names(self) -> set[str]:
        """Every operator and job name."""
        return set(self.operators) | set(self.jobs)

    def is_job(self, node: str) -> bool:
        """Whether ``node`` is a job node."""
        return node in self.jobs

    # -- variables ------------------------------------------------------------------------------
    def value(self, name: str) -> VarValue:
        """The current value of a variable (raises :class:`SchemeError` if there is none)."""
        try:
            return self.variables[name].value
        except KeyError:
            raise SchemeError(f"{self.name}: no variable named {name!r}") from None

    def with_value(self, name: str, value: VarValue, reset_value: VarValue | None = None) -> Scheme:
        """A copy with variable ``name`` set (converted to its kind); optionally its reset value too."""
        try:
            var = self.variables[name]
        except KeyError:
            raise SchemeError(f"{self.name}: no variable named {name!r}") from None
        try:
            new = replace(
                var,
                value=coerce_value(var.kind, value),
                reset_value=var.reset_value if reset_value is None else coerce_value(var.kind, reset_value),
            )
        except ValueError as exc:
            raise SchemeError(f"{self.name}: variable {name!r} is a {var.kind.value}: {exc}") from None
        return replace(self, variables={**self.variables, name: new})

    def with_variable(self, var: Variable) -> Scheme:
        """A copy with ``var`` added or replaced."""
        return replace(self, variables={**self.variables, var.name: var})

    # -- jobs, node, status ---------------------------------------------------------------------
    def with_job(self, name: str, **changes: object) -> Scheme:
        """A copy with fields of job ``name`` changed (``current_name=``, ``has_started=``...)."""
        try:
            job = self.jobs[name]
        except KeyError:
            raise SchemeError(f"{self.name}: no job named {name!r}") from None
        return replace(self, jobs={**self.jobs, name: replace(job, **changes)})

    def with_current_node(self, node: str | None) -> Scheme:
        """A copy whose program counter is ``node`` (``None`` -> ``undefined``)."""
        return replace(self, current_node=UNDEFINED if node is None else node)

    def with_status(self, status: RunStatus, message: str = "") -> Scheme:
        """A copy with the run status recorded."""
        return replace(self, status=status, message=message)

    def reset(self) -> Scheme:
        """``relion_schemer --reset``: variables to their reset values, jobs unstarted, counter at start.

        Job modes are kept (as RELION does); autospa's fingerprints and visit records are cleared.
        """
        variables = {n: replace(v, value=v.reset_value) for n, v in self.variables.items()}
        jobs = {
            n: replace(j, current_name=j.name, has_started=False, fingerprint="", visit=JobVisit.NONE)
            for n, j in self.jobs.items()
        }
        return replace(
            self,
            variables=variables,
            jobs=jobs,
            current_node=self.start_node,
            status=RunStatus.NONE,
            message="",
        )


def scheme_short_name(name: str) -> str:
    """``Schemes/prep/`` (or ``Schemes/prep``, or ``prep``) -> ``prep``."""
    parts = [p for p in name.strip().split("/") if p]
    return parts[-1] if parts else ""


def scheme_folder_name(short: str) -> str:
    """``prep`` -> ``Schemes/prep/`` (RELION's ``rlnSchemeName``)."""
    return f"Schemes/{short}/"


# ================================================================================================
# scheme.star text
# ================================================================================================
_GENERAL = "scheme_general"
_TABLES = {
    VarKind.FLOAT: ("scheme_floats", "rlnSchemeFloatVariable"),
    VarKind.BOOL: ("scheme_bools", "rlnSchemeBooleanVariable"),
    VarKind.STRING: ("scheme_strings", "rlnSchemeStringVariable"),
}
_OPERATORS = "scheme_operators"
_JOBS = "scheme_jobs"
_EDGES = "scheme_edges"
_AUTOSPA_GENERAL = "autospa_scheme_general"
_AUTOSPA_JOBS = "autospa_scheme_jobs"


def _opt(value: str) -> str | None:
    return None if value in (UNDEFINED, "") else value


def _need(block: StarBlock, label: str, source: str | None) -> list:
    if label not in block.labels:
        raise InputError(source, f"data_{block.name} has no _{label} column")
    return block.column(label)


def _bool_text(text: str, source: str | None, what: str) -> bool:
    try:
        return parse_bool(str(text))
    except ValueError:
        raise InputError(source, f"{what}: {text!r} is not a boolean (0/1)") from None


def _float_text(text: str, source: str | None, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(source, f"{what}: {text!r} is not a number") from None


def scheme_from_text(text: str, source: str | None = None) -> Scheme:
    """Parse ``scheme.star`` text (RELION-4.0 or autospa) into a :class:`Scheme`.

    Only the format is checked here (columns, types, duplicate names); the graph is checked by
    :func:`autospa.scheme.validate.validate_scheme`.

    Raises
    ------
    InputError
        Missing ``data_scheme_general`` or name, a column missing from a table, a value of the wrong
        type, a name used twice, a job mode other than new/continue.
    """
    blocks = parse_star_text(text, source)
    general = blocks.get(_GENERAL)
    if general is None or general.loop or not general.rows:
        raise InputError(source, "no data_scheme_general block: not a scheme.star file")
    g = general.records()[0]
    if "rlnSchemeName" not in g:
        raise InputError(source, "data_scheme_general has no _rlnSchemeName")
    name = str(g["rlnSchemeName"])
    if not name.endswith("/"):
        name += "/"
    current = str(g.get("rlnSchemeCurrentNodeName", UNDEFINED)) or UNDEFINED

    variables: dict[str, Variable] = {}
    for kind, (block_name, prefix) in _TABLES.items():
        block = blocks.get(block_name)
        if block is None:
            continue
        names = _need(block, f"{prefix}Name", source)
        values = _need(block, f"{prefix}Value", source)
        resets = _need(block, f"{prefix}ResetValue", source)
        for n, v, r in zip(names, values, resets, strict=True):
            n = str(n)
            if n in variables:
                raise InputError(source, f"variable {n!r} is defined twice ({variables[n].kind.value} and {kind.value})")
            what = f"{kind.value} variable {n!r}"
            if kind is VarKind.FLOAT:
                val, res = _float_text(v, source, what), _float_text(r, source, what)
            elif kind is VarKind.BOOL:
                val, res = _bool_text(v, source, what), _bool_text(r, source, what)
            else:
                val, res = str(v), str(r)
            variables[n] = Variable(n, kind, val, res)

    operators: dict[str, Operator] = {}
    block = blocks.get(_OPERATORS)
    if block is not None:
        cols = [
            _need(block, f"rlnSchemeOperator{c}", source) for c in ("Name", "Type", "Output", "Input1", "Input2")
        ]
        for n, t, o, i1, i2 in zip(*cols, strict=True):
            n = str(n)
            if n in operators:
                raise InputError(source, f"operator {n!r} is defined twice")
            operators[n] = Operator(n, str(t), _opt(str(o)), _opt(str(i1)), _opt(str(i2)))

    jobs: dict[str, SchemeJob] = {}
    block = blocks.get(_JOBS)
    if block is not None:
        cols = [_need(block, f"rlnSchemeJob{c}", source) for c in ("NameOriginal", "Name", "Mode", "HasStarted")]
        for orig, cur, mode, started in zip(*cols, strict=True):
            orig = str(orig)
            if orig in jobs:
                raise InputError(source, f"job {orig!r} is defined twice")
            if orig in operators:
                raise InputError(source, f"{orig!r} is both an operator and a job")
            try:
                m = JobMode(str(mode))
            except ValueError:
                raise InputError(source, f"job {orig!r}: mode {mode!r} is not 'new' or 'continue'") from None
            jobs[orig] = SchemeJob(orig, str(cur), m, _bool_text(started, source, f"job {orig!r} HasStarted"))

    edges: list[Edge] = []
    block = blocks.get(_EDGES)
    if block is not None:
        cols = [
            _need(block, f"rlnSchemeEdge{c}", source)
            for c in ("InputNodeName", "OutputNodeName", "IsFork", "OutputNodeNameIfTrue", "BooleanVariable")
        ]
        for src, dst, fork, dst_true, var in zip(*cols, strict=True):
            is_fork = _bool_text(fork, source, f"edge {src} -> {dst} IsFork")
            edges.append(
                Edge(
                    str(src),
                    str(dst),
                    is_fork,
                    _opt(str(dst_true)) if is_fork else None,
                    _opt(str(var)) if is_fork else None,
                )
            )

    status, message = RunStatus.NONE, ""
    block = blocks.get(_AUTOSPA_GENERAL)
    if block is not None and block.rows:
        rec = block.records()[0]
        try:
            status = RunStatus(str(rec.get("autospaSchemeStatus", "")))
        except ValueError:
            raise InputError(source, f"unknown autospa run status {rec.get('autospaSchemeStatus')!r}") from None
        message = str(rec.get("autospaSchemeMessage", ""))
    block = blocks.get(_AUTOSPA_JOBS)
    if block is not None:
        for rec in block.records():
            jn = str(rec.get("autospaSchemeJobName", ""))
            if jn not in jobs:
                raise InputError(source, f"data_{_AUTOSPA_JOBS} names job {jn!r}, which the scheme does not have")
            try:
                visit = JobVisit(str(rec.get("autospaSchemeJobVisit", "")))
            except ValueError:
                raise InputError(source, f"job {jn!r}: unknown visit record {rec.get('autospaSchemeJobVisit')!r}") from None
            fp = str(rec.get("autospaSchemeJobFingerprint", ""))
            jobs[jn] = replace(jobs[jn], fingerprint="" if fp == UNDEFINED else fp, visit=visit)

    return Scheme(
        name=name,
        current_node=current,
        variables=variables,
        operators=operators,
        jobs=jobs,
        edges=tuple(edges),
        status=status,
        message=message,
    )


def _u(x: str | None) -> str:
    return UNDEFINED if x is None or x == "" else x


def scheme_to_text(scheme: Scheme) -> str:
    """The ``scheme.star`` text RELION-4.0 would write for ``scheme`` (plus autospa's blocks if any)."""
    blocks = [
        StarBlock(
            _GENERAL,
            loop=False,
            labels=["rlnSchemeName", "rlnSchemeCurrentNodeName"],
            rows=[[scheme.name, scheme.current_node or UNDEFINED]],
        )
    ]
    for kind, (block_name, prefix) in _TABLES.items():
        vars_ = sorted((v for v in scheme.variables.values() if v.kind is kind), key=lambda v: v.name)
        if not vars_:
            continue
        blocks.append(
            StarBlock(
                block_name,
                loop=True,
                labels=[f"{prefix}Name", f"{prefix}Value", f"{prefix}ResetValue"],
                rows=[[v.name, v.value, v.reset_value] for v in vars_],
            )
        )
    if scheme.operators:
        blocks.append(
            StarBlock(
                _OPERATORS,
                loop=True,
                labels=[f"rlnSchemeOperator{c}" for c in ("Name", "Type", "Output", "Input1", "Input2")],
                rows=[
                    [o.name, o.type, _u(o.output), _u(o.input1), _u(o.input2)]
                    for o in sorted(scheme.operators.values(), key=lambda o: o.name)
                ],
            )
        )
    if scheme.jobs:
        blocks.append(
            StarBlock(
                _JOBS,
                loop=True,
                labels=[f"rlnSchemeJob{c}" for c in ("NameOriginal", "Name", "Mode", "HasStarted")],
                rows=[
                    [j.name, j.current_name, j.mode.value, j.has_started]
                    for j in sorted(scheme.jobs.values(), key=lambda j: j.name)
                ],
            )
        )
    if scheme.edges:
        blocks.append(
            StarBlock(
                _EDGES,
                loop=True,
                labels=[
                    f"rlnSchemeEdge{c}"
                    for c in ("InputNodeName", "OutputNodeName", "IsFork", "OutputNodeNameIfTrue", "BooleanVariable")
                ],
                rows=[
                    [e.source, e.target, e.is_fork, _u(e.target_if_true), _u(e.bool_variable)] for e in scheme.edges
                ],
            )
        )
    if scheme.status is not RunStatus.NONE or scheme.message:
        blocks.append(
            StarBlock(
                _AUTOSPA_GENERAL,
                loop=False,
                labels=["autospaSchemeStatus", "autospaSchemeMessage"],
                rows=[[scheme.status.value or UNDEFINED, scheme.message.replace('"', "'").replace("\n", " ")]],
            )
        )
    recorded = [j for j in sorted(scheme.jobs.values(), key=lambda j: j.name) if j.fingerprint or j.visit.value]
    if recorded:
        blocks.append(
            StarBlock(
                _AUTOSPA_JOBS,
                loop=True,
                labels=["autospaSchemeJobName", "autospaSchemeJobFingerprint", "autospaSchemeJobVisit"],
                rows=[[j.name, j.fingerprint or UNDEFINED, j.visit.value] for j in recorded],
            )
        )
    return format_star(blocks)


# ================================================================================================
# job.star text (templates and the copy written into every job directory)
# ================================================================================================

#: RELION < 3.1 job type numbers (``_rlnJobType``) -> type labels, for old templates.
LEGACY_JOB_TYPES = {
    0: "relion.import",
    1: "relion.motioncorr",
    2: "relion.ctffind",
    3: "relion.manualpick",
    4: "relion.autopick",
    5: "relion.extract",
    7: "relion.select",
    8: "relion.class2d",
    9: "relion.class3d",
    10: "relion.refine3d",
    12: "relion.maskcreate",
    13: "relion.joinstar",
    14: "relion.subtract",
    15: "relion.postprocess",
    16: "relion.localres",
    18: "relion.initialmodel",
    19: "relion.multibody",
    20: "relion.polish",
    21: "relion.ctfrefine",
    99: "relion.external",
}


@dataclass(frozen=True)
class JobTemplate:
    """A ``job.star``: job type label, continue flag and option values (all strings).

    ``options`` keeps file order; a key given twice keeps its last value, as RELION's reader does.
    """

    type_label: str
    options: Mapping[str, str]
    is_continue: bool = False
    is_tomo: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _frozen(self.options))

    def with_option(self, key: str, value: str) -> JobTemplate:
        """A copy with one option set."""
        return replace(self, options={**self.options, key: value})


def job_template_from_text(text: str, source: str | None = None) -> JobTemplate:
    """Parse ``job.star`` text (``data_job`` + ``data_joboptions_values``).

    Raises
    ------
    InputError
        No ``data_job`` block, no job type, or an options table without its two columns.
    """
    blocks = parse_star_text(text, source)
    head = blocks.get("job")
    if head is None or not head.rows:
        raise InputError(source, "no data_job block: not a job.star file")
    rec = head.records()[0]
    if "rlnJobTypeLabel" in rec:
        label = str(rec["rlnJobTypeLabel"])
    elif "rlnJobType" in rec:
        try:
            label = LEGACY_JOB_TYPES[int(float(rec["rlnJobType"]))]
        except (ValueError, KeyError):
            raise InputError(source, f"unknown job type number {rec['rlnJobType']!r}") from None
    else:
        raise InputError(source, "data_job has no _rlnJobTypeLabel")
    is_continue = _bool_text(rec.get("rlnJobIsContinue", "0"), source, "_rlnJobIsContinue")
    is_tomo = _bool_text(rec.get("rlnJobIsTomo", "0"), source, "_rlnJobIsTomo")
    options: dict[str, str] = {}
    vals = blocks.get("joboptions_values")
    if vals is not None:
        keys = _need(vals, "rlnJobOptionVariable", source)
        values = _need(vals, "rlnJobOptionValue", source)
        for k, v in zip(keys, values, strict=True):
            options[str(k)] = str(v)
    return JobTemplate(label, options, is_continue, is_tomo)


def job_template_to_text(template: JobTemplate, write_is_tomo: bool = False) -> str:
    """The ``job.star`` text RELION-4.0 writes (options sorted by key, as its ``std::map`` is)."""
    labels = ["rlnJobTypeLabel", "rlnJobIsContinue"]
    row: list = [template.type_label, template.is_continue]
    if write_is_tomo or template.is_tomo:
        labels.append("rlnJobIsTomo")
        row.append(template.is_tomo)
    blocks = [StarBlock("job", loop=False, labels=labels, rows=[row])]
    blocks.append(
        StarBlock(
            "joboptions_values",
            loop=True,
            labels=["rlnJobOptionVariable", "rlnJobOptionValue"],
            rows=[[k, template.options[k]] for k in sorted(template.options)],
        )
    )
    return format_star(blocks)
