"""RLOO is TRL 1.x's ``RLOOTrainer``: its sequence-level loss (``stage.loss.loss_type=rloo``, the rloo stage's
default), checked against ``RLOOTrainer._compute_loss`` itself on the same tensors (value and gradient), and
the rloo stage's defaults against ``RLOOConfig``'s."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import RLOOConfig, RLOOTrainer
from trl.trainer.utils import selective_log_softmax

from conftest import compose
from marl_exp.config import ConfigError, validate
from marl_exp.data import build_task
from marl_exp.modeling.loading import load_tokenizer, resolve_device
from marl_exp.rl.algorithms.rloo import rloo_sequence_loss
from marl_exp.rl.functional import logprobs_from_logits
from marl_exp.rl.trainer import RLTrainer
from marl_exp.rl.rollout import sample, score
from marl_exp.stages.rl_models import build_roles


class TRLLossHarness:
    """What ``RLOOTrainer._compute_loss`` reads from ``self`` on one process. ``logits()`` gives the policy's
    completion logits, which become per-token log-probs as in TRL (``selective_log_softmax``)."""

    def __init__(self, logits, completion_ids: torch.Tensor, epsilon: float, epsilon_high: float):
        self.logits, self.completion_ids = logits, completion_ids
        self.epsilon_low, self.epsilon_high = epsilon, epsilon_high
        self.aux_loss_enabled = False
        self.model = SimpleNamespace(training=True)
        self._metrics = {"train": defaultdict(list)}
        self.accelerator = SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        logps = selective_log_softmax(self.logits(), self.completion_ids)
        return logps, torch.zeros_like(logps), None


def _batch(seed: int = 0):
    """Six responses, two groups of three: ragged lengths, one response masked out (a truncated one under
    mask_truncated_completions), garbage in the old log-probs at padding, and old log-probs that differ per
    token and give these response log-ratios: clipped high, clipped low, inside the clip range."""
    gen = torch.Generator().manual_seed(seed)
    batch, length, vocab = 6, 5, 7
    logits = torch.randn(batch, length, vocab, generator=gen, requires_grad=True)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.arange(length)[None, :] < torch.tensor([5, 3, 1, 4, 5, 2])[:, None]
    mask[3] = False
    log_ratios = torch.tensor([0.4, -0.4, 0.1, 0.0, -0.05, 0.3])
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.7, -1.2, 0.5])
    with torch.no_grad():
        noise = torch.where(mask, 0.2 * torch.randn(batch, length, generator=gen), 0.0)
        noise -= mask * (noise.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1))
        old = selective_log_softmax(logits, ids) + noise - mask * (log_ratios / mask.sum(1).clamp(min=1))[:, None]
    old = torch.where(mask, old, torch.full_like(old, 1e4))
    return logits, ids, mask, old, advantages


def _trl_loss(logits, ids, mask, old, advantages, epsilon, epsilon_high):
    """RLOOTrainer's loss; ``logits``: a tensor, or a function that computes them (a model's forward)."""
    harness = TRLLossHarness(logits if callable(logits) else lambda: logits, ids, epsilon, epsilon_high)
    completion_mask = mask.long()
    inputs = {"prompt_ids": torch.zeros(len(ids), 2, dtype=torch.long),
              "prompt_mask": torch.ones(len(ids), 2, dtype=torch.long),
              "completion_ids": ids, "completion_mask": completion_mask,
              # as RLOOTrainer._generate_and_score_completions: the masked sum of the old per-token log-probs
              "old_logps": (torch.where(mask, old, 0.0) * completion_mask).sum(1), "advantages": advantages}
    loss = RLOOTrainer._compute_loss(harness, model=None, inputs=inputs)
    return loss, {k: v[-1] for k, v in harness._metrics["train"].items()}


@pytest.mark.parametrize("epsilon,epsilon_high", [(0.2, 0.2), (0.1, 0.28)])
def test_sequence_loss_and_its_gradient_equal_trl_rloo_trainers(epsilon, epsilon_high):
    logits, ids, mask, old, advantages = _batch()
    want, want_stats = _trl_loss(logits, ids, mask, old, advantages, epsilon, epsilon_high)
    (want_grad,) = torch.autograd.grad(want, logits)

    logprobs = logprobs_from_logits(logits, ids)
    got, stats = rloo_sequence_loss(logprobs, old, advantages, mask, epsilon, epsilon_high)
    (got_grad,) = torch.autograd.grad(got, logits)

    # The same float32 operations in the same order: equal bit for bit (measured).
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=0, rtol=0)
    assert want_grad.abs().max() > 1e-3  # the loss is not flat here
    clipped = want_stats["clip_ratio/region_mean"]
    assert 0 < clipped < 1, "the batch clips some responses and not others"
    for key, value in want_stats.items():
        if key.startswith("clip_ratio/"):
            assert stats[key].item() == pytest.approx(value), key


def test_the_rloo_stages_update_is_trl_rloo_trainers(trained_chain, tmp_path):
    # The rloo stage at its defaults, one micro-batch of the tiny model: loss and LoRA gradient of the
    # trainer's own backward against RLOOTrainer._compute_loss over the same forward.
    cfg = compose("stage=rloo", "logger=none", f"output_dir={tmp_path}",
                  f"stage.sft_model={trained_chain['sft_model']}", f"stage.reward_adapter={trained_chain['reward_adapter']}",
                  "stage.batch_size=8", "stage.sampling.num_generations=4", "stage.sampling.max_new_tokens=8")
    roles = build_roles(cfg, str(trained_chain["sft_model"]), str(trained_chain["reward_adapter"]),
                        resolve_device("cpu"))
    roles.model.train(False)
    tokenizer = load_tokenizer(str(trained_chain["sft_model"]))
    trainer = RLTrainer(roles, tokenizer, cfg.stage, build_task(cfg.data).prompts_train, seed=0)
    torch.manual_seed(0)
    rollout = score(roles, sample(roles.model, tokenizer, trainer._next_prompts(), "policy", cfg.stage),
                    "policy", "none", cfg.stage, tokenizer)
    rollout.scores = trainer.algorithm.shape_scores("policy", rollout)
    rollout.advantages, _ = trainer.algorithm.advantages("policy", rollout)
    mask = rollout.response_mask.bool()
    # A policy that moved since sampling: old log-probs ~0.15 nats off per token, so some responses clip.
    noise = torch.randn(rollout.logprobs.shape, generator=torch.Generator().manual_seed(1))
    rollout.logprobs = rollout.logprobs + 0.15 * noise
    params = trainer.policies["policy"].params
    everything = torch.arange(len(mask))

    for p in params:
        p.grad = None
    # One micro-batch of the loop's update: its forward and guards, the algorithm's loss, its backward.
    weight, tokens = trainer.algorithm.loss_weight(rollout, everything, everything)
    mb = rollout.select(everything)
    forward = trainer._policy_forward("policy", mb)
    assert trainer._guard(forward, mb) is None
    loss, stats = trainer.algorithm.loss(forward, mb, tokens)
    del forward
    stats = trainer._backward(loss, weight, stats)
    got_grads = [p.grad.clone() for p in params]

    def policy_logits():
        return trainer._policy_forward("policy", rollout).logits

    epsilon = cfg.stage.loss.epsilon
    want, want_stats = _trl_loss(policy_logits, rollout.response_ids, mask, rollout.logprobs,
                                 rollout.advantages[:, 0], epsilon, epsilon)
    want_grads = torch.autograd.grad(want, params)
    assert 0 < want_stats["clip_ratio/region_mean"] < 1
    # Measured: equal bit for bit (the token-level dapo loss of the old default was off by 1.6e-3, its
    # gradient by 2.0e-2 of a largest component 2.4e-2).
    assert stats["loss"] == want.item()
    for got, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert max(g.abs().max() for g in want_grads) > 1e-4


def test_the_rloo_stage_defaults_are_trl_rlooconfigs():
    trl = {f.name: f.default for f in dataclasses.fields(RLOOConfig)}
    stage = compose("stage=rloo", "logger=none").stage
    validate(compose("stage=rloo", "logger=none"))
    assert stage.loss.loss_type == "rloo"  # RLOOTrainer's sequence-level loss
    assert stage.optim.num_iterations == trl["num_iterations"]
    assert stage.kl.beta == trl["beta"] and stage.kl.kl_in_reward
    assert stage.kl.kl_estimator == "k1"  # RLOOTrainer: old_per_token_logps - ref_per_token_logps
    assert stage.loss.epsilon == trl["epsilon"] and stage.loss.epsilon_high == trl["epsilon_high"]
    assert stage.advantages.normalize_advantages == trl["normalize_advantages"]
    assert stage.loss.mask_truncated_completions == trl["mask_truncated_completions"]
    assert stage.sampling.temperature == trl["temperature"] and stage.sampling.top_p == trl["top_p"]
    assert stage.sampling.top_k == trl["top_k"]


def test_the_token_level_surrogate_stays_an_option():
    validate(compose("stage=rloo", "logger=none", "stage.loss.loss_type=dapo"))


@pytest.mark.parametrize("stage,override,message", [
    ("reinforce_pp", "stage.loss.loss_type=rloo", "needs one advantage per response"),
    ("grpo", "stage.loss.loss_type=rloo", "has no KL loss term"),
])
def test_the_sequence_loss_refuses_what_it_cannot_compute(stage, override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(f"stage={stage}", "logger=none", override))
    assert message in str(err.value) and "\n" not in str(err.value)
