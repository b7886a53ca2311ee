"""Training the class ranker on simulated 2D classification jobs (L5): ``autospa ranker train``.

The network of RELION-4.0's ``relion_class_ranker`` was trained on 233 real 2D jobs with human
scores (EMPIAR-10812). We have no such labels, so the corpus is made the same way from the
simulator's truth instead of a human:

1. :func:`corpus_specs` draws many small jobs of varied quality: SNR (log-uniform), fraction and
   kinds of junk (empty ice, aggregates, broken particles, carbon edges), 1 to 4 structures mixed,
   too few particles for the number of classes, and a wrong box (particles larger than the box);
2. :func:`make_corpus_job` simulates each job, runs our own 2D classification (VDAM, the same code
   path as ``autospa class2d --grad``) and keeps its last-iteration outputs plus the truth;
3. :func:`corpus_examples` computes, for every class of every job, the network inputs (the 24
   features of :mod:`autospa.ranker.features` and the 64 x 64 image) and the target score made the
   paper's way (:mod:`autospa.ranker.targets`: a job score, a per-class quality category and a
   resolution term, all from the truth);
4. :func:`train_ranker` splits by job (never by class), trains with RELION's recipe (MSE, Adam
   lr 5e-5 / weight decay 5e-4, rotation + flip augmentation, granulometry features zeroed) and
   calibrates the default selection threshold on the validation jobs (particle FPR/FNR against
   the simulator's truth).

One command reproduces all of it: ``autospa ranker train --corpus DIR --o weights.ckpt``.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from autospa.errors import InputError
from autospa.ranker.features import JobInputs

log = logging.getLogger(__name__)

#: Junk kinds of the simulator.
JUNK_KINDS = ("empty_ice", "aggregate", "partial", "carbon_edge")


@dataclass(frozen=True)
class CorpusJobSpec:
    """One simulated 2D classification job of the training corpus.

    Attributes
    ----------
    name
        Folder name (``job0007``).
    seed
        Seed of the simulation and of the classification.
    n_particles, n_structures, n_classes
        Particles simulated, distinct structures among them, classes asked of class2d (K).
    box, pixel_size_a
        Image size in pixels and pixel size in Angstrom.
    snr
        Simulator SNR.
    junk_fraction, junk_kinds
        Share and kinds of junk images.
    particle_scale
        1 for a normal extraction (particle diameter about 0.56 box); > 1 makes the particles
        larger than the box ("wrong box": cut off at the edges).
    n_iter
        VDAM mini-batches.
    diameter_a
        Mask diameter given to class2d.
    """

    name: str
    seed: int
    n_particles: int
    n_structures: int
    n_classes: int
    box: int
    pixel_size_a: float
    snr: float
    junk_fraction: float
    junk_kinds: tuple[str, ...]
    particle_scale: float
    n_iter: int
    diameter_a: float


def corpus_specs(n_jobs: int, seed: int = 0, first_index: int = 0) -> list[CorpusJobSpec]:
    """``n_jobs`` varied job specifications (deterministic for a seed).

    Parameters
    ----------
    n_jobs
        Number of jobs.
    seed
        Seed of the draws.
    first_index
        Index of the first job (names ``job{index:04d}``; seeds follow the index, so a larger
        corpus with the same ``seed`` extends a smaller one).
    """
    specs = []
    for j in range(first_index, first_index + n_jobs):
        rng = np.random.default_rng([seed, j])
        box = int(rng.choice([48, 48, 48, 48, 64]))
        pixel = float(rng.uniform(3.0, 4.2))
        kind = rng.random()
        n_particles = int(rng.choice([300, 400, 500]))
        if kind < 0.12:  # too few particles for the number of classes
            n_particles = int(rng.choice([100, 150]))
        n_structures = int(rng.integers(1, 5))
        n_classes = int(rng.integers(max(6, n_structures + 2), 11))
        snr = float(math.exp(rng.uniform(math.log(0.008), math.log(0.3))))
        junk = float(rng.choice([0.0, rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.7)], p=[0.2, 0.5, 0.3]))
        n_kinds = int(rng.integers(1, 5))
        kinds = tuple(sorted(rng.choice(JUNK_KINDS, size=n_kinds, replace=False).tolist()))
        scale = 1.0 if rng.random() > 0.12 else float(rng.uniform(1.4, 1.8))
        n_iter = int(rng.integers(20, 26))
        diameter = float(0.8 * box * pixel)
        specs.append(CorpusJobSpec(f"job{j:04d}", int(seed * 100000 + j), n_particles, n_structures, n_classes, box, pixel,
                                   snr, junk, kinds if junk > 0 else (), scale, n_iter, diameter))
    return specs


def simulate_job(spec: CorpusJobSpec, device: str | torch.device | None = None):
    """The simulated particle set of a corpus job.

    Returns
    -------
    SimulatedParticles
        As :func:`autospa.simulate.particles.simulate_2d_classes` (``templates`` are the true 2D
        classes cut to the box, also when the particles are larger than the box).
    """
    from autospa.simulate.particles import simulate_2d_classes

    kinds = spec.junk_kinds or JUNK_KINDS
    if spec.particle_scale == 1.0:
        return simulate_2d_classes(n=spec.n_particles, n_classes=spec.n_structures, box=spec.box, pixel_size_a=spec.pixel_size_a,
                                   snr=spec.snr, seed=spec.seed, junk_fraction=spec.junk_fraction, junk_kinds=kinds,
                                   shift_sigma_px=1.5, max_shift_px=4.0, device=device)
    from autospa.conventions import euler_to_matrix
    from autospa.numerics.projection import project_real
    from autospa.simulate.particles import SimulatedParticles, particle_optics, simulate_particles
    from autospa.simulate.phantoms import phantom_set

    big = 2 * int(round(spec.box * spec.particle_scale / 2))
    vols = phantom_set(spec.n_structures, 1, box=big, pixel_size_a=spec.pixel_size_a, seed=spec.seed, device=device)
    view = (0.0, 90.0)
    images, truth = simulate_particles(vols, spec.n_particles, spec.pixel_size_a, box=spec.box, snr=spec.snr, seed=spec.seed,
                                       orientation=np.asarray([view]), shift_sigma_px=1.5, max_shift_px=4.0,
                                       junk_fraction=spec.junk_fraction, junk_kinds=kinds)[:2]
    rot = euler_to_matrix(torch.tensor([view[0]]), torch.tensor([view[1]]), torch.tensor([0.0])).to(vols[0].device, torch.float32)
    o = big // 2 - spec.box // 2
    templates = torch.stack([project_real(v, rot)[0][o:o + spec.box, o:o + spec.box] for v in vols])
    return SimulatedParticles(images=images, truth=truth, optics=particle_optics(spec.pixel_size_a, spec.box),
                              volumes=list(vols), templates=templates, clean=None)


def make_corpus_job(spec: CorpusJobSpec, corpus_dir: str | Path, device: str = "cpu", torch_threads: int = 0,
                    keep_particles: bool = False) -> Path:
    """Simulate one job, classify it with VDAM and keep what training needs.

    Files in ``corpus_dir/<name>/``: ``Class2D/run_itNNN_{model,data,optimiser,sampling}.star``
    and ``_classes.mrcs`` (the last iteration, RELION's layout), ``truth.star`` (one row per
    particle, in data.star order), ``templates.mrcs`` (the true 2D classes), ``spec.json`` and, last,
    ``DONE`` (a job without it is redone). The particle stacks and the Zarr store are removed
    unless ``keep_particles``.

    Returns
    -------
    Path
        The job folder.
    """
    from autospa.io.ranker_files import write_corpus_job_files
    from autospa.jobs.class2d import Class2DOptions, run_class2d
    from autospa.jobs.demo import write_unaligned_set

    job_dir = Path(corpus_dir) / spec.name
    if (job_dir / "DONE").exists():
        return job_dir
    if job_dir.exists():
        shutil.rmtree(job_dir)
    t0 = time.perf_counter()
    sim = simulate_job(spec, device=device)
    star, truth_star = write_unaligned_set(job_dir / "Simulated", sim)
    opts = Class2DOptions(input=str(star), output=str(job_dir / "Class2D" / "run"), n_classes=spec.n_classes,
                          n_iter=spec.n_iter, grad=True, particle_diameter_a=spec.diameter_a, ctf=True, center_classes=True,
                          random_seed=spec.seed % 100000 + 1, grad_write_iter=spec.n_iter, device=device,
                          torch_threads=torch_threads)
    result = run_class2d(opts, client=None)
    seconds = time.perf_counter() - t0
    write_corpus_job_files(job_dir, truth_star, sim.templates.detach().cpu().numpy(), spec.pixel_size_a,
                           {**asdict(spec), "seconds": seconds, "last_root": str(Path(str(result["root"])).relative_to(job_dir))})
    if not keep_particles:
        shutil.rmtree(job_dir / "Simulated", ignore_errors=True)
        for p in (job_dir / "Class2D").glob("*.zarr"):
            shutil.rmtree(p, ignore_errors=True)
        for p in (job_dir / "Class2D").glob("*checkpoint*"):
            p.unlink()
    last = Path(str(result["root"])).name
    for p in (job_dir / "Class2D").glob("run_it*"):
        if not p.name.startswith(last + "_"):
            p.unlink()
    log.info("corpus job %s: %d particles, K=%d, %.1f s", spec.name, spec.n_particles, spec.n_classes, seconds)
    return job_dir


def _corpus_worker(args: tuple) -> list[str]:
    """Process-pool worker: make jobs in turn until the deadline (wall-clock time)."""
    specs, corpus_dir, device, torch_threads, deadline = args
    torch.set_num_threads(max(1, torch_threads))
    done = []
    for spec in specs:
        if time.time() > deadline:
            break
        try:
            make_corpus_job(spec, corpus_dir, device=device, torch_threads=torch_threads)
        except Exception as exc:  # one failed simulation must not end the corpus
            if device != "cpu":
                log.warning("corpus job %s failed on %s (%s); retrying on the CPU", spec.name, device, exc)
                device = "cpu"
                make_corpus_job(spec, corpus_dir, device=device, torch_threads=torch_threads)
            else:
                raise
        done.append(spec.name)
    return done


def build_corpus(corpus_dir: str | Path, n_jobs: int, seed: int = 0, first_index: int = 0, workers: int = 1,
                 devices: Sequence[str] = ("cpu",), torch_threads: int = 1, time_limit_s: float | None = None,
                 progress: Callable[[str], None] | None = None) -> list[Path]:
    """Make (or complete) a corpus of ``n_jobs`` simulated 2D jobs in ``corpus_dir``.

    Jobs already finished (``DONE``) are kept, so an interrupted build continues. With
    ``workers > 1`` the jobs are shared round-robin between processes (worker ``w`` computes on
    ``devices[w % len(devices)]``). With ``time_limit_s`` no job starts after that many seconds
    (the corpus is then smaller; :func:`corpus_examples` uses whatever is finished).

    Returns
    -------
    list of Path
        The finished job folders.
    """
    corpus = Path(corpus_dir)
    corpus.mkdir(parents=True, exist_ok=True)
    specs = [s for s in corpus_specs(n_jobs, seed, first_index) if not (corpus / s.name / "DONE").exists()]
    deadline = time.time() + (time_limit_s if time_limit_s is not None else 1e12)
    if workers <= 1:
        for spec in specs:
            if time.time() > deadline:
                break
            make_corpus_job(spec, corpus, device=devices[0], torch_threads=torch_threads)
            if progress is not None:
                progress(spec.name)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        chunks = [(specs[w::workers], str(corpus), devices[w % len(devices)], torch_threads, deadline) for w in range(workers)]
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(_corpus_worker, c) for c in chunks if c[0]]):
                for name in fut.result():
                    if progress is not None:
                        progress(name)
    return sorted(p.parent for p in corpus.glob("*/DONE"))


# ----------------------------------------------------------------------------- examples ---


@dataclass
class JobExamples:
    """Network inputs, targets and truth of the scored classes of one corpus job.

    Attributes
    ----------
    name
        Job name.
    images, features
        ``(n, 64, 64)`` and ``(n, 24)`` network inputs of the kept classes.
    targets
        ``(n,)`` target scores.
    class_numbers
        ``(n,)`` 1-based class numbers of the kept classes.
    categories, purity, match
        ``(n,)`` category codes, purity and template match of the kept classes.
    job_score
        The job's score.
    particle_class
        ``(P,)`` class number of every particle (data.star).
    particle_real
        ``(P,)`` bool: the particle is real (not junk) in the truth.
    """

    name: str
    images: torch.Tensor
    features: torch.Tensor
    targets: torch.Tensor
    class_numbers: torch.Tensor
    categories: torch.Tensor
    purity: torch.Tensor
    match: torch.Tensor
    job_score: float
    particle_class: torch.Tensor
    particle_real: torch.Tensor


def inputs_of_job(job) -> JobInputs:
    """The ranker's inputs (:func:`autospa.ranker.features.job_inputs`) of a
    :class:`autospa.io.ranker_files.Class2DJob`, with RELION's SSNR fallback resolution."""
    from autospa.ranker.features import job_inputs, resolution_from_ssnr

    t = job.classes_table
    k = job.n_classes

    def col(name: str, default: float) -> torch.Tensor:
        return torch.tensor(t[name].to_numpy(np.float64)) if name in t else torch.full((k,), default, dtype=torch.float64)

    res = col("rlnEstimatedResolution", 0.0)
    fallback = torch.full((k,), 2.0 * job.pixel_size_a, dtype=torch.float64)
    for c in range(k):
        spec = job.class_spectra[c]
        if float(res[c]) <= 0 and "rlnSsnrMap" in spec and "rlnAngstromResolution" in spec:
            fallback[c] = resolution_from_ssnr(torch.as_tensor(spec["rlnSsnrMap"].to_numpy(np.float64)),
                                               torch.as_tensor(spec["rlnAngstromResolution"].to_numpy(np.float64)), job.pixel_size_a)
    return job_inputs(torch.as_tensor(job.classes), col("rlnClassDistribution", 0.0), col("rlnAccuracyRotations", 999.0),
                      col("rlnAccuracyTranslationsAngst", 999.0), res, len(job.particles), job.pixel_size_a,
                      job.particle_diameter_a, fallback_resolution=fallback)


