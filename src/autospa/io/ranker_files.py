"""Files of the class ranker (L3): reading a 2D job, writing relion_class_ranker's outputs, the
model files (RELION 5.0's checkpoint and RELION 4.0's TorchScript), the training corpus.

Reading a 2D classification job starts from its ``run_itNNN_optimiser.star`` as RELION does:
``rlnModelStarFile`` and ``rlnExperimentalDataStarFile`` name the model and data files (paths are
relative to the project directory, i.e. the working directory; when that does not resolve, the
file of that name beside the optimiser file is used), ``rlnReferenceImage`` of
``data_model_classes`` names the class averages (``000001@run_it025_classes.mrcs``).

Outputs written to ``--o`` (reference/relion-schemes-and-ranker.md B9), all atomically:
``features.npy`` / ``images.npy`` (network inputs), ``rank_optimiser.star``, ``rank_model.star``
(rlnClassScore, -999 for classes not scored), ``rank_data.star`` (all particles +
rlnSortedIndex), ``backup_selection.star`` (rlnSelected per class), ``particles.star`` (selected
particles), ``class_averages.star`` (selected classes with rlnPredictedClassScore) and
``rank_classes.png`` (gallery sorted by score).
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autospa.errors import InputError
from autospa.io.atomic import atomic_path, write_bytes, write_text
from autospa.io.mrc import read_mrc, write_mrc
from autospa.io.star import read_star, write_star

log = logging.getLogger(__name__)

#: Columns RELION's rank_model.star carries (B9), in order.
RANK_MODEL_COLUMNS = (
    "rlnReferenceImage", "rlnClassScore", "rlnClassDistribution", "rlnAccuracyRotations", "rlnAccuracyTranslationsAngst",
    "rlnEstimatedResolution", "rlnOverallFourierCompleteness", "rlnClassPriorOffsetX", "rlnClassPriorOffsetY",
)  # fmt: skip
#: Columns of class_averages.star (B9), in order.
CLASS_AVERAGES_COLUMNS = (
    "rlnReferenceImage", "rlnPredictedClassScore", "rlnClassDistribution", "rlnAccuracyRotations",
    "rlnAccuracyTranslationsAngst", "rlnEstimatedResolution",
)  # fmt: skip


@dataclass
class Class2DJob:
    """Everything the ranker reads of one 2D classification iteration.

    Attributes
    ----------
    optimiser_path, model_path, data_path
        The files read.
    optimiser
        ``data_optimiser_general`` (label -> value).
    model_general
        ``data_model_general``.
    classes_table
        ``data_model_classes`` (one row per class).
    class_spectra
        ``data_model_class_N`` tables (SSNR per shell), one per class (empty frames if absent).
    classes
        ``(K, D, D)`` float32 class averages.
    pixel_size_a
        rlnPixelSize of the model.
    particles, optics
        data.star's tables.
    reference_images
        ``N@stack`` of every class with the stack path as found (written to the outputs, so that
        they point to the class averages from wherever they are read).
    """

    optimiser_path: Path
    model_path: Path
    data_path: Path
    optimiser: dict
    model_general: dict
    classes_table: pd.DataFrame
    class_spectra: list[pd.DataFrame]
    classes: np.ndarray
    pixel_size_a: float
    particles: pd.DataFrame
    optics: pd.DataFrame
    reference_images: list[str]

    @property
    def n_classes(self) -> int:
        return int(self.classes.shape[0])

    @property
    def particle_diameter_a(self) -> float:
        return float(self.optimiser.get("rlnParticleDiameter", 0.0))

    @property
    def do_correct_ctf(self) -> bool:
        return bool(int(self.optimiser.get("rlnDoCorrectCtf", 1)))


def _resolve(name: str, beside: Path) -> Path:
    """A file named in a STAR file: absolute, relative to the working (project) directory, or
    the file of that name beside ``beside``'s folder."""
    p = Path(str(name).strip())
    if p.exists():
        return p
    for cand in ((beside / p.name,) if p.is_absolute() else (beside / p, beside / p.name)):
        if cand.exists():
            return cand
    return p


def _frame(block, path: Path, name: str) -> pd.DataFrame:
    if isinstance(block, pd.DataFrame):
        return block
    if isinstance(block, dict) and block:
        return pd.DataFrame([block])
    raise InputError(path, f"no data_{name} table")


