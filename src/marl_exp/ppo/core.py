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
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

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
