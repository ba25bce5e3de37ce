"""Smoke test of the TRL peer benchmark (bench/trl_peer.py): one step of each framework on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_trl_peer_runs_both_frameworks_on_the_same_work(tmp_path):
    out = tmp_path / "trl_peer.json"
    cmd = [sys.executable, str(REPO / "bench" / "trl_peer.py"), "--sizes", "tiny", "--warmup", "0", "--steps", "1",
           "--no-checkpointing-row", "--prompts", "2", "--num-generations", "2", "--new-tokens", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = json.loads(out.read_text())["sizes"][0]
    # Same work: 2 prompts x 2 responses of exactly 4 tokens, 2 updates, policy and reference log-probs.
    for fw in ("marl-exp", "trl"):
        r = row[fw]
        assert r["tokens_per_step"] == [16.0]
        assert r["optimizer_steps_per_step"] == 2
        assert r["torch_threads"] == 1
        assert r["step"]["seconds"] > 0 and r["step"]["sample"] > 0 and r["step"]["update"] > 0
        assert r["rss_steps_peak_above_baseline_mib"] > 0
        assert set(r["rss_phase_peak_above_baseline_mib"]) == {"sample", "score", "update"}  # each phase its own
        assert all(kl is not None for kl in r["kl"])  # beta > 0: both computed the reference
    # TRL scores the old policy and the reference; marl-exp the reference only: its update's first forward (one
    # mini-batch, KL in the loss) gives the old log-probs.
    assert row["trl"]["scoring_logprob_passes"] == [2] and row["marl-exp"]["scoring_logprob_passes"] == [1]
    assert row["same_work"]
    # MFU per phase: each framework's model FLOPs (the same but for that pass) and its own times.
    mfu = row["mfu"]
    for fw in ("marl-exp", "trl"):
        flops = mfu["model_flops"][fw]
        for phase in ("sample", "score", "update"):
            assert mfu[fw][phase] == pytest.approx(flops[phase] / row[fw]["step"][phase] / mfu["peak_flops"])
        assert flops["update"] > flops["score"] > 0
    marl_flops, trl_flops = mfu["model_flops"]["marl-exp"], mfu["model_flops"]["trl"]
    assert marl_flops["score"] < trl_flops["score"]
    assert (marl_flops["sample"], marl_flops["update"]) == (trl_flops["sample"], trl_flops["update"])
    assert "| tiny | " in proc.stdout.split("Model FLOP utilization")[1]
    # TRL holds a second model (the reward classifier); marl-exp holds one base.
    assert row["marl-exp"]["model_bytes"] < row["trl"]["model_bytes"]
    assert "| tiny | 0.8M | marl-exp |" in proc.stdout


def test_the_real_model_size_is_the_imported_model_with_a_reward_adapter_on_it(tmp_path, monkeypatch):
    """``--sizes smollm2`` benchmarks the model=smollm2 import itself (a stand-in dir here: the wheel is not needed
    to check the routing), with a reward adapter built on it in the bench cache."""
    sys.path.insert(0, str(REPO / "bench"))
    import common
    from marl_exp.config import TinyArchConfig
    from marl_exp.modeling import gguf_import
    from marl_exp.modeling.tiny import builtin_model_dir

    stand_in = builtin_model_dir(TinyArchConfig())
    monkeypatch.setattr(gguf_import, "smollm2_dir", lambda: stand_in)
    monkeypatch.setenv("MARL_EXP_CACHE", str(tmp_path))
    base, reward = common.model_dirs("smollm2")
    assert base == stand_in
    assert json.loads((reward / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert not (reward.parent / "base").exists()  # nothing built in place of the real model
