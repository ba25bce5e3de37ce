"""PPO math for RLHF, written to be checked line by line against the papers.

References
----------
- [PPO]  Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
- [GAE]  Schulman et al. 2016, "High-Dimensional Continuous Control Using
         Generalized Advantage Estimation".
- [RLHF] Ziegler et al. 2019, "Fine-Tuning Language Models from Human
         Preferences"; Stiennon et al. 2020, "Learning to summarize from
         human feedback".
- [K3]   Schulman 2020, "Approximating KL Divergence" (blog note).
- [GRPO] Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical
         Reasoning in Open Language Models" (sec. 4.1).
- [DRGRPO] Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
         Perspective" (Dr. GRPO).
- [DAPO] Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
         System at Scale" (clip higher, token-level loss).
- [RLOO] Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
         Optimization for Learning from Human Feedback in LLMs"; Kool et al.
         2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!".
- [RPP]  Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning
         Large Language Models" (arXiv 2501.03262).
- [TRL]  TRL 1.x ``GRPOTrainer`` / ``RLOOTrainer`` (conventions read from
         trl 1.16.0): argument and metric names, epsilons, loss aggregation.

Conventions
-----------
Unless noted, every tensor is ``[B, T]`` over *response tokens* (the prompt is
not part of T), with a ``mask`` ``[B, T]`` (float or bool): 1 = real response
token, 0 = padding / after EOS. The mask is assumed to be a contiguous prefix
of each row (response tokens, then padding).

Masked positions may hold garbage (even very large numbers); every function
selects with ``torch.where`` rather than multiplying by the mask, so such
values never reach the result (``huge * 0`` would be fine, but ``inf * 0`` is
NaN) and receive zero gradient.

All functions are pure: no global state, inputs are never modified in place.
(The one exception: the registry of advantage estimators by algorithm name,
which register_advantage_estimator extends.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

KL_PENALTIES = ("kl", "abs", "mse", "full")
KL_ESTIMATORS = ("k1", "k3")


# ---------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of ``x`` over entries where ``mask == 1``.

    ``dim=None`` sums over all entries (scalar); otherwise over ``dim``.
    """
    # where (not x * mask) so non-finite garbage at masked positions is ignored
    kept = torch.where(_as_bool(mask), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask == 1``.

    ``dim=None`` averages over all entries (scalar); otherwise over ``dim``.
    An empty selection (all-zero mask) gives 0, not NaN: a batch/row with no
    response tokens contributes nothing.
    """
    total = masked_sum(x, mask, dim)
    count = masked_sum(torch.ones_like(x), mask, dim)
    # clamp keeps the division finite; total is 0 whenever count is 0
    return total / count.clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all entries where ``mask == 1`` (scalar).

    ``unbiased=True`` applies Bessel's correction n / (n - 1). With fewer
    than two entries the correction is undefined and skipped (so the result
    stays finite: 0 for n <= 1).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = masked_sum(torch.ones_like(x), mask)
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Normalise ``x`` to zero mean / unit variance using masked statistics.

    ``(x - mean) / sqrt(var + eps)``. With ``shift_mean=False`` the mean is
    added back: rewards are scaled but keep their sign/level (whitening the
    mean away would turn "all good" batches into half-bad ones). Masked
    positions are returned as 0.
    """
    mask_b = _as_bool(mask)
    mean = masked_mean(x, mask_b)
    var = masked_var(x, mask_b)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask_b, whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------------------
# Log-probabilities, entropy
# ---------------------------------------------------------------------------


def logprobs_from_logits(logits: Tensor, labels: Tensor, grad_in_place: bool = False) -> Tensor:
    """log π(label_t | context) for each position: ``logits[label] - logsumexp(logits)``.

    logits ``[B, T, V]``, labels ``[B, T]`` (int) -> ``[B, T]`` float32.
    Computed in float32: log_softmax in bf16/fp16 loses enough precision to
    bias the importance ratio exp(logp - old_logp).

    Backward keeps one ``[B, T, V]`` tensor (the logits) where ``log_softmax`` + ``gather`` keep and
    make three (the log-softmax, gather's scattered gradient, the softmax gradient): the largest
    tensors of a PPO update. ``grad_in_place=True`` goes further and turns the float32 logits into
    their own gradient during backward; the caller gives them up (it must not read them after
    backward, and the graph can be back-propagated once).
    """
    return _TokenLogProbs.apply(logits.float(), labels.long(), grad_in_place)


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, grad_in_place: bool) -> Tensor:
        lse = by_rows(lambda rows: torch.logsumexp(rows, dim=-1), logits, chunk_elements=2**20)
        ctx.save_for_backward(logits, labels, lse)
        ctx.grad_in_place, ctx.spent = grad_in_place, False
        return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: Tensor):
        # d/dlogits (logits[label] - lse) = onehot(label) - softmax(logits)
        if ctx.spent:
            raise RuntimeError("logprobs_from_logits(grad_in_place=True) was back-propagated twice; its logits "
                               "became the gradient the first time: call it with grad_in_place=False to retain the graph")
        logits, labels, lse = ctx.saved_tensors
        g, index = grad.unsqueeze(-1), labels.unsqueeze(-1)
        if torch.is_grad_enabled():  # create_graph: out of place and differentiable in the logits
            return (logits.softmax(-1) * -g).scatter_add(-1, index, g), None, None
        if ctx.grad_in_place:
            ctx.spent = True
            probs = logits.sub_(lse.unsqueeze(-1)).exp_()
        else:
            probs = (logits - lse.unsqueeze(-1)).exp_()
        return probs.mul_(-g).scatter_add_(-1, index, g), None, None


