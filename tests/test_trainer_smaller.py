"""Three smaller items of issue 26, on the built-in tiny model with a function reward (no trained chain):

1. the LR schedule runs on the step clock: a skipped step, a skipped update or an early stop does not
   hold it back, so it ends at 0 after the last step, as in a run without skips;
2. with dropout on, fused and one-pass-per-role scoring give the same old log-probs and values: those of
   the policy that sampled the responses (eval mode, as ``generate`` runs);
3. a critic-free policy is saved without a value head, and the result block lists none; PPO keeps one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose
from marl_exp.compat import AutoModelForCausalLMWithValueHead
from marl_exp.config import judge_label
from marl_exp.modeling.loading import load_tokenizer, resolve_device, resolve_model_path
from marl_exp.modeling.multi_adapter import VALUE_HEAD_FILE
from marl_exp.rl import trainer as trainer_module
from marl_exp.rl.checkpoint import load_checkpoint, save_checkpoint
from marl_exp.rl.functional import logprobs_from_logits
from marl_exp.rl.rollout import PerfOptions, Rollout, response_slice, sample, score_many, temperature_scaled
from marl_exp.run import console
from marl_exp.sample import load as sample_load, parse_args, resolve as sample_resolve
from marl_exp.stages.pipeline import run_stage
from marl_exp.stages.rl_models import build_roles, make_trainer

PROMPTS = ["the movie was", "this show is", "the plot felt", "the cast seemed"]
# Small and fast; the reward is the built-in task's strict gold, so no reward stage is trained.
SMALL = ("logger=none", "+rewards=oracle_strict", "stage.batch_size=4", "stage.optim.mini_batch_size=2",
         "stage.sampling.max_new_tokens=4", "stage.eval.eval_every=0", "stage.eval.eval_samples=4", "stage.save_every=0")
ATOL = 1e-5  # fused vs one-pass-per-role at fp32 (tests/test_perf_equivalence.py)


def tiny_base() -> str:
    return resolve_model_path(compose().model)


def rl_cfg(out, stage: str, *overrides):
    return compose(f"stage={stage}", f"output_dir={out}", f"stage.sft_model={tiny_base()}", *SMALL, *overrides)


def roles_for(cfg):
    roles = build_roles(cfg, cfg.stage.sft_model, None, resolve_device("cpu"))
    roles.model.train(not cfg.stage.runtime.disable_dropout)  # as the RL stage sets it
    return roles, load_tokenizer(cfg.stage.sft_model)


def perturb_policy(model, adapter: str = "policy", std: float = 0.5) -> None:
    """A fresh LoRA B is 0: the adapter (and its dropout) would change nothing."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if f".lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


# ------------------------------------------------------------------ 1. the LR schedule's clock
STEPS = 4


