"""RLOO (Ahmadian et al. 2024) as TRL 1.x's RLOOTrainer: the leave-one-out baseline, and its
sequence-level loss (``loss_type=rloo``: one importance ratio and one clip per response).

References: [RLOO] Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a
Baseline for Free!"; [TRL] TRL 1.x ``RLOOTrainer``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from marl_exp.rl.algorithms.groups import (
    REWARD_STD_EPS,
    AdvantageSettings,
    all_equal,
    broadcast_to_tokens,
    group_view,
    register_advantage_estimator,
    sequence_rewards,
)
from marl_exp.rl.functional import Tensor, as_bool, clipped_objective, masked_sum


def leave_one_out_advantages(
    rewards: Tensor, num_generations: int, normalize_advantages: bool = False, eps: float = REWARD_STD_EPS
) -> Tensor:
    """RLOO's advantage, one per response ``[B]`` [RLOO].

        A_i = r_i - (1 / (G - 1)) · sum_{j != i, j in group(i)} r_j

    the baseline of each response is the mean reward of the *other* G - 1
    responses to the same prompt (G = num_generations), so it does not depend
    on r_i and the estimate stays unbiased. Equivalently
    A_i = G / (G - 1) · (r_i - mean_g(r)): GRPO's unscaled advantage times
    G / (G - 1).

    ``normalize_advantages`` (TRL ``RLOOConfig``'s option) then whitens over
    the batch: (A - mean(A)) / (std(A) + eps), Bessel std, eps = 1e-4 as TRL.
    (mean(A) is 0 up to rounding: each group's advantages sum to 0.) A group
    whose rewards are all equal gets exactly 0 in both cases.
    """
    groups = group_view(rewards, num_generations)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (num_generations - 1)
    advantages = groups - others_mean
    if normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std(correction=1) + eps)
    advantages = torch.where(all_equal(groups).unsqueeze(1), torch.zeros_like(advantages), advantages)
    return advantages.reshape(-1)


@register_advantage_estimator("rloo")
def rloo_estimator(scores: Tensor, mask: Tensor, kl: Optional[Tensor], settings: AdvantageSettings) -> Tensor:
    rewards = sequence_rewards(scores, mask, kl, settings.beta)
    advantages = leave_one_out_advantages(rewards, settings.num_generations, settings.normalize_advantages)
    return broadcast_to_tokens(advantages, mask)


def rloo_sequence_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """TRL 1.x ``RLOOTrainer``'s loss: one importance ratio and one clip per response (scalar).

        ratio_i = exp(sum_t logprobs_{i,t} - sum_t old_logprobs_{i,t})     (sums over i's mask)
        loss    = mean_i -min(ratio_i · A_i, clip(ratio_i, 1 - ε, 1 + ε_high) · A_i)

    ``advantages`` ``[B]``, one per response; ``old_logprobs`` ``[B, T]``, the
    sampling policy's. Unlike ``grpo.clipped_surrogate`` + ``grpo.aggregate_loss``,
    the ratio is the whole response's probability ratio (the product over its
    tokens, not a token's), so a response is clipped as a whole, and the
    gradient is -A_i ∇ sum_t log π at ratio 1: a response's tokens weigh by
    their number, not divided by it. A response with an empty mask (dropped by
    ``critic_free.drop_truncated_completions``) has ratio 1: it adds -A_i to the mean
    and nothing to the gradient, as in TRL. The mean is over this
    micro-batch's responses (TRL returns it unscaled; the HF Trainer divides by
    gradient accumulation).

    Stats: TRL's clip metrics over responses (detached scalars):
    ``clip_ratio/low_mean`` / ``clip_ratio/low_min`` (ratio < 1 - ε with A < 0),
    ``clip_ratio/high_mean`` / ``clip_ratio/high_max`` (ratio > 1 + ε_high with
    A > 0), ``clip_ratio/region_mean`` (either).
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages shape {tuple(advantages.shape)} must be [B] = {tuple(logprobs.shape[:1])}: "
                         "one advantage per response")
    mask_b = as_bool(mask)
    log_ratio = masked_sum(logprobs, mask_b, dim=1) - masked_sum(old_logprobs.detach(), mask_b, dim=1)
    advantages = advantages.detach().to(logprobs.dtype)
    per_response, low, high = clipped_objective(torch.exp(log_ratio), advantages, epsilon, epsilon_high)
    loss = per_response.mean()

    with torch.no_grad():
        stats = {
            "clip_ratio/low_mean": low.mean(),
            "clip_ratio/low_min": low.min(),
            "clip_ratio/high_mean": high.mean(),
            "clip_ratio/high_max": high.max(),
            "clip_ratio/region_mean": torch.maximum(low, high).mean(),
        }
    return loss, stats
