"""Every scheme operator, evaluated on real files in a project directory, with RELION-4.0's
semantics and the documented fixes of its bugs."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from autospa.errors import InputError
from autospa.io.scheme_files import FileSystemEnvironment, write_scheme
from autospa.scheme.model import UNDEFINED, Edge, JobMode, Operator, Scheme, SchemeError, SchemeJob, Variable, VarKind
from autospa.scheme.operators import OPERATORS, OperatorClock, evaluate_operator
from autospa.scheme.star_format import StarBlock, format_star
from autospa.scheme.validate import validate_scheme

F, B, S = VarKind.FLOAT, VarKind.BOOL, VarKind.STRING
TESTED: set[str] = set()


def _scheme(op_type: str, output=None, input1=None, input2=None, jobs=(), **variables) -> Scheme:
    """A one-operator scheme ``OP -> OP`` with ``variables`` given as ``name=(kind, value)``."""
    vars_ = {n: Variable(n, k, v, v) for n, (k, v) in variables.items()}
    return Scheme(
        name="Schemes/test/",
        variables=vars_,
        operators={"OP": Operator("OP", op_type, output, input1, input2)},
        jobs={j.name: j for j in jobs},
        edges=(),
    )


def _run(scheme: Scheme, project: Path, clock: OperatorClock | None = None) -> tuple[Scheme, bool]:
    TESTED.add(scheme.operators["OP"].type)
    return evaluate_operator(scheme, "OP", FileSystemEnvironment(project), clock or OperatorClock())


def _out(scheme: Scheme, project: Path, name: str = "out", clock: OperatorClock | None = None):
    s, go_on = _run(scheme, project, clock)
    assert go_on
    return s.variables[name].value


def _write_star(path: Path, blocks: dict[str, tuple[list[str], list[list]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_star([StarBlock(n, True, labels, rows) for n, (labels, rows) in blocks.items()]))


@pytest.fixture
def ctf_star(tmp_path: Path) -> Path:
    """A RELION 3.1 micrographs_ctf.star with 4 micrographs."""
    path = tmp_path / "CtfFind" / "job003" / "micrographs_ctf.star"
    _write_star(
        path,
        {
            "optics": (["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographPixelSize"], [["opticsGroup1", 1, 0.885]]),
            "micrographs": (
                ["rlnMicrographName", "rlnCtfMaxResolution", "rlnDefocusU", "rlnOpticsGroup"],
                [["m1.mrc", 4.5, 12000.0, 1], ["m2.mrc", 7.25, 15000.0, 1], ["m3.mrc", 3.5, 9000.0, 1], ["m4.mrc", 5.0, 20000.0, 1]],
            ),
        },
    )
    return path


# ------------------------------------------------------------------------------------------------
# bool
# ------------------------------------------------------------------------------------------------
def test_bool_logic(tmp_path: Path) -> None:
    for a in (True, False):
        assert _out(_scheme("bool=set", "out", "a", out=(B, False), a=(B, a)), tmp_path) is a
        assert _out(_scheme("bool=not", "out", "a", out=(B, False), a=(B, a)), tmp_path) is (not a)
        for b in (True, False):
            kw = dict(out=(B, False), a=(B, a), b=(B, b))
            assert _out(_scheme("bool=and", "out", "a", "b", **kw), tmp_path) is (a and b)
            assert _out(_scheme("bool=or", "out", "a", "b", **kw), tmp_path) is (a or b)


@pytest.mark.parametrize(
    "op, x, y, expected",
    [
        ("bool=gt", 37.0, 0.0, True), ("bool=gt", 5.0, 5.0, False),
        ("bool=lt", 1.0, 2.0, True), ("bool=lt", 2.0, 2.0, False),
        ("bool=ge", 5000.0, 5000.0, True), ("bool=ge", 4999.0, 5000.0, False),
        ("bool=le", 3.0, 3.0, True), ("bool=le", 3.5, 3.0, False),
        ("bool=eq", 0.1 + 0.2, 0.3, True), ("bool=eq", 1.0, 1.001, False),
    ],
)
def test_comparisons(tmp_path: Path, op: str, x: float, y: float, expected: bool) -> None:
    s = _scheme(op, "out", "x", "y", out=(B, not expected), x=(F, x), y=(F, y))
    assert _out(s, tmp_path) is expected


def test_literal_number_as_input2_is_used(tmp_path: Path) -> None:
    """FIX: RELION accepts ``--i2 10`` but compares against 0; we use 10."""
    s = _scheme("bool=gt", "out", "x", "10", out=(B, False), x=(F, 5.0))
    validate_scheme(dataclasses.replace(s, edges=(Edge("OP", "OP"),)))  # a literal passes validation
    assert _out(s, tmp_path) is False  # 5 > 10 is false (RELION: 5 > 0 -> true)
    s = _scheme("float=plus", "out", "x", "2.5", out=(F, 0.0), x=(F, 5.0))
    assert _out(s, tmp_path) == 7.5


def test_file_exists_with_path_rewriting(tmp_path: Path, ctf_star: Path) -> None:
    job = SchemeJob("ctffind", "CtfFind/job003/", JobMode.CONTINUE, True)
    s = _scheme("bool=file_exists", "out", "f", out=(B, False), f=(S, "Schemes/test/ctffind/micrographs_ctf.star"), jobs=[job])
    out, _ = _run(s, tmp_path)
    assert out.variables["out"].value is True
    assert out.variables["f"].value == "Schemes/test/ctffind/micrographs_ctf.star"  # stored form kept
    s = _scheme("bool=file_exists", "out", "f", out=(B, True), f=(S, "None"))
    assert _out(s, tmp_path) is False


def test_path_rewriting_in_another_scheme(tmp_path: Path, ctf_star: Path) -> None:
    """proc reads prep's output: Schemes/prep/ctffind/... -> prep's ctffind job directory."""
    prep = Scheme(
        name="Schemes/prep/",
        jobs={"ctffind": SchemeJob("ctffind", "CtfFind/job003/", JobMode.CONTINUE, True)},
    )
    write_scheme(tmp_path / "Schemes" / "prep", prep)
    s = _scheme(
        "float=count_images", "out", "f", "t", out=(F, 0.0),
        f=(S, "Schemes/prep/ctffind/micrographs_ctf.star"), t=(S, "micrographs"),
    )
    assert _out(s, tmp_path) == 4.0
    # prep's job has not run: the path is left as it is (RELION glues node and file name)
    write_scheme(tmp_path / "Schemes" / "prep", prep.with_job("ctffind", current_name="ctffind", has_started=False))
    assert _out(s, tmp_path) == 0.0
    # a missing other scheme is an error, not a silent 0
    (tmp_path / "Schemes" / "prep" / "scheme.star").unlink()
    with pytest.raises(SchemeError, match="cannot be read"):
        _run(s, tmp_path)


def test_inputs_are_rewritten_independently(tmp_path: Path, ctf_star: Path) -> None:
    """FIX: RELION writes a rewritten input2 over input1 (string=join would give input2 twice)."""
    job = SchemeJob("ctffind", "CtfFind/job003/", JobMode.CONTINUE, True)
    s = _scheme(
        "string=join", "out", "a", "b", out=(S, ""), a=(S, "prefix:"),
        b=(S, "Schemes/test/ctffind/micrographs_ctf.star"), jobs=[job],
    )
    assert _out(s, tmp_path) == "prefix:CtfFind/job003/micrographs_ctf.star"


# ------------------------------------------------------------------------------------------------
# read_star and STAR tables
# ------------------------------------------------------------------------------------------------
def test_read_star_goes_to_the_output_variable(tmp_path: Path, ctf_star: Path) -> None:
    """FIX: RELION stores the value in the namespace of the label's type; we store it in the output."""
    rel = str(ctf_star.relative_to(tmp_path))
    s = _scheme("float=read_star", "out", "spec", "row", out=(F, 0.0), spec=(S, f"{rel},micrographs,rlnDefocusU"), row=(F, 2.0))
    assert _out(s, tmp_path) == 9000.0
    s = _scheme("float=read_star", "out", "spec", out=(F, 0.0), spec=(S, f"{rel},micrographs,rlnCtfMaxResolution"))
    assert _out(s, tmp_path) == 4.5  # default row 0
    s = _scheme("string=read_star", "out", "spec", "1", out=(S, ""), spec=(S, f"{rel},micrographs,rlnMicrographName"))
    assert _out(s, tmp_path) == "m2.mrc"
    s = _scheme("string=read_star", "out", "spec", out=(S, ""), spec=(S, f"{rel},optics,rlnOpticsGroupName"))
    assert _out(s, tmp_path) == "opticsGroup1"
    flags = tmp_path / "flags.star"
    flags.write_text("data_general\n_rlnDoThis 1\n_rlnName hello\n")
    s = _scheme("bool=read_star", "out", "spec", out=(B, False), spec=(S, "flags.star,general,rlnDoThis"))
    assert _out(s, tmp_path) is True
    s = _scheme("float=read_star", "out", "spec", "9", out=(F, 0.0), spec=(S, f"{rel},micrographs,rlnDefocusU"))
    with pytest.raises(SchemeError, match="row 9 does not exist"):
        _run(s, tmp_path)
    s = _scheme("float=read_star", "out", "spec", out=(F, 0.0), spec=(S, f"{rel},micrographs"))
    with pytest.raises(SchemeError, match="must be 'starfile,table,rlnLabel'"):
        _run(s, tmp_path)