def by_rows(fn, logits: Tensor, chunk_elements: int) -> Tensor:
    """``fn`` (a reduction over the last dim) applied a few rows of ``logits`` at a time, so its
    temporaries stay small rather than another full ``[B, T, V]``; every row is computed on its own
    either way, so the values are the same."""
    flat = logits.reshape(-1, logits.shape[-1])
    rows = max(1, chunk_elements // max(1, flat.shape[-1]))
    return torch.cat([fn(chunk) for chunk in flat.split(rows)]).reshape(logits.shape[:-1])


def _finite_log_softmax(logits: Tensor) -> Tensor:
    # Tokens banned with -inf logits have p = 0; clamping their log-prob to a
    # finite floor makes p * logp = 0 * finite = 0 instead of 0 * -inf = NaN.
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.clamp(min=torch.finfo(logp.dtype).min)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution: H = -sum_v p_v log p_v.

    logits ``[B, T, V]`` -> ``[B, T]`` float32.
    """
    logp = _finite_log_softmax(logits)
    return -(logp.exp() * logp).sum(dim=-1)


# ---------------------------------------------------------------------------
# KL penalty and rewards [RLHF]
# ---------------------------------------------------------------------------


def kl_per_token(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    penalty: str = "kl",
    estimator: str = "k1",
    logits: Optional[Tensor] = None,
    ref_logits: Optional[Tensor] = None,
) -> Tensor:
    """Per-token penalty approximating KL(π ‖ π_ref), ``[B, T]``.

    Tokens were sampled from the policy π, so with d = log π - log π_ref:

    - ``"kl"``, ``"k1"``: d. Unbiased single-sample KL estimate, but can be
      negative per token (high variance).
    - ``"kl"``, ``"k3"``: (r - 1) - log r with r = π_ref / π = exp(-d).
      Unbiased (E_π[r] = 1), always >= 0 (log r <= r - 1), lower variance [K3].
    - ``"abs"``: |d|.
    - ``"mse"``: 0.5 * d² (the "k2" estimator of [K3]; biased, >= 0).
    - ``"full"``: exact KL over the vocabulary,
      sum_v π_v (log π_v - log π_ref,v); needs ``logits`` and ``ref_logits``
      ``[B, T, V]``. ``estimator`` does not apply.

    The result is not masked; :func:`compute_rewards` applies the mask.
    """
    if penalty not in KL_PENALTIES:
        raise ValueError(
            f"unknown KL penalty {penalty!r}; valid choices: {', '.join(KL_PENALTIES)}"
        )
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; valid choices: {', '.join(KL_ESTIMATORS)}"
        )

    if penalty == "full":
        if logits is None:
            raise ValueError("kl penalty 'full' needs `logits` (policy logits [B, T, V])")
        if ref_logits is None:
            raise ValueError("kl penalty 'full' needs `ref_logits` (reference logits [B, T, V])")
        logp = _finite_log_softmax(logits)
        ref_logp = _finite_log_softmax(ref_logits)
        return (logp.exp() * (logp - ref_logp)).sum(dim=-1)

    d = logprobs - ref_logprobs
    if penalty == "abs":
        return d.abs()
    if penalty == "mse":
        return 0.5 * d.square()
    # penalty == "kl"
    if estimator == "k1":
        return d
    # k3: (r - 1) - log r with r = exp(-d)  ==  expm1(-d) + d.
    # expm1 keeps precision when d is near 0 (the usual case).
    return torch.expm1(-d) + d


def compute_rewards(
    scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float
) -> Tuple[Tensor, Tensor]:
    """Per-token rewards for RLHF PPO [RLHF].

    R_t = -β · KL_t on every response token, plus the reward-model score of
    the whole response added at the last response token (the "action" that
    completes the sequence).

    Args:
        scores: ``[B]`` reward-model score per response.
        kl: ``[B, T]`` per-token KL penalty (see :func:`kl_per_token`).
        mask: ``[B, T]`` response-token mask.
        kl_coef: β.

    Returns:
        rewards ``[B, T]`` and non_score_reward ``[B, T]`` (the -β·KL part
        alone, for logging). Both are 0 on masked positions. A row with no
        response tokens gets no score.
    """
    mask_b = _as_bool(mask)
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
    mask_b = _as_bool(mask)
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
    mask_b = _as_bool(mask)
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
            "ratio_max": _masked_max(ratio, mask_b),
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
    mask_b = _as_bool(mask)
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


def _masked_max(x: Tensor, mask: Tensor) -> Tensor:
    # Max over mask == 1 entries; 0 for an empty mask (consistent with masked_mean).
    if not bool(mask.any()):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x[mask].max()


def is_ratio_extreme(
    logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, threshold: float
) -> bool:
    """Guard: True when the mean importance ratio exceeds ``threshold``.

    A huge mean ratio means the policy has moved far from the one that
    sampled the batch (or numerics blew up); the caller skips the batch
    rather than take a step from a meaningless surrogate.
    """
    mask_b = _as_bool(mask)
    log_ratio = torch.where(mask_b, logprobs - old_logprobs, torch.zeros_like(logprobs))
    return bool(masked_mean(torch.exp(log_ratio.detach()), mask_b) > threshold)


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


# ---------------------------------------------------------------------------
# Critic-free advantages: GRPO, RLOO, REINFORCE++ [GRPO, RLOO, RPP]
#
# A batch holds num_prompts * num_generations responses laid out group by
# group, as TRL's RepeatSampler yields them: prompt 0's num_generations
# responses first, then prompt 1's, ... (``rewards.view(-1, num_generations)``
# gives one row per prompt). Sequence-level tensors are ``[B]``, B =
# num_prompts * num_generations; token-level ones ``[B, T]`` as above.
# Advantages are targets: they are detached and computed in float32.
# ---------------------------------------------------------------------------

SCALE_REWARDS = ("group", "batch", "none")
# Token-level surrogates, aggregated by aggregate_loss (TRL 1.x GRPOTrainer's loss_type values).
TOKEN_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
# "rloo": TRL 1.x RLOOTrainer's sequence-level loss (rloo_sequence_loss).
LOSS_TYPES = TOKEN_LOSS_TYPES + ("rloo",)
# TRL adds this to the std before dividing (advantages / (std + 1e-4)): a
# group with a tiny spread gets a large but finite advantage.
REWARD_STD_EPS = 1e-4


def _groups(rewards: Tensor, num_generations: int) -> Tensor:
    # [B] -> [num_prompts, num_generations] (a view: row i = prompt i's group)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * num_generations], got shape {tuple(rewards.shape)}")
    if not isinstance(num_generations, int) or num_generations < 2:
        raise ValueError(f"num_generations={num_generations!r} must be an int >= 2; a group needs two responses "
                         "to compare (set num_generations to 2 or more)")
    if rewards.numel() == 0 or rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}; "
                         "give num_generations responses for every prompt")
    return rewards.detach().float().view(-1, num_generations)


def _all_equal(groups: Tensor) -> Tensor:
    # [P, G] -> [P] bool: every reward of the group is the same number
    return groups.amax(dim=1) == groups.amin(dim=1)


def zero_std_groups(rewards: Tensor, num_generations: int) -> Tuple[Tensor, Tensor]:
    """Groups whose rewards are all equal: ``(count, fraction)``.

    Such a group carries no learning signal: every advantage estimator here
    gives its responses exactly zero advantage. The fraction is TRL's
    ``frac_reward_zero_std``. "All equal" is tested exactly (max == min).
    TRL tests ``isclose(std, 0)`` (atol 1e-8) instead, which can miss an
    all-equal group: the float32 mean of equal numbers can be off by an ulp,
    giving a std of ~1e-7. Under ``scale_rewards="batch"`` TRL tests the
    batch std; this one always counts groups.
    """
    equal = _all_equal(_groups(rewards, num_generations))
    return equal.sum(), equal.float().mean()


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
    groups = _groups(rewards, num_generations)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (groups.std(dim=1, correction=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (groups.std(correction=1) + eps)
    advantages = torch.where(_all_equal(groups).unsqueeze(1), torch.zeros_like(advantages), advantages)
    return advantages.reshape(-1)


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
    groups = _groups(rewards, num_generations)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (num_generations - 1)
    advantages = groups - others_mean
    if normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std(correction=1) + eps)
    advantages = torch.where(_all_equal(groups).unsqueeze(1), torch.zeros_like(advantages), advantages)
    return advantages.reshape(-1)


def sequence_rewards(
    scores: Tensor, mask: Tensor, kl: Optional[Tensor] = None, beta: float = 0.0
) -> Tensor:
    """Reward per response ``[B]`` with the KL penalty in the reward (TRL's RLOO).

        R_i = score_i - β · sum_t KL_{i,t}     (sum over i's response tokens)

    ``kl`` ``[B, T]`` is a per-token estimate from :func:`kl_per_token`,
    computed with the log-probs of the policy that sampled the batch (TRL's
    RLOO uses k1, log π_old - log π_ref, which can be negative per token).
    ``kl=None`` (KL not in the reward, e.g. GRPO's KL loss term) gives the
    scores themselves.
    """
    scores = scores.detach().float()
    if kl is None:
        return scores
    return scores - beta * masked_sum(kl.detach().float(), mask, dim=1)


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
    mask_b = _as_bool(mask)
    scores = scores.detach().float()
    kl = torch.zeros(mask_b.shape, device=scores.device) if kl is None else kl.detach().float()
    token_rewards, _ = compute_rewards(scores, kl, mask_b, beta)
    returns, _ = compute_gae(token_rewards, torch.zeros_like(token_rewards), mask_b, gamma, 1.0)
    return masked_whiten(returns, mask_b)


def broadcast_to_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """A per-response value ``[B]`` on every response token ``[B, T]``; 0 on padding.

    GRPO and RLOO give the whole response one advantage: every token of
    response i gets A_i.
    """
    mask_b = _as_bool(mask)
    return torch.where(mask_b, values.unsqueeze(1).to(torch.float32), torch.zeros(mask_b.shape, device=values.device))


def drop_truncated_completions(mask: Tensor, truncated: Tensor) -> Tensor:
    """TRL's ``mask_truncated_completions``: responses cut off at the length limit leave the loss.

    ``truncated`` ``[B]`` bool: the response ended without EOS. Its mask row
    becomes all 0, so it adds nothing to any loss or token count (DAPO's
    overlong filtering [DAPO]); its reward still counts in its group's
    statistics. Returns a new mask of ``mask``'s dtype.
    """
    keep = ~_as_bool(truncated).unsqueeze(1)
    return torch.where(keep, mask, torch.zeros_like(mask))


# ---------------------------------------------------------------------------
# Advantage estimators by name (one signature, so one loop runs them all)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvantageSettings:
    """What the estimators need besides the batch; TRL 1.x names.

    num_generations: responses per prompt (the group size G).
    beta: KL coefficient β, applied in the reward when the estimator is given
        a ``kl`` tensor (the KL as a loss term is :func:`kl_loss_per_token`).
    scale_rewards: "group" | "batch" | "none" (``grpo`` only).
    normalize_advantages: whiten over the batch (``rloo`` only).
    gamma: discount of the return to go (``reinforce_pp`` only).
    """

    num_generations: int = 2
    beta: float = 0.0
    scale_rewards: str = "group"
    normalize_advantages: bool = False
    gamma: float = 1.0

    def __post_init__(self):
        if not isinstance(self.num_generations, int) or self.num_generations < 1:
            raise ValueError(f"num_generations={self.num_generations!r} must be an int >= 1")
        if not self.beta >= 0:
            raise ValueError(f"beta={self.beta} must be >= 0; 0 turns the KL penalty off")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"unknown scale_rewards {self.scale_rewards!r}; valid choices: {', '.join(SCALE_REWARDS)}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma} must be in [0, 1]; 1 (no discount) is usual")


AdvantageEstimator = Callable[[Tensor, Tensor, Optional[Tensor], AdvantageSettings], Tensor]
"""``(scores [B], mask [B, T], kl [B, T] or None, settings) -> advantages [B, T]``.

``kl`` given = the KL penalty goes in the reward (β = settings.beta); None =
it does not (GRPO puts it in the loss instead). Advantages are 0 on padding.
"""

_ADVANTAGE_ESTIMATORS: Dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: make ``fn`` the advantage estimator of algorithm ``name``."""

    def register(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in _ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return register


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered for algorithm ``name``."""
    if name not in _ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid choices: {', '.join(advantage_estimators())}")
    return _ADVANTAGE_ESTIMATORS[name]


def advantage_estimators() -> Tuple[str, ...]:
    """Names of the registered estimators, sorted."""
    return tuple(sorted(_ADVANTAGE_ESTIMATORS))


@register_advantage_estimator("grpo")
def _grpo(scores: Tensor, mask: Tensor, kl: Optional[Tensor], settings: AdvantageSettings) -> Tensor:
    # Dr. GRPO is this with scale_rewards="none" and loss_type="dr_grpo".
    rewards = sequence_rewards(scores, mask, kl, settings.beta)
    advantages = group_relative_advantages(rewards, settings.num_generations, settings.scale_rewards)
    return broadcast_to_tokens(advantages, mask)


@register_advantage_estimator("rloo")
def _rloo(scores: Tensor, mask: Tensor, kl: Optional[Tensor], settings: AdvantageSettings) -> Tensor:
    rewards = sequence_rewards(scores, mask, kl, settings.beta)
    advantages = leave_one_out_advantages(rewards, settings.num_generations, settings.normalize_advantages)
    return broadcast_to_tokens(advantages, mask)


@register_advantage_estimator("reinforce_pp")
def _reinforce_pp(scores: Tensor, mask: Tensor, kl: Optional[Tensor], settings: AdvantageSettings) -> Tensor:
    # No group baseline: num_generations only shapes the batch here.
    return reinforce_pp_advantages(scores, mask, kl, settings.beta, settings.gamma)


# ---------------------------------------------------------------------------
# Critic-free losses: clip higher, KL term, aggregation [GRPO, DAPO, DRGRPO]
# ---------------------------------------------------------------------------


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
    mask_b = _as_bool(mask)
    zeros = torch.zeros_like(logprobs)
    # Zero log-ratio and advantage at padding: garbage there must not overflow exp() or reach the gradient.
    log_ratio = torch.where(mask_b, logprobs - old_logprobs, zeros)
    advantages = torch.where(mask_b, advantages.detach().to(logprobs.dtype), zeros)
    per_token, low, high = _clipped_objective(torch.exp(log_ratio), advantages, epsilon, epsilon_high)
    per_token = torch.where(mask_b, per_token, zeros)

    with torch.no_grad():
        has_tokens = mask_b.any(dim=1)
        stats = {
            "clip_ratio/low_mean": masked_mean(low, mask_b),
            "clip_ratio/high_mean": masked_mean(high, mask_b),
            "clip_ratio/region_mean": masked_mean(torch.maximum(low, high), mask_b),
            "clip_ratio/low_min": _masked_min(masked_mean(low, mask_b, dim=1), has_tokens),
            "clip_ratio/high_max": _masked_max(masked_mean(high, mask_b, dim=1), has_tokens),
        }
    return per_token, {k: v.detach() for k, v in stats.items()}


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
    sampling policy's. Unlike :func:`clipped_surrogate` + :func:`aggregate_loss`,
    the ratio is the whole response's probability ratio (the product over its
    tokens, not a token's), so a response is clipped as a whole, and the
    gradient is -A_i ∇ sum_t log π at ratio 1: a response's tokens weigh by
    their number, not divided by it. A response with an empty mask (dropped by
    :func:`drop_truncated_completions`) has ratio 1: it adds -A_i to the mean
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
    mask_b = _as_bool(mask)
    log_ratio = masked_sum(logprobs, mask_b, dim=1) - masked_sum(old_logprobs.detach(), mask_b, dim=1)
    advantages = advantages.detach().to(logprobs.dtype)
    per_response, low, high = _clipped_objective(torch.exp(log_ratio), advantages, epsilon, epsilon_high)
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


def _clipped_objective(ratio: Tensor, advantages: Tensor, epsilon: float,
                       epsilon_high: float) -> Tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped objective per item (token or response), negated as a loss, and where each clip bites:
    ``low`` (ratio < 1 - ε with A < 0) and ``high`` (ratio > 1 + ε_high with A > 0), as float masks."""
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    with torch.no_grad():
        low = ((ratio < 1.0 - epsilon) & (advantages < 0)).float()
        high = ((ratio > 1.0 + epsilon_high) & (advantages > 0)).float()
    return loss, low, high


def _masked_min(x: Tensor, mask: Tensor) -> Tensor:
    # Min over mask == 1 entries; 0 for an empty mask (as _masked_max).
    if not bool(mask.any()):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x[mask].min()


def kl_loss_per_token(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GRPO's KL term, per token ``[B, T]`` [GRPO eq. 4, K3].

        KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

    the k3 estimator of KL(π_θ ‖ π_ref) (>= 0, unbiased), differentiated
    through ``logprobs`` (the policy being updated, not the sampling one).
    The loss adds β · KL_t to each token's surrogate before aggregation, as
    TRL: ``loss = aggregate_loss(surrogate + beta * kl, ...)``; TRL logs its
    token mean as ``kl``. 0 on padding (with zero gradient there).
    """
    mask_b = _as_bool(mask)
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
    mask_b = _as_bool(mask)
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
