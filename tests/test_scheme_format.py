"""scheme.star and job.star: RELION-4.0's own prep and proc files parsed, round-tripped and checked
against the graphs the reference describes; the shipped schemes/ encode the same graphs; load-time
validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from autospa.errors import InputError
from autospa.io.scheme_files import read_job_template, read_scheme, write_job_template, write_scheme
from autospa.scheme.model import (
    UNDEFINED,
    JobMode,
    JobVisit,
    RunStatus,
    VarKind,
    job_template_from_text,
    job_template_to_text,
    scheme_from_text,
    scheme_to_text,
)
from autospa.scheme.star_format import parse_star_text
from autospa.scheme.validate import validate_job_templates, validate_scheme

RELION = Path("/work/shared/reference/relion-4.0-schemes")
REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "schemes"
if not RELION.exists():  # a checkout without the shared folder: the copy in tests/data
    RELION = REPO / "tests" / "data" / "relion-4.0-schemes"

RELION_FILES = sorted(RELION.rglob("*.star"))
SHIPPED_FILES = sorted(SHIPPED.rglob("*.star"))

#: Reference §A7 / §A8: (input, output-if-false-or-plain, is_fork, output-if-true, bool variable).
PREP_EDGES = [
    ("WAIT", "EXIT_maxtime", False, None, None),
    ("EXIT_maxtime", "importmovies", False, None, None),
    ("importmovies", "motioncorr", False, None, None),
    ("motioncorr", "ctffind", False, None, None),
    ("ctffind", "WAIT", False, None, None),
]
PROC_EDGES = [
    ("WAIT", "EXIT_maxtime", False, None, None),
    ("EXIT_maxtime", "HAS_ctffind", False, None, None),
    ("HAS_ctffind", "WAIT", True, "select_mics", "has_ctffind"),
    ("select_mics", "COUNT_mics", False, None, None),
    ("COUNT_mics", "HAS_mics_increased", False, None, None),
    ("HAS_mics_increased", "WAIT", True, "SET_prev_nr_mics", "has_larger_nr_mics"),
    ("SET_prev_nr_mics", "SET_do_topaz", False, None, None),
    ("SET_do_topaz", "autopick", False, None, None),
    ("autopick", "extract", False, None, None),
    ("extract", "class2d", False, None, None),
    ("class2d", "select_parts", False, None, None),
    ("select_parts", "COUNT_parts", False, None, None),
    ("COUNT_parts", "CHECK_do_3d", False, None, None),
    ("CHECK_do_3d", "WAIT", True, "CHECK_iniref", "do_3d"),
    ("CHECK_iniref", "inimodel3d", True, "SET_myref_user", "has_iniref"),
    ("inimodel3d", "SET_myref_inimodel", False, None, None),
    ("SET_myref_inimodel", "refine3d", False, None, None),
    ("SET_myref_user", "refine3d", False, None, None),
    ("refine3d", "WAIT", False, None, None),
]
PROC_OPERATORS = {
    "HAS_ctffind": ("bool=file_exists", "has_ctffind", "ctffind_mics", None),
    "COUNT_mics": ("float=count_images", "current_nr_mics", "selected_mics", "micrographs"),
    "COUNT_parts": ("float=count_images", "current_nr_parts", "selected_parts", "particles"),
    "CHECK_do_3d": ("bool=ge", "do_3d", "current_nr_parts", "min_nr_parts_3d"),
    "SET_prev_nr_mics": ("float=set", "prev_nr_mics", "current_nr_mics", None),
    "HAS_mics_increased": ("bool=gt", "has_larger_nr_mics", "current_nr_mics", "prev_nr_mics"),
    "EXIT_maxtime": ("exit_maxtime", None, "maxtime_hr", None),
    "SET_do_topaz": ("bool=not", "do_topaz", "do_log", None),
    "CHECK_iniref": ("bool=file_exists", "has_iniref", "iniref", None),
    "SET_myref_user": ("string=set", "myref", "iniref", None),
    "SET_myref_inimodel": ("string=set", "myref", "inimodel_output", None),
    "WAIT": ("wait", None, "wait_sec", None),
}
PROC_JOBS = {
    "select_mics": "continue", "autopick": "continue", "extract": "continue",
    "class2d": "new", "select_parts": "new", "inimodel3d": "new", "refine3d": "new",
}


def _edges(scheme):
    return [(e.source, e.target, e.is_fork, e.target_if_true, e.bool_variable) for e in scheme.edges]


def _load(path: Path):
    text = path.read_text()
    if path.name == "scheme.star":
        return scheme_from_text(text, str(path)), scheme_to_text
    return job_template_from_text(text, str(path)), job_template_to_text


def _typed_rows(text: str) -> dict[str, tuple[list[str], list[tuple]]]:
    """Every block: its labels and its rows as a sorted list of value tuples (numbers compared as
    floats, so ``5000.000`` and ``5000.000000`` are the same value)."""

    def typed(v):
        try:
            return ("n", float(v))
        except ValueError:
            return ("s", v)

    out = {}
    for name, block in parse_star_text(text).items():
        out[name] = (block.labels, sorted(tuple(typed(v) for v in row) for row in block.rows))
    return out


# ------------------------------------------------------------------------------------------------
# RELION's files
# ------------------------------------------------------------------------------------------------
def test_relion_reference_files_are_all_there() -> None:
    assert len(RELION_FILES) == 12  # 2 scheme.star + 10 job templates
    assert len(SHIPPED_FILES) == 12


@pytest.mark.parametrize("path", RELION_FILES, ids=lambda p: str(p.relative_to(RELION)))
def test_relion_file_round_trips(path: Path) -> None:
    value, to_text = _load(path)
    written = to_text(value)
    again, _ = _load_text(path, written)
    assert again == value  # nothing lost
    assert to_text(again) == written  # our text is a fixed point
    original = path.read_text()
    # every block, label and row value survives (rows compared as sets: RELION sorts by name)
    a, b = _typed_rows(original), _typed_rows(written)
    if path.name == "job.star":
        # RELION's class2d template (hand-edited) gives do_em and do_grad twice: one row each remains
        labels, rows = a["joboptions_values"]
        a["joboptions_values"] = (labels, sorted(set(rows)))
        keys = [r[0] for r in a["joboptions_values"][1]]
        assert len(keys) == len(set(keys))
    assert a == b


def _load_text(path: Path, text: str):
    if path.name == "scheme.star":
        return scheme_from_text(text, str(path)), scheme_to_text
    return job_template_from_text(text, str(path)), job_template_to_text


@pytest.mark.parametrize("name", ["prep/ctffind/job.star", "prep/importmovies/job.star", "proc/select_parts/job.star"])
def test_relion_written_files_round_trip_byte_for_byte(name: str) -> None:
    """The templates RELION wrote itself (not edited by hand afterwards) come back byte for byte:
    the writer lays out blocks, labels and values exactly as RELION-4.0 does."""
    text = (RELION / name).read_text()
    assert job_template_to_text(job_template_from_text(text)) == text


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: str(p.relative_to(SHIPPED)))
def test_shipped_files_are_in_relion_layout(path: Path) -> None:
    value, to_text = _load(path)
    assert to_text(value) == path.read_text()


def test_relion_prep_scheme_content() -> None:
    s = read_scheme(RELION / "prep")
    assert s.name == "Schemes/prep/" and s.current_node == "WAIT" and s.start_node == "WAIT"
    assert {n: (v.kind, v.value, v.reset_value) for n, v in s.variables.items()} == {
        "do_at_most": (VarKind.FLOAT, 50.0, 50.0),
        "maxtime_hr": (VarKind.FLOAT, 48.0, 48.0),
        "wait_sec": (VarKind.FLOAT, 180.0, 180.0),
    }
    assert {n: (o.type, o.input1) for n, o in s.operators.items()} == {
        "WAIT": ("wait", "wait_sec"), "EXIT_maxtime": ("exit_maxtime", "maxtime_hr")
    }
    assert {n: (j.mode, j.has_started, j.current_name) for n, j in s.jobs.items()} == {
        n: (JobMode.CONTINUE, False, n) for n in ("importmovies", "motioncorr", "ctffind")
    }
    assert _edges(s) == PREP_EDGES


def test_relion_proc_scheme_content() -> None:
    s = read_scheme(RELION / "proc")
    assert _edges(s) == PROC_EDGES
    ops = {n: (o.type, o.output, o.input1, o.input2) for n, o in s.operators.items()}
    assert ops.pop("HAS_topaz_model") == ("bool=file_exists", "has_topaz_model", "topaz_model", None)
    assert ops == PROC_OPERATORS
    assert {n: j.mode.value for n, j in s.jobs.items()} == PROC_JOBS
    v = {n: x.value for n, x in s.variables.items()}
    assert v["min_nr_parts_3d"] == 5000.0 and v["wait_sec"] == 180.0 and v["do_log"] is True
    assert v["ctffind_mics"] == "Schemes/prep/ctffind/micrographs_ctf.star"
    assert v["iniref"] == "None" and v["myref"] == UNDEFINED
    assert s.variables["topaz_model"].kind is VarKind.STRING


def test_relion_templates_hold_the_documented_options() -> None:
    mc = read_job_template(RELION / "prep" / "motioncorr")
    assert mc.type_label == "relion.motioncorr" and not mc.is_continue
    assert mc.options["other_args"] == "--do_at_most $$do_at_most"
    assert mc.options["do_float16"] == "Yes" and mc.options["bin_factor"] == "2"
    c2 = read_job_template(RELION / "proc" / "class2d")
    assert c2.options["do_em"] == "No" and c2.options["do_grad"] == "Yes" and c2.options["nr_iter_grad"] == "200"
    r3 = read_job_template(RELION / "proc" / "refine3d")
    assert r3.options["fn_ref"] == "$$myref" and r3.options["sampling"] == "7.5 degrees"


def test_relion_schemes_validate() -> None:
    prep = read_scheme(RELION / "prep")
    validate_scheme(prep)
    proc = read_scheme(RELION / "proc")
    # RELION's proc has an operator that no edge reaches: an error unless allowed
    with pytest.raises(InputError, match="HAS_topaz_model cannot be reached"):
        validate_scheme(proc, "proc/scheme.star")
    validate_scheme(proc, allow_unreachable=True)
    for name, scheme in (("prep", prep), ("proc", proc)):
        templates = {j: read_job_template(RELION / name / j) for j in scheme.jobs}
        validate_job_templates(scheme, templates)


# ------------------------------------------------------------------------------------------------
# the shipped schemes/ run the same graphs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["prep", "proc"])
def test_shipped_schemes_encode_relions_graphs(name: str) -> None:
    ours, theirs = read_scheme(SHIPPED / name), read_scheme(RELION / name)
    assert _edges(ours) == _edges(theirs)
    assert {n: (j.mode, j.has_started) for n, j in ours.jobs.items()} == {
        n: (j.mode, j.has_started) for n, j in theirs.jobs.items()
    }
    their_ops = {n: o for n, o in theirs.operators.items() if n != "HAS_topaz_model"}  # unreachable: dropped
    assert dict(ours.operators) == their_ops
    assert set(theirs.variables) - {"has_topaz_model"} <= set(ours.variables)
    for n, var in theirs.variables.items():
        if n in ours.variables:
            assert ours.variables[n].kind is var.kind
    validate_scheme(ours)  # no unreachable nodes, every fork on a bool
    templates = {j: read_job_template(SHIPPED / name / j) for j in ours.jobs}
    validate_job_templates(ours, templates)
    for j, tpl in templates.items():  # same job family as RELION's template
        assert tpl.type_label.split(".")[:2] == read_job_template(RELION / name / j).type_label.split(".")[:2]


def test_shipped_proc_ties_class2d_iterations_to_the_ranker_input() -> None:
    """FIX: RELION hard-wires run_it200_optimiser.star; ours derives both from class2d_iter."""
    proc = read_scheme(SHIPPED / "proc")
    assert proc.variables["class2d_iter"].value == 200.0
    assert read_job_template(SHIPPED / "proc" / "class2d").options["nr_iter_grad"] == "$$class2d_iter"
    fn_model = read_job_template(SHIPPED / "proc" / "select_parts").options["fn_model"]
    assert "$$class2d_optimiser" in fn_model or "run_it200" in proc.variables["class2d_optimiser"].value


# ------------------------------------------------------------------------------------------------
# autospa's extra blocks, quoting
# ------------------------------------------------------------------------------------------------
def test_autospa_blocks_round_trip_and_relion_reader_ignores_them(tmp_path: Path) -> None:
    s = read_scheme(RELION / "prep")
    s = s.with_job("motioncorr", current_name="MotionCorr/job002/", has_started=True, fingerprint="abc123",
                   visit=JobVisit.LAUNCHED)
    s = s.with_status(RunStatus.FAILED, 'job "x" failed\nbadly').with_value("do_at_most", 7)
    write_scheme(tmp_path, s)
    back = read_scheme(tmp_path)
    assert back.jobs["motioncorr"].fingerprint == "abc123" and back.jobs["motioncorr"].visit is JobVisit.LAUNCHED
    assert back.status is RunStatus.FAILED and back.message == "job 'x' failed badly"
    assert back.variables["do_at_most"].value == 7.0 and back.variables["do_at_most"].reset_value == 50.0
    blocks = parse_star_text((tmp_path / "scheme.star").read_text())
    relion_blocks = [b for b in blocks if not b.startswith("autospa")]
    assert relion_blocks == ["scheme_general", "scheme_floats", "scheme_operators", "scheme_jobs", "scheme_edges"]
    # reset clears autospa's records too, and the file is RELION's again
    write_scheme(tmp_path, back.reset())
    assert "autospa" not in (tmp_path / "scheme.star").read_text()


def test_job_template_quoting(tmp_path: Path) -> None:
    tpl = read_job_template(RELION / "proc" / "refine3d").with_option("other_args", "").with_option(
        "fn_mask", "My Masks/mask one.mrc"
    )
    path = write_job_template(tmp_path, tpl)
    text = path.read_text()
    assert '   fn_mask "My Masks/mask one.mrc" \n' in text and 'other_args         "" \n' in text
    assert read_job_template(path) == tpl


# ------------------------------------------------------------------------------------------------
# validation: clear errors before anything runs
# ------------------------------------------------------------------------------------------------
def _edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


PREP_TEXT = (RELION / "prep" / "scheme.star").read_text() if (RELION / "prep" / "scheme.star").exists() else ""


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("EXIT_maxtime exit_maxtime", "EXIT_maxtime exit_sometimes", "operator EXIT_maxtime has unknown type 'exit_sometimes'"),
        ("motioncorr    ctffind ", "motioncorr    ctffindX ", "goes to 'ctffindX', which is not a node of the scheme"),
        ("WAIT       wait  undefined   wait_sec", "WAIT       wait  undefined   no_such_var", "input1 'no_such_var' is not a variable"),
        (
            "ctffind WAIT            0  undefined  undefined",
            "ctffind WAIT            1  motioncorr  wait_sec",
            "fork at ctffind: variable 'wait_sec' is a float, not a bool",
        ),
        (
            "importmovies motioncorr            0",
            "importmovies    ctffind            0",
            "node(s) motioncorr cannot be reached from the start node WAIT",
        ),
        ("_rlnSchemeJobMode #3 \n", "_rlnSchemeJobMode #3 \n", None),  # unchanged: valid
        ("motioncorr   continue", "motioncorr  overwrite", "mode 'overwrite' is not 'new' or 'continue'"),
    ],
)
def test_validation_errors_are_one_clear_line(old: str, new: str, message: str | None) -> None:
    text = _edit(PREP_TEXT, old, new)
    if message is None:
        validate_scheme(scheme_from_text(text, "x/scheme.star"), "x/scheme.star")
        return
    with pytest.raises(InputError) as info:
        validate_scheme(scheme_from_text(text, "x/scheme.star"), "x/scheme.star")
    msg = str(info.value)
    assert message in msg and msg.startswith("x/scheme.star: ") and "\n" not in msg


def test_template_with_unknown_variable_is_refused() -> None:
    prep = read_scheme(RELION / "prep")
    templates = {j: read_job_template(RELION / "prep" / j) for j in prep.jobs}
    templates["motioncorr"] = templates["motioncorr"].with_option("other_args", "--do_at_most $$do_at_least")
    with pytest.raises(InputError, match=r"motioncorr/job.star uses \$\$do_at_least"):
        validate_job_templates(prep, templates, "Schemes/prep")
    templates["motioncorr"] = read_job_template(RELION / "prep" / "motioncorr")
    templates["ctffind"] = None
    with pytest.raises(InputError, match="job ctffind has no template"):
        validate_job_templates(prep, templates, "Schemes/prep")


def test_malformed_star_is_an_input_error() -> None:
    with pytest.raises(InputError, match="not a scheme.star"):
        scheme_from_text("data_job\n_rlnJobTypeLabel relion.import\n", "f.star")
    bad = _edit(PREP_TEXT, "do_at_most    50.000000    50.000000", "do_at_most    fifty    50.000000")
    with pytest.raises(InputError, match="'fifty' is not a number"):
        scheme_from_text(bad, "f.star")
    bad = _edit(PREP_TEXT, "do_at_most    50.000000    50.000000", "do_at_most    50.000000")
    with pytest.raises(InputError, match="2 values for the 3 labels"):
        scheme_from_text(bad, "f.star")
