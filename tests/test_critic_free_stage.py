"""The critic-free stages (GRPO, RLOO, REINFORCE++) on the tiny model: what one step trains, the group
statistics, the sampling policy's log-probs across iterations, the loss against a hand computation,
every stage through ``run_stage`` (fp32 and 4-bit), exact resume, config errors and a short convergence
check. The math itself is tested in test_critic_free_core.py."""

from __future__ import annotations

import json
import shutil

import pytest
from omegaconf import OmegaConf
import torch

from conftest import compose
from test_ppo_stage import assert_moved_from_the_reference, assert_policy_trained
from marl_exp.config import ConfigError, validate
from marl_exp.data import build_task
from marl_exp.modeling.loading import load_tokenizer, resolve_device
from marl_exp.rl.algorithms import critic_free
from marl_exp.rl.trainer import RLTrainer
from marl_exp.rl.rollout import sample, score
from marl_exp.stages.pipeline import run_stage
from marl_exp.stages.rl_models import build_roles

SMALL = ("stage.steps=2", "stage.batch_size=8", "stage.sampling.num_generations=4", "stage.optim.mini_batch_size=4",
         "stage.eval.eval_samples=8", "stage.sampling.max_new_tokens=8", "stage.eval.eval_every=0", "stage.save_every=0")


def rl_cfg(chain, out, stage, *overrides):
    return compose(f"stage={stage}", "logger=none", f"output_dir={out}", f"stage.sft_model={chain['sft_model']}",
                   f"stage.reward_adapter={chain['reward_adapter']}", *SMALL, *overrides)


@pytest.fixture(scope="module")
def roles_and_tokenizer(trained_chain, tmp_path_factory):
    cfg = rl_cfg(trained_chain, tmp_path_factory.mktemp("cf"), "grpo")
    roles = build_roles(cfg, str(trained_chain["sft_model"]), str(trained_chain["reward_adapter"]), resolve_device("cpu"))
    roles.model.train(False)
    return roles, load_tokenizer(str(trained_chain["sft_model"])), build_task(cfg.data).prompts_train


@pytest.fixture
def fresh_policy(roles_and_tokenizer):
    """The policy adapter back to its initial weights after the test (the roles are shared)."""
    roles = roles_and_tokenizer[0]
    saved = {n: p.detach().clone() for n, p in roles.model.named_parameters()}
    yield
    with torch.no_grad():
        for n, p in roles.model.named_parameters():
            p.copy_(saved[n])


def _stage(trained_chain, tmp_path, stage, *overrides):
    return rl_cfg(trained_chain, tmp_path, stage, *overrides).stage


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_a_step_changes_only_the_policy_lora_weights(roles_and_tokenizer, fresh_policy, trained_chain, tmp_path, stage):
    roles, tokenizer, prompts = roles_and_tokenizer
    trainer = RLTrainer(roles, tokenizer, _stage(trained_chain, tmp_path, stage), prompts, seed=0)
    before = {n: p.detach().clone() for n, p in roles.model.named_parameters()}
    torch.manual_seed(0)
    stats = trainer.step()
    changed = {n for n, p in roles.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the step trained nothing"
    # The policy's LoRA matrices and nothing else: no value head, no reward adapter or head, no base weight.
    assert all("lora_" in n and ".policy." in n for n in changed), sorted(changed)[:5]
    assert not any(n.startswith("value_heads.") for n in changed)
    assert stats["skipped_nonfinite"] == 0 and stats["grad_norm"] > 0
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean",
                "completions/mean_length", "loss", "learning_rate"):
        assert key in stats and stats[key] == stats[key], key


def test_groups_with_equal_rewards_are_counted_and_get_no_advantage(roles_and_tokenizer, fresh_policy,
                                                                     trained_chain, tmp_path):
    roles, tokenizer, prompts = roles_and_tokenizer
    trainer = RLTrainer(roles, tokenizer, _stage(trained_chain, tmp_path, "grpo"), prompts, seed=0)
    torch.manual_seed(0)
    rollout = score(roles, sample(roles.model, tokenizer, trainer._next_prompts(), "policy", trainer.stage),
                    "policy", "none", trainer.stage, tokenizer)
    # Two groups of four: the first all equal (no signal), the second spread.
    rollout.raw_scores = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, -1.0, 2.0, 0.0])
    rollout.scores = trainer.algorithm.shape_scores("policy", rollout)
    rollout.advantages, _ = trainer.algorithm.advantages("policy", rollout)
    assert torch.all(rollout.advantages[:4] == 0)
    assert torch.all(rollout.advantages[4:][rollout.response_mask[4:].bool()] != 0)
    stats = trainer._update(trainer.policies["policy"], rollout)
    assert stats["frac_reward_zero_std"] == 0.5


