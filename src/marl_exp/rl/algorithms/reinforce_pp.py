"""REINFORCE++ (Hu 2025, arXiv 2501.03262): PPO's per-token reward (score at the last token, -β·KL on
each), its discounted return to go, whitened over the whole batch in place of a critic. Its loss is the
token-level one (``grpo``'s, by ``loss_type``)."""

from __future__ import annotations

from typing import Optional

import torch

from marl_exp.rl.algorithms.groups import AdvantageSettings, register_advantage_estimator
from marl_exp.rl.algorithms.ppo import compute_gae, compute_rewards
from marl_exp.rl.functional import Tensor, as_bool, masked_whiten


def reinforce_pp_advantages(
    scores: Tensor,
    mask: Tensor,
    kl: Optional[Tensor] = None,
    beta: float = 0.0,
    gamma: float = 1.0,
) -> Tensor:
    """REINFORCE++ advantages, per token ``[B, T]`` [RPP eqs. 8-10].

        r_t   = -β · KL_t  +  score · [t = last response token]
        G_t   = sum_{s >= t} γ^(s-t) r_s              (return to go)
        A_t   = (G_t - mean(G)) / sqrt(var(G) + 1e-8)

    mean and var (Bessel) over all response tokens of the whole batch: the
    global-batch normalisation that replaces the critic (with several
    processes, the caller gathers first for a truly global batch). ``kl``
    ``[B, T]``, from :func:`kl_per_token` with the sampling policy's
    log-probs (the paper's KL is k1); ``None`` means no KL in the reward.

    Built from :func:`compute_rewards` (the same per-token reward PPO uses),
    :func:`compute_gae` with V = 0 and λ = 1 (which is exactly the discounted
    return to go) and :func:`masked_whiten`. 0 on masked positions.
    """
    mask_b = as_bool(mask)
    scores = scores.detach().float()
    kl = torch.zeros(mask_b.shape, device=scores.device) if kl is None else kl.detach().float()
    token_rewards, _ = compute_rewards(scores, kl, mask_b, beta)
    returns, _ = compute_gae(token_rewards, torch.zeros_like(token_rewards), mask_b, gamma, 1.0)
    return masked_whiten(returns, mask_b)


@register_advantage_estimator("reinforce_pp")
def reinforce_pp_estimator(scores: Tensor, mask: Tensor, kl: Optional[Tensor], settings: AdvantageSettings) -> Tensor:
    # No group baseline: num_generations only shapes the batch here.
    return reinforce_pp_advantages(scores, mask, kl, settings.beta, settings.gamma)
