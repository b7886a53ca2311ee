"""Exceptions shared by every layer (L0).

Library code raises these; the CLI turns them into a one-line message and exit code 1.
"""

from __future__ import annotations

from pathlib import Path


class AutospaError(Exception):
    """Base class of autospa's own errors."""


class InputError(AutospaError, ValueError):
    """Bad input: a file (or value) that cannot be used, with the reason.

    Parameters
    ----------
    path
        The offending file (or ``None`` when the problem is not tied to a file).
    problem
        One line saying what is wrong.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        msg = problem if path is None else f"{path}: {problem}"
        super().__init__(msg)


class DeviceError(AutospaError, RuntimeError):
    """A requested accelerator (CUDA, GPUs) is not available."""
