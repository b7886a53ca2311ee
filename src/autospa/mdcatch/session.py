"""Session watcher (L3): find new movies of an EPU or SerialEM session by polling, parse each
complete one, flag drift, and keep the session files up to date.

Polling, not file-system events, because sessions live on network file systems (NFS/CIFS), as in
MDCatch's old ``watcher.py`` (a watchdog ``PollingObserver``). A movie is **complete** when its
size and modification time are the same at two consecutive polls and its metadata file exists
(and is stable too). The poll state is saved in ``session.json`` after every poll, so that
``poll()`` calls from separate processes (``autospa mdcatch watch --once`` run by cron) compose.

Fixes against MDCatch (reference/mdcatch.md sections 1.4 and 1.12): every movie is parsed, not
only the first file in directory order; a movie is used only once complete; the first movie is
checked against the rest of the session (drift in dose, magnification, pixel size, detector mode,
voltage); optics groups are split by acquisition settings and SerialEM's OpticalGroup instead of
one ``opticsGroup1``; nothing depends on a fixed folder layout.

Layouts recognised:
- EPU: ``FoilHole_*_Data_*.xml`` anywhere under the session (``Images-Disc*/GridSquare_*/Data``),
  movies ``FoilHole_*_Data_*[_Fractions|_fractions|_EER].{mrc,tif,tiff,eer}`` under the session or
  a separate movies folder; a movie is paired with the XML of the same name without the suffix.
- SerialEM: movies ``*.{tif,tiff,mrc,eer}`` with ``<movie>.mdoc`` (or ``<stem>.mdoc``) beside them,
  or named by ``SubFramePath`` in a session mdoc.
"""

from __future__ import annotations

import logging
import math
import ntpath
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autospa.errors import InputError
from autospa.io.session_files import (
    link_movies,
    read_session_json,
    write_key_values,
    write_movies_star,
    write_session_json,
)
from autospa.mdcatch.derive import DerivedParameters, build_it_options, derive_parameters
from autospa.mdcatch.detectors import MDCatchConfig, resolve
from autospa.mdcatch.gain import GainReport, gain_report, is_gain_name
from autospa.mdcatch.metadata import AcquisitionMetadata, is_close, merge
from autospa.mdcatch.parsers import MOVIE_SUFFIXES, parse_file
from autospa.mdcatch.parsers.epu_xml import parse_epu_xml
from autospa.mdcatch.parsers.mdoc import parse_mdoc, read_mdoc

log = logging.getLogger(__name__)

EPU = "EPU"
SERIALEM = "SerialEM"
SESSION_JSON = "session.json"
SESSION_PARAMS = "session_params.txt"
MOVIES_STAR = "movies.star"
MOVIES_LINK = "Movies"
STATE_FORMAT = "autospa-mdcatch-session/1"

_EPU_MOVIE_TAIL = re.compile(r"_(Fractions|fractions|EER|eer)$")
_EPU_NAME = re.compile(r"^FoilHole_\d+_Data_")


@dataclass(frozen=True)
class WatchSettings:
    """What the watcher derives its parameters with.

    Attributes
    ----------
    software
        ``auto``, ``EPU`` or ``SerialEM``.
    movies_dir
        Folder of the movies when it is not the session folder (EPU with separate storage).
    particle_diameter_a, helical, symmetry, eer_target_dose_e_a2
        Passed to :func:`~autospa.mdcatch.derive.derive_parameters` (None: configured default).
    """

    software: str = "auto"
    movies_dir: str | None = None
    particle_diameter_a: float | None = None
    helical: bool = False
    symmetry: str | None = None
    eer_target_dose_e_a2: float | None = None


@dataclass(frozen=True)
class MoviePair:
    """A movie and the metadata file that describes it (None while it has not appeared)."""

    movie: Path
    metadata: Path | None


