"""Prefect entry point: ``autospa it`` as a flow (configure prep and proc, run both as sub-flows).

``prefect deploy --all`` (see prefect.yaml) or, without a server,
``python flows/it.py PROJECT [CONFIG.yaml]``.
"""

from __future__ import annotations

import dataclasses
import sys

from autospa.orchestration.it import load_it_config
from autospa.orchestration.prefect_flows import it_flow

#: The flow: ``it(project_dir=..., config={...ItConfig fields or relion_it keys...}, reset=False)``.
it = it_flow

if __name__ == "__main__":
    project = sys.argv[1] if len(sys.argv) > 1 else "."
    config = dataclasses.asdict(load_it_config(sys.argv[2])) if len(sys.argv) > 2 else {}
    it(project_dir=project, config=config)
