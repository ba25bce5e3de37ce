"""GRPO, RLOO and REINFORCE++ on the multi-adapter model: the RL loop without a critic.

Same five phases as PPO (``RLTrainer.step``); what differs:

- the batch: ``batch_size / num_generations`` prompts, each sampled ``num_generations`` times, laid out
  group by group (prompt 0's responses first), as ``core``'s estimators expect;
- rewards: the reward adapter's scores as they are (the KL, when in the reward, enters in phase 4);
- advantages: the estimator registered as ``stage.advantage_estimator`` (``core.get_advantage_estimator``);
- the update: ``num_iterations`` passes of a clipped surrogate against the log-probs of the policy that
  sampled the batch (TRL's ``old_per_token_logps``): per token, plus ``beta`` · k3 KL to the reference when
  the KL is a loss term, aggregated by ``loss_type`` (GRPOTrainer's); or, with ``loss_type=rloo``, per
  response (RLOOTrainer's sequence-level loss). Only the policy adapter's LoRA weights are trained.

Metric names are TRL 1.x ``GRPOTrainer``'s (``reward``, ``reward_std``, ``frac_reward_zero_std``, ``kl``,
``entropy``, ``clip_ratio/*``, ``completions/*``); the guard counters (``ppo/nonfinite_*``,
``ppo/skipped_nonfinite``) are the loop's own, shared with PPO.
"""

from __future__ import annotations

import torch

from marl_exp import distributed
from marl_exp.ppo import core
from marl_exp.ppo.rollout import Rollout
from marl_exp.ppo.trainer import PolicyState, RLTrainer, _all_finite, _entropy_for_logging, _mean


