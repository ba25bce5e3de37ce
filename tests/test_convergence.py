"""A short convergence check of PPO on the built-in task (the full benchmark is bench/convergence.py)."""

from __future__ import annotations

import pytest

from conftest import compose
from marl_exp.stages.pipeline import run_stage


@pytest.mark.slow
def test_ppo_learns_well_formed_positive_reviews_within_kl_budget(trained_chain, tmp_path):
    # Default settings but 60 of the default 200 PPO steps, judged by the strict gold (the oracle on well-formed
    # reviews, 0 elsewhere) and the well-formed share, not by the plain oracle a stub can satisfy. The full
    # targets (strict >= 0.8 and +0.25, well formed >= 0.9, KL <= 10 after 200 steps, 3 fresh seeds, each
    # quant mode) are checked by bench/convergence.py, whose table is in the README.
    cfg = compose("stage=ppo", "logger=none", f"output_dir={tmp_path}", "stage.steps=60", "stage.eval.eval_every=0",
                  "stage.save_every=0", f"stage.sft_model={trained_chain['sft_model']}",
                  f"stage.reward_adapter={trained_chain['reward_adapter']}")
    summary = run_stage(cfg, tmp_path / "run")
    before, after = summary["eval/before/oracle_strict"], summary["eval/after/oracle_strict"]
    assert after - before >= 0.25 and after >= 0.75, (before, after)
    assert summary["eval/after/well_formed"] >= 0.9, summary["eval/after/well_formed"]
    assert summary["eval/after/kl"] <= 10.0


@pytest.mark.slow
def test_adamw_8bit_optimizer_keeps_8bit_state_and_trains(trained_chain, tmp_path, monkeypatch):
    """stage.optim.optimizer=adamw_8bit: bitsandbytes' AdamW8bit holds its moments in uint8 (block-wise
    quantized) for every tensor of at least its min_8bit_size elements, and one step moves every trained
    tensor (LoRA B starts at zero, so a moved B proves the update reached it)."""
    import bitsandbytes as bnb
    import torch

    from marl_exp.stages import rl

    trainers = []
    make_trainer = rl.make_trainer

    def keep(*args, **kwargs):
        trainers.append(make_trainer(*args, **kwargs))
        trainers.append({n: [p.detach().clone() for p in s.params] for n, s in trainers[0].policies.items()})
        return trainers[0]

    monkeypatch.setattr(rl, "make_trainer", keep)
    cfg = compose("stage=ppo", "logger=none", f"output_dir={tmp_path}", "stage.optim.optimizer=adamw_8bit",
                  "stage.steps=1", "stage.batch_size=8", "stage.optim.mini_batch_size=4", "stage.eval.eval_samples=8",
                  "stage.sampling.max_new_tokens=8", "stage.eval.eval_every=0", "stage.save_every=0",
                  f"stage.sft_model={trained_chain['sft_model']}", f"stage.reward_adapter={trained_chain['reward_adapter']}")
    summary = run_stage(cfg, tmp_path / "run")
    assert summary["train/steps"] == 1
    trainer, initial = trainers
    for name, policy in trainer.policies.items():
        optimizer = policy.optimizer
        assert isinstance(optimizer, bnb.optim.AdamW8bit)
        min_8bit = optimizer.args.min_8bit_size
        large = [p for p in policy.params if p.numel() >= min_8bit]
        assert large, f"no trained tensor of {name} has {min_8bit}+ elements: the 8-bit path is never taken"
        for param in large:
            state = optimizer.state[param]
            assert state["state1"].dtype == state["state2"].dtype == torch.uint8, (param.shape, state["state1"].dtype)
        moved = [not torch.equal(before, after.detach()) for before, after in zip(initial[name], policy.params)]
        assert all(moved), f"{moved.count(False)} of {len(moved)} trained tensors of {name} did not move"
