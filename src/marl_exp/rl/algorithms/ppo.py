"""PPO for RLHF (Ziegler et al. 2019; Stiennon et al. 2020): per-token rewards with a KL penalty (adaptive
coefficient), GAE advantages from a value head or a critic adapter, ``ppo_epochs`` epochs of the clipped
policy and value losses. The loop that runs it is ``marl_exp.rl.trainer.RLTrainer``.

References: [PPO] Schulman et al. 2017; [GAE] Schulman et al. 2016; [RLHF] Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences", Stiennon et al. 2020, "Learning to summarize from human feedback".
Tensors follow ``marl_exp.rl.functional``'s conventions (``[B, T]`` over response tokens, with a mask).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from marl_exp.rl.functional import (
    Tensor,
    as_bool,
    entropy_for_logging,
    entropy_from_logits,
    list_mean,
    masked_max,
    masked_mean,
    masked_sum,
    masked_whiten,
)
from marl_exp.rl.roles import critic_name
from marl_exp.rl.rollout import PolicyForward, Rollout
from marl_exp.run import distributed


class PPO:
    """PPO's part of the RL step: score shaping, KL-shaped rewards and GAE, the clipped policy and value
    losses, the early stop on approximate KL, the KL controller. Metrics keep PPO's ``ppo/`` names."""

    metric_prefix = "ppo/"  # the loop's own counters (guards, grad norm, learning rate) are PPO's here
    group_size = 1  # one response per prompt
    reads_old_logprobs_before_update = True  # the KL in the reward and GAE's values come from scoring

    def __init__(self, stage, perf):
        self.stage, self.perf = stage, perf
        self.critic = stage.critic  # value_head | adapter: what scoring computes values with
        self.epochs = stage.optim.ppo_epochs
        # Each policy its own KL coefficient and score statistics: they follow that policy's responses only.
        self.kl_ctls = {name: make_kl_controller(stage.kl.adaptive_kl, stage.kl.init_kl_coef, stage.kl.target_kl,
                                                 stage.kl.kl_horizon) for name in stage.policies}
        self.score_moments = {name: RunningMoments() for name in stage.policies}

    def trained_parameters(self, model, name: str) -> list:
        params = model.trainable_parameters(name)
        if self.critic == "adapter":
            params += model.trainable_parameters(critic_name(name))
        return params

    # ----------------------------------------------------------------------- rewards and advantages
    def shape_scores(self, name: str, rollout: Rollout) -> Tensor:
        """Score options, in the order applied: missing-EOS penalty, running whitening, scale, clip."""
        stage, scores = self.stage, rollout.raw_scores.clone()
        if stage.scores.missing_eos_penalty is not None:
            scores = scores - stage.scores.missing_eos_penalty * (~rollout.has_eos).float()
        if stage.scores.whiten_scores:
            moments = self.score_moments[name]
            moments.update(distributed.cat_tensors(scores))  # every rank's scores of this policy
            scores = (scores - moments.mean) / moments.std
        scores = scores * stage.scores.score_scale
        if stage.scores.score_clip is not None:
            scores = scores.clamp(-stage.scores.score_clip, stage.scores.score_clip)
        return scores

    def advantages(self, name: str, rollout: Rollout) -> Tuple[Tensor, Tensor]:
        """Per-token rewards -β·KL on every response token, the score added at the last one; GAE."""
        stage, mask = self.stage, rollout.response_mask
        rewards, _ = compute_rewards(rollout.scores, rollout.kl, mask, self.kl_ctls[name].value)
        advantages, returns = compute_gae(rewards, rollout.values, mask, stage.advantages.gamma, stage.advantages.lam)
        if stage.advantages.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return advantages, returns

    # ------------------------------------------------------------------------------------- losses
    def loss_mask(self, mb: Rollout) -> Tensor:
        return mb.response_mask

    def loss_weight(self, rollout: Rollout, rows: Tensor, mini_batch: Tensor) -> Tuple[float, None]:
        """(weight, tokens): gradient accumulation averages the micro-batches' losses over the mini-batch."""
        return len(rows) / len(mini_batch), None

    def loss(self, forward: PolicyForward, mb: Rollout, tokens=None) -> Tuple[Tensor, dict]:
        """The clipped policy loss minus the entropy bonus, plus ``vf_coef`` × the clipped value loss when
        the values come from the policy's own head (a critic adapter's: ``critic_loss``, after this one)."""
        stage, mask = self.stage, mb.response_mask
        pg_loss, pg_stats = policy_loss(forward.logprobs, mb.logprobs, mb.advantages, mask, stage.loss.cliprange)
        if self.perf.lazy_entropy and stage.loss.entropy_coef == 0:
            entropy = masked_mean(entropy_for_logging(forward.logits), mask)
        else:
            entropy = masked_mean(entropy_from_logits(forward.logits), mask)
        loss = pg_loss - stage.loss.entropy_coef * entropy
        stats = {
            "ppo/loss/policy": pg_loss.detach(),
            "ppo/policy/entropy": entropy.detach(),
            "objective/entropy": entropy.detach(),
            **{f"ppo/policy/{k}": v for k, v in pg_stats.items()},
        }
        if self.critic == "adapter":
            return loss, stats
        values = forward.values[:, forward.window].float()
        vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mask, stage.loss.cliprange_value)
        return loss + stage.loss.vf_coef * vf_loss, {**stats, **self._value_stats(pg_loss, vf_loss, vf_stats)}

    def critic_loss(self, values: Tensor, mb: Rollout, policy_stats: dict) -> Tuple[Tensor, dict]:
        """``vf_coef`` × the clipped value loss of a critic adapter's ``values`` [B, T]."""
        vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mb.response_mask, self.stage.loss.cliprange_value)
        return self.stage.loss.vf_coef * vf_loss, self._value_stats(policy_stats["ppo/loss/policy"], vf_loss, vf_stats)

    def _value_stats(self, pg_loss, vf_loss: Tensor, vf_stats: dict) -> dict:
        return {
            "ppo/loss/value": vf_loss.detach(),
            "ppo/loss/total": (pg_loss + self.stage.loss.vf_coef * vf_loss).detach(),
            **{f"ppo/val/{k}": v for k, v in vf_stats.items()},
        }

    # ---------------------------------------------------------------------------- around the update
    def stop_epochs(self, epoch_stats: list[dict]) -> bool:
        """Stop this step's updates after an epoch whose approximate KL passed ``early_stop_kl``. Decided on
        this epoch's mini-batches alone: an average over all epochs so far would be diluted by the first
        one, whose approx-KL starts at 0 (the policy is the rollout policy there)."""
        approxkl = list_mean([s["ppo/policy/approxkl"] for s in epoch_stats if "ppo/policy/approxkl" in s])
        approxkl = distributed.mean(approxkl)  # one decision for all ranks
        return self.stage.optim.early_stop_kl is not None and approxkl > self.stage.optim.early_stop_kl

    def step_stats(self, name: str, rollout: Rollout, stopped_early: bool) -> dict:
        mask, kl_coef = rollout.response_mask, self.kl_ctls[name].value
        kl_sum = masked_sum(rollout.kl, mask, dim=1)
        _, non_score = compute_rewards(rollout.scores, rollout.kl, mask, kl_coef)
        return {
            "objective/kl": kl_sum.mean().item(),
            "objective/kl_per_token": masked_mean(rollout.kl, mask).item(),
            "objective/entropy_sampled": -masked_sum(rollout.logprobs, mask, dim=1).mean().item(),
            "objective/rlhf_reward": (rollout.scores - kl_coef * kl_sum).mean().item(),
            "env/reward_mean": rollout.raw_scores.mean().item(),
            "env/reward_std": rollout.raw_scores.std().item(),
            "env/score_mean": rollout.scores.mean().item(),
            "env/response_length": mask.sum(1).float().mean().item(),
            "env/eos_fraction": rollout.has_eos.float().mean().item(),
            "ppo/returns/mean": masked_mean(rollout.returns, mask).item(),
            "ppo/advantages/mean": masked_mean(rollout.advantages, mask).item(),
            "ppo/val/mean": masked_mean(rollout.values, mask).item(),
            "ppo/mean_non_score_reward": masked_sum(non_score, mask, dim=1).mean().item(),
            "ppo/early_stop": float(stopped_early),
        }

    def after_update(self, name: str, stats: dict) -> dict:
        """The KL controller follows the policy's KL over every rank's responses (the same on all ranks)."""
        policy_kl = distributed.mean(stats["objective/kl"])
        self.kl_ctls[name].update(policy_kl, self.stage.batch_size * distributed.world_size())
        return {"objective/kl_coef": self.kl_ctls[name].value}

    def skip_stats(self, name: str) -> dict:
        """What a skipped step still reports: the KL coefficient, which did not move."""
        return {"objective/kl_coef": self.kl_ctls[name].value}

    def state_dict(self) -> dict:
        return {
            "kl_ctl": {name: ctl.state_dict() for name, ctl in self.kl_ctls.items()},
            "score_moments": {name: m.state_dict() for name, m in self.score_moments.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        for name in self.kl_ctls:
            self.kl_ctls[name].load_state_dict(_per_policy(state["kl_ctl"], name))
            self.score_moments[name].load_state_dict(_per_policy(state["score_moments"], name))


# ---------------------------------------------------------------------------
# Per-token rewards [RLHF]
# ---------------------------------------------------------------------------


def compute_rewards(
    scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float
) -> Tuple[Tensor, Tensor]:
    """Per-token rewards for RLHF PPO [RLHF].

    R_t = -β · KL_t on every response token, plus the reward-model score of
    the whole response added at the last response token (the "action" that
    completes the sequence).

    Args:
        scores: ``[B]`` reward-model score per response.
        kl: ``[B, T]`` per-token KL penalty (see ``functional.kl_per_token``).
        mask: ``[B, T]`` response-token mask.
        kl_coef: β.

    Returns:
        rewards ``[B, T]`` and non_score_reward ``[B, T]`` (the -β·KL part
        alone, for logging). Both are 0 on masked positions. A row with no
        response tokens gets no score.
    """
    mask_b = as_bool(mask)
    non_score_reward = torch.where(mask_b, -kl_coef * kl, torch.zeros_like(kl))

    # Index of the last response token per row: the largest position with
    # mask == 1 (-1 when the row is empty).
    T = mask_b.shape[1]
    positions = torch.arange(T, device=mask_b.device).expand_as(mask_b)
    last = torch.where(mask_b, positions, torch.full_like(positions, -1)).max(dim=1).values
    has_tokens = last >= 0

    score = torch.where(has_tokens, scores.to(kl.dtype), torch.zeros_like(scores, dtype=kl.dtype))
    rewards = non_score_reward.scatter_add(
        1, last.clamp(min=0).unsqueeze(1), score.unsqueeze(1)
    )
    return rewards, non_score_reward


# ---------------------------------------------------------------------------
# Generalized advantage estimation [GAE]
# ---------------------------------------------------------------------------


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> Tuple[Tensor, Tensor]:
    """Generalized advantage estimation, computed backward over t [GAE].

        δ_t = r_t + γ V_{t+1} - V_t
        A_t = δ_t + γ λ A_{t+1}
        returns_t = A_t + V_t          (the λ-return, target for the critic)

    The episode ends at the last response token: V and A after it count as 0
    (terminal state). Rewards and values at masked positions are treated as 0
    so they cannot leak backwards into real tokens.

    Returns ``(advantages, returns)``, both ``[B, T]``, detached, 0 on masked
    positions.
    """
    mask_b = as_bool(mask)
    zeros = torch.zeros_like(values)
    # Advantages are targets, not something to differentiate through.
    r = torch.where(mask_b, rewards.detach().to(values.dtype), zeros).detach()
    v = torch.where(mask_b, values.detach(), zeros).detach()

    T = r.shape[1]
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])  # V_{T} = 0: terminal
    next_adv = torch.zeros_like(v[:, 0])  # A_{T} = 0
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        # A padded position is past the end of the episode: A = 0 there, and
        # since V = 0 there too, the last real token sees a terminal state.
        adv_t = torch.where(mask_b[:, t], adv_t, torch.zeros_like(adv_t))
        advantages[:, t] = adv_t
        next_value = v[:, t]
        next_adv = adv_t

    returns = torch.where(mask_b, advantages + v, zeros)
    return advantages.detach(), returns.detach()


