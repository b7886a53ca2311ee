"""``autospa mdcatch``: acquisition metadata of cryo-EM sessions, MDCatch-style.

Subcommands::

    autospa mdcatch parse FILE [--json]         every parsed and derived field of one movie
    autospa mdcatch watch SESSION [--launch]    follow a session: parse new movies, flag drift,
                                                keep session.json, session_params.txt and
                                                movies.star up to date, start the pipeline
    autospa mdcatch gain GAIN MOVIE             check a gain reference against a movie

Detector presets and the microscope table come from the shipped ``detectors.toml``, a user copy in
``~/.config/autospa/detectors.toml`` and ``--config FILE``. Options of several words are accepted
with ``-`` or ``_`` (``--particle-diameter`` or ``--particle_diameter``).

``--launch`` (watch): once the first complete movie is in, the ``it`` pipeline configuration is
derived from it (``autospa it``'s settings: movies glob, gain and its orientation, pixel size,
dose per frame, voltage, Cs, Q0, EER grouping, particle diameter, box sizes ...; values from
``--it-config FILE`` win) and checked (``orchestration.it.config_from_mapping``); the prep and
proc schemes are installed into ``PROJECT/Schemes`` and set from it
(``orchestration.it.prepare_it``); the configuration is written to ``PROJECT/it_config.yaml`` and
``autospa it --project PROJECT --engine ENGINE --config PROJECT/it_config.yaml`` is started in
``PROJECT`` as a detached process (prep and proc together), its output in
``PROJECT/it_launch.log``. ``--launch-command CMD`` starts ``CMD --config PROJECT/it_config.yaml``
instead (a site wrapper; split like a shell line, never run through a shell). PROJECT is
``--project`` (default: ``--out``); movies outside it are reached through a ``PROJECT/Movies``
link, as MDCatch does. The pipeline is launched once per session (recorded in ``session.json``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from autospa.errors import InputError
from autospa.io.session_files import open_log, read_pipeline_config, write_pipeline_config
from autospa.mdcatch.detectors import load_config
from autospa.mdcatch.gain import check_gain_size, find_gain_orientation, read_image, read_image_shape
from autospa.mdcatch.metadata import AcquisitionMetadata
from autospa.mdcatch.session import SessionWatcher, WatchSettings, ingest_file, it_settings
from autospa.orchestration.it import config_from_mapping, prepare_it

IT_CONFIG = "it_config.yaml"
IT_LOG = "it_launch.log"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``autospa mdcatch`` and its subcommands."""
    p = subparsers.add_parser(
        "mdcatch",
        help="parse acquisition metadata (EPU XML, SerialEM mdoc, MRC/TIFF/EER headers), watch sessions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="mdcatch_command", metavar="SUBCOMMAND")
    sub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", default=None, metavar="TOML", help="detector presets / microscope table overriding the shipped and user ones")
        q.add_argument("--particle-diameter", "--particle_diameter", type=float, default=None, metavar="A", help="particle diameter in A (default: from the configuration, 180)")
        q.add_argument("--helical", action="store_true", help="helical processing: --particle-diameter is the filament width")
        q.add_argument("--eer-dose", "--eer_dose", type=float, default=None, metavar="E_A2", help="EER: dose per grouped fraction to aim at (e/A^2, default 1.0)")

    pp = sub.add_parser("parse", help="print every parsed and derived field of a metadata or movie file")
    pp.add_argument("file", help="EPU FoilHole XML, SerialEM mdoc, MRC (FEI header), TIFF or EER file")
    pp.add_argument("--movie", default=None, help="the movie to merge with (default: found beside FILE)")
    pp.add_argument("--session", default=None, help="session folder searched for the gain reference and MTF (default: FILE's folder)")
    pp.add_argument("--json", action="store_true", help="print JSON")
    common(pp)
    pp.set_defaults(func=run_parse)

    pw = sub.add_parser("watch", help="poll a session: parse new movies, flag drift, keep session files, optionally launch the pipeline")
    pw.add_argument("session", help="EPU session folder (with Images-Disc*) or SerialEM folder")
    pw.add_argument("--out", default=".", help="folder for session.json, session_params.txt, movies.star (default: .)")
    pw.add_argument("--movies", default=None, metavar="DIR", help="movies folder when it is not the session folder")
    pw.add_argument("--software", choices=("auto", "EPU", "SerialEM"), default="auto")
    pw.add_argument("--interval", type=float, default=30.0, metavar="S", help="seconds between polls (default 30)")
    pw.add_argument("--timeout", type=float, default=None, metavar="S", help="stop after S seconds (default: run until interrupted)")
    pw.add_argument("--once", action="store_true", help="poll once and exit (the poll state is kept in session.json)")
    pw.add_argument("--symmetry", default=None, help="point group for 3D (default C1)")
    pw.add_argument("--launch", action="store_true", help="start the it pipeline once the first complete movie is in")
    pw.add_argument("--project", default=None, metavar="DIR",
                    help="project directory the pipeline runs in (default: --out)")
    pw.add_argument("--it-config", "--it_config", default=None, metavar="YAML",
                    help="it settings (picker, gpus, thresholds, ...) that win over the derived ones")
    pw.add_argument("--engine", choices=("prefect", "plain"), default="prefect",
                    help="how autospa it runs the schemes: as Prefect flows (default) or without Prefect")
    pw.add_argument("--launch-command", "--launch_command", default=None, metavar="CMD",
                    help="program to start instead of 'autospa it' (gets --config FILE appended; no shell)")
    pw.add_argument("--json", action="store_true", help="print one JSON line per poll")
    common(pw)
    pw.set_defaults(func=run_watch)

    pg = sub.add_parser("gain", help="check a gain reference's size and orientation against a movie")
    pg.add_argument("gain", help="gain reference (MRC or TIFF)")
    pg.add_argument("movie", help="a raw (not gain-corrected) movie, MRC or TIFF")
    pg.add_argument("--frames", type=int, default=None, metavar="N", help="frames to sum (default: all)")
    pg.add_argument("--json", action="store_true", help="print JSON")
    pg.set_defaults(func=run_gain)


# ------------------------------------------------------------------------------------ parse
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v) if v else "-"
    return str(v)