@dataclass
class PollReport:
    """What one poll found.

    Attributes
    ----------
    ingested
        Per movie ingested at this poll: its session record (see ``session.json`` ``movies``).
    drift
        Drift flags raised at this poll.
    failed
        Movie -> error message, for movies that could not be parsed at this poll.
    pending
        Movies seen but not complete yet.
    total
        Movies ingested so far.
    first_movie
        True when this poll ingested the session's first movie.
    """

    ingested: list[dict[str, Any]] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: int = 0
    total: int = 0
    first_movie: bool = False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sig(path: Path | None) -> list[int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def detect_software(session: Path) -> str | None:
    """``EPU`` when the session holds FoilHole XMLs, ``SerialEM`` when it holds mdocs, else None."""
    for _ in session.rglob("FoilHole_*_Data_*.xml"):
        return EPU
    for _ in session.rglob("*.mdoc"):
        return SERIALEM
    return None


def movies_glob(movie: Path, movies_root: Path, software: str, metadata: Path | None = None) -> str:
    """A glob matching the session's movies, built from one movie.

    EPU: ``Images-Disc<N>`` and ``GridSquare_<N>`` folders become wildcards and the file name
    ``FoilHole_*_Data_*<tail>`` keeps the movie's tail after the XML name (``_Fractions.mrc``,
    ``_EER.eer``). SerialEM: ``*<suffix>`` in the movie's folder.

    Parameters
    ----------
    movie
        One movie of the session.
    movies_root
        The folder the movies are found under.
    software
        ``EPU`` or ``SerialEM``.
    metadata
        EPU: the movie's XML (its name without ``.xml`` is the prefix of the movie's name).

    Returns
    -------
    str
        An absolute glob.
    """
    try:
        rel = movie.resolve().relative_to(movies_root.resolve())
    except ValueError:
        rel = Path(movie.name)
        movies_root = movie.parent
    parts = list(rel.parts)
    for i, p in enumerate(parts[:-1]):
        p = re.sub(r"^Images-Disc\d+$", "Images-Disc*", p)
        parts[i] = re.sub(r"^GridSquare_\d+$", "GridSquare_*", p)
    name = parts[-1]
    if software == EPU and _EPU_NAME.match(name):
        tail = name[len(metadata.stem):] if metadata is not None and name.startswith(metadata.stem) else (
            "".join(movie.suffixes[-1:]))
        parts[-1] = "FoilHole_*_Data_*" + tail
    else:
        parts[-1] = "*" + movie.suffix
    return str(movies_root.resolve().joinpath(*parts))


def pair_for_file(path: str | Path) -> MoviePair | None:
    """The movie/metadata pair that a single file belongs to, looking only beside it.

    An EPU XML finds ``<stem>_Fractions.mrc``, ``<stem>_EER.eer``, ``<stem>_fractions.tiff`` ... (a
    plain ``<stem>.mrc`` last); a ``movie.tif.mdoc`` finds ``movie.tif`` (or its section's
    ``SubFramePath``); a movie finds ``movie.mdoc``, ``<stem>.mdoc`` or its EPU XML.

    Returns
    -------
    MoviePair or None
        None when ``path`` is a metadata file without its movie and the movie is not beside it
        (``MoviePair(movie, None)`` for a movie without metadata).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    d = path.parent
    if suffix == ".xml":
        cands = sorted(
            (p for p in d.glob(path.stem + "*") if p.suffix.lower() in MOVIE_SUFFIXES and p.is_file()),
            key=lambda p: (p.stem == path.stem, p.name),  # suffixed movies before a plain sum
        )
        return MoviePair(cands[0], path) if cands else None
    if suffix == ".mdoc":
        direct = path.with_suffix("")
        if direct.suffix.lower() in MOVIE_SUFFIXES and direct.is_file():
            return MoviePair(direct, path)
        try:
            md = read_mdoc(path)
        except InputError:
            return None
        for _, _, sec in md.sections:
            sub = sec.get("SubFramePath")
            if sub and (d / ntpath.basename(sub)).is_file():
                return MoviePair(d / ntpath.basename(sub), path)
        return None
    if suffix in MOVIE_SUFFIXES:
        for cand in (path.with_name(path.name + ".mdoc"), path.with_suffix(".mdoc")):
            if cand.is_file():
                return MoviePair(path, cand)
        stem = _EPU_MOVIE_TAIL.sub("", path.stem)
        xml = d / (stem + ".xml")
        return MoviePair(path, xml if xml.is_file() else None)
    return None


@dataclass(frozen=True)
class FileReport:
    """Everything ``autospa mdcatch parse`` reports about one file."""

    metadata: AcquisitionMetadata
    derived: DerivedParameters
    gain: GainReport
    movie: str | None
    metadata_file: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "movie": self.movie,
            "metadata_file": self.metadata_file,
            "metadata": self.metadata.to_dict(),
            "derived": self.derived.to_dict(),
            "gain": self.gain.to_dict(),
        }


def ingest_file(
    path: str | Path,
    config: MDCatchConfig,
    *,
    movie: str | Path | None = None,
    session: str | Path | None = None,
    particle_diameter_a: float | None = None,
    helical: bool = False,
    eer_target_dose_e_a2: float | None = None,
) -> FileReport:
    """Parse one file, merge it with its counterpart beside it (movie <-> metadata), resolve it
    against the configuration, derive the processing parameters and look for gain/MTF files.

    Parameters
    ----------
    path
        EPU XML, mdoc, MRC, TIFF or EER file.
    config
        MDCatch configuration.
    movie
        The movie to merge with, instead of the one found beside ``path``.
    session
        Session folder searched for gain/MTF (default: the file's folder).
    particle_diameter_a, helical, eer_target_dose_e_a2
        See :func:`~autospa.mdcatch.derive.derive_parameters`.

    Returns
    -------
    FileReport

    Raises
    ------
    InputError
        ``path`` (or its counterpart) is missing or malformed.
    """
    path = Path(path)
    meta = parse_file(path)
    pair = pair_for_file(path) if movie is None else None
    movie_path: Path | None = Path(movie) if movie is not None else None
    meta_path: Path | None = None
    if movie_path is not None:
        meta = merge(meta, parse_file(movie_path))
        meta_path = path
    elif pair is not None and pair.metadata is not None and pair.movie != path:
        movie_path, meta_path = pair.movie, path
        from_movie = parse_file(movie_path)
        if meta.source_format == "epu_xml" and (from_movie.n_frames or 0) <= 1 and not _EPU_MOVIE_TAIL.search(
            movie_path.stem
        ):
            movie_path = None  # an EPU single-image sum, not the movie
        else:
            meta = merge(meta, from_movie)
    elif pair is not None and pair.metadata is not None:
        movie_path, meta_path = path, pair.metadata
        if pair.metadata.suffix.lower() == ".xml":
            from_meta = parse_epu_xml(pair.metadata)
        else:
            try:
                from_meta = parse_mdoc(pair.metadata, movie=path)
            except InputError:
                from_meta = parse_mdoc(pair.metadata)
        meta = merge(from_meta, meta)
    elif meta.source_format in ("mrc", "fei_mrc", "tiff", "eer"):
        movie_path = path
    else:
        meta_path = path
    if movie_path is not None:
        meta = meta.replace(movie=str(movie_path))
    meta = resolve(meta, config)
    derived = derive_parameters(meta, config, particle_diameter_a, helical, eer_target_dose_e_a2)
    gain = gain_report(meta, Path(session) if session else path.parent, config, derived.mtf_name, movie=movie_path)
    return FileReport(meta, derived, gain, None if movie_path is None else str(movie_path),
                      None if meta_path is None else str(meta_path))


class SessionWatcher:
    """Poll an acquisition session and keep its metadata files in ``out_dir`` up to date.

    Parameters
    ----------
    session
        The session folder (EPU session with ``Images-Disc*``, or SerialEM's folder).
    out_dir
        Where ``session.json``, ``session_params.txt`` and ``movies.star`` are written.
    config
        MDCatch configuration (``mdcatch.detectors.load_config``).
    settings
        Watch settings.

    Raises
    ------
    InputError
        Missing session folder, or an ``out_dir/session.json`` that belongs to another session.
    """

    def __init__(self, session: str | Path, out_dir: str | Path, config: MDCatchConfig,
                 settings: WatchSettings | None = None) -> None:
        self.session = Path(session).resolve()
        if not self.session.is_dir():
            raise InputError(session, "session folder not found")
        self.out_dir = Path(out_dir).resolve()
        self.config = config
        self.settings = settings or WatchSettings()
        self.movies_root = Path(self.settings.movies_dir).resolve() if self.settings.movies_dir else self.session
        if not self.movies_root.is_dir():
            raise InputError(self.settings.movies_dir, "movies folder not found")
        if self.settings.software not in ("auto", EPU, SERIALEM):
            raise InputError(None, f"software must be auto, EPU or SerialEM, not {self.settings.software!r}")
        self.software: str | None = None if self.settings.software == "auto" else self.settings.software
        self.state: dict[str, Any] = self._load_state()
        if self.software is None and self.state.get("software"):
            self.software = self.state["software"]
        self._reference: AcquisitionMetadata | None = None
        if self.state.get("reference"):
            self._reference = AcquisitionMetadata.from_dict(self.state["reference"]["metadata"])
        self._mdoc_index: dict[str, tuple[list[int] | None, list[str]]] = {}

    # ------------------------------------------------------------------ state
    @property
    def session_json(self) -> Path:
        """Path of ``session.json``."""
        return self.out_dir / SESSION_JSON

    @property
    def params_txt(self) -> Path:
        """Path of ``session_params.txt``."""
        return self.out_dir / SESSION_PARAMS

    @property
    def movies_star(self) -> Path:
        """Path of ``movies.star``."""
        return self.out_dir / MOVIES_STAR

    def _load_state(self) -> dict[str, Any]:
        if self.session_json.is_file():
            st = read_session_json(self.session_json)
            if st.get("format") != STATE_FORMAT:
                raise InputError(self.session_json, f"not an autospa mdcatch session file (format {st.get('format')!r})")
            if st.get("session") != str(self.session):
                raise InputError(self.session_json, f"belongs to session {st.get('session')}, not {self.session}")
            return st
        return {
            "format": STATE_FORMAT,
            "session": str(self.session),
            "movies_dir": str(self.movies_root),
            "software": self.software,
            "created": _now(),
            "updated": None,
            "settings": {
                "particle_diameter_a": self.settings.particle_diameter_a,
                "helical": self.settings.helical,
                "symmetry": self.settings.symmetry,
                "eer_target_dose_e_a2": self.settings.eer_target_dose_e_a2,
            },
            "config_sources": list(self.config.sources),
            "reference": None,
            "derived": None,
            "gain": None,
            "optics_groups": [],
            "movies": [],
            "drift": [],
            "failed": {},
            "ignored": [],
            "watch": {"polls": 0, "pending": {}},
            "launched": None,
        }

    @property
    def reference(self) -> AcquisitionMetadata | None:
        """The session's first complete movie's metadata (None before it)."""
        return self._reference

    @property
    def derived(self) -> DerivedParameters | None:
        """Derived parameters of the first movie (None before it)."""
        d = self.state.get("derived")
        if not d:
            return None
        d = dict(d)
        d["warnings"] = tuple(d.get("warnings", ()))
        return DerivedParameters(**d)

    @property
    def n_movies(self) -> int:
        """Movies ingested so far."""
        return len(self.state["movies"])

    # ------------------------------------------------------------------ discovery
    def discover(self) -> list[MoviePair]:
        """Every movie of the session with its metadata file (None when not there yet)."""
        if self.software is None:
            self.software = detect_software(self.session)
            if self.software is None:
                return []
            self.state["software"] = self.software
            log.info("%s: %s session", self.session, self.software)
        if self.software == EPU:
            return self._discover_epu()
        return self._discover_serialem()

    def _movie_files(self, pattern: str) -> list[Path]:
        out = []
        for p in self.movies_root.rglob(pattern):
            name = p.name
            if name.startswith(".") or p.suffix.lower() not in MOVIE_SUFFIXES:
                continue
            if is_gain_name(name, self.config) or self.out_dir in p.parents:
                continue
            if p.is_file():
                out.append(p)
        return sorted(out)

    def _discover_epu(self) -> list[MoviePair]:
        xmls = {p.stem: p for p in self.session.rglob("FoilHole_*_Data_*.xml") if not p.name.startswith(".")}
        movies = self._movie_files("FoilHole_*_Data_*")
        by_stem: dict[str, Path] = {}
        plain: dict[str, Path] = {}
        for m in movies:
            stem = m.name[: -len(m.suffix)]
            base = _EPU_MOVIE_TAIL.sub("", stem)
            if base != stem:
                by_stem[base] = m
            else:
                plain[stem] = m
        for stem, m in plain.items():  # an unsuffixed file is a movie only without a suffixed one
            by_stem.setdefault(stem, m)
        return [MoviePair(m, xmls.get(stem)) for stem, m in sorted(by_stem.items())]

    def _mdoc_movies(self) -> dict[str, list[Path]]:
        """SubFramePath basename -> the session mdocs whose sections name it."""
        out: dict[str, list[Path]] = {}
        for md in sorted(self.session.rglob("*.mdoc")):
            if self.out_dir in md.parents:
                continue
            sig = _sig(md)
            cached = self._mdoc_index.get(str(md))
            if cached is None or cached[0] != sig:
                try:
                    parsed = read_mdoc(md)
                    names = [ntpath.basename(s["SubFramePath"]) for _, _, s in parsed.sections if s.get("SubFramePath")]
                    if parsed.header.get("SubFramePath"):
                        names.append(ntpath.basename(parsed.header["SubFramePath"]))
                except InputError:
                    names = []
                self._mdoc_index[str(md)] = (sig, names)
                cached = self._mdoc_index[str(md)]
            for n in cached[1]:
                out.setdefault(n, []).append(md)
        return out

    def _discover_serialem(self) -> list[MoviePair]:
        """Movies with ``<movie>.mdoc`` / ``<stem>.mdoc`` beside them, then movies named by an mdoc's
        ``SubFramePath``. An mdoc entry describes one movie: a file of the same name elsewhere (a
        copy, a motion-corrected sum) is not paired with it, and when several movies share the
        name, only the one in the mdoc's own folder is."""
        movies = self._movie_files("*")
        direct: dict[Path, Path] = {}
        for m in movies:
            for cand in (m.with_name(m.name + ".mdoc"), m.with_suffix(".mdoc")):
                if cand.is_file():
                    direct[m] = cand
                    break
        claimed = {(md, m.name) for m, md in direct.items()}
        by_name: dict[str, list[Path]] = {}
        for m in movies:
            by_name.setdefault(m.name, []).append(m)
        index: dict[str, list[Path]] | None = None
        pairs = []
        for m in movies:
            meta = direct.get(m)
            if meta is None:
                if index is None:
                    index = self._mdoc_movies()
                for md in index.get(m.name, []):
                    if (md, m.name) in claimed:
                        continue
                    if md.parent == m.parent or len(by_name[m.name]) == 1:
                        meta = md
                        claimed.add((md, m.name))
                        break
            pairs.append(MoviePair(m, meta))
        return pairs

    # ------------------------------------------------------------------ polling
    def poll(self) -> PollReport:
        """Look once: update the poll state, ingest the movies that became complete, write files.

        Returns
        -------
        PollReport
        """
        report = PollReport()
        watch = self.state["watch"]
        watch["polls"] = int(watch.get("polls", 0)) + 1
        previous: dict[str, Any] = watch.get("pending", {})
        done = {r["movie"] for r in self.state["movies"]} | set(self.state["ignored"])
        pending: dict[str, Any] = {}
        complete: list[tuple[int, str, MoviePair]] = []
        for pair in self.discover():
            key = str(pair.movie)
            if key in done:
                continue
            sig = {"movie": _sig(pair.movie), "metadata": _sig(pair.metadata)}
            if sig["movie"] is None:
                continue
            failed_sig = self.state["failed"].get(key, {}).get("signature")
            if failed_sig is not None and failed_sig == sig:
                continue  # failed before and unchanged since
            stable = (
                previous.get(key) == sig
                and sig["movie"][0] > 0
                and sig["metadata"] is not None
            )
            if stable:
                complete.append((sig["movie"][1], key, pair))
            elif sig["metadata"] is None and previous.get(key) == sig and self._single_image(pair.movie, sig):
                log.info("%s: a single image without metadata (a sum), not a movie: ignored", pair.movie)
                self.state["ignored"].append(key)
            else:
                pending[key] = sig
        complete.sort(key=lambda t: (t[0], t[1]))  # in acquisition (modification) order
        for _, _, pair in complete:
            self._ingest(pair, report)
        watch["pending"] = pending
        report.pending = len(pending)
        report.total = self.n_movies
        self._write_files()
        return report

    def _single_image(self, movie: Path, sig: dict[str, Any]) -> bool:
        """Whether a file that has waited for its metadata is a single image (its header is read
        once per file version)."""
        checked = self.state["watch"].setdefault("checked", {})
        if checked.get(str(movie)) == sig["movie"]:
            return False
        checked[str(movie)] = sig["movie"]
        try:
            n = parse_file(movie).n_frames
        except InputError:
            return False
        return n is not None and n <= 1

    def _ingest(self, pair: MoviePair, report: PollReport) -> None:
        key = str(pair.movie)
        assert pair.metadata is not None
        try:
            if pair.metadata.suffix.lower() == ".xml":
                from_meta = parse_epu_xml(pair.metadata)
            else:
                try:
                    from_meta = parse_mdoc(pair.metadata, movie=pair.movie)
                except InputError:
                    from_meta = parse_mdoc(pair.metadata)
            from_movie = parse_file(pair.movie)
            meta = resolve(merge(from_meta, from_movie).replace(movie=key), self.config)
        except InputError as exc:
            msg = str(exc)
            log.warning("skipping movie %s: %s", pair.movie, msg)
            self.state["failed"][key] = {"message": msg, "signature": {"movie": _sig(pair.movie),
                                                                       "metadata": _sig(pair.metadata)}}
            report.failed[key] = msg
            return
        if from_movie.n_frames is not None and from_movie.n_frames <= 1:
            log.info("%s: a single image (an EPU or SerialEM sum), not a movie: ignored", pair.movie)
            self.state["ignored"].append(key)
            return
        self.state["failed"].pop(key, None)
        first = self._reference is None
        if first:
            self._set_reference(pair, meta)
            report.first_movie = True
        flags = self._drift(meta)
        group = self._optics_group(meta)
        record = {
            "movie": key,
            "metadata_file": str(pair.metadata),
            "optics_group": group,
            "timestamp": meta.timestamp,
            "pixel_size_a": meta.pixel_size_a,
            "voltage_kv": meta.voltage_kv,
            "magnification": meta.magnification,
            "detector_mode": meta.detector_mode,
            "total_dose_e_a2": meta.total_dose_e_a2,
            "n_frames": meta.n_frames,
            "exposure_time_s": meta.exposure_time_s,
            "target_defocus_a": meta.target_defocus_a,
            "beam_shift": None if meta.beam_shift is None else list(meta.beam_shift),
            "image_shift": None if meta.image_shift is None else list(meta.image_shift),
            "optics_group_label": meta.optics_group_label,
            "drift": [f["field"] for f in flags],
            "warnings": list(meta.warnings),
        }
        self.state["movies"].append(record)
        self.state["drift"].extend(flags)
        report.ingested.append(record)
        report.drift.extend(flags)
        for f in flags:
            log.warning("drift: %s %s = %s (session: %s)", pair.movie.name, f["field"], f["value"], f["reference"])

    def _set_reference(self, pair: MoviePair, meta: AcquisitionMetadata) -> None:
        s = self.settings
        derived = derive_parameters(meta, self.config, s.particle_diameter_a, s.helical, s.eer_target_dose_e_a2)
        gain: GainReport = gain_report(meta, self.session, self.config, derived.mtf_name, movie=pair.movie)
        self._reference = meta
        self.state["reference"] = {"movie": str(pair.movie), "metadata_file": str(pair.metadata),
                                   "metadata": meta.to_dict()}
        self.state["derived"] = derived.to_dict()
        self.state["gain"] = gain.to_dict()
        self.state["movies_glob"] = movies_glob(pair.movie, self.movies_root, self.software or SERIALEM,
                                                pair.metadata)
        log.info("first complete movie %s: reference for the session", pair.movie)

    def _drift(self, meta: AcquisitionMetadata) -> list[dict[str, Any]]:
        ref = self._reference
        assert ref is not None
        tol_dose = float(self.config.drift.get("dose_relative", 0.05))
        tol_px = float(self.config.drift.get("pixel_size_relative", 0.002))
        checks = (
            ("total_dose_e_a2", lambda a, b: is_close(a, b, tol_dose)),
            ("pixel_size_a", lambda a, b: is_close(a, b, tol_px)),
            ("magnification", lambda a, b: a == b),
            ("detector_mode", lambda a, b: a == b),
            ("voltage_kv", lambda a, b: is_close(a, b, 1e-6)),
        )
        flags = []
        for name, same in checks:
            a, b = getattr(ref, name), getattr(meta, name)
            if not same(a, b):
                flags.append({"movie": meta.movie, "field": name, "reference": a, "value": b})
        return flags

    def _optics_group(self, meta: AcquisitionMetadata) -> int:
        key = {
            "pixel_size_a": None if meta.pixel_size_a is None else round(meta.pixel_size_a, 4),
            "voltage_kv": meta.voltage_kv,
            "cs_mm": meta.cs_mm,
            "detector_mode": meta.detector_mode,
            "magnification": meta.magnification,
            "label": meta.optics_group_label,
        }
        for g in self.state["optics_groups"]:
            if g["key"] == key:
                return int(g["rlnOpticsGroup"])
        n = len(self.state["optics_groups"]) + 1
        self.state["optics_groups"].append({
            "rlnOpticsGroup": n,
            "rlnOpticsGroupName": f"opticsGroup{n}",
            "key": key,
            "mtf_file": (self.state.get("gain") or {}).get("mtf_file"),
        })
        return n

    # ------------------------------------------------------------------ outputs
    def _write_files(self) -> None:
        self.state["updated"] = _now()
        write_session_json(self.session_json, self.state)
        write_key_values(self.params_txt, self.params(), header=[f"Movies dir: {self.movies_root}"])
        self._write_movies_star()

    def params(self) -> dict[str, Any]:
        """The ``key = value`` items of ``session_params.txt``."""
        items: dict[str, Any] = {
            "session.path": str(self.session),
            "session.software": self.software,
            "session.movies": self.n_movies,
            "session.pending": len(self.state["watch"]["pending"]),
            "session.failed": len(self.state["failed"]),
            "session.drift_flags": len(self.state["drift"]),
            "session.optics_groups": len(self.state["optics_groups"]),
            "session.movies_glob": self.state.get("movies_glob"),
            "session.updated": self.state["updated"],
        }
        ref = self.state.get("reference")
        if ref:
            for k, v in ref["metadata"].items():
                if v is not None and v != [] and k not in ("source",):
                    items[f"metadata.{k}"] = v
            for k, v in (self.state.get("derived") or {}).items():
                if v is not None and v != []:
                    items[f"derived.{k}"] = v
            gain = self.state.get("gain") or {}
            for k in ("gain_reference", "defect_file", "mtf_name", "mtf_file", "gain_rot", "gain_flip"):
                items[f"gain.{k}"] = gain.get(k)
            if gain.get("check"):
                items["gain.check"] = gain["check"]["message"]
        return items

    def _write_movies_star(self) -> None:
        ref = self._reference
        if ref is None or not self.state["movies"]:
            return
        optics = []
        for g in self.state["optics_groups"]:
            k = g["key"]
            if k["pixel_size_a"] is None or k["voltage_kv"] is None or k["cs_mm"] is None:
                log.warning("optics group %s lacks pixel size, voltage or Cs: movies.star not written", g["rlnOpticsGroupName"])
                return
            optics.append({
                "rlnOpticsGroupName": g["rlnOpticsGroupName"],
                "rlnOpticsGroup": g["rlnOpticsGroup"],
                "rlnMtfFileName": g.get("mtf_file"),
                "rlnMicrographOriginalPixelSize": float(k["pixel_size_a"]),
                "rlnVoltage": float(k["voltage_kv"]),
                "rlnSphericalAberration": float(k["cs_mm"]),
                "rlnAmplitudeContrast": float(self.config.default("amplitude_contrast")),
            })
        movies = [{"rlnMicrographMovieName": r["movie"], "rlnOpticsGroup": r["optics_group"]}
                  for r in self.state["movies"]]
        write_movies_star(self.movies_star, optics, movies)

    # ------------------------------------------------------------------ pipeline
    def pipeline_movies_glob(self, project_dir: str | Path) -> str:
        """The session's movies glob as the pipeline in ``project_dir`` sees it.

        Relative to the project directory: the movies folder's own path when it lies inside the
        project, else ``Movies/...`` through a ``Movies`` link to the movies folder, made here when
        missing (MDCatch links the movies folder the same way).

        Raises
        ------
        InputError
            No complete movie yet, or ``project_dir/Movies`` exists and is something else.
        """
        glob = self.state.get("movies_glob")
        if not glob:
            raise InputError(self.session, "no complete movie yet: the movies glob is not known")
        project = Path(project_dir).resolve()
        try:
            rel = Path(glob).relative_to(self.movies_root)
        except ValueError:  # movies outside the movies folder: keep the absolute glob
            return str(glob)
        try:
            return (self.movies_root.relative_to(project) / rel).as_posix()
        except ValueError:
            link_movies(project / MOVIES_LINK, self.movies_root)
            return (Path(MOVIES_LINK) / rel).as_posix()

    def it_configuration(self, movies_glob: str | None = None) -> dict[str, Any]:
        """The ``it`` pipeline configuration from the first complete movie
        (:func:`~autospa.mdcatch.derive.build_it_options`).

        Parameters
        ----------
        movies_glob
            The movies glob to give the pipeline (default: the absolute glob of the session).

        Raises
        ------
        InputError
            No complete movie yet, or values the pipeline needs are missing.
        """
        if self._reference is None or self.derived is None:
            raise InputError(self.session, "no complete movie yet: cannot build the pipeline configuration")
        gain = self.state.get("gain") or {}
        check = gain.get("check")
        gain_ref = gain.get("gain_reference")
        if gain_ref and not gain.get("usable"):
            log.warning("gain %s does not fit the movies (%s): not passed to the pipeline", gain_ref,
                        (check or {}).get("message"))
            gain_ref = None
        if self.settings.helical:
            log.warning("the it pipeline has no helical mode: box and mask follow the helical rules, nothing else")
        return build_it_options(
            self._reference,
            self.derived,
            self.config,
            movies_glob=movies_glob or self.state["movies_glob"],
            gain_reference=gain_ref,
            gain_rot=int(gain.get("gain_rot") or 0) if gain_ref else 0,
            gain_flip=int(gain.get("gain_flip") or 0) if gain_ref else 0,
            mtf_file=gain.get("mtf_file"),
            defect_file=gain.get("defect_file"),
            symmetry=self.settings.symmetry,
        )

    def mark_launched(self, info: dict[str, Any]) -> None:
        """Record that the pipeline was started (saved to ``session.json`` at once)."""
        self.state["launched"] = {**info, "time": _now()}
        write_session_json(self.session_json, self.state)

    @property
    def launched(self) -> dict[str, Any] | None:
        """The launch record, or None."""
        return self.state.get("launched")


def it_settings(watcher: SessionWatcher, extra: dict[str, Any] | None = None,
                movies_glob: str | None = None) -> dict[str, Any]:
    """The session's ``it`` settings with ``extra`` winning (its ``options`` merged key by key)."""
    settings = watcher.it_configuration(movies_glob)
    for k, v in (extra or {}).items():
        if k == "options" and isinstance(v, dict):
            settings["options"] = {**settings.get("options", {}), **v}
        else:
            settings[k] = v
    return settings


def describe(meta: AcquisitionMetadata) -> str:
    """One line about a movie's acquisition (for logs and the CLI)."""
    def f(v: Any, fmt: str) -> str:
        return "?" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
    return (f"{Path(meta.movie or meta.source).name}: {f(meta.pixel_size_a, '.4f')} A/px, "
            f"{f(meta.voltage_kv, 'g')} kV, {f(meta.total_dose_e_a2, '.2f')} e/A^2 in {f(meta.n_frames, 'd')} frames, "
            f"{meta.detector_model or meta.detector_name or '?'} {meta.detector_mode or '?'}")


__all__ = [
    "EPU",
    "FileReport",
    "ingest_file",
    "it_settings",
    "SERIALEM",
    "MoviePair",
    "PollReport",
    "SessionWatcher",
    "WatchSettings",
    "describe",
    "detect_software",
    "movies_glob",
    "pair_for_file",
]