def test_star_table_statistics_and_indices(tmp_path: Path, ctf_star: Path) -> None:
    rel = str(ctf_star.relative_to(tmp_path))
    spec = (S, f"{rel},micrographs,rlnCtfMaxResolution")  # 4.5, 7.25, 3.5, 5.0
    assert _out(_scheme("float=star_table_max", "out", "spec", out=(F, 0.0), spec=spec), tmp_path) == 7.25
    assert _out(_scheme("float=star_table_min", "out", "spec", out=(F, 0.0), spec=spec), tmp_path) == 3.5
    assert _out(_scheme("float=star_table_avg", "out", "spec", out=(F, 0.0), spec=spec), tmp_path) == pytest.approx(5.0625)
    # FIX: implemented (declared but missing in RELION): 0-based rows of the max and min
    assert _out(_scheme("float=star_table_max_idx", "out", "spec", out=(F, 0.0), spec=spec), tmp_path) == 1.0
    assert _out(_scheme("float=star_table_min_idx", "out", "spec", out=(F, 0.0), spec=spec), tmp_path) == 2.0
    # sort_idx: k = 1 -> row of the smallest, k = 2 -> second smallest, k = -1 -> row of the largest
    expected = {1: 2.0, 2: 0.0, 3: 3.0, 4: 1.0, -1: 1.0, -2: 3.0}
    for k, row in expected.items():
        s = _scheme("float=star_table_sort_idx", "out", "spec", "k", out=(F, 0.0), spec=spec, k=(F, float(k)))
        assert _out(s, tmp_path) == row, k
    s = _scheme("float=star_table_sort_idx", "out", "spec", "0", out=(F, 0.0), spec=spec)
    with pytest.raises(SchemeError, match="k = 0"):
        _run(s, tmp_path)