def _print_section(title: str, items: dict[str, Any]) -> None:
    print(f"[{title}]")
    width = max((len(k) for k in items), default=0)
    for k, v in items.items():
        if k == "warnings":
            continue
        print(f"  {k:<{width}} = {_fmt(v)}")
    for w in items.get("warnings") or ():
        print(f"  warning: {w}")


def run_parse(args: argparse.Namespace) -> int:
    """``autospa mdcatch parse``."""
    config = load_config(args.config)
    rep = ingest_file(
        args.file, config, movie=args.movie, session=args.session,
        particle_diameter_a=args.particle_diameter, helical=args.helical, eer_target_dose_e_a2=args.eer_dose,
    )
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
        return 0
    print(f"file: {args.file}")
    print(f"movie: {rep.movie or '-'}")
    print(f"metadata file: {rep.metadata_file or '-'}")
    _print_section("metadata", rep.metadata.to_dict())
    _print_section("derived", rep.derived.to_dict())
    g = rep.gain.to_dict()
    check = g.pop("check")
    _print_section("gain", g)
    if check is not None:
        print(f"  check = {check['message']}")
    return 0


# ------------------------------------------------------------------------------------ watch
def launch_command(project_dir: Path, config_path: Path, launch_command: str | None = None,
                   engine: str = "prefect") -> list[str]:
    """The argv that runs the pipeline: ``python -m autospa it --project PROJECT --engine ENGINE
    --config FILE``, or ``CMD --config FILE`` for a ``--launch-command``."""
    if launch_command is None:
        head = [sys.executable, "-m", "autospa", "it", "--project", str(project_dir), "--engine", engine]
    else:
        head = shlex.split(launch_command)
        if not head:
            raise InputError(None, "--launch-command is empty")
    return [*head, "--config", str(config_path)]


def launch_pipeline(
    watcher: SessionWatcher,
    project_dir: Path | None = None,
    extra: dict[str, Any] | None = None,
    launch_cmd: str | None = None,
    engine: str = "prefect",
) -> tuple[dict[str, Any], subprocess.Popen]:
    """Configure the project's prep and proc schemes from the session and start them, detached.

    Parameters
    ----------
    watcher
        A watcher that has ingested its first movie.
    project_dir
        Where the pipeline runs (default: the watcher's output folder).
    extra
        ``it`` settings that win over the derived ones (``--it-config``).
    launch_cmd
        Replacement for ``autospa it`` (see the module docstring).
    engine
        ``autospa it --engine``: ``prefect`` (each scheme a Prefect flow) or ``plain``.

    Returns
    -------
    info, process
        ``info``: ``command``, ``pid``, ``config``, ``log``, ``project``, ``schemes`` (also saved in
        ``session.json`` ``launched``); ``process``: the started process (it runs on after
        ``watch`` exits).

    Raises
    ------
    InputError
        A setting ``autospa it`` does not accept, a scheme without a derived option, or a command
        that cannot be started.
    """
    project = (project_dir or watcher.out_dir).resolve()
    config_from_mapping(it_settings(watcher, extra), "it configuration derived from the session")  # check first
    # the movies as the project sees them (a Movies link when needed), unless the user names them
    glob = None if "movies" in (extra or {}) else watcher.pipeline_movies_glob(project)
    settings = it_settings(watcher, extra, glob)
    cfg = config_from_mapping(settings, "it configuration derived from the session")
    schemes = prepare_it(project, cfg)
    cfg_path = write_pipeline_config(project / IT_CONFIG, settings)
    argv = launch_command(project, cfg_path, launch_cmd, engine)
    log_path = project / IT_LOG
    with open_log(log_path) as logf:
        try:
            proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
                argv, cwd=project, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise InputError(argv[0], f"cannot start the pipeline: {exc.strerror or exc}") from None
    info = {"command": argv, "pid": proc.pid, "config": str(cfg_path), "log": str(log_path),
            "project": str(project), "schemes": list(schemes)}
    watcher.mark_launched(info)
    return info, proc