def job_examples(job_dir: str | Path) -> JobExamples:
    """Inputs and truth-derived targets of the classes of a finished corpus job."""
    from autospa.io.ranker_files import read_corpus_job
    from autospa.ranker.targets import class_categories, job_score_from_truth, target_scores, template_match

    job, truth, templates, spec = read_corpus_job(job_dir)
    if len(truth) != len(job.particles):
        raise InputError(job_dir, f"truth has {len(truth)} rows, data.star {len(job.particles)}")
    inputs = inputs_of_job(job)
    kept = torch.nonzero(inputs.kept).flatten()
    pclass = torch.from_numpy(np.array(job.particles["rlnClassNumber"], dtype=np.int64))
    tclass = torch.from_numpy(np.array(truth["rlnClassNumber"], dtype=np.int64))
    real = torch.from_numpy(np.array(truth["rlnAutospaIsJunk"], dtype=np.int64) == 0) & (tclass > 0)
    n_struct = templates.shape[0]
    match_all = template_match(torch.as_tensor(job.classes), torch.as_tensor(templates), job.particle_diameter_a / 2 / job.pixel_size_a,
                               job.pixel_size_a)
    k = job.n_classes
    purity = torch.zeros(k, dtype=torch.float64)
    match = torch.zeros(k, dtype=torch.float64)
    for c in range(k):
        members = pclass == c + 1
        m = int(members.sum())
        if m == 0:
            continue
        counts = torch.bincount(tclass[members & real], minlength=n_struct + 1)[1:]
        major = int(torch.argmax(counts)) if int(counts.sum()) > 0 else int(torch.argmax(match_all[c]))
        purity[c] = float(counts[major]) / m
        match[c] = float(match_all[c, major])
    cats = class_categories(purity, match)
    res = torch.from_numpy(np.array(job.classes_table["rlnEstimatedResolution"], dtype=np.float64))
    scored = inputs.kept
    pure_enough = scored & (purity >= 0.5)
    best = float(match[pure_enough].max()) if bool(pure_enough.any()) else 0.0
    jscore = job_score_from_truth(best, float(real.double().mean()))
    targets = target_scores(cats, res, jscore, scored)
    return JobExamples(spec["name"], inputs.images, inputs.features, targets[kept].float(), kept + 1, cats[kept], purity[kept].float(),
                       match[kept].float(), jscore, pclass, real)