def test_count_images(tmp_path: Path, ctf_star: Path) -> None:
    rel = str(ctf_star.relative_to(tmp_path))
    s = _scheme("float=count_images", "out", "f", "t", out=(F, -1.0), f=(S, rel), t=(S, "micrographs"))
    assert _out(s, tmp_path) == 4.0
    parts = tmp_path / "Extract" / "job005" / "particles.star"
    _write_star(parts, {"optics": (["rlnOpticsGroup"], [[1]]), "particles": (["rlnImageName"], [[f"{i}@s.mrcs"] for i in range(1, 8)])})
    s = _scheme("float=count_images", "out", "f", out=(F, -1.0), f=(S, "Extract/job005/particles.star"))
    assert _out(s, tmp_path) == 7.0  # default table: particles
    s = _scheme("float=count_images", "out", "f", out=(F, -1.0), f=(S, "Select/job009/particles.star"))
    assert _out(s, tmp_path) == 0.0  # no file yet: 0, as RELION


def test_float_arithmetic(tmp_path: Path) -> None:
    kw = dict(out=(F, 0.0), a=(F, 7.0), b=(F, 2.0))
    assert _out(_scheme("float=set", "out", "a", **kw), tmp_path) == 7.0
    assert _out(_scheme("float=plus", "out", "a", "b", **kw), tmp_path) == 9.0
    assert _out(_scheme("float=minus", "out", "a", "b", **kw), tmp_path) == 5.0
    assert _out(_scheme("float=mult", "out", "a", "b", **kw), tmp_path) == 14.0
    assert _out(_scheme("float=divide", "out", "a", "b", **kw), tmp_path) == 3.5
    with pytest.raises(SchemeError, match="division by zero"):  # FIX: RELION stores inf
        _run(_scheme("float=divide", "out", "a", "z", out=(F, 0.0), a=(F, 1.0), z=(F, 0.0)), tmp_path)
    for x, r in ((2.5, 3.0), (-2.5, -3.0), (2.4999, 2.0), (0.5, 1.0), (-0.4, 0.0)):  # half away from zero
        assert _out(_scheme("float=round", "out", "a", out=(F, 0.0), a=(F, x)), tmp_path) == r


