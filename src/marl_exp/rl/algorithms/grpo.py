"""GRPO (Shao et al. 2024) as TRL 1.x's GRPOTrainer: group-relative advantages, and the per-token clipped
surrogate plus β · k3 KL to the reference, aggregated by ``loss_type`` (the loss every critic-free stage
uses unless ``loss_type=rloo``).

References: [GRPO] Shao et al. 2024, "DeepSeekMath" (sec. 4.1); [DRGRPO] Liu et al. 2025, "Understanding
R1-Zero-Like Training" (Dr. GRPO); [DAPO] Yu et al. 2025 (clip higher, token-level loss); [K3] Schulman
2020; [TRL] TRL 1.x ``GRPOTrainer`` (argument and metric names, epsilons, loss aggregation).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from marl_exp.config import SCALE_REWARDS, TOKEN_LOSS_TYPES
from marl_exp.rl.algorithms.groups import (
    REWARD_STD_EPS,
    AdvantageSettings,
    all_equal,
    broadcast_to_tokens,
    group_view,
    register_advantage_estimator,
    sequence_rewards,
)
from marl_exp.rl.functional import (
    Tensor,
    as_bool,
    clipped_objective,
    kl_per_token,
    masked_max,
    masked_mean,
    masked_min,
    masked_sum,
)


def group_relative_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: str = "group", eps: float = REWARD_STD_EPS
) -> Tensor:
    """GRPO's outcome advantage, one per response ``[B]`` [GRPO sec. 4.1.2].

        A_i = (r_i - mean_g(r)) / (s + eps)

    mean_g over the num_generations responses of the prompt of i, and the
    scale s by ``scale_rewards`` (TRL 1.x's option and conventions):

    - ``"group"``: s = std_g(r), the std of i's group (GRPO);
    - ``"batch"``: s = std(r) over all B rewards of the batch (centred on the
      batch mean), as Lite PPO (arXiv 2508.08221) recommends; the mean
      subtracted is still the group's;
    - ``"none"``: no division, A_i = r_i - mean_g(r) (Dr. GRPO [DRGRPO]: the
      std puts a question-difficulty bias in the update).

    std with Bessel's correction (divide by n - 1), as TRL's ``nanstd``;
    ``eps`` = 1e-4 added to the std (not inside the square root), as TRL.
    A group whose rewards are all equal gets exactly 0. (TRL's formula can
    give ~1e-3 there: the float32 mean of equal numbers can be an ulp off,
    and that ulp divided by std + 1e-4 ~ 1e-4 is no longer small.)

    With several processes, pass the rewards gathered from all of them
    (TRL normalises the gathered batch): the batch std is the global one.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid choices: {', '.join(SCALE_REWARDS)}")
    groups = group_view(rewards, num_generations)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (groups.std(dim=1, correction=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (groups.std(correction=1) + eps)
    advantages = torch.where(all_equal(groups).unsqueeze(1), torch.zeros_like(advantages), advantages)
    return advantages.reshape(-1)


@register_advantage_estimator("grpo")
def grpo_estimator(scores: Tensor, mask: Tensor, kl: Optional[Tensor], settings: AdvantageSettings) -> Tensor:
    # Dr. GRPO is this with scale_rewards="none" and loss_type="dr_grpo".
    rewards = sequence_rewards(scores, mask, kl, settings.beta)
    advantages = group_relative_advantages(rewards, settings.num_generations, settings.scale_rewards)
    return broadcast_to_tokens(advantages, mask)


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Per-token clipped surrogate with separate lower/upper clip, ``[B, T]``.

        ratio_t = exp(logprobs_t - old_logprobs_t)
        loss_t  = -min(ratio_t · A_t, clip(ratio_t, 1 - ε, 1 + ε_high) · A_t)

    ε = ``epsilon``, ε_high = ``epsilon_high`` (None: ε_high = ε, plain PPO).
    DAPO's "clip higher" sets ε_high > ε (0.28 vs 0.2) so unlikely tokens
    with A > 0 can gain more probability before the clip stops them [DAPO].
    ``old_logprobs`` are the log-probs of the policy that sampled the batch,
    computed once and kept for all ``num_iterations`` updates of that batch;
    with ``num_iterations=1`` pass ``logprobs.detach()``: ratio = 1 and the
    gradient is the plain policy gradient -A_t ∇log π.

    Returns the per-token loss (0 on padding; aggregate it with
    :func:`aggregate_loss`, after adding a KL term if any) and TRL's clip
    metrics (detached scalars, local to this batch):
        clip_ratio/low_mean     fraction of tokens with ratio < 1 - ε and A < 0
        clip_ratio/high_mean    fraction of tokens with ratio > 1 + ε_high and A > 0
        clip_ratio/region_mean  either of the two (the clip is active, no gradient)
        clip_ratio/low_min      min over responses of their low-clipped fraction
        clip_ratio/high_max     max over responses of their high-clipped fraction
    (responses without tokens are left out of the min/max).
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if not 0 <= epsilon < 1:
        raise ValueError(f"epsilon={epsilon} must be in [0, 1); 0.2 is usual")
    if not epsilon_high >= 0:
        raise ValueError(f"epsilon_high={epsilon_high} must be >= 0; DAPO uses 0.28")
    if advantages.shape != logprobs.shape:
        raise ValueError(f"advantages shape {tuple(advantages.shape)} != logprobs shape {tuple(logprobs.shape)}; "
                         "give per-token advantages (broadcast_to_tokens for one value per response)")
    mask_b = as_bool(mask)
    zeros = torch.zeros_like(logprobs)
    # Zero log-ratio and advantage at padding: garbage there must not overflow exp() or reach the gradient.
    log_ratio = torch.where(mask_b, logprobs - old_logprobs, zeros)
    advantages = torch.where(mask_b, advantages.detach().to(logprobs.dtype), zeros)
    per_token, low, high = clipped_objective(torch.exp(log_ratio), advantages, epsilon, epsilon_high)
    per_token = torch.where(mask_b, per_token, zeros)

    with torch.no_grad():
        has_tokens = mask_b.any(dim=1)
        stats = {
            "clip_ratio/low_mean": masked_mean(low, mask_b),
            "clip_ratio/high_mean": masked_mean(high, mask_b),
            "clip_ratio/region_mean": masked_mean(torch.maximum(low, high), mask_b),
            "clip_ratio/low_min": masked_min(masked_mean(low, mask_b, dim=1), has_tokens),
            "clip_ratio/high_max": masked_max(masked_mean(high, mask_b, dim=1), has_tokens),
        }
    return per_token, {k: v.detach() for k, v in stats.items()}


def kl_loss_per_token(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GRPO's KL term, per token ``[B, T]`` [GRPO eq. 4, K3].

        KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

    the k3 estimator of KL(π_θ ‖ π_ref) (>= 0, unbiased), differentiated
    through ``logprobs`` (the policy being updated, not the sampling one).
    The loss adds β · KL_t to each token's surrogate before aggregation, as
    TRL: ``loss = aggregate_loss(surrogate + beta * kl, ...)``; TRL logs its
    token mean as ``kl``. 0 on padding (with zero gradient there).
    """
    mask_b = as_bool(mask)
    zeros = torch.zeros_like(logprobs)
    # Zero the difference at padding first: exp() of garbage would give inf, and inf * 0 gradient is NaN.
    d = torch.where(mask_b, logprobs - ref_logprobs.to(logprobs.dtype), zeros)
    return torch.where(mask_b, kl_per_token(d, zeros, "kl", "k3"), zeros)


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: str,
    *,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
) -> Tensor:
    """One scalar loss from per-token losses, by TRL 1.x's ``loss_type``.

    L_{i,t} = ``per_token_loss`` over a micro-batch of B responses, |o_i| =
    number of response tokens of i:

    - ``"grpo"``:    (1/B) sum_i (1/|o_i|) sum_t L_{i,t}   (mean of sequence means [GRPO];
      a long response's tokens weigh less: the length bias [DRGRPO]);
    - ``"bnpo"``:    sum_{i,t} L_{i,t} / sum_i |o_i|        (token mean over this micro-batch);
    - ``"dr_grpo"``: sum_{i,t} L_{i,t} / (B · max_completion_length)   (a constant denominator [DRGRPO]);
    - ``"dapo"``:    sum_{i,t} L_{i,t} / (num_items_in_batch / num_processes)   [DAPO].

    The result is this micro-batch's share of the optimizer step's loss, as
    TRL returns it: back-propagate each micro-batch's value and the
    accumulated gradient is the step's. So grpo, bnpo and dr_grpo are divided
    by ``gradient_accumulation_steps`` (each a mean of micro-batch means),
    while dapo divides by ``num_items_in_batch``, the number of response
    tokens of the whole step over all micro-batches and all processes (TRL
    gathers it): summed over micro-batches and averaged over processes by
    data parallel, dapo's gradient is the token mean of the global batch,
    whatever the micro-batch split. bnpo is the same mean over the local
    micro-batch only; with one micro-batch on one process bnpo = dapo.
    Empty denominators count as 1 (an empty batch gives 0, not NaN).
    """
    if loss_type not in TOKEN_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid choices: {', '.join(TOKEN_LOSS_TYPES)} "
                         "(loss_type 'rloo' is rloo_sequence_loss, not an aggregation)")
    mask_b = as_bool(mask)
    if loss_type == "dapo":
        if num_items_in_batch is None:
            raise ValueError("loss_type='dapo' needs num_items_in_batch (response tokens of the whole step, all "
                             "processes); use 'bnpo' for the local token mean")
        total = torch.as_tensor(num_items_in_batch, dtype=per_token_loss.dtype, device=per_token_loss.device)
        return masked_sum(per_token_loss, mask_b) / (total.clamp(min=1.0) / num_processes)
    if loss_type == "grpo":
        loss = masked_mean(per_token_loss, mask_b, dim=1).mean()
    elif loss_type == "bnpo":
        loss = masked_mean(per_token_loss, mask_b)
    else:  # dr_grpo
        if max_completion_length is None or not max_completion_length > 0:
            raise ValueError(f"loss_type='dr_grpo' needs max_completion_length > 0 (got {max_completion_length}); "
                             "pass the generation length limit")
        loss = masked_sum(per_token_loss, mask_b) / (per_token_loss.shape[0] * max_completion_length)
    return loss / gradient_accumulation_steps
