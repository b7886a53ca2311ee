"""Prefect entry point: run the project's ``Schemes/proc`` (select, pick, extract, 2D, rank, 3D).

``prefect deploy --all`` (see prefect.yaml) or, without a server, ``python flows/proc.py [PROJECT]``.
"""

from __future__ import annotations

import sys

from autospa.orchestration.prefect_flows import named_scheme_flow

#: The flow: ``proc(scheme="proc", project_dir=...)``; each node visit is a task run named after it.
proc = named_scheme_flow("proc")

if __name__ == "__main__":
    proc(scheme="proc", project_dir=sys.argv[1] if len(sys.argv) > 1 else ".")
