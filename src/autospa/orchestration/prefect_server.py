"""A local Prefect server with its dashboard, for the length of a run.

Prefect's ephemeral mode (no ``PREFECT_API_URL``) starts a temporary API server without a UI, so
nothing can be watched while the flows run. :func:`prefect_server` starts ``prefect server start``
(API and UI) as a subprocess on a free local port, with ``PREFECT_HOME`` (database, logs) in a
folder of the caller's choosing, points this process's Prefect client at it and stops it again::

    with prefect_server(outdir / ".prefect") as dashboard:   # "http://127.0.0.1:PORT" or None
        ...                                                  # flows run here are recorded there

When ``PREFECT_API_URL`` is already set (environment or Prefect profile), that server is used and its dashboard address is yielded.
When the server does not answer in time, a warning is logged, the process is stopped and ``None``
is yielded: the flows then run in ephemeral mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from autospa.orchestration.it import PREFECT_DEFAULTS

log = logging.getLogger(__name__)

#: Settings of the server process where the user has not set them: no scheduler or late-run
#: services (the runs are started by this process, never from deployments), quiet logs.
SERVER_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
}

#: The server's output (start-up errors included) goes here, in ``PREFECT_HOME``.
SERVER_LOG_NAME = "server.log"


def dashboard_url(api_url: str) -> str:
    """The UI address of a Prefect API address (``http://host:4200/api`` -> ``http://host:4200``;
    Prefect Cloud's ``https://api.prefect.cloud/api/accounts/A/workspaces/W`` ->
    ``https://app.prefect.cloud/account/A/workspace/W``)."""
    url = api_url.rstrip("/")
    if "api.prefect.cloud/api/" in url:
        url = url.replace("https://api.", "https://app.", 1).replace("/api/accounts/", "/account/", 1)
        return url.replace("/workspaces/", "/workspace/", 1)
    return url.removesuffix("/api")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def api_healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``GET {api_url}/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to the server's process group (it and its children), then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # the server leads its own session: its group id is its pid
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # children that outlived their leader (the group may survive it)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _start(home: Path, host: str, port: int) -> subprocess.Popen:
    env = dict(os.environ)
    for k, v in SERVER_DEFAULTS.items():
        env.setdefault(k, v)
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(home)
    # the UI asks this address for its data (by default it would be PREFECT_SERVER_API_PORT's 4200)
    env["PREFECT_SERVER_API_HOST"], env["PREFECT_SERVER_API_PORT"] = host, str(port)
    env["PREFECT_UI_API_URL"] = f"http://{host}:{port}/api"
    logfile = open(home / SERVER_LOG_NAME, "ab")  # noqa: SIM115 (the child holds it; closed below)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped with its children; no terminal signals
        )
    finally:
        logfile.close()


def configured_api_url() -> str | None:
    """The Prefect API address this process's client uses (``PREFECT_API_URL`` from the environment
    or the active Prefect profile), or ``None`` (ephemeral mode).

    Imports Prefect (its root settings are read then), after applying :data:`PREFECT_DEFAULTS`.
    """
    for k, v in PREFECT_DEFAULTS.items():  # before Prefect's first import, as prefect_environment does
        os.environ.setdefault(k, v)
    import prefect.settings

    return os.environ.get("PREFECT_API_URL") or prefect.settings.PREFECT_API_URL.value() or None


@contextlib.contextmanager
def _client_settings(api_url: str) -> Iterator[None]:
    """Point this process's Prefect client at ``api_url`` (environment and Prefect's settings context)."""
    import prefect.settings

    os.environ["PREFECT_API_URL"] = api_url
    try:
        with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: api_url}):
            try:
                yield
            finally:
                _drain_prefect_workers()
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def _drain_prefect_workers(timeout_s: float = 10.0) -> None:
    """Send the flow-run logs and events still queued in this process to the server before it stops
    (else they are lost, with "Error logging to API" at exit), as Prefect's test harness does."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout_s)
        except Exception as exc:  # a failed flush must not hide the block's own outcome
            log.debug("draining %s: %s", worker.__name__, exc)


@contextlib.contextmanager
def prefect_server(home: str | Path, timeout_s: float = 60.0, host: str = "127.0.0.1") -> Iterator[str | None]:
    """Run a local Prefect server (API and dashboard) while the block runs; yield the dashboard address.

    Parameters
    ----------
    home
        The server's ``PREFECT_HOME`` (its SQLite database and ``server.log``); created if missing.
    timeout_s
        How long to wait for ``/api/health`` to answer.
    host
        Interface the server listens on.

    Yields
    ------
    str or None
        ``http://HOST:PORT`` (or the dashboard of the server ``PREFECT_API_URL`` names, when it is
        set in the environment or the Prefect profile: then nothing is started); ``None`` when the server did not start in time (Prefect's
        ephemeral mode then runs the flows).
    """
    existing = configured_api_url()
    if existing:
        yield dashboard_url(existing)
        return
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    api = f"http://{host}:{port}/api"
    t0 = time.monotonic()
    proc = _start(home, host, port)
    try:
        while not api_healthy(api):
            if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                why = f"exited with status {proc.returncode}" if proc.poll() is not None else f"did not answer in {timeout_s:.0f} s"
                log.warning("the Prefect server %s (see %s); running the flows in Prefect's ephemeral mode",
                            why, home / SERVER_LOG_NAME)
                _stop(proc)
                yield None
                return
            time.sleep(0.25)
        log.info("Prefect server pid %d at %s (started in %.1f s; PREFECT_HOME %s)", proc.pid, api, time.monotonic() - t0, home)
        with _client_settings(api):
            yield dashboard_url(api)
    finally:
        _stop(proc)