def test_every_iteration_uses_the_sampling_policys_logprobs(roles_and_tokenizer, fresh_policy, trained_chain,
                                                           tmp_path, monkeypatch):
    roles, tokenizer, prompts = roles_and_tokenizer
    # One mini-batch per iteration (mini_batch_size = batch_size): iteration 2 runs on moved weights.
    stage = _stage(trained_chain, tmp_path, "grpo", "stage.optim.num_iterations=3", "stage.optim.mini_batch_size=8",
                   "stage.optim.learning_rate=0.01")
    trainer = RLTrainer(roles, tokenizer, stage, prompts, seed=0)
    calls = []
    original = critic_free.clipped_surrogate

    def recording(logprobs, old_logprobs, advantages, mask, *args, **kwargs):
        calls.append((logprobs.detach().clone(), old_logprobs.clone(), mask.bool().clone()))
        return original(logprobs, old_logprobs, advantages, mask, *args, **kwargs)

    monkeypatch.setattr(critic_free, "clipped_surrogate", recording)
    torch.manual_seed(0)
    stats = trainer.step()
    rollout = trainer.last_rollouts["policy"]
    assert len(calls) == 3
    for _, old, _ in calls:  # every pass: the rollout's own log-probs (rows in that pass's shuffled order)
        assert (old[:, None, :] == rollout.logprobs[None]).all(-1).any(1).all()
    current, old, mask = calls[0]  # pass 1: the policy is the one that sampled, ratio 1
    torch.testing.assert_close(current[mask], old[mask], atol=1e-5, rtol=0)
    current, old, mask = calls[2]  # pass 3: the policy moved, the old log-probs did not
    assert (current[mask] - old[mask]).abs().max() > 1e-3
    assert stats["clip_ratio/region_mean"] >= 0


def test_loss_matches_a_hand_computation_at_ratio_one(roles_and_tokenizer, fresh_policy, trained_chain, tmp_path):
    roles, tokenizer, prompts = roles_and_tokenizer
    # One update over the whole batch: at ratio 1 the clipped surrogate is -A per token, and with the KL
    # as a loss term each token adds beta * k3(pi, ref). dapo divides the sum by the batch's token count.
    stage = _stage(trained_chain, tmp_path, "grpo", "stage.optim.num_iterations=1", "stage.optim.mini_batch_size=8",
                   "stage.kl.beta=0.1", "stage.loss.loss_type=dapo")
    trainer = RLTrainer(roles, tokenizer, stage, prompts, seed=0)
    with torch.no_grad():  # a policy that differs from the reference, so the KL term is not 0
        for n, p in roles.model.named_parameters():
            if "lora_B" in n and ".policy." in n:
                p.normal_(0, 0.05)
    torch.manual_seed(0)
    stats = trainer.step()
    r = trainer.last_rollouts["policy"]
    mask = r.response_mask.float()
    scores = r.raw_scores.view(-1, 4)
    adv = ((scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-4)).reshape(-1)
    d = r.ref_logprobs - r.logprobs
    k3 = torch.exp(d) - d - 1
    expected = ((-adv[:, None] + 0.1 * k3) * mask).sum() / mask.sum()
    assert stats["loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert stats["kl"] == pytest.approx(((k3 * mask).sum() / mask.sum()).item(), abs=1e-5)


@pytest.mark.parametrize("stage,quant", [("grpo", "fp32"), ("rloo", "fp32"), ("reinforce_pp", "fp32"),
                                         ("grpo", "4bit")])
def test_each_stage_runs_through_run_stage(trained_chain, tmp_path, stage, quant):
    summary = run_stage(rl_cfg(trained_chain, tmp_path, stage, f"quant={quant}", "stage.steps=1"), tmp_path / "run")
    assert_policy_trained(tmp_path / "run" / "policies" / "policy", value_head=False)
    assert_moved_from_the_reference(summary)
    for key in ("eval/before/oracle_score", "eval/after/oracle_score", "eval/after/reward_score"):
        assert key in summary and summary[key] == summary[key], key
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*records)
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "completions/mean_length", "time/rollout", "perf/tokens_per_s"):
        assert key in logged, key
    assert (tmp_path / "run" / "policies" / "policy" / "adapter_model.safetensors").exists()
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_resume_continues_to_the_same_result_as_an_uninterrupted_run(trained_chain, tmp_path):
    overrides = ("stage.steps=3", "stage.save_every=1", "stage.optim.num_iterations=2")
    full = run_stage(rl_cfg(trained_chain, tmp_path, "rloo", *overrides), tmp_path / "full")
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000001", resumed_dir / "checkpoints" / "step-000001")
    resumed = run_stage(rl_cfg(trained_chain, tmp_path, "rloo", *overrides, "stage.resume=auto"), resumed_dir)
    for key in ("eval/after/oracle_score", "eval/after/reward_score", "eval/after/kl"):
        assert resumed[key] == full[key], key

    def step_metrics(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["reward"]) for r in rows if "loss" in r and r["step"] > 1}

    assert step_metrics("resumed") == step_metrics("full") and len(step_metrics("full")) == 2


