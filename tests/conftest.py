"""Test session set-up: Prefect's settings as the autospa CLI applies them before Prefect's first
import (``autospa.orchestration.it.PREFECT_DEFAULTS``). Test modules import Prefect at collection,
so without this the in-process ephemeral server keeps Prefect's 20 s start-up limit, which a slow
2-core machine can exceed."""

from __future__ import annotations

import os

from autospa.orchestration.it import PREFECT_DEFAULTS

for _key, _value in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
