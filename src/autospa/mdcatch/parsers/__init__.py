"""Parsers of acquisition metadata: EPU XML, SerialEM mdoc, MRC (FEI header), TIFF and EER.

:func:`parse_file` picks the parser from the file name (or, for an unknown suffix, from the first
bytes) and returns an :class:`~autospa.mdcatch.metadata.AcquisitionMetadata`.
"""

from __future__ import annotations

from pathlib import Path

from autospa.errors import InputError
from autospa.mdcatch.metadata import AcquisitionMetadata
from autospa.mdcatch.parsers.epu_xml import parse_epu_xml
from autospa.mdcatch.parsers.fei_mrc import parse_mrc
from autospa.mdcatch.parsers.mdoc import parse_mdoc
from autospa.mdcatch.parsers.tiff_eer import parse_tiff

__all__ = ["MOVIE_SUFFIXES", "METADATA_SUFFIXES", "detect_format", "parse_file"]

#: Suffixes of movie files (lower case).
MOVIE_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".eer")
#: Suffixes of metadata files (lower case).
METADATA_SUFFIXES = (".xml", ".mdoc")


def detect_format(path: str | Path) -> str:
    """``xml``, ``mdoc``, ``mrc`` or ``tiff`` from the suffix, else from the file's first bytes.

    Raises
    ------
    InputError
        Missing file or unrecognised content.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    suffix = path.suffix.lower()
    by_suffix = {".xml": "xml", ".mdoc": "mdoc", ".mrc": "mrc", ".mrcs": "mrc", ".st": "mrc",
                 ".tif": "tiff", ".tiff": "tiff", ".eer": "tiff"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 212 and head[208:211] == b"MAP":
        return "mrc"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"<"):
        return "xml"
    if b" = " in head:
        return "mdoc"
    raise InputError(path, "unrecognised file: not EPU XML, mdoc, MRC, TIFF or EER")


def parse_file(path: str | Path, movie: str | Path | None = None) -> AcquisitionMetadata:
    """Parse one metadata or movie file.

    Parameters
    ----------
    path
        EPU XML, SerialEM mdoc, MRC, TIFF or EER file.
    movie
        For a multi-section mdoc: the movie whose section to read.

    Returns
    -------
    AcquisitionMetadata
    """
    fmt = detect_format(path)
    if fmt == "xml":
        return parse_epu_xml(path)
    if fmt == "mdoc":
        return parse_mdoc(path, movie=movie)
    if fmt == "mrc":
        return parse_mrc(path)
    return parse_tiff(path)