def test_count_words(tmp_path: Path) -> None:
    for text, n in (("a.mrc,b.mrc,c.mrc", 3.0), ("one", 1.0), (UNDEFINED, 0.0), ("", 0.0)):
        assert _out(_scheme("float=count_words", "out", "w", out=(F, -1.0), w=(S, text)), tmp_path) == n


# ------------------------------------------------------------------------------------------------
# strings
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op, expected",
    [
        ("string=before_first", "Movies/a"),
        ("string=after_first", "b_c.tiff"),
        ("string=before_last", "Movies/a_b"),
        ("string=after_last", "c.tiff"),
    ],
)
def test_string_splits(tmp_path: Path, op: str, expected: str) -> None:
    s = _scheme(op, "out", "t", "d", out=(S, ""), t=(S, "Movies/a_b_c.tiff"), d=(S, "_"))
    assert _out(s, tmp_path) == expected
    s = _scheme(op, "out", "t", "d", out=(S, ""), t=(S, "Movies/a.tiff"), d=(S, "#"))
    assert _out(s, tmp_path) == "Movies/a.tiff"  # absent delimiter: the whole input


def test_string_set_join_glob_nth_word(tmp_path: Path) -> None:
    assert _out(_scheme("string=set", "out", "a", out=(S, ""), a=(S, "x y")), tmp_path) == "x y"
    assert _out(_scheme("string=join", "out", "a", "b", out=(S, ""), a=(S, "run_it"), b=(S, "025")), tmp_path) == "run_it025"
    for name in ("b.tiff", "a.tiff", "c.mrc"):
        (tmp_path / "Movies").mkdir(exist_ok=True)
        (tmp_path / "Movies" / name).write_bytes(b"")
    s = _scheme("string=glob", "out", "g", out=(S, ""), g=(S, "Movies/*.tiff"))
    assert _out(s, tmp_path) == "Movies/a.tiff,Movies/b.tiff"
    s = _scheme("string=glob", "out", "g", out=(S, ""), g=(S, "Movies/*.eer"))
    assert _out(s, tmp_path) == UNDEFINED
    words = (S, "a,b,c")
    for n, w in ((1, "a"), (3, "c"), (4, UNDEFINED), (0, UNDEFINED), (-1, "c"), (-3, "a"), (-4, UNDEFINED)):
        # FIX: negative N counts from the end (RELION always gives undefined)
        s = _scheme("string=nth_word", "out", "w", "n", out=(S, ""), w=words, n=(F, float(n)))
        assert _out(s, tmp_path) == w, n


