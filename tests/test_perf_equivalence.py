"""Speed-ups never change results: each one of ``rollout.PerfOptions``, the cheap role switches, the fused
scoring pass and gradient checkpointing in eval mode give what the plain path gives (fp32, CPU)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, compose
from marl_exp.modeling.loading import load_tokenizer, resolve_device
from marl_exp.rl.roles import critic_name
from marl_exp.rl.rollout import PerfOptions, Rollout, sample, score, score_many
from marl_exp.rl.trainer import RLTrainer
from marl_exp.stages.rl_models import build_roles

SMALL = ("stage.steps=2", "stage.batch_size=8", "stage.optim.mini_batch_size=4", "stage.sampling.max_new_tokens=8",
         "stage.eval.eval_every=0", "stage.save_every=0")
PROMPTS = ["the movie was", "this show is", "the plot felt", "the cast seemed"] * 2
ALL_OFF = PerfOptions(**{f.name: False for f in dataclasses.fields(PerfOptions)})
ATOL = 1e-5


def ppo_cfg(chain, out, *overrides):
    return compose("stage=ppo", "logger=none", f"output_dir={out}", f"stage.sft_model={chain['sft_model']}",
                   f"stage.reward_adapter={chain['reward_adapter']}", *SMALL, *overrides)


def build(chain, out, *overrides):
    cfg = ppo_cfg(chain, out, *overrides)
    roles = build_roles(cfg, str(chain["sft_model"]), str(chain["reward_adapter"]), resolve_device("cpu"))
    for name in roles.model.policy_names:  # fresh LoRA B = 0 would make every policy the reference
        perturb(roles.model, name, seed=len(name))
    roles.model.train(not cfg.stage.runtime.disable_dropout)
    return roles, load_tokenizer(str(chain["sft_model"])), cfg


def perturb(model, adapter: str, seed: int, std: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if f".lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def shared(trained_chain, tmp_path_factory):
    return build(trained_chain, tmp_path_factory.mktemp("perf"))


def unscored(rollout: Rollout) -> Rollout:
    return Rollout(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask,
                   has_eos=rollout.has_eos)


SCORED = ("logprobs", "ref_logprobs", "values", "kl", "raw_scores")


def assert_scored_close(a: Rollout, b: Rollout, atol: float = ATOL) -> None:
    for field in SCORED:
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=atol, rtol=0, msg=field)


def trainable_state(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def restore(model, state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, saved in zip([p for p in model.parameters() if p.requires_grad], state):
            param.copy_(saved)


def one_step(roles, tokenizer, cfg, perf: PerfOptions) -> tuple[dict, list[torch.Tensor]]:
    """A whole PPO step (rollout, scoring, optimisation) from the current weights and a fixed seed; the
    weights are put back afterwards. Returns the step's stats and the weights it produced."""
    before = trainable_state(roles.model)
    trainer = RLTrainer(roles, tokenizer, cfg.stage, PROMPTS, seed=0, perf=perf)
    torch.manual_seed(0)
    try:
        stats = trainer.step()
        return stats, trainable_state(roles.model)
    finally:
        restore(roles.model, before)


# ------------------------------------------------------------------------------------ whole steps
def test_switching_the_trainers_speed_ups_reaches_the_algorithms_loss(shared, monkeypatch):
    """bench/speed.py's ablation flips ``trainer.perf`` on one trainer; PPO's loss reads lazy_entropy, so the
    switch must reach the algorithm (it did not after the rl/ redesign: the ablation measured the default)."""
    from marl_exp.rl.algorithms import ppo as ppo_module

    roles, tokenizer, cfg = shared
    assert cfg.stage.loss.entropy_coef == 0  # the entropy is only logged: the lazy path applies
    calls = []
    real = ppo_module.entropy_for_logging
    monkeypatch.setattr(ppo_module, "entropy_for_logging", lambda logits: calls.append(1) or real(logits))
    before = trainable_state(roles.model)
    trainer = RLTrainer(roles, tokenizer, cfg.stage, PROMPTS, seed=0)
    try:
        trainer.step()
        assert calls, "the default (lazy entropy) never computed the logged entropy without autograd"
        calls.clear()
        trainer.perf = dataclasses.replace(PerfOptions(), lazy_entropy=False)
        trainer.step()
        assert not calls, "lazy_entropy=False set on the trainer did not reach PPO's loss"
    finally:
        restore(roles.model, before)