_EXAMPLE_FIELDS = ("images", "features", "targets", "class_numbers", "categories", "purity", "match", "particle_class", "particle_real")


def cached_job_examples(job_dir: str | Path, refresh: bool = False) -> JobExamples:
    """:func:`job_examples`, cached in ``job_dir/examples.pt`` (recomputed when ``refresh`` or when
    the cache is older than the job's files)."""
    from autospa.io.ranker_files import load_tensors, save_checkpoint

    job_dir = Path(job_dir)
    cache = job_dir / "examples.pt"
    if cache.exists() and not refresh and cache.stat().st_mtime >= (job_dir / "DONE").stat().st_mtime:
        d = load_tensors(cache)
        if d.get("version") == EXAMPLES_VERSION:
            return JobExamples(name=d["name"], job_score=float(d["job_score"]), **{k: d[k] for k in _EXAMPLE_FIELDS})
    ex = job_examples(job_dir)
    save_checkpoint(cache, {"version": EXAMPLES_VERSION, "name": ex.name, "job_score": ex.job_score,
                            **{k: getattr(ex, k) for k in _EXAMPLE_FIELDS}})
    return ex


#: Version of the cached examples (bump when features or targets change).
EXAMPLES_VERSION = 1


def corpus_examples(corpus_dirs: Sequence[str | Path], refresh: bool = False,
                    progress: Callable[[str], None] | None = None) -> list[JobExamples]:
    """Examples of every finished job (``*/DONE``) under the corpus folders, sorted by name."""
    jobs = sorted({p.parent for d in corpus_dirs for p in Path(d).glob("*/DONE")}, key=lambda p: (p.name, str(p)))
    out = []
    for j in jobs:
        ex = cached_job_examples(j, refresh)
        if ex.targets.numel():
            out.append(ex)
        if progress is not None:
            progress(j.name)
    return out