# ------------------------------------------------------------------------------------------------
# files (in Python, no shell; only inside the project)
# ------------------------------------------------------------------------------------------------
def test_touch_copy_move_delete(tmp_path: Path) -> None:
    _run(_scheme("touch_file", None, "f", f=(S, "flags/ready")), tmp_path)
    assert (tmp_path / "flags" / "ready").is_file()
    (tmp_path / "a.txt").write_text("A")
    _run(_scheme("copy_file", None, "s", "d", s=(S, "a.txt"), d=(S, "backup/a_copy.txt")), tmp_path)
    assert (tmp_path / "backup" / "a_copy.txt").read_text() == "A" and (tmp_path / "a.txt").exists()
    (tmp_path / "b.txt").write_text("B")
    _run(_scheme("copy_file", None, "s", "d", s=(S, "*.txt"), d=(S, "many/")), tmp_path)  # globs expand
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["a.txt", "b.txt"]
    _run(_scheme("move_file", None, "s", "d", s=(S, "b.txt"), d=(S, "moved/b.txt")), tmp_path)
    assert (tmp_path / "moved" / "b.txt").read_text() == "B" and not (tmp_path / "b.txt").exists()
    _run(_scheme("delete_file", None, "s", s=(S, "many/*.txt")), tmp_path)
    assert list((tmp_path / "many").iterdir()) == []
    _run(_scheme("delete_file", None, "s", s=(S, "nothing_here*")), tmp_path)  # rm -f: no error
    outside = tmp_path.parent / f"{tmp_path.name}_outside.txt"
    with pytest.raises(SchemeError, match="outside the project directory"):
        _run(_scheme("copy_file", None, "s", "d", s=(S, "a.txt"), d=(S, str(outside))), tmp_path)
    assert not outside.exists()
    with pytest.raises(SchemeError, match="nothing matches"):
        _run(_scheme("move_file", None, "s", "d", s=(S, "missing.txt"), d=(S, "x.txt")), tmp_path)


# ------------------------------------------------------------------------------------------------
# time, mail, exit
# ------------------------------------------------------------------------------------------------
def test_wait_first_call_does_not_sleep_then_paces_the_loop(tmp_path: Path) -> None:
    clock = OperatorClock()
    s = _scheme("wait", "elapsed", "sec", elapsed=(F, -1.0), sec=(F, 0.3))
    t0 = time.monotonic()
    out, go_on = _run(s, tmp_path, clock)
    assert go_on and time.monotonic() - t0 < 0.1 and out.variables["elapsed"].value == 0.0
    out, _ = _run(s, tmp_path, clock)  # sleeps until 0.3 s after the first call
    assert 0.28 <= time.monotonic() - t0 < 0.6
    assert out.variables["elapsed"].value == pytest.approx(0.3, abs=0.1)
    time.sleep(0.35)  # the loop took longer than the period: no sleep
    t1 = time.monotonic()
    _run(s, tmp_path, clock)
    assert time.monotonic() - t1 < 0.1


def test_wait_is_cut_short_by_an_abort(tmp_path: Path) -> None:
    flag = tmp_path / "abort"
    env = FileSystemEnvironment(tmp_path, abort_check=flag.exists)
    clock = OperatorClock()
    s = _scheme("wait", None, "sec", sec=(F, 30.0))
    TESTED.add("wait")
    evaluate_operator(s, "OP", env, clock)
    flag.write_text("")
    t0 = time.monotonic()
    evaluate_operator(s, "OP", env, clock)
    assert time.monotonic() - t0 < 1.0