@pytest.mark.parametrize("flip", [f.name for f in dataclasses.fields(PerfOptions)] + ["all"])
def test_a_ppo_step_is_the_same_with_any_speed_up_flipped(shared, flip):
    roles, tokenizer, cfg = shared
    default = PerfOptions()
    flipped = ALL_OFF if flip == "all" else dataclasses.replace(default, **{flip: not getattr(default, flip)})
    stats_a, weights_a = one_step(roles, tokenizer, cfg, default)
    stats_b, weights_b = one_step(roles, tokenizer, cfg, flipped)
    for key in ("ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy", "ppo/policy/clipfrac",
                "ppo/policy/approxkl", "objective/kl", "env/reward_mean", "ppo/grad_norm"):
        assert stats_a[key] == pytest.approx(stats_b[key], abs=ATOL, rel=1e-5), key
    for a, b in zip(weights_a, weights_b):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# GRPO's defaults here: KL in the loss, 2 iterations, one mini-batch a step: the first forward is on-policy.
GRPO_ONE_MINI_BATCH = ("stage.steps=2", "stage.batch_size=8", "stage.optim.mini_batch_size=8",
                       "stage.sampling.num_generations=4", "stage.sampling.max_new_tokens=8",
                       "stage.eval.eval_every=0", "stage.save_every=0")


def grpo_build(chain, out, *overrides):
    cfg = compose("stage=grpo", "logger=none", f"output_dir={out}", f"stage.sft_model={chain['sft_model']}",
                  f"stage.reward_adapter={chain['reward_adapter']}", *GRPO_ONE_MINI_BATCH, *overrides)
    roles = build_roles(cfg, str(chain["sft_model"]), str(chain["reward_adapter"]), resolve_device("cpu"))
    perturb(roles.model, "policy", seed=6)
    roles.model.train(not cfg.stage.runtime.disable_dropout)
    return roles, load_tokenizer(str(chain["sft_model"])), cfg


@pytest.fixture(scope="module")
def grpo_shared(trained_chain, tmp_path_factory):
    return grpo_build(trained_chain, tmp_path_factory.mktemp("perf_grpo"))