def is_validation_job(name: str, fraction: float = 0.2) -> bool:
    """Job-level split: a job is held out when the CRC32 of its name falls in the first
    ``fraction`` of the range (stable across corpus sizes and machines)."""
    import zlib

    return (zlib.crc32(name.encode()) % 1000) < fraction * 1000


def _stack(examples: Sequence[JobExamples]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not examples:
        return torch.zeros(0, 64, 64), torch.zeros(0, 24), torch.zeros(0)
    return (torch.cat([e.images for e in examples]), torch.cat([e.features for e in examples]),
            torch.cat([e.targets for e in examples]))


def _selection_jobs(model, examples: Sequence[JobExamples]) -> list[tuple]:
    from autospa.ranker.network import predict_scores

    return [(e.class_numbers, predict_scores(model, e.images, e.features), e.particle_class, e.particle_real) for e in examples]


def oracle_floors(train: Sequence[JobExamples], val: Sequence[JobExamples]) -> dict[str, float]:
    """Validation MSE of two oracles that know every class's job score and one truth quantity
    exactly (:func:`autospa.ranker.train.oracle_mse`, binned means over the ``train`` jobs): its
    template match (what a class average shows), or its purity (the share of real particles, which
    an average mostly hides). The first is what a model that read the match off the average perfectly,
    but could not tell the purity, would be left with.

    Returns
    -------
    dict
        ``validation_mse_oracle_match_and_job_score`` and ``validation_mse_oracle_purity_and_job_score``
        (empty without training or validation jobs).
    """
    from autospa.ranker.train import oracle_mse

    if not train or not val:
        return {}

    def column(es: Sequence[JobExamples], field: str) -> torch.Tensor:
        return torch.cat([getattr(e, field) for e in es])

    def job_score(es: Sequence[JobExamples]) -> torch.Tensor:
        return torch.cat([torch.full((len(e.targets),), e.job_score) for e in es])

    return {f"validation_mse_oracle_{f}_and_job_score": oracle_mse(column(train, f), column(train, "targets"), job_score(train),
                                                                   column(val, f), column(val, "targets"), job_score(val))
            for f in ("match", "purity")}


def train_ranker(corpus_dirs: Sequence[str | Path], output: str | Path, config=None, val_fraction: float = 0.2,
                 device: str | None = None, progress: Callable[[str], None] | None = None,
                 final_train: bool = False) -> dict:
    """Train the ranker on a corpus, calibrate the default threshold, write the weights.

    Parameters
    ----------
    corpus_dirs
        Corpus folders (jobs made by :func:`build_corpus`).
    output
        Weights file (RELION 5.0 checkpoint layout, :func:`autospa.ranker.network.checkpoint_payload`);
        ``<output>.json`` gets the training report.
    config
        :class:`autospa.ranker.train.TrainConfig`.
    val_fraction
        Share of jobs held out (split by job, :func:`is_validation_job`).
    device
        Training device (default CPU).
    progress
        Called with a line of text per job read and per epoch.
    final_train
        Train on every job (RELION's ``--final-train``); the report then has no held-out figures.

    Returns
    -------
    dict
        The report: corpus size, split, MSE per epoch, validation MSE, the calibrated threshold
        and the particle FPR / FNR at it (training and validation jobs), training seconds.
    """
    from autospa.io.ranker_files import save_checkpoint, write_json
    from autospa.ranker.network import checkpoint_payload
    from autospa.ranker.train import TrainConfig, calibrate_threshold, evaluate_mse, pooled_rates, train_network

    cfg = config or TrainConfig()
    examples = corpus_examples(corpus_dirs, progress=progress)
    if not examples:
        raise InputError(None, f"no finished corpus jobs under {', '.join(map(str, corpus_dirs))}")
    val = [e for e in examples if is_validation_job(e.name, val_fraction)] if not final_train else []
    train = [e for e in examples if e not in val]
    if not train:
        raise InputError(None, "every corpus job fell in the validation split; make a larger corpus")
    xi, xf, xt = _stack(train)
    vi, vf, vt = _stack(val)

    def on_epoch(epoch: int, tr: float, vm: float) -> None:
        if progress is not None:
            progress(f"epoch {epoch + 1}/{cfg.epochs}: train MSE {tr:.4f}, validation MSE {vm:.4f}")

    model, hist = train_network(xi, xf, xt, vi, vf, vt, cfg, progress=on_epoch, device=device)
    model = model.cpu()
    thr, fpr_tr, fnr_tr = calibrate_threshold(_selection_jobs(model, train))
    report: dict = {
        "corpus": [str(d) for d in corpus_dirs],
        "n_jobs_train": len(train), "n_jobs_validation": len(val),
        "n_classes_train": int(xt.numel()), "n_classes_validation": int(vt.numel()),
        "train_jobs": [e.name for e in train], "validation_jobs": [e.name for e in val],
        "config": asdict(cfg), "train_mse_per_epoch": hist.train_mse, "validation_mse_per_epoch": hist.val_mse,
        "best_epoch": hist.best_epoch, "training_seconds": hist.seconds,
        "train_mse": evaluate_mse(model, xi, xf, xt), "default_threshold": thr,
        "train_fpr": fpr_tr, "train_fnr": fnr_tr,
        "target_mean_train": float(xt.mean()), "target_var_validation": float(vt.var(unbiased=False)) if vt.numel() else None,
    }  # fmt: skip
    if val:
        vjobs = _selection_jobs(model, val)
        fpr, fnr = pooled_rates(vjobs, thr)
        best_thr, best_fpr, best_fnr = calibrate_threshold(vjobs)
        report.update({
            "validation_mse": evaluate_mse(model, vi, vf, vt), "validation_fpr": fpr, "validation_fnr": fnr,
            "validation_rates_by_threshold": {f"{t:.2f}": pooled_rates(vjobs, t) for t in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)},
            "validation_best_threshold": best_thr, "validation_best_fpr": best_fpr, "validation_best_fnr": best_fnr,
            "validation_mse_constant_predictor": float(((vt - xt.mean()) ** 2).mean()),
            **oracle_floors(train, val),
        })  # fmt: skip
    out = Path(output)
    save_checkpoint(out, checkpoint_payload(model, autospa_default_threshold=thr, autospa_training_report={
        k: v for k, v in report.items() if not isinstance(v, list)}))
    write_json(out.with_name(out.name + ".json"), report)
    return report