def test_exit_maxtime_and_exit(tmp_path: Path) -> None:
    clock = OperatorClock()
    s = _scheme("exit_maxtime", None, "h", h=(F, 0.25 / 3600))  # a quarter of a second
    assert _run(s, tmp_path, clock)[1] is True  # first call sets the deadline
    assert _run(s, tmp_path, clock)[1] is True
    time.sleep(0.3)
    assert _run(s, tmp_path, clock)[1] is False  # past the deadline: stop
    assert _run(s, tmp_path, OperatorClock())[1] is True  # a new process gets a fresh deadline
    assert _run(_scheme("exit"), tmp_path)[1] is False


def test_email_without_address_does_nothing_and_with_one_sends(tmp_path: Path) -> None:
    sent = []

    class Env(FileSystemEnvironment):
        def send_email(self, to: str, subject: str, body: str) -> None:
            sent.append((to, subject, body))

    s = _scheme("email", None, "n", n=(F, 42.0))
    TESTED.add("email")
    _, go_on = evaluate_operator(s, "OP", Env(tmp_path), OperatorClock())
    assert go_on and sent == []
    s = _scheme("email", None, "n", "m", n=(F, 42.0), m=(S, "hello"), email=(S, "me@example.org"))
    evaluate_operator(s, "OP", Env(tmp_path), OperatorClock())
    assert sent[0][0] == "me@example.org" and sent[0][1] == "Schemer: test"
    assert "n = 42.0" in sent[0][2] and "m = hello" in sent[0][2]


# ------------------------------------------------------------------------------------------------
# the registry and validation
# ------------------------------------------------------------------------------------------------
def test_validation_checks_variable_kinds() -> None:
    def scheme(op_type, output, i1, i2=None, **v):
        s = _scheme(op_type, output, i1, i2, **v)
        return Scheme(name=s.name, variables=s.variables, operators=s.operators, edges=(Edge("OP", "OP"),))

    validate_scheme(scheme("bool=ge", "o", "x", "y", o=(B, False), x=(F, 1.0), y=(F, 2.0)))
    with pytest.raises(InputError, match="output 'o' is a float variable, not bool"):
        validate_scheme(scheme("bool=ge", "o", "x", "y", o=(F, 0.0), x=(F, 1.0), y=(F, 2.0)))
    with pytest.raises(InputError, match="input1 'x' is a string variable, not float"):  # FIX: RELION skips this
        validate_scheme(scheme("bool=gt", "o", "x", "y", o=(B, False), x=(S, "a"), y=(F, 2.0)))
    with pytest.raises(InputError, match="needs input2"):
        validate_scheme(scheme("string=join", "o", "a", None, o=(S, ""), a=(S, "")))
    with pytest.raises(InputError, match="takes no input2"):
        validate_scheme(scheme("float=set", "o", "a", "b", o=(F, 0.0), a=(F, 0.0), b=(F, 0.0)))
    with pytest.raises(InputError, match="'ten' is not a variable"):
        validate_scheme(scheme("float=plus", "o", "a", "ten", o=(F, 0.0), a=(F, 0.0)))


def test_every_registered_operator_was_exercised() -> None:
    """Runs last in this module: every RELION-4.0 operator type (plus the two it declares but never
    implemented) has been evaluated above."""
    relion_types = {
        "bool=set", "bool=and", "bool=or", "bool=not", "bool=gt", "bool=lt", "bool=ge", "bool=le", "bool=eq",
        "bool=file_exists", "bool=read_star", "float=set", "float=plus", "float=minus", "float=mult",
        "float=divide", "float=round", "float=count_images", "float=count_words", "float=read_star",
        "float=star_table_max", "float=star_table_min", "float=star_table_avg", "float=star_table_sort_idx",
        "float=star_table_max_idx", "float=star_table_min_idx", "string=set", "string=join",
        "string=before_first", "string=after_first", "string=before_last", "string=after_last",
        "string=read_star", "string=glob", "string=nth_word", "touch_file", "copy_file", "move_file",
        "delete_file", "wait", "email", "exit_maxtime", "exit",
    }
    assert set(OPERATORS) == relion_types
    assert TESTED == relion_types
