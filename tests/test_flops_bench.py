"""bench/flops.py: model FLOPs counted by hand on a toy block, and weight counts against the model itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import flops  # noqa: E402

TOY = flops.Shapes(layers=1, hidden=2, linears=((2, 3),), attention_width=2, vocab=5)


def test_forward_flops_by_hand():
    # 2 tokens: dense 2*(2*3)*2 = 24; attention 4*2*(1+2) = 24; LM head 2*2*5*2 = 40.
    assert flops.forward_flops(TOY, 2) == 88
    # LoRA rank 1 on the one linear: 2*1*(2+3) = 10 per token.
    assert flops.forward_flops(TOY, 2, lora_rank=1) == 108
    # One new token after 3 cached: dense 12, attention 4*2*4 = 32 (it attends to 4 keys), no logits.
    assert flops.forward_flops(TOY, 1, start=3, lm_head_tokens=0) == 44


def test_backward_through_a_frozen_base_by_hand():
    # Input gradients = the forward's work (108) + attention's second product (24) + LoRA weight grads (20).
    assert flops.backward_flops(TOY, 2, lora_rank=1) == 152


def test_step_phases_by_hand():
    # 1 reply, prompt 2 + response 2 tokens, 1 update, no LoRA on the reward model.
    got = flops.step_flops(TOY, replies=1, prompt=2, response=2, updates=1, lora_rank=0, reward_rank=0)
    prefill = flops.forward_flops(TOY, 2, lm_head_tokens=1)  # 24 + 24 + 20 = 68
    decode = flops.forward_flops(TOY, 1, start=2)  # 12 + 24 + 20 = 56
    assert prefill == 68 and decode == 56 and got["sample"] == 124
    whole = flops.forward_flops(TOY, 4)  # dense 48, attention 80, head 80
    assert whole == 208
    assert got["score"] == whole + whole + (208 - 80)  # policy, reference, reward (no LM head)
    assert got["update"] == whole + flops.backward_flops(TOY, 4, 0)
    # The update's first forward gave the old log-probs: scoring is the reference and the reward only.
    without = flops.step_flops(TOY, replies=1, prompt=2, response=2, updates=1, lora_rank=0, reward_rank=0,
                               policy_scoring=False)
    assert without == {**got, "score": whole + (208 - 80)}


def test_block_weights_match_the_models_own_linear_layers():
    """Shapes.from_config against the weights a Llama with grouped-query attention really has."""
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(config)
    in_blocks = sum(m.weight.numel() for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".layers." in name)
    shapes = flops.Shapes.from_config(config)
    assert shapes.block_weights * shapes.layers == in_blocks
    assert shapes.hidden * shapes.vocab == model.lm_head.weight.numel()


def test_smollm2_decode_matches_the_issue_estimate():
    """SmolLM2-135M's shapes: one decode token of 16 rows is ~4.3 GFLOP (issue 24's own count)."""
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152)
    per_token = flops.forward_flops(flops.Shapes.from_config(config), 1)
    assert round(16 * per_token / 1e9, 1) == 4.3


def test_mean_prompt_tokens_is_over_every_training_prompt(tmp_path):
    """The mean of all training prompts' token counts, each counted on its own (it was once the first prompt's)."""
    from conftest import compose
    from marl_exp.data.task import build_task
    from marl_exp.modeling.loading import load_tokenizer, resolve_model_path

    cfg = compose("stage=grpo", "stage.sft_model=builtin:tiny", f"output_dir={tmp_path}")
    tokenizer = load_tokenizer(resolve_model_path(cfg.model))
    prompts = build_task(cfg.data).prompts("train")
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) > 1  # prompts differ in length, so the first one alone would not do
    assert abs(flops.mean_prompt_tokens(cfg) - sum(lengths) / len(lengths)) < 1e-6  # a float32 mean


@pytest.mark.parametrize("logged, scored", [({"perf/old_logprobs_from_update": 1.0}, False),
                                            ({"perf/old_logprobs_from_update": 0.0}, True),
                                            ({}, True)])  # a run from before the metric: scoring ran the policy
def test_a_runs_counts_say_whether_scoring_ran_the_policy(tmp_path, logged, scored):
    from omegaconf import OmegaConf

    from conftest import compose

    cfg = compose("stage=grpo", "stage.sft_model=builtin:tiny", f"output_dir={tmp_path}")
    (tmp_path / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg))
    step = {"time/step": 3.0, "time/rollout": 1.0, "time/score": 1.0, "time/optimize": 1.0,
            "completions/mean_length": 4.0, **logged}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(step) + "\n")
    assert flops.run_counts(tmp_path)["policy_scoring"] is scored
