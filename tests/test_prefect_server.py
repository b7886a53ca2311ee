"""The local Prefect server of ``autospa demo``: API, dashboard, flow runs recorded, stopped afterwards.

Real components: ``prefect server start`` in a subprocess, a real flow, HTTP against the server.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("prefect")

from prefect import flow  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from autospa.orchestration.prefect_server import configured_api_url, dashboard_url, prefect_server  # noqa: E402


@flow(name="autospa-test-dashboard", persist_result=False)
def tiny_flow(x: int) -> str:
    return f"{flow_run.id}:{x + 1}"


def _server_processes(port: int | None = None) -> list[psutil.Process]:
    """This process's children running ``prefect server start`` (on ``port``, or any)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "prefect" in cmd and "server" in cmd and "start" in cmd and (port is None or str(port) in cmd):
            out.append(p)
    return out


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("content-type", ""), r.read().decode("utf-8", "replace")


@pytest.fixture
def no_api_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    if configured_api_url():
        pytest.skip("the Prefect profile names a server (PREFECT_API_URL)")


def test_server_dashboard_and_flow_run(tmp_path: Path, no_api_url: None) -> None:
    home = tmp_path / "prefect_home"
    t0 = time.perf_counter()
    with prefect_server(home) as url:
        started = time.perf_counter() - t0
        assert url is not None, (home / "server.log").read_text() if (home / "server.log").exists() else "no log"
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        procs = _server_processes(port)
        assert procs, "no server process among this process's children"
        assert os.environ["PREFECT_API_URL"] == f"{url}/api"

        status, _, body = _get(f"{url}/api/health")
        assert status == 200 and json.loads(body) is True
        status, ctype, body = _get(f"{url}/")
        assert status == 200 and "text/html" in ctype and "<html" in body.lower()

        run_id, value = tiny_flow(41).split(":")
        assert value == "42"
        req = urllib.request.Request(f"{url}/api/flow_runs/filter", method="POST",
                                     data=json.dumps({"flow_runs": {"id": {"any_": [run_id]}}}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.loads(r.read())
        assert [r["id"] for r in runs] == [run_id]
        assert runs[0]["state_type"] == "COMPLETED"
        assert (home / "prefect.db").exists()  # the server's database is in the given PREFECT_HOME
    for p in procs:
        assert not p.is_running(), f"server process {p.pid} still running"
    assert _server_processes(port) == []
    assert "PREFECT_API_URL" not in os.environ
    assert configured_api_url() is None  # back to ephemeral mode
    print(f"server started in {started:.1f} s; test body {time.perf_counter() - t0:.1f} s")


def test_server_not_ready_in_time_falls_back_to_ephemeral(tmp_path: Path, no_api_url: None) -> None:
    with prefect_server(tmp_path / "h", timeout_s=0.0) as url:
        assert url is None
        assert "PREFECT_API_URL" not in os.environ
        assert _server_processes() == []


def test_existing_api_url_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    with prefect_server(tmp_path / "h") as url:
        assert url == "http://prefect.example:4200"
    assert not (tmp_path / "h").exists()  # nothing started
    assert os.environ["PREFECT_API_URL"] == "http://prefect.example:4200/api"


def test_dashboard_url() -> None:
    assert dashboard_url("http://127.0.0.1:4200/api/") == "http://127.0.0.1:4200"
    assert dashboard_url("https://api.prefect.cloud/api/accounts/a1/workspaces/w2") == (
        "https://app.prefect.cloud/account/a1/workspace/w2")