def _print_poll(rep: Any, watcher: SessionWatcher, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ingested": [r["movie"] for r in rep.ingested], "drift": rep.drift,
                          "failed": rep.failed, "pending": rep.pending, "total": rep.total}), flush=True)
        return
    for r in rep.ingested:
        print(f"movie {Path(r['movie']).name}: {_fmt(r['pixel_size_a'])} A/px, {_fmt(r['total_dose_e_a2'])} e/A^2, "
              f"{_fmt(r['n_frames'])} frames, optics group {r['optics_group']}", flush=True)
    for f in rep.drift:
        print(f"drift: {Path(str(f['movie'])).name}: {f['field']} = {_fmt(f['value'])} (session: {_fmt(f['reference'])})", flush=True)
    for m, msg in rep.failed.items():
        print(f"failed: {msg}", flush=True)


def _report_poll(rep: Any, watcher: SessionWatcher, as_json: bool) -> None:
    _print_poll(rep, watcher, as_json)
    if rep.first_movie and watcher.reference is not None and not as_json:
        ref: AcquisitionMetadata = watcher.reference
        d = watcher.derived
        print(f"session reference: {Path(ref.movie or ref.source).name}: {ref.detector_model or ref.detector_name} "
              f"{ref.detector_mode}, {_fmt(ref.voltage_kv)} kV, Cs {_fmt(ref.cs_mm)} mm; "
              f"box {_fmt(d.box_size_px if d else None)} px, downscaled {_fmt(d.downscaled_box_px if d else None)} px",
              flush=True)
        gain = watcher.state.get("gain") or {}
        if gain.get("check"):
            print(f"gain: {gain['gain_reference']}: {gain['check']['message']}", flush=True)


def run_watch(args: argparse.Namespace) -> int:
    """``autospa mdcatch watch``."""
    if args.interval <= 0:
        raise InputError(None, "--interval must be positive")
    config = load_config(args.config)
    settings = WatchSettings(
        software=args.software, movies_dir=args.movies, particle_diameter_a=args.particle_diameter,
        helical=args.helical, symmetry=args.symmetry, eer_target_dose_e_a2=args.eer_dose,
    )
    extra = read_pipeline_config(args.it_config) if args.it_config else None
    watcher = SessionWatcher(args.session, args.out, config, settings)
    launched: list[subprocess.Popen] = []
    start = time.monotonic()
    while True:
        try:
            rep = watcher.poll()
        except OSError as exc:  # a network file system that hiccups: try again at the next poll
            if args.once:
                raise InputError(args.session, f"cannot read the session: {exc.strerror or exc}") from None
            print(f"warning: poll failed ({exc.strerror or exc}); retrying in {args.interval:g} s",
                  file=sys.stderr, flush=True)
        else:
            _report_poll(rep, watcher, args.json)
            if args.launch and watcher.reference is not None and watcher.launched is None:
                info, proc = launch_pipeline(watcher, Path(args.project) if args.project else None, extra,
                                             args.launch_command, args.engine)
                launched.append(proc)
                print(f"launched: {' '.join(info['command'])} (pid {info['pid']}, log {info['log']})", flush=True)
        if args.once:
            break
        elapsed = time.monotonic() - start
        if args.timeout is not None and elapsed + args.interval > args.timeout:
            break
        time.sleep(args.interval)
    for proc in launched:
        try:
            rc = proc.wait(timeout=1.0)
            print(f"pipeline process {proc.pid} exited with code {rc}", file=sys.stderr)
        except subprocess.TimeoutExpired:
            print(f"pipeline process {proc.pid} keeps running (log in {watcher.launched['log']})", file=sys.stderr)
    if not args.json:
        print(f"{watcher.n_movies} movie(s) ingested, {len(watcher.state['watch']['pending'])} pending, "
              f"{len(watcher.state['drift'])} drift flag(s); session files in {watcher.out_dir}")
    return 0


# ------------------------------------------------------------------------------------ gain
def run_gain(args: argparse.Namespace) -> int:
    """``autospa mdcatch gain``."""
    gain_shape = read_image_shape(args.gain)
    movie_shape = read_image_shape(args.movie)
    check = check_gain_size(gain_shape, movie_shape)
    ranking = find_gain_orientation(read_image(args.gain, max_frames=1), read_image(args.movie, max_frames=args.frames))
    if args.json:
        print(json.dumps({"check": check.to_dict(), "orientations": [asdict(o) for o in ranking]}, indent=2))
        return 0
    print(check.message)
    if not ranking:
        print("no orientation of the gain fits the movie's size")
        return 0
    print("orientation (RELION gain_rot, gain_flip) by correlation of the frame sum with 1/gain:")
    for o in ranking:
        print(f"  gain_rot {o.gain_rot}  gain_flip {o.gain_flip}  r = {o.correlation:+.4f}")
    best = ranking[0]
    margin = best.correlation - (ranking[1].correlation if len(ranking) > 1 else 0.0)
    print(f"best: gain_rot {best.gain_rot}, gain_flip {best.gain_flip}"
          + ("" if margin > 0.05 else " (not clearly better than the next: sum more frames)"))
    return 0


