"""GRPO, RLOO and REINFORCE++'s part of the RL step: no critic, ``num_generations`` responses per prompt.

What differs from PPO:

- the batch: ``batch_size / num_generations`` prompts, each sampled ``num_generations`` times, laid out
  group by group (prompt 0's responses first), as the estimators expect (``groups``);
- rewards: the reward as it is (the KL, when in the reward, enters the advantages);
- advantages: the estimator registered as ``stage.advantage_estimator`` (``grpo``, ``rloo``,
  ``reinforce_pp``), over every rank's responses;
- the loss: ``num_iterations`` passes of a clipped surrogate against the log-probs of the policy that sampled
  the batch (TRL's ``old_per_token_logps``): per token, plus ``beta`` · k3 KL to the reference when the KL is
  a loss term, aggregated by ``loss_type`` (``token_loss``: GRPOTrainer's, from ``grpo``); or, with
  ``loss_type=rloo``, per response (``sequence_loss``: RLOOTrainer's, from ``rloo``). Only the policy
  adapter's LoRA weights are trained.

Metric names are TRL 1.x ``GRPOTrainer``'s (``reward``, ``reward_std``, ``frac_reward_zero_std``, ``kl``,
``entropy``, ``clip_ratio/*``, ``completions/*``, ``grad_norm``, ``learning_rate``); the loop's guard
counters are unprefixed (``skipped_nonfinite``, ``nonfinite_step``, ...).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from marl_exp.rl.algorithms.groups import AdvantageSettings, get_advantage_estimator, zero_std_groups
from marl_exp.rl.algorithms.grpo import aggregate_loss, clipped_surrogate, kl_loss_per_token
from marl_exp.rl.algorithms.rloo import rloo_sequence_loss
from marl_exp.rl.functional import Tensor, as_bool, entropy_for_logging, masked_mean, masked_sum, masked_var
from marl_exp.rl.rollout import PolicyForward, Rollout
from marl_exp.run import distributed


class CriticFree:
    """The critic-free algorithms' part of the step (see the module docstring)."""

    metric_prefix = ""  # the loop's own counters go unprefixed, as TRL's grad_norm and learning_rate
    critic = "none"  # scoring computes no critic; the policy's unused value head is not trained

    def __init__(self, stage, perf=None):
        self.stage = stage
        self.group_size = stage.sampling.num_generations
        self.epochs = stage.optim.num_iterations
        # The KL in the reward enters the advantages; in the loss (GRPO), nothing reads the old log-probs before it.
        self.reads_old_logprobs_before_update = bool(stage.kl.kl_in_reward)
        self.estimator = get_advantage_estimator(stage.advantage_estimator)
        self.settings = AdvantageSettings(
            num_generations=stage.sampling.num_generations, beta=stage.kl.beta,
            scale_rewards=stage.advantages.scale_rewards,
            normalize_advantages=stage.advantages.normalize_advantages, gamma=stage.advantages.gamma)
        # The loss the loop calls: per response (RLOOTrainer's) or per token, aggregated by loss_type.
        self.loss = self.sequence_loss if stage.loss.loss_type == "rloo" else self.token_loss

    def trained_parameters(self, model, name: str) -> list:
        # The LoRA weights only: the model gives every policy a value head, which nothing here trains.
        heads = {id(p) for p in model.value_heads[name].parameters()}
        return [p for p in model.trainable_parameters(name) if id(p) not in heads]

    # ----------------------------------------------------------------------- rewards and advantages
    def shape_scores(self, name: str, rollout: Rollout) -> Tensor:
        return rollout.raw_scores.clone()

    def advantages(self, name: str, rollout: Rollout) -> Tuple[Tensor, None]:
        """The estimator over every rank's responses, this rank's rows of the result: batch statistics
        (whitening, ``scale_rewards=batch``, ``normalize_advantages``) are global, as in TRL. Group
        statistics are unchanged by it: each rank samples whole groups."""
        kl = rollout.kl if self.stage.kl.kl_in_reward else None
        (scores, mask, kl), rows = distributed.cat_rows(rollout.scores, rollout.response_mask, kl)
        advantages = self.estimator(scores, mask, kl, self.settings)
        return advantages[rows, :rollout.response_mask.shape[1]], None

    # ------------------------------------------------------------------------------------- losses
    def loss_mask(self, mb: Rollout) -> Tensor:
        """The tokens that enter the loss: TRL's ``mask_truncated_completions`` drops responses without EOS."""
        if not self.stage.loss.mask_truncated_completions:
            return mb.response_mask
        return drop_truncated_completions(mb.response_mask, ~mb.has_eos)

    def loss_weight(self, rollout: Rollout, rows: Tensor, mini_batch: Tensor) -> Tuple[float, Optional[float]]:
        """(weight, tokens): grpo, bnpo, dr_grpo and rloo average the micro-batches' losses over the mini-batch;
        dapo divides by the response tokens of the whole update (every micro-batch, every rank)."""
        if self.stage.loss.loss_type != "dapo":
            return len(rows) / len(mini_batch), None
        local = float(self.loss_mask(rollout.select(mini_batch)).sum())
        return 1.0, distributed.mean(local) * distributed.world_size()

    def token_loss(self, forward: PolicyForward, mb: Rollout, tokens: Optional[float]) -> Tuple[Tensor, dict]:
        """The clipped surrogate per token, plus β·k3 when the KL is a loss term, aggregated by ``loss_type``.
        ``mb.logprobs``: the sampling policy's, fixed for all num_iterations passes over this batch."""
        stage, mask = self.stage, self.loss_mask(mb)
        kl = kl_loss_per_token(forward.logprobs, mb.ref_logprobs, mask)
        per_token, clip_stats = clipped_surrogate(forward.logprobs, mb.logprobs, mb.advantages, mask,
                                                  stage.loss.epsilon, stage.loss.epsilon_high)
        if stage.kl.beta > 0 and not stage.kl.kl_in_reward:
            per_token = per_token + stage.kl.beta * kl
        loss = aggregate_loss(per_token, mask, stage.loss.loss_type,
                              max_completion_length=stage.sampling.max_new_tokens, num_items_in_batch=tokens,
                              num_processes=distributed.world_size())
        return loss, self._loss_stats(forward, mb, loss, kl, mask, clip_stats)

    def sequence_loss(self, forward: PolicyForward, mb: Rollout, tokens=None) -> Tuple[Tensor, dict]:
        """TRL's RLOOTrainer loss (``loss_type=rloo``): one ratio and clip per response, mean over responses.
        Its estimators give every token of a response the same advantage; the first token has it (a response
        has at least one token: EOS counts)."""
        mask = self.loss_mask(mb)
        kl = kl_loss_per_token(forward.logprobs, mb.ref_logprobs, mask)  # logged only: RLOO's KL is in the reward
        loss, clip_stats = rloo_sequence_loss(forward.logprobs, mb.logprobs, mb.advantages[:, 0], mask,
                                              self.stage.loss.epsilon, self.stage.loss.epsilon_high)
        return loss, self._loss_stats(forward, mb, loss, kl, mask, clip_stats)

    @staticmethod
    def _loss_stats(forward: PolicyForward, mb: Rollout, loss: Tensor, kl: Tensor, mask: Tensor,
                    clip_stats: dict) -> dict:
        return {
            "loss": loss.detach(),
            "kl": masked_mean(kl.detach(), mask),
            "entropy": masked_mean(entropy_for_logging(forward.logits.detach()), mb.response_mask),
            **clip_stats,
        }

    # ---------------------------------------------------------------------------- around the update
    def stop_epochs(self, epoch_stats: list[dict]) -> bool:
        return False

    def step_stats(self, name: str, rollout: Rollout, stopped_early: bool) -> dict:
        mask = rollout.response_mask
        lengths = mask.sum(1).float()
        terminated = lengths[rollout.has_eos]
        _, zero_std = zero_std_groups(rollout.raw_scores, self.stage.sampling.num_generations)
        return {
            "reward": rollout.raw_scores.mean().item(),
            "reward_std": rollout.raw_scores.std().item(),
            "frac_reward_zero_std": zero_std.item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": (~rollout.has_eos).float().mean().item(),
            "completions/mean_terminated_length": terminated.mean().item() if len(terminated) else 0.0,
            "advantages/mean": masked_mean(rollout.advantages, mask).item(),
            "advantages/std": masked_var(rollout.advantages, mask).sqrt().item(),
            # KL(π_old ‖ π_ref) of a whole response (nats), as PPO's objective/kl: comparable across stages.
            "objective/kl": masked_sum(rollout.logprobs - rollout.ref_logprobs, mask, dim=1).mean().item(),
        }

    def after_update(self, name: str, stats: dict) -> dict:
        return {}

    def skip_stats(self, name: str) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def drop_truncated_completions(mask: Tensor, truncated: Tensor) -> Tensor:
    """TRL's ``mask_truncated_completions``: responses cut off at the length limit leave the loss.

    ``truncated`` ``[B]`` bool: the response ended without EOS. Its mask row
    becomes all 0, so it adds nothing to any loss or token count (DAPO's
    overlong filtering [DAPO]); its reward still counts in its group's
    statistics. Returns a new mask of ``mask``'s dtype.
    """
    keep = ~as_bool(truncated).unsqueeze(1)
    return torch.where(keep, mask, torch.zeros_like(mask))