class CriticFreeTrainer(RLTrainer):
    critic = "none"  # scoring computes no critic; the policy's unused value head is not trained

    def __init__(self, roles, tokenizer, cfg, prompts: list[str], seed: int, perf=None):
        self.estimator = core.get_advantage_estimator(cfg.advantage_estimator)
        self.settings = core.AdvantageSettings(
            num_generations=cfg.sampling.num_generations, beta=cfg.kl.beta, scale_rewards=cfg.advantages.scale_rewards,
            normalize_advantages=cfg.advantages.normalize_advantages, gamma=cfg.advantages.gamma)
        super().__init__(roles, tokenizer, cfg, prompts, seed, **({} if perf is None else {"perf": perf}))

    # ------------------------------------------------------------------------- the algorithm's part
    def _next_prompts(self) -> list[str]:
        """Each prompt ``num_generations`` times in a row: one group per prompt."""
        groups = self.cfg.batch_size // self.cfg.sampling.num_generations
        return [prompt for prompt in (self.prompt_rng.choice(self.prompts) for _ in range(groups))
                for _ in range(self.cfg.sampling.num_generations)]

    def _trained_parameters(self, name: str) -> list:
        # The LoRA weights only: the model gives every policy a value head, which nothing here trains.
        heads = {id(p) for p in self.model.value_heads[name].parameters()}
        return [p for p in self.model.trainable_parameters(name) if id(p) not in heads]

    def _updates_per_batch(self) -> int:
        return self.cfg.optim.num_iterations

    def _shape_scores(self, name: str, rollout: Rollout) -> torch.Tensor:
        return rollout.raw_scores.clone()

    def _estimate_advantages(self, name: str, rollout: Rollout) -> tuple[torch.Tensor, None]:
        """The estimator over every rank's responses, this rank's rows of the result: batch statistics
        (whitening, ``scale_rewards=batch``, ``normalize_advantages``) are global, as in TRL. Group
        statistics are unchanged by it: each rank samples whole groups (``_next_prompts``)."""
        kl = rollout.kl if self.cfg.kl.kl_in_reward else None
        (scores, mask, kl), rows = distributed.cat_rows(rollout.scores, rollout.response_mask, kl)
        advantages = self.estimator(scores, mask, kl, self.settings)
        return advantages[rows, :rollout.response_mask.shape[1]], None

    def _loss_mask(self, rollout: Rollout) -> torch.Tensor:
        """The tokens that enter the loss: TRL's ``mask_truncated_completions`` drops responses without EOS."""
        if not self.cfg.loss.mask_truncated_completions:
            return rollout.response_mask
        return core.drop_truncated_completions(rollout.response_mask, ~rollout.has_eos)

    # ---------------------------------------------------------------------------------- the update
    def _optimize(self, policy: PolicyState, rollout: Rollout) -> dict:
        cfg, mask = self.cfg, rollout.response_mask
        if rollout.advantages is None:  # called on its own (tests), not from ``step``
            rollout.advantages, _ = self._estimate_advantages(policy.name, rollout)
        epoch_stats, _, nonfinite_updates = self._run_epochs(policy, rollout, cfg.optim.num_iterations)
        keys = sorted(set().union(*epoch_stats))
        stats = {k: _mean([s[k] for s in epoch_stats if k in s]) for k in keys}
        if "ppo/grad_norm" in stats:
            stats["grad_norm"] = stats.pop("ppo/grad_norm")
        lengths = mask.sum(1).float()
        terminated = lengths[rollout.has_eos]
        _, zero_std = core.zero_std_groups(rollout.raw_scores, cfg.sampling.num_generations)
        stats.update({
            "reward": rollout.raw_scores.mean().item(),
            "reward_std": rollout.raw_scores.std().item(),
            "frac_reward_zero_std": zero_std.item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": (~rollout.has_eos).float().mean().item(),
            "completions/mean_terminated_length": terminated.mean().item() if len(terminated) else 0.0,
            "advantages/mean": core.masked_mean(rollout.advantages, mask).item(),
            "advantages/std": core.masked_var(rollout.advantages, mask).sqrt().item(),
            # KL(π_old ‖ π_ref) of a whole response (nats), as PPO's objective/kl: comparable across stages.
            "objective/kl": core.masked_sum(rollout.logprobs - rollout.ref_logprobs, mask, dim=1).mean().item(),
            "learning_rate": policy.scheduler.get_last_lr()[0],
            "ppo/skipped_nonfinite": float(nonfinite_updates),
        })
        return stats

    def _micro_batch_backward(self, name: str, rollout: Rollout, rows: torch.Tensor, mini_batch: torch.Tensor) -> dict:
        tokens = None
        weight = len(rows) / len(mini_batch)  # grpo, bnpo, dr_grpo, rloo: the mean of the micro-batches' losses
        if self.cfg.loss.loss_type == "dapo":
            # dapo divides by the response tokens of the whole update (every micro-batch, every rank).
            local = float(self._loss_mask(rollout.select(mini_batch)).sum())
            tokens, weight = distributed.mean(local) * distributed.world_size(), 1.0
        return self._loss_backward(name, rollout.select(rows), weight, tokens)

    def _loss_backward(self, name: str, mb: Rollout, weight: float, tokens: float | None) -> dict:
        cfg, mask = self.cfg, self._loss_mask(mb)
        out, logits, _ = self._policy_on_responses(name, mb)
        del out
        logprobs = core.logprobs_from_logits(logits, mb.response_ids, grad_in_place=self.perf.lean_logprobs)
        if not _all_finite(logprobs.detach(), mask):
            return {"skipped": True, "nonfinite": True}
        # mb.logprobs: the sampling policy's, fixed for all num_iterations passes over this batch.
        if core.is_ratio_extreme(logprobs.detach(), mb.logprobs, mb.response_mask, cfg.optim.ratio_threshold):
            return {"skipped": True}
        kl = core.kl_loss_per_token(logprobs, mb.ref_logprobs, mask)
        if cfg.loss.loss_type == "rloo":
            loss, clip_stats = self._sequence_loss(logprobs, mb, mask)
        else:
            loss, clip_stats = self._token_loss(logprobs, kl, mb, mask, tokens)
        if not torch.isfinite(loss.detach()):
            return {"skipped": True, "nonfinite": True}
        entropy = core.masked_mean(_entropy_for_logging(logits.detach()), mb.response_mask)
        del logits
        (loss * weight).backward()
        return {
            "skipped": False,
            "loss": loss.item(),
            "kl": core.masked_mean(kl.detach(), mask).item(),
            "entropy": entropy.item(),
            **{k: v.item() for k, v in clip_stats.items()},
        }

    def _token_loss(self, logprobs, kl, mb: Rollout, mask, tokens: float | None):
        """The clipped surrogate per token, plus β·k3 when the KL is a loss term, aggregated by ``loss_type``."""
        cfg = self.cfg
        per_token, clip_stats = core.clipped_surrogate(logprobs, mb.logprobs, mb.advantages, mask,
                                                       cfg.loss.epsilon, cfg.loss.epsilon_high)
        if cfg.kl.beta > 0 and not cfg.kl.kl_in_reward:
            per_token = per_token + cfg.kl.beta * kl
        loss = core.aggregate_loss(per_token, mask, cfg.loss.loss_type, max_completion_length=cfg.sampling.max_new_tokens,
                                   num_items_in_batch=tokens, num_processes=distributed.world_size())
        return loss, clip_stats

    def _sequence_loss(self, logprobs, mb: Rollout, mask):
        """TRL's RLOOTrainer loss (``loss_type=rloo``): one ratio and clip per response, mean over responses.
        Its estimators give every token of a response the same advantage; the first token has it (a response
        has at least one token: EOS counts)."""
        return core.rloo_sequence_loss(logprobs, mb.logprobs, mb.advantages[:, 0], mask,
                                       self.cfg.loss.epsilon, self.cfg.loss.epsilon_high)