def _nan_scores_at_step_2(monkeypatch):
    real, calls = trainer_module.score_many, []

    def nan_at_step_2(roles, rollouts, *args, **kwargs):
        out = real(roles, rollouts, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            for rollout in out.values():
                rollout.raw_scores = torch.full_like(rollout.raw_scores, float("nan"))
        return out

    monkeypatch.setattr(trainer_module, "score_many", nan_at_step_2)


def _inf_logits_in_every_update_of_step_2(monkeypatch, trainer):
    model, real = trainer.model, trainer.model.policy_forward

    def faulty(*args, **kwargs):
        out = real(*args, **kwargs)
        if torch.is_grad_enabled() and trainer.step_count == 1:  # the update's forward of step 2 only
            return type(out)(**{**vars(out), "logits": out.logits * float("inf")})
        return out

    monkeypatch.setattr(model, "policy_forward", faulty)


def _early_stop_after_the_first_epoch(monkeypatch, trainer):
    monkeypatch.setattr(trainer.algorithm, "stop_epochs", lambda epoch_stats: True)


@pytest.mark.parametrize("stage, skip", [("ppo", "skipped_step"), ("ppo", "skipped_updates"), ("ppo", "early_stop"),
                                         ("grpo", "skipped_step"), ("grpo", "skipped_updates")])
def test_the_lr_schedule_reaches_zero_at_the_last_step_whatever_was_skipped(tmp_path, monkeypatch, stage, skip):
    overrides = ["stage.sampling.num_generations=2"] if stage == "grpo" else []
    cfg = rl_cfg(tmp_path, stage, f"stage.steps={STEPS}", "stage.optim.lr_scheduler=linear", *overrides)
    roles, tokenizer = roles_for(cfg)
    trainer = make_trainer(cfg.stage, roles, tokenizer, PROMPTS, seed=0)
    {"skipped_step": lambda: _nan_scores_at_step_2(monkeypatch),
     "skipped_updates": lambda: _inf_logits_in_every_update_of_step_2(monkeypatch, trainer),
     "early_stop": lambda: _early_stop_after_the_first_epoch(monkeypatch, trainer)}[skip]()
    lr = cfg.stage.optim.learning_rate
    seen, skipped = [], []
    torch.manual_seed(0)
    for _ in range(STEPS):
        stats = trainer.step()
        skipped.append(stats[{"ppo": "ppo/skipped_nonfinite", "grpo": "skipped_nonfinite"}[stage]])
        seen.append(trainer.policies["policy"].scheduler.get_last_lr()[0])
    if skip != "early_stop":
        assert skipped[1] > 0 and skipped[0] == skipped[2] == skipped[3] == 0  # the fault hit step 2 only
    # transformers' linear schedule without warm-up, read on the step clock: lr · (1 - step / steps).
    expected = [lr * (1 - step / STEPS) for step in range(1, STEPS + 1)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[-1] == 0.0

    # A resume after the skipped step continues on the same clock (the schedule's state is checkpointed).
    fresh = make_trainer(cfg.stage, roles, tokenizer, PROMPTS, seed=1)
    fresh.load_state_dict(trainer.state_dict())
    assert fresh.policies["policy"].scheduler.get_last_lr()[0] == seen[-1]
    assert fresh.policies["policy"].scheduler.last_epoch == trainer.policies["policy"].scheduler.last_epoch


# ------------------------------------------------------- 2. one mode for the old log-probs
def _eval_mode_reference(model, rollout: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling policy's log-probs and values: the policy's own forward in eval mode, as ``generate`` ran."""
    window = response_slice(rollout.query_ids.shape[1], rollout.response_ids.shape[1])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.policy_forward(rollout.input_ids, rollout.attention_mask, adapter="policy")
    finally:
        model.train(was_training)
    logits = temperature_scaled(out.logits[:, window], temperature)
    return logprobs_from_logits(logits, rollout.response_ids), out.values[:, window].float()


def test_fused_and_per_role_scoring_give_the_sampling_policys_log_probs_with_dropout_on(tmp_path):
    cfg = rl_cfg(tmp_path, "ppo", "stage.runtime.disable_dropout=false", "adapter.lora_dropout=0.3")
    roles, tokenizer = roles_for(cfg)
    model = roles.model
    perturb_policy(model)
    assert model.training  # dropout on, as the stage leaves the model with disable_dropout=false
    torch.manual_seed(0)
    sampled = sample(model, tokenizer, PROMPTS, "policy", cfg.stage)
    reference_logprobs, reference_values = _eval_mode_reference(model, sampled, cfg.stage.sampling.temperature)
    mask = sampled.response_mask.bool()
    for fused in (True, False):
        rollout = Rollout(sampled.query_ids, sampled.query_mask, sampled.response_ids, sampled.response_mask,
                          has_eos=sampled.has_eos, prompts=list(PROMPTS))
        torch.manual_seed(1)
        scored = score_many(roles, {"policy": rollout}, "value_head", cfg.stage, tokenizer,
                            perf=PerfOptions(fused_scoring=fused))["policy"]
        torch.testing.assert_close(scored.logprobs[mask], reference_logprobs[mask], atol=ATOL, rtol=0,
                                   msg=lambda m: f"old log-probs, fused_scoring={fused}: {m}")
        torch.testing.assert_close(scored.values[mask], reference_values[mask], atol=ATOL, rtol=0,
                                   msg=lambda m: f"values, fused_scoring={fused}: {m}")
    assert model.training  # scoring left the mode as it was


# --------------------------------------------------------------- 3. no value head without a critic
def _result_block(cfg, run_dir: Path) -> str:
    return console.result(cfg, run_dir, {})


@pytest.mark.parametrize("stage, has_value_head", [("ppo", True), ("grpo", False), ("rloo", False),
                                                   ("reinforce_pp", False)])
def test_the_result_block_lists_a_value_head_only_for_a_stage_with_a_critic(tmp_path, stage, has_value_head):
    block = _result_block(compose(f"stage={stage}", f"output_dir={tmp_path}"), tmp_path / "run")
    assert ("value_head.safetensors" in block) == has_value_head, block
    assert str(tmp_path / "run" / "policies" / "policy") in block


@pytest.mark.parametrize("data, line_label, table_label", [("reviews", "well formed", "well-formed share"),
                                                           ("movie_sentiment", "AFINN positive", "AFINN-positive share")])
def test_the_judge_is_named_by_what_the_task_judges(tmp_path, data, line_label, table_label):
    """eval/*/well_formed is the share of replies the task's judge accepts: the grammar for the reviews tasks,
    an AFINN score > 0 for movie_sentiment; the console says which."""
    cfg = compose("stage=grpo", f"data={data}", f"output_dir={tmp_path}")
    values = {"reward_score": 0.5, "well_formed": 0.75, "kl": 1.0}
    line = console.eval_line("after", 60, 60, values, judge=judge_label(cfg.data.name))
    assert f"| {line_label} 0.750 |" in line, line
    summary = {f"eval/{when}/{key}": value for when in ("before", "after") for key, value in values.items()}
    rows = [row.split()[:3] for row in console.result(cfg, tmp_path / "run", summary).splitlines()]
    assert [table_label.split()[0], "share", "0.750"] in rows and ["reward", "0.500", "->"] in rows
    assert ["KL", "to", "reference"] in rows  # every row of the table, the judge's among them


def test_a_grpo_run_saves_no_value_head_and_a_ppo_run_does(tmp_path):
    for stage, has_value_head in (("grpo", False), ("ppo", True)):
        out = tmp_path / stage
        cfg = rl_cfg(out, stage, "stage.steps=2", "stage.save_every=1",
                     *(["stage.sampling.num_generations=2"] if stage == "grpo" else ["stage.optim.ppo_epochs=1"]))
        run_stage(cfg, out / "run")
        policy_dir = out / "run" / "policies" / "policy"
        assert (policy_dir / "adapter_model.safetensors").exists()
        checkpoints = sorted((out / "run" / "checkpoints").glob("step-*"))
        assert checkpoints, "no checkpoint written"
        for directory in (policy_dir, *(c / "policies" / "policy" for c in checkpoints)):
            assert (directory / VALUE_HEAD_FILE).exists() == has_value_head, directory
        block = _result_block(cfg, out / "run")
        assert ("value_head.safetensors" in block) == has_value_head, block


def _lora_weights(model, adapter: str = "policy") -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if ".lora_" in n
            and f".{adapter}." in n}


def test_a_checkpoint_without_a_value_head_resumes(tmp_path):
    """A critic-free stage's checkpoint has no value head: it loads, with the adapter and state as saved."""
    cfg = rl_cfg(tmp_path, "grpo", "stage.sampling.num_generations=2")
    roles, tokenizer = roles_for(cfg)
    perturb_policy(roles.model)
    trainer = make_trainer(cfg.stage, roles, tokenizer, PROMPTS, seed=0)
    trainer.step_count = 3
    checkpoint = save_checkpoint(tmp_path / "run", 3, roles.model, ["policy"], trainer.state_dict(), {"seen": 1.0})
    (checkpoint / "policies" / "policy" / VALUE_HEAD_FILE).unlink()  # what a critic-free stage leaves
    fresh, _ = roles_for(cfg)
    state, summary = load_checkpoint(checkpoint, fresh.model, ["policy"])
    loaded = _lora_weights(fresh.model)
    for name, value in _lora_weights(roles.model).items():
        torch.testing.assert_close(loaded[name], value, atol=0, rtol=0)
    assert state["step"] == 3 and summary == {"seen": 1.0}


def test_a_policy_dir_without_a_value_head_loads_for_sampling_and_the_trl_entry_point(tmp_path):
    """A critic-free policy dir (peft adapter + base record, no value head) loads with
    ``AutoModelForCausalLMWithValueHead.from_pretrained`` and ``marl-exp sample``'s loader, with the
    adapter's weights exactly as saved."""
    cfg = rl_cfg(tmp_path, "grpo", "stage.sampling.num_generations=2")
    roles, tokenizer = roles_for(cfg)
    perturb_policy(roles.model)
    policy_dir = tmp_path / "run" / "policies" / "policy"
    roles.model.save_policy(policy_dir, adapter="policy", base_record={"base_model": cfg.stage.sft_model})
    (policy_dir / VALUE_HEAD_FILE).unlink()  # what a critic-free stage leaves
    saved = _lora_weights(roles.model)

    trl_style = AutoModelForCausalLMWithValueHead.from_pretrained(str(policy_dir))
    sources = sample_resolve(parse_args([str(policy_dir), "--base", cfg.stage.sft_model]))
    sampled, _ = sample_load(sources, "cpu")
    for model, name in ((trl_style, "default"), (sampled, "policy")):
        loaded = dict(model.peft_model.named_parameters())
        for key, value in saved.items():
            torch.testing.assert_close(loaded[key.replace(".policy.", f".{name}.")], value, atol=0, rtol=0)
        with torch.no_grad():  # and it runs: a forward with logits and values
            out = model.policy_forward(torch.tensor([[1, 2, 3]]))
        assert out.logits.shape[:2] == (1, 3) and out.values.shape == (1, 3)


def test_running_moments_std_is_the_sample_std_of_every_score_so_far():
    """As TRL's RunningMoments: the running std over batches equals torch.std (unbiased) of all scores seen."""
    from marl_exp.rl.algorithms.ppo import RunningMoments

    batches = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([-3.0, 0.5]), torch.tensor([7.0, 7.0, 8.0, -1.0])]
    moments = RunningMoments()
    for i, batch in enumerate(batches):
        moments.update(batch)
        seen = torch.cat(batches[:i + 1])
        assert moments.mean == pytest.approx(seen.mean().item(), abs=1e-6)
        assert moments.std == pytest.approx(seen.std(unbiased=True).item(), abs=1e-6)
    # By hand for the first batch: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9, / (3 - 1) = 7/3.
    first = RunningMoments()
    first.update(batches[0])
    assert first.std == pytest.approx((7 / 3) ** 0.5, abs=1e-6)
