"""quant=8bit and quant=4bit run the whole chain as a user would (`python train.py debug=ppo quant=...`): the
reward adapter is trained on the quantized base and PPO reads it there; adapters and heads stay fp32 and the
policy moves. (bf16: tests/test_bf16.py; fp32: the rest of the suite.)"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import compose
from marl_exp.stages.pipeline import run_stage

pytestmark = pytest.mark.slow  # each mode trains its own debug chain (~1 min on 2 cores)


def lora_b_norm(weights: dict) -> float:
    return sum(v.float().norm().item() for k, v in weights.items() if "lora_B" in k)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_whole_chain_in_quant_mode(tmp_path, mode):
    cfg = compose("debug=ppo", f"quant={mode}", f"output_dir={tmp_path}")
    summary = run_stage(cfg, tmp_path / "run")

    (reward_entry,) = (tmp_path / "cache").glob("reward-*")
    reward_cfg = yaml.safe_load((reward_entry / "resolved_config.yaml").read_text())
    assert reward_cfg["quant"]["mode"] == mode and reward_cfg["stage"]["name"] == "reward"
    reward_summary = json.loads((reward_entry / "summary.json").read_text())
    assert reward_summary["train/steps"] == cfg.upstream.reward.max_steps
    reward_weights = load_file(reward_entry / "reward_adapter" / "adapter_model.safetensors")
    assert any(k.endswith("score.weight") for k in reward_weights)
    assert lora_b_norm(reward_weights) > 0  # LoRA B starts at 0: the adapter was trained
    assert {v.dtype for v in reward_weights.values()} == {torch.float32}

    run_cfg = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())
    assert run_cfg["quant"]["mode"] == mode
    assert summary["train/steps"] == cfg.stage.steps
    policy = load_file(tmp_path / "run" / "policies" / "policy" / "adapter_model.safetensors")
    assert lora_b_norm(policy) > 0 and {v.dtype for v in policy.values()} == {torch.float32}
    # The policy moved away from the reference it started equal to.
    assert summary["eval/before/kl"] == pytest.approx(0.0, abs=1e-4) and summary["eval/after/kl"] > 0