# ---------------------------------------------------------------------------
# Losses [PPO]
# ---------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped surrogate objective, PPO eq. (7), as a loss to minimise.

        ratio_t = π(a_t|s_t) / π_old(a_t|s_t) = exp(logprobs - old_logprobs)
        loss    = mean_t max(-A_t · ratio_t, -A_t · clip(ratio_t, 1-ε, 1+ε))

    (max of the negated terms == -min of the objective terms: the pessimistic
    bound.) The mean is over response tokens.

    Stats (detached scalars):
        clipfrac     fraction of tokens where the clipped term is active
                     (-A·clipped > -A·ratio), i.e. the gradient is cut off;
        approxkl     0.5 · mean(d²), d = logprobs - old_logprobs;
        approxkl_k3  mean((ratio - 1) - log ratio);
        ratio_mean, ratio_max  over response tokens.
    """
    mask_b = as_bool(mask)
    # Zero the log-ratio at padding so garbage there cannot overflow exp().
    log_ratio = torch.where(mask_b, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)

    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask_b)

    with torch.no_grad():
        clipped = (pg_losses_clipped > pg_losses).to(ratio.dtype)
        stats = {
            "clipfrac": masked_mean(clipped, mask_b),
            "approxkl": 0.5 * masked_mean(log_ratio.square(), mask_b),
            "approxkl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, mask_b),
            "ratio_mean": masked_mean(ratio, mask_b),
            "ratio_max": masked_max(ratio, mask_b),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped value loss (the PPO2 / RLHF critic objective).

        v_clipped = old_values + clip(values - old_values, -c, c)
        loss      = 0.5 · mean_t max((values - returns)², (v_clipped - returns)²)

    Like the policy clip, this keeps the critic near the values the
    advantages were computed with; max() makes it a pessimistic bound.

    Stats (detached scalars): clipfrac (fraction where the clipped error is
    strictly larger), vpred (mean value), error (mean (values - returns)²).
    """
    mask_b = as_bool(mask)
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses = (values - returns).square()
    vf_losses_clipped = (v_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask_b)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), mask_b),
            "vpred": masked_mean(values, mask_b),
            "error": masked_mean(vf_losses, mask_b),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


