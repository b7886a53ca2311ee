"""relion.select.onvalue: keep micrographs by CTF resolution (the proc scheme's select_mics)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from autospa.errors import InputError
from autospa.io.job_control import SUCCESS
from autospa.io.preprocess_files import write_micrograph_table, write_particles_star
from autospa.io.star import read_star
from autospa.jobs.registry import get_job
from autospa.jobs.select import SelectValueParams, run_select_on_value

OPTICS = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnMicrographPixelSize": [1.0],
                       "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})  # fmt: skip
RES = [3.5, 7.2, 5.9, 6.0, 12.0]


def _mics(root: Path) -> Path:
    rows = pd.DataFrame({"rlnMicrographName": [f"CtfFind/job003/Movies/m{i}.mrc" for i in range(5)], "rlnOpticsGroup": [1] * 5,
                         "rlnCtfMaxResolution": RES, "rlnDefocusU": [10000.0 + i for i in range(5)]})  # fmt: skip
    return write_micrograph_table(root / "CtfFind/job003/micrographs_ctf.star", OPTICS, rows)


def test_select_micrographs_by_ctf_resolution_as_the_scheme_does(tmp_path: Path) -> None:
    _mics(tmp_path)
    job_dir = tmp_path / "Select/job006"
    job_dir.mkdir(parents=True)
    # the options of schemes/proc/select_mics/job.star
    options = {"fn_mic": "CtfFind/job003/micrographs_ctf.star", "do_select_values": "Yes", "select_label": "rlnCtfMaxResolution",
               "select_minval": "-9999.", "select_maxval": "6", "fn_data": '""', "do_class_ranker": "No"}  # fmt: skip
    get_job("relion.select.onvalue").func(job_dir, options, True)
    assert (job_dir / SUCCESS).exists()
    blocks = read_star(job_dir / "micrographs.star")
    kept = blocks["micrographs"]
    assert list(kept["rlnCtfMaxResolution"]) == [3.5, 5.9, 6.0]  # inclusive bound, original order
    assert list(kept["rlnMicrographName"]) == ["CtfFind/job003/Movies/m0.mrc", "CtfFind/job003/Movies/m2.mrc", "CtfFind/job003/Movies/m3.mrc"]
    pd.testing.assert_frame_equal(blocks["optics"], OPTICS, check_dtype=False)


def test_select_particles_and_missing_label(tmp_path: Path) -> None:
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@p.mrcs" for i in range(4)], "rlnOpticsGroup": [1] * 4,
                          "rlnAutopickFigureOfMerit": [0.1, 2.0, 1.5, -1.0]})  # fmt: skip
    write_particles_star(tmp_path / "in/particles.star", OPTICS, parts)
    out = run_select_on_value(SelectValueParams("in/particles.star", "Select/job007", "rlnAutopickFigureOfMerit", 1.0, 99.0), tmp_path)
    assert out.name == "particles.star"
    assert list(read_star(out)["particles"]["rlnImageName"]) == ["000002@p.mrcs", "000003@p.mrcs"]
    with pytest.raises(InputError, match="no rlnCtfMaxResolution"):
        run_select_on_value(SelectValueParams("in/particles.star", "Select/job008"), tmp_path)
    assert not (tmp_path / "Select/job008").exists()