def read_class2d_job(optimiser_path: str | Path) -> Class2DJob:
    """Read a 2D classification iteration from its optimiser.star.

    Raises
    ------
    InputError
        A file is missing or unreadable, not a 2D job, or the class averages do not match the
        model (count, size).
    """
    opt_path = Path(optimiser_path)
    if not opt_path.is_file():
        raise InputError(opt_path, "optimiser file does not exist")
    blocks = read_star(opt_path)
    opt = blocks.get("optimiser_general")
    if not isinstance(opt, dict):
        raise InputError(opt_path, "no data_optimiser_general block (is this a run_itNNN_optimiser.star?)")
    for label in ("rlnModelStarFile", "rlnExperimentalDataStarFile"):
        if label not in opt:
            raise InputError(opt_path, f"data_optimiser_general has no {label}")
    model_path = _resolve(opt["rlnModelStarFile"], opt_path.parent)
    data_path = _resolve(opt["rlnExperimentalDataStarFile"], opt_path.parent)
    for p in (model_path, data_path):
        if not p.is_file():
            raise InputError(opt_path, f"names {p}, which does not exist")
    mblocks = read_star(model_path)
    general = mblocks.get("model_general")
    if not isinstance(general, dict):
        raise InputError(model_path, "no data_model_general block")
    if int(general.get("rlnReferenceDimensionality", 2)) != 2:
        raise InputError(model_path, "not a 2D classification (rlnReferenceDimensionality is not 2)")
    table = _frame(mblocks.get("model_classes"), model_path, "model_classes").reset_index(drop=True)
    for label in ("rlnReferenceImage", "rlnClassDistribution"):
        if label not in table:
            raise InputError(model_path, f"data_model_classes has no {label}")
    k = len(table)
    spectra = []
    for c in range(k):
        s = mblocks.get(f"model_class_{c + 1}")
        spectra.append(s if isinstance(s, pd.DataFrame) else pd.DataFrame())
    classes, refs = _read_class_images(table["rlnReferenceImage"].astype(str).tolist(), model_path)
    pixel = float(general.get("rlnPixelSize", 0.0))
    if not pixel > 0:
        raise InputError(model_path, "rlnPixelSize is missing or not positive")
    dblocks = read_star(data_path)
    particles = _frame(dblocks.get("particles"), data_path, "particles").reset_index(drop=True)
    optics = dblocks.get("optics")
    optics = optics if isinstance(optics, pd.DataFrame) else (pd.DataFrame([optics]) if isinstance(optics, dict) else pd.DataFrame())
    if "rlnClassNumber" not in particles:
        raise InputError(data_path, "data_particles has no rlnClassNumber")
    return Class2DJob(opt_path, model_path, data_path, opt, general, table, spectra, classes, pixel, particles, optics, refs)


def _read_class_images(refs: list[str], model_path: Path) -> tuple[np.ndarray, list[str]]:
    stacks: dict[Path, np.ndarray] = {}
    out, names = [], []
    for ref in refs:
        if "@" not in ref:
            raise InputError(model_path, f"rlnReferenceImage {ref!r} is not N@stack")
        idx_s, name = ref.split("@", 1)
        path = _resolve(name, model_path.parent)
        if path not in stacks:
            if not path.is_file():
                raise InputError(model_path, f"class averages {path} do not exist")
            data, _ = read_mrc(path)
            stacks[path] = data[None] if data.ndim == 2 else data
        arr = stacks[path]
        i = int(idx_s) - 1
        if not 0 <= i < arr.shape[0]:
            raise InputError(path, f"has {arr.shape[0]} images, {ref} asked for")
        out.append(np.asarray(arr[i], np.float32))
        names.append(f"{i + 1:06d}@{path}")
    if not out:
        raise InputError(model_path, "data_model_classes is empty")
    return np.stack(out), names


