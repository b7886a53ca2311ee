"""Prefect entry point: run the project's ``Schemes/prep`` (movies -> motion correction -> CTF).

``prefect deploy --all`` (see prefect.yaml) or, without a server, ``python flows/prep.py [PROJECT]``.
"""

from __future__ import annotations

import sys

from autospa.orchestration.prefect_flows import named_scheme_flow

#: The flow: ``prep(scheme="prep", project_dir=...)``; each node visit is a task run named after it.
prep = named_scheme_flow("prep")

if __name__ == "__main__":
    prep(scheme="prep", project_dir=sys.argv[1] if len(sys.argv) > 1 else ".")