@pytest.mark.parametrize("override,message", [
    ("stage.batch_size=10", "stage.batch_size=10 is not divisible by stage.sampling.num_generations=4"),
    ("stage.sampling.num_generations=1", "stage.sampling.num_generations=1 must be >= 2"),
    ("stage.loss.loss_type=sum", "stage.loss.loss_type='sum' is not valid"),
    ("stage.advantages.scale_rewards=std", "stage.advantages.scale_rewards='std' is not valid"),
    ("stage.loss.epsilon=1.5", "stage.loss.epsilon=1.5 must be in [0, 1)"),
    ("stage.kl.beta=-0.1", "stage.kl.beta=-0.1 must be >= 0"),
    ("stage.optim.num_iterations=0", "stage.optim.num_iterations=0 must be > 0"),
])
def test_bad_values_fail_with_one_line_naming_key_and_fix(override, message):
    cfg = compose("stage=grpo", "logger=none", override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("stage", ["grpo", "rloo", "reinforce_pp"])
def test_each_stage_composes_with_its_trl_names(stage):
    cfg = compose(f"stage={stage}", "logger=none")
    validate(cfg)
    assert cfg.stage.advantage_estimator == stage and cfg.stage.kl.kl_in_reward == (stage != "grpo")
    for key in ("sampling.num_generations", "kl.beta", "loss.epsilon", "loss.epsilon_high", "loss.loss_type",
                "advantages.scale_rewards", "optim.num_iterations", "loss.mask_truncated_completions",
                "optim.learning_rate"):
        assert OmegaConf.select(cfg.stage, key, default="absent") != "absent", key


@pytest.mark.slow
@pytest.mark.parametrize("stage,quant", [("grpo", "fp32"), ("rloo", "8bit"), ("reinforce_pp", "4bit")])
def test_each_algorithm_learns_well_formed_positive_reviews_within_kl_budget(trained_chain, tmp_path, stage, quant):
    # Each critic-free stage at its defaults, 40 of the default 200 steps (40 x 64 responses), each quant mode
    # once; judged as PPO's test is: by the strict gold (the oracle on well-formed reviews, 0 elsewhere) and the
    # well-formed share. The 200-step, 3-seed comparison is bench/algorithms.py (README).
    cfg = compose(f"stage={stage}", f"quant={quant}", "logger=none", f"output_dir={tmp_path}", "stage.steps=40",
                  "stage.eval.eval_every=0", "stage.save_every=0", f"stage.sft_model={trained_chain['sft_model']}",
                  f"stage.reward_adapter={trained_chain['reward_adapter']}")
    summary = run_stage(cfg, tmp_path / "run")
    before, after = summary["eval/before/oracle_strict"], summary["eval/after/oracle_strict"]
    assert after - before >= 0.25 and after >= 0.7, (before, after)
    assert summary["eval/after/well_formed"] >= 0.85, summary["eval/after/well_formed"]
    assert summary["eval/after/kl"] <= 10.0


def test_two_policies_with_separate_reference_and_reward_models(trained_chain, tmp_path):
    cfg = rl_cfg(trained_chain, tmp_path, "rloo", "stage.policies=[alice,bob]", "stage.sharing=separate", "stage.steps=1")
    summary = run_stage(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for name in ("alice", "bob"):
        assert f"eval/after/{name}/oracle_score" in summary
        assert (tmp_path / "run" / "policies" / name / "adapter_model.safetensors").exists()
        assert any(f"{name}/loss" in r and f"{name}/frac_reward_zero_std" in r for r in records)


@pytest.mark.slow
def test_grpo_data_parallel_on_two_cpu_processes(trained_chain, tmp_path):
    from test_distributed import WORLD, accelerate_launch

    # dapo's denominator is the update's token count over both ranks (a collective in every micro-batch).
    result = accelerate_launch(
        tmp_path, "stage=grpo", "logger=none", f"stage.sft_model={trained_chain['sft_model']}",
        f"stage.reward_adapter={trained_chain['reward_adapter']}", "stage.steps=2", "stage.batch_size=8",
        "stage.optim.mini_batch_size=4", "stage.optim.gradient_accumulation_steps=2", "stage.loss.loss_type=dapo",
        "stage.eval.eval_samples=8", "stage.save_every=1", "stage.sampling.max_new_tokens=8")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dist/world_size"] == WORLD
    assert summary["dist/max_weight_divergence"] == 0.0  # gradients averaged: the ranks agree exactly
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"frac_reward_zero_std"' in line]
    assert [s["step"] for s in steps] == [1, 2]