# ------------------------------------------------------------------------------------ outputs ---


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    """A ``.npy`` file, atomically."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    write_bytes(path, buf.getvalue())
    return Path(path)


def write_rank_outputs(
    out_dir: str | Path,
    job: Class2DJob,
    scores: np.ndarray,
    selected: np.ndarray,
    features: np.ndarray,
    images: np.ndarray,
    scored: np.ndarray,
    gallery_png: bytes | None,
    fn_root: str = "rank",
    fn_sel_parts: str = "particles.star",
    fn_sel_classavgs: str = "class_averages.star",
    write_selection: bool = True,
) -> dict[str, Path]:
    """Write relion_class_ranker's files.

    Parameters
    ----------
    out_dir
        ``--o``.
    job
        The 2D job read by :func:`read_class2d_job`.
    scores
        ``(K,)`` predicted scores (any value for classes not scored).
    selected
        ``(K,)`` bool.
    features, images
        ``(n, 24)`` normalised features and ``(n, 64, 64)`` images of the ``n`` scored classes.
    scored
        ``(K,)`` bool: classes that got a score (the others get -999).
    gallery_png
        The gallery image or None.
    fn_root, fn_sel_parts, fn_sel_classavgs
        Output names (RELION's options).
    write_selection
        Write particles.star, class_averages.star and backup_selection.star (``--auto_select``).

    Returns
    -------
    dict
        Output name -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = job.n_classes
    files: dict[str, Path] = {}
    files["features"] = write_npy(out / "features.npy", np.asarray(features, np.float32))
    files["images"] = write_npy(out / "images.npy", np.asarray(images, np.float32))
    score_col = np.where(scored, np.asarray(scores, np.float64), -999.0)
    table = job.classes_table
    refs = np.asarray(job.reference_images, dtype=object)
    model = pd.DataFrame({"rlnReferenceImage": refs, "rlnClassScore": score_col})
    for col in RANK_MODEL_COLUMNS[2:]:
        model[col] = table[col].to_numpy() if col in table else np.zeros(k)
    model_path = out / f"{fn_root}_model.star"
    data_path = out / f"{fn_root}_data.star"
    files["model"] = write_star(model_path, {"model_classes": model})
    parts = job.particles.copy()
    parts["rlnSortedIndex"] = np.arange(len(parts), dtype=np.int64)
    data_blocks = {"optics": job.optics, "particles": parts} if len(job.optics) else {"particles": parts}
    files["data"] = write_star(data_path, data_blocks)
    opt = {"rlnModelStarFile": str(model_path), "rlnExperimentalDataStarFile": str(data_path)}
    files["optimiser"] = write_star(out / f"{fn_root}_optimiser.star", {"optimiser_general": opt})
    if write_selection:
        sel = np.asarray(selected, bool)
        files["backup_selection"] = write_star(out / "backup_selection.star", {"": pd.DataFrame({"rlnSelected": sel.astype(np.int64)})})
        cls_num = job.particles["rlnClassNumber"].to_numpy(np.int64)
        keep = np.isin(cls_num, np.flatnonzero(sel) + 1)
        sel_parts = job.particles[keep].reset_index(drop=True)
        files["particles"] = write_star(out / fn_sel_parts, {"optics": job.optics, "particles": sel_parts} if len(job.optics)
                                        else {"particles": sel_parts})
        order = [int(c) for c in np.argsort(-score_col, kind="stable") if sel[c]]
        avg = pd.DataFrame({
            "rlnReferenceImage": refs[order],
            "rlnPredictedClassScore": score_col[order],
        })
        for col in CLASS_AVERAGES_COLUMNS[2:]:
            avg[col] = (table[col].to_numpy() if col in table else np.zeros(k))[order]
        files["class_averages"] = write_star(out / fn_sel_classavgs, {"": avg})
    if gallery_png is not None:
        write_bytes(out / f"{fn_root}_classes.png", gallery_png)
        files["gallery"] = out / f"{fn_root}_classes.png"
    return files


def read_overrides(path: str | Path, n_classes: int) -> dict[int, bool]:
    """A file of manual selection overrides: class number (1-based) -> selected.

    Accepted forms:

    - text, one ``CLASS 1|0`` (or ``+CLASS`` / ``-CLASS``) per line, ``#`` comments;
    - a STAR file with ``rlnClassNumber`` and ``rlnSelected`` columns;
    - RELION's ``backup_selection.star`` (``rlnSelected`` only: row i is class i + 1).

    Raises
    ------
    InputError
        Unreadable lines, class numbers outside 1..K, values other than 0/1.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "overrides file does not exist")
    text = p.read_text(errors="replace")
    out: dict[int, bool] = {}
    if "data_" in text:
        blocks = read_star(p)
        table = next((b for b in blocks.values() if isinstance(b, pd.DataFrame) and "rlnSelected" in b), None)
        if table is None:
            single = next((b for b in blocks.values() if isinstance(b, dict) and "rlnSelected" in b), None)
            table = pd.DataFrame([single]) if single else None
        if table is None:
            raise InputError(p, "no rlnSelected column")
        classes = table["rlnClassNumber"].to_numpy() if "rlnClassNumber" in table else np.arange(1, len(table) + 1)
        values = table["rlnSelected"].to_numpy()
        pairs = list(zip(classes, values))
    else:
        pairs = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            f = line.split()
            try:
                if len(f) == 1 and f[0][0] in "+-":
                    pairs.append((int(f[0][1:]), 1 if f[0][0] == "+" else 0))
                elif len(f) == 2:
                    pairs.append((int(f[0]), int(f[1])))
                else:
                    raise ValueError
            except ValueError:
                raise InputError(p, f"line {n}: expected 'CLASS 0|1', '+CLASS' or '-CLASS', got {line!r}") from None
    for c, v in pairs:
        c, v = int(c), int(v)
        if not 1 <= c <= n_classes:
            raise InputError(p, f"class {c} is outside 1..{n_classes}")
        if v not in (0, 1):
            raise InputError(p, f"class {c}: selection {v} is not 0 or 1")
        out[c] = bool(v)
    return out


# ------------------------------------------------------------------------------- model files ---


def save_checkpoint(path: str | Path, payload: Mapping) -> Path:
    """``torch.save`` of a dict (RELION 5.0's class-ranker checkpoint layout), atomically."""
    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)
    return Path(path)


def save_torchscript(path: str | Path, module: torch.nn.Module) -> Path:
    """A scripted module (RELION 4.0's ``relion_class_ranker_default_model.pt`` format), atomically."""
    scripted = torch.jit.script(module)
    with atomic_path(path) as tmp:
        torch.jit.save(scripted, str(tmp))
    return Path(path)


def load_model_file(path: str | Path) -> dict | torch.jit.ScriptModule:
    """Read a class-ranker model file.

    Returns
    -------
    dict or torch.jit.ScriptModule
        The checkpoint dict (RELION 5.0 / ours: ``model_state_dict``, ``model_definition``...) or
        the TorchScript module (RELION 4.0), on the CPU.

    Raises
    ------
    InputError
        Missing or unreadable file, or neither format.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "model file does not exist")
    is_zip = zipfile.is_zipfile(p)
    if is_zip:
        with zipfile.ZipFile(p) as z:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist()):
                try:
                    return torch.jit.load(str(p), map_location="cpu")
                except Exception as exc:
                    raise InputError(p, f"unreadable TorchScript model ({type(exc).__name__}: {exc})") from exc
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(p, f"not a class-ranker model file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(obj, dict):
        raise InputError(p, f"not a class-ranker checkpoint (a {type(obj).__name__}, expected a dict)")
    if "model_state_dict" not in obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = {"model_state_dict": obj}
    if "model_state_dict" not in obj:
        raise InputError(p, "checkpoint has no model_state_dict")
    return obj


# ---------------------------------------------------------------------------------- corpus ---


def write_corpus_job_files(job_dir: str | Path, truth_star: str | Path, templates: np.ndarray, pixel_size_a: float,
                           spec: Mapping) -> None:
    """The truth files of a corpus job: ``truth.star`` (copied), ``templates.mrcs``,
    ``spec.json``, then ``DONE``; the VDAM moment files and iteration 0 are removed."""
    import json

    job_dir = Path(job_dir)
    write_bytes(job_dir / "truth.star", Path(truth_star).read_bytes())
    write_mrc(job_dir / "templates.mrcs", np.asarray(templates, np.float32), pixel_size_a, stack=True)
    write_text(job_dir / "spec.json", json.dumps(dict(spec), indent=1, default=str))
    for p in (job_dir / "Class2D").glob("*moment.mrcs"):
        p.unlink()
    for p in (job_dir / "Class2D").glob("run_it000_*"):
        p.unlink()
    write_text(job_dir / "DONE", "")


def read_corpus_job(job_dir: str | Path) -> tuple[Class2DJob, pd.DataFrame, np.ndarray, dict]:
    """A finished corpus job: (the 2D job, truth table, ``(S, D, D)`` templates, spec dict)."""
    import json

    job_dir = Path(job_dir)
    if not (job_dir / "DONE").exists():
        raise InputError(job_dir, "corpus job is not finished (no DONE file)")
    spec = json.loads((job_dir / "spec.json").read_text())
    job = read_class2d_job(job_dir / f"{spec['last_root']}_optimiser.star")
    truth = read_star(job_dir / "truth.star")["particles"].reset_index(drop=True)
    templates, _ = read_mrc(job_dir / "templates.mrcs")
    templates = templates[None] if templates.ndim == 2 else templates
    return job, truth, np.asarray(templates, np.float32), spec


def write_json(path: str | Path, data: Mapping) -> Path:
    """A JSON report, atomically."""
    import json

    write_text(path, json.dumps(dict(data), indent=1, default=float))
    return Path(path)


__all__ = [
    "CLASS_AVERAGES_COLUMNS", "Class2DJob", "RANK_MODEL_COLUMNS", "load_model_file", "read_class2d_job", "read_corpus_job",
    "load_tensors", "read_overrides", "save_checkpoint", "save_torchscript", "write_corpus_job_files", "write_json", "write_npy",
    "write_rank_outputs",
]  # fmt: skip


def load_tensors(path: str | Path) -> dict:
    """A dict of tensors and plain values written by :func:`save_checkpoint` (``weights_only``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "file does not exist")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(p, f"unreadable ({type(exc).__name__})") from exc
