"""The math every RL algorithm here shares: masked statistics, log-probs and entropy from logits, KL
estimators, PPO's clipped objective and the ratio guard. Pure functions (no state; inputs never modified).

References: [PPO] Schulman et al. 2017; [RLHF] Ziegler et al. 2019, Stiennon et al. 2020; [K3] Schulman
2020, "Approximating KL Divergence".

Conventions
-----------
Unless noted, every tensor is ``[B, T]`` over *response tokens* (the prompt is not part of T), with a
``mask`` ``[B, T]`` (float or bool): 1 = real response token, 0 = padding / after EOS. The mask is assumed
to be a contiguous prefix of each row (response tokens, then padding).

Masked positions may hold garbage (even very large numbers); every function selects with ``torch.where``
rather than multiplying by the mask, so such values never reach the result (``huge * 0`` would be fine,
but ``inf * 0`` is NaN) and receive zero gradient.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

KL_PENALTIES = ("kl", "abs", "mse", "full")
KL_ESTIMATORS = ("k1", "k3")


# ---------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------


def as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of ``x`` over entries where ``mask == 1``.

    ``dim=None`` sums over all entries (scalar); otherwise over ``dim``.
    """
    # where (not x * mask) so non-finite garbage at masked positions is ignored
    kept = torch.where(as_bool(mask), x, torch.zeros_like(x))
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
    mask_b = as_bool(mask)
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
# KL estimators [K3]
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

    The result is not masked; the caller masks it (PPO's ``compute_rewards``).
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


# ---------------------------------------------------------------------------
# Clipped objective and the ratio guard [PPO]
# ---------------------------------------------------------------------------


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    # Max over mask == 1 entries; 0 for an empty mask (consistent with masked_mean).
    if not bool(mask.any()):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x[mask].max()


def masked_min(x: Tensor, mask: Tensor) -> Tensor:
    # Min over mask == 1 entries; 0 for an empty mask (as masked_max).
    if not bool(mask.any()):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x[mask].min()


def is_ratio_extreme(
    logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, threshold: float
) -> bool:
    """Guard: True when the mean importance ratio exceeds ``threshold``.

    A huge mean ratio means the policy has moved far from the one that
    sampled the batch (or numerics blew up); the caller skips the batch
    rather than take a step from a meaningless surrogate.
    """
    mask_b = as_bool(mask)
    log_ratio = torch.where(mask_b, logprobs - old_logprobs, torch.zeros_like(logprobs))
    return bool(masked_mean(torch.exp(log_ratio.detach()), mask_b) > threshold)


def clipped_objective(ratio: Tensor, advantages: Tensor, epsilon: float,
                      epsilon_high: float) -> Tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped objective per item (token or response), negated as a loss, and where each clip bites:
    ``low`` (ratio < 1 - ε with A < 0) and ``high`` (ratio > 1 + ε_high with A > 0), as float masks."""
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    with torch.no_grad():
        low = ((ratio < 1.0 - epsilon) & (advantages < 0)).float()
        high = ((ratio > 1.0 + epsilon_high) & (advantages > 0)).float()
    return loss, low, high


@torch.no_grad()
def entropy_for_logging(logits: Tensor) -> Tensor:
    """:func:`entropy_from_logits` when the entropy is only logged (no bonus): no autograd graph over
    [B, T, vocab], and a few rows at a time."""
    return by_rows(entropy_from_logits, logits, chunk_elements=2**19)


def list_mean(values: list[float]) -> float:
    """The mean of a list of numbers (metrics over micro-batches); NaN for an empty list."""
    return sum(values) / len(values) if values else float("nan")