def test_a_grpo_step_is_the_same_with_the_old_log_probs_from_the_first_update_forward(grpo_shared, monkeypatch):
    """The scoring pass leaves the policy out and the update's first forward gives the old log-probs: the same
    loss, KL, clip ratio and weights as with the scoring pass, one policy forward fewer a step."""
    roles, tokenizer, cfg = grpo_shared
    calls = []
    real = roles.model.policy_forward
    monkeypatch.setattr(roles.model, "policy_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = {}
    for on in (True, False):
        calls.clear()
        results[on] = one_step(roles, tokenizer, cfg, PerfOptions(old_logprobs_from_update=on)) + (len(calls),)
    (stats_on, weights_on, forwards_on), (stats_off, weights_off, forwards_off) = results[True], results[False]
    epochs = cfg.stage.optim.num_iterations
    assert (forwards_on, forwards_off) == (epochs, epochs + 1)
    for key in ("loss", "kl", "entropy", "clip_ratio/region_mean", "reward", "objective/kl", "grad_norm"):
        assert stats_on[key] == pytest.approx(stats_off[key], abs=ATOL, rel=1e-5), key
    for a, b in zip(weights_on, weights_off):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_the_first_forward_fills_the_rollouts_old_log_probs_with_the_scoring_passs_values(grpo_shared):
    roles, tokenizer, cfg = grpo_shared
    trainer = RLTrainer(roles, tokenizer, cfg.stage, PROMPTS, seed=0)
    before = trainable_state(roles.model)
    try:
        torch.manual_seed(5)
        rollout = sample(roles.model, tokenizer, PROMPTS, "policy", cfg.stage, group=4)
        scored = score_many(roles, {"policy": unscored(rollout)}, "none", cfg.stage, tokenizer)["policy"]
        deferred = score_many(roles, {"policy": unscored(rollout)}, "none", cfg.stage, tokenizer,
                              policy=False)["policy"]
        assert deferred.logprobs is None and deferred.kl is None
        torch.testing.assert_close(deferred.ref_logprobs, scored.ref_logprobs, atol=0, rtol=0)
        torch.testing.assert_close(deferred.raw_scores, scored.raw_scores, atol=0, rtol=0)
        deferred.scores = deferred.raw_scores.clone()
        trainer._update(trainer.policies["policy"], deferred)
        mask = scored.response_mask.bool()
        torch.testing.assert_close(deferred.logprobs[mask], scored.logprobs[mask], atol=ATOL, rtol=0)
    finally:
        restore(roles.model, before)


@pytest.mark.parametrize("case, overrides, expected", [
    ("grpo, KL in the loss, one mini-batch", (), True),
    ("two mini-batches: the second runs updated weights", ("stage.optim.mini_batch_size=4",), False),
    ("KL in the reward: the advantages read it", ("stage.kl.kl_in_reward=true", "stage.kl.beta=0.05"), False),
    ("dropout on: the forward differs from sampling's", ("stage.runtime.disable_dropout=false",), False),
])
def test_the_old_log_probs_come_from_the_update_only_where_its_first_forward_is_the_sampling_policy(
        trained_chain, tmp_path, case, overrides, expected):
    roles, tokenizer, cfg = grpo_build(trained_chain, tmp_path, *overrides)
    trainer = RLTrainer(roles, tokenizer, cfg.stage, PROMPTS, seed=0)
    rollout = {"policy": Rollout(*(torch.ones(8, 3, dtype=torch.long),) * 4)}
    assert trainer._old_logprobs_from_update(rollout) is expected, case
    trainer.perf = PerfOptions(old_logprobs_from_update=False)
    assert trainer._old_logprobs_from_update(rollout) is False


def test_ppo_always_scores_the_policy_first(shared):
    roles, tokenizer, cfg = shared
    trainer = RLTrainer(roles, tokenizer, cfg.stage, PROMPTS, seed=0)
    rollout = {"policy": Rollout(*(torch.ones(4, 3, dtype=torch.long),) * 4)}  # one mini-batch, eval mode
    assert not roles.model.training and not trainer._old_logprobs_from_update(rollout)


def test_inference_mode_gives_bit_identical_rollouts_and_scores(shared):
    roles, tokenizer, cfg = shared
    rollouts = []
    for perf in (PerfOptions(inference_mode=True), PerfOptions(inference_mode=False)):
        torch.manual_seed(3)
        rollouts.append(score(roles, sample(roles.model, tokenizer, PROMPTS, "policy", cfg.stage, perf=perf),
                              "policy", cfg.stage.critic, cfg.stage, tokenizer, perf=perf))
    fast, plain = rollouts
    for field in ("response_ids", "response_mask", *SCORED):
        assert torch.equal(getattr(fast, field), getattr(plain, field)), field
    # Nothing the optimisation gets is an inference tensor (autograd could not save it for backward).
    assert not any(getattr(fast, f).is_inference() for f in ("query_ids", "response_ids", "response_mask", *SCORED))


def test_logits_in_the_response_window_only_score_the_same(shared):
    roles, tokenizer, cfg = shared
    torch.manual_seed(4)
    fixed = sample(roles.model, tokenizer, PROMPTS, "policy", cfg.stage)
    window = score(roles, unscored(fixed), "policy", "value_head", cfg.stage, tokenizer, perf=PerfOptions(window_logits=True))
    full = score(roles, unscored(fixed), "policy", "value_head", cfg.stage, tokenizer, perf=PerfOptions(window_logits=False))
    assert_scored_close(window, full)


# ---------------------------------------------------------------------------------- role switches
def test_cheap_reference_and_reward_passes_equal_peft_set_adapter_and_disable_adapter(shared):
    roles, tokenizer, _ = shared
    model = roles.model
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    flags = [p.requires_grad for p in model.parameters()]
    reference = model.reference_logits(enc.input_ids, enc.attention_mask)
    reward = model.compute_reward_score(enc.input_ids, enc.attention_mask)
    assert [p.requires_grad for p in model.parameters()] == flags  # nothing was switched
    with torch.no_grad():  # peft's own switches, the way the roles were run before
        with model.peft_model.disable_adapter():
            expected_reference = model._lm_logits(model._hidden_states(enc.input_ids, enc.attention_mask))
        model.peft_model.set_adapter(model.reward_adapter_name)
        hidden = model._hidden_states(enc.input_ids, enc.attention_mask)
        model.activate_policy("policy")
    last = enc.attention_mask.shape[1] - 1  # left padding: the last position is every row's last token
    expected_reward = model.score_head(hidden[:, last])[:, 0]
    assert torch.equal(reference, expected_reference)
    assert torch.equal(reward, expected_reward)


# ----------------------------------------------------------------------------------- fused scoring
@pytest.fixture(scope="module")
def two_policies_with_critics(trained_chain, tmp_path_factory):
    return build(trained_chain, tmp_path_factory.mktemp("perf2"), "stage.policies=[alice,bob]",
                 "stage.critic=adapter")


@pytest.mark.parametrize("critic", ["value_head", "adapter"])
def test_fused_scoring_equals_one_pass_per_role(two_policies_with_critics, critic):
    """One mixed-adapter forward (alice rows, bob rows, their critics, base, reward) == separate passes."""
    roles, tokenizer, cfg = two_policies_with_critics
    torch.manual_seed(5)
    fixed = {name: sample(roles.model, tokenizer, PROMPTS, name, cfg.stage) for name in ("alice", "bob")}
    fixed["bob"].response_ids = fixed["bob"].response_ids[:, :5]  # different lengths: padded to one batch
    fixed["bob"].response_mask = fixed["bob"].response_mask[:, :5]
    out = {}
    for fused in (True, False):
        rollouts = {name: unscored(r) for name, r in fixed.items()}
        out[fused] = score_many(roles, rollouts, critic, cfg.stage, tokenizer,
                                perf=PerfOptions(fused_scoring=fused))
    for name in fixed:
        assert_scored_close(out[True][name], out[False][name])
    assert roles.model.active_policy in ("alice", "bob")


def test_fused_scoring_reads_each_critic_from_its_own_adapter(two_policies_with_critics):
    roles, tokenizer, _ = two_policies_with_critics
    model = roles.model
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS[:4], return_tensors="pt", padding=True)
    ids, mask = enc.input_ids.repeat(2, 1), enc.attention_mask.repeat(2, 1)
    policies = ["alice"] * 4 + ["bob"] * 4
    fused = model.score_roles(ids, mask, policies, [critic_name(p) for p in policies])
    with torch.no_grad():
        for rows, name in ((slice(0, 4), "alice"), (slice(4, 8), "bob")):
            values = model.policy_forward(ids[rows], mask[rows], adapter=critic_name(name)).values
            torch.testing.assert_close(fused.values[rows], values, atol=ATOL, rtol=0)
    model.activate_policy("alice")