# ---------------------------------------------------------------------------
# KL coefficient controllers [RLHF, Ziegler et al. 2019, sec. 2.2]
# ---------------------------------------------------------------------------


class AdaptiveKLController:
    """Adapt β to keep the observed KL near ``target``.

        e_t = clip(KL_t / target - 1, -0.2, 0.2)
        β_{t+1} = β_t (1 + K_β · e_t),  K_β = n_steps / horizon

    The clip bounds how fast β moves per update, whatever the KL does.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant β; same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


def make_kl_controller(
    adaptive: bool,
    init_kl_coef: float,
    target: Optional[float] = None,
    horizon: Optional[float] = None,
):
    """Build an adaptive or fixed KL controller (target/horizon only used if adaptive)."""
    if init_kl_coef < 0:
        raise ValueError(f"init_kl_coef={init_kl_coef} must be >= 0; set a non-negative KL coefficient")
    if not adaptive:
        return FixedKLController(init_kl_coef)
    if target is None or not target > 0:
        raise ValueError(f"adaptive KL target={target} must be > 0; set a positive target KL or disable adaptive KL")
    if horizon is None or not horizon > 0:
        raise ValueError(f"adaptive KL horizon={horizon} must be > 0; set a positive horizon or disable adaptive KL")
    return AdaptiveKLController(init_kl_coef, target, horizon)


class RunningMoments:
    """Running mean and variance of scores over all steps so far (Chan et al. parallel update); ``var`` is
    the population variance, ``std`` the sample one."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        n, mean, var = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.var * self.count + var * n + delta ** 2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        """The sample standard deviation of every score so far (Bessel-corrected, as TRL's RunningMoments)."""
        unbiased = self.var * self.count / (self.count - 1) if self.count > 1 else self.var
        return math.sqrt(max(unbiased, 1e-8))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def _per_policy(state: dict, name: str) -> dict:
    """A policy's entry of a per-policy state; checkpoints written before per-policy state held one for all."""
    return state[name] if name in state and isinstance(state[name], dict) else state
