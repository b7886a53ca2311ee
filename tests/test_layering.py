"""DESIGN.md section 3: imports only point down, and the pure layers stay pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "autospa"

LAYER = {
    "conventions": 0, "errors": 0, "config": 0,
    "numerics": 1,
    "refinement": 2, "ranker": 2, "scheme": 2, "data": 2,
    "io": 3, "simulate": 3, "mdcatch": 3, "preprocess": 3, "report": 3,
    "distributed": 4,
    "jobs": 5, "orchestration": 5,
    "cli": 6,
}
PURE = {"numerics", "refinement", "ranker", "scheme", "conventions", "errors"}
IMPURE_LIBS = {"dask", "distributed", "prefect", "zarr", "xarray", "mrcfile", "starfile"}


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0].removesuffix(".py")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


FILES = [p for p in SRC.rglob("*.py") if _package_of(p) in LAYER]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path) -> None:
    pkg = _package_of(path)
    for mod in _imports(path):
        parts = mod.split(".")
        if parts[0] == "autospa" and len(parts) > 1 and parts[1] in LAYER:
            assert LAYER[parts[1]] <= LAYER[pkg], f"{path.relative_to(SRC)} imports {mod} (a higher layer)"
        if pkg in PURE:
            assert parts[0] not in IMPURE_LIBS, f"{path.relative_to(SRC)} imports {mod}: {pkg}/ stays pure"
        if parts[0] == "prefect":
            assert pkg == "orchestration", f"{path.relative_to(SRC)} imports prefect (only orchestration/ may)"


def test_every_package_has_a_layer() -> None:
    for child in SRC.iterdir():
        name = child.name.removesuffix(".py")
        if child.name.startswith("_") or name.startswith("."):
            continue
        if child.is_dir() and not (child / "__init__.py").exists():
            continue
        assert name in LAYER, f"src/autospa/{child.name} has no layer in DESIGN.md section 3"