# --------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_recomputes_in_eval_mode_and_keeps_gradients(trained_chain, tmp_path):
    """PPO runs the policy in eval mode (no dropout); transformers checkpoints only layers in training mode,
    so without help stage.runtime.gradient_checkpointing=true would silently do nothing."""
    grads, calls = {}, {}
    for checkpointing in (False, True):
        roles, tokenizer, _ = build(trained_chain, tmp_path, f"stage.runtime.gradient_checkpointing={checkpointing}")
        model = roles.model.eval()
        tokenizer.padding_side = "left"
        enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        mlp = model.peft_model.get_base_model().model.layers[0].mlp
        count, forward = [0], mlp.forward

        def counted(*args, **kwargs):  # a forward hook would not see the recompute
            count[0] += 1
            return forward(*args, **kwargs)

        mlp.forward = counted
        out = model.policy_forward(enc.input_ids, enc.attention_mask, logits_positions=slice(-3, None))
        (out.logits.logsumexp(-1).mean() + out.values.mean()).backward()
        del mlp.forward
        calls[checkpointing] = count[0]
        grads[checkpointing] = [p.grad.clone() for p in model.trainable_parameters("policy")]
        assert all(not m.training for m in model.modules())  # modes restored
    assert calls == {False: 1, True: 2}  # recomputed in backward
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------- bench smoke
@pytest.mark.slow
def test_speed_bench_quick_mode_writes_its_results(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "bench/speed.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["summary"]["tiny/shared_over_separate_step_time"] > 0
    assert result["rollout"]["tiny"]["ratio_rollout_over_plain"] > 0
    assert "| tiny | shared |" in proc.stdout


def test_bench_report_reads_every_target_size_and_a_measured_7b(monkeypatch):
    """The report's arithmetic: the memory target at each >= 100M size, and a weights-only size's 4-bit ratio
    against 4 bytes per parameter (fp32) rather than the projection."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import memory
    import run_all

    def row(size, quant, sharing, peak, base_bytes=400, linear_bytes=300):
        return {"size": size, "quant": quant, "sharing": sharing, "params": 100, "cuda_step_peak_mib": peak,
                "weights_base_bytes": base_bytes, "weights_linear_bytes": linear_bytes, "linear_params": 75}

    mem = {"rows": [row("base", "fp32", "shared", 46), row("base", "fp32", "separate", 100),
                    row("large", "fp32", "shared", 40), row("large", "fp32", "separate", 100),
                    row("base", "4bit", "shared", 30, base_bytes=160, linear_bytes=39),
                    row("base", "4bit", "separate", 60, base_bytes=160, linear_bytes=39)],
           "weights_bf16_rest": [{"size": "base", "quant": "4bit", "weights_base_bytes": 100},
                                 {"size": "llama2-7b", "quant": "4bit", "weights_base_bytes": 57, "params": 100}]}
    mem["summary"] = memory.summarize(mem)
    weights = mem["summary"]["quant_over_fp32_weights"]
    assert weights["llama2-7b/4bit"] == {"total_bf16_rest": 57 / 400}
    assert weights["base/4bit"]["total"] == 160 / 400 and weights["base/4bit"]["linear_layers"] == 39 / 300
    assert weights["base/4bit"]["total_bf16_rest"] == 100 / 400
    spd = {"rollout": {"tiny": {"ratio_rollout_over_plain": 1.0, "rollout": {"tokens_per_s": 9},
                                "plain_generate": {"tokens_per_s": 9}}},
           "steps": {"tiny": {"paired_ratio": {"q1": 0.9, "median": 1.01, "q3": 1.1},
                              "shared": {"step": 1.0}, "separate": {"step": 1.0}}}}
    memory_row, rollout_row, step_row, weights_row = run_all.targets(mem, spd)
    assert memory_row["ratio"] == "0.460 / 0.400" and memory_row["met"] == "base: **no**; large: yes"
    assert rollout_row["met"] is True and step_row["met"] is False
    assert "0.142 (measured)" in weights_row["ratio"] and weights_row["met"].startswith("7B: yes;")


def test_stage_fused_scoring_option_reaches_the_scoring_pass(trained_chain, tmp_path, monkeypatch):
    from marl_exp.rl import trainer as trainer_module
    from marl_exp.stages.pipeline import run_stage

    seen = []
    real = trainer_module.score_many
    monkeypatch.setattr(trainer_module, "score_many",
                        lambda *a, perf, **k: seen.append(perf.fused_scoring) or real(*a, perf=perf, **k))
    run_stage(ppo_cfg(trained_chain, tmp_path, "stage.steps=1", "stage.runtime.fused_scoring=true"), tmp_path / "run")
    assert seen == [True]
