"""bench/wait_policy.py's bookkeeping: the settings it compares (threads=auto's and an explicit threads=N's among
them) and the ratios of its table, on hand-made measurements."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import wait_policy  # noqa: E402  (bench/ is not a package)

from marl_exp.run import threads  # noqa: E402


def test_settings_cover_what_marl_exp_sets_and_openmps_default():
    settings = wait_policy.settings()
    assert settings["PASSIVE (threads=auto)"] == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert settings[f"GOMP_SPINCOUNT={threads.SHORT_SPIN} (threads=N)"] == {"GOMP_SPINCOUNT": threads.SHORT_SPIN}
    assert settings["OpenMP default"] == {}
    # Each is what marl_exp.run.threads itself picks for that choice.
    assert threads.wait_policy(threads.choose("auto", env={}), {}) == settings["PASSIVE (threads=auto)"]
    assert threads.wait_policy(threads.choose("2", env={}), {}) == {"GOMP_SPINCOUNT": threads.SHORT_SPIN}


def test_ratios_are_to_passive_in_the_same_condition():
    machine = {"cpu": "Some CPU", "cpu_flags": [], "cpu_cores": 2, "torch_threads": 2, "torch": "2.13.0",
               "git": "abc", "tree": "clean"}
    results = wait_policy.with_ratios({"machine": machine, "threads": 2, "rounds": 3, "work": "w", "runs": {
        "PASSIVE (threads=auto)": {"quiet": {"median_s": 8.0}, "busy": {"median_s": 10.0}},
        "OpenMP default": {"quiet": {"median_s": 6.0}, "busy": {"median_s": 35.0}}}})
    assert results["runs"]["OpenMP default"]["quiet_over_passive"] == pytest.approx(0.75)
    table = wait_policy.report(results)
    assert "| OpenMP default | 6.00 | 0.75 | 35.00 | 3.50 |" in table
    assert "| PASSIVE (threads=auto) | 8.00 | 1.00 | 10.00 | 1.00 |" in table
