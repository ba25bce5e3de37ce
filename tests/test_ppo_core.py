"""Hand-computed checks for the shared RL math (marl_exp.rl.functional) and PPO's (marl_exp.rl.algorithms.ppo).

Every expected number is worked out in a comment next to it; the tests do not
re-run the implementation's formulas.
"""

import math

import pytest
import torch

from marl_exp.rl.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    compute_rewards,
    make_kl_controller,
    policy_loss,
    value_loss,
)
from marl_exp.rl.functional import (
    entropy_from_logits,
    is_ratio_extreme,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)


def close(actual, expected, atol=1e-5):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual.float(), expected, atol=atol, rtol=0)


# ---------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_sum_and_mean():
    # selected entries: 1, 2, 4
    close(masked_sum(X, M), 7.0)
    close(masked_mean(X, M), 7.0 / 3.0)
    # per row: (1+2)/2 = 1.5, 4/1 = 4
    close(masked_sum(X, M, dim=1), [3.0, 4.0])
    close(masked_mean(X, M, dim=1), [1.5, 4.0])
    # bool mask gives the same
    close(masked_mean(X, M.bool()), 7.0 / 3.0)


def test_masked_mean_ignores_nonfinite_padding():
    x = torch.tensor([[1.0, 3.0, float("inf"), float("nan")]])
    m = torch.tensor([[1, 1, 0, 0]])
    close(masked_mean(x, m), 2.0)


def test_masked_var():
    # entries 1, 2, 4: mean 7/3; deviations -4/3, -1/3, 5/3;
    # squares 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    # biased = 14/3 / 3 = 14/9; unbiased = 14/3 / 2 = 7/3
    close(masked_var(X, M, unbiased=False), 14.0 / 9.0)
    close(masked_var(X, M, unbiased=True), 7.0 / 3.0)


def test_masked_whiten():
    x = torch.tensor([[2.0, 4.0, 1e6], [6.0, 1e6, -1e6]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # entries 2, 4, 6: mean 4; unbiased var = (4 + 0 + 4) / 2 = 4; std 2
    # whitened: (2-4)/2 = -1, 0, (6-4)/2 = 1; masked -> 0
    w = masked_whiten(x, m)
    close(w, [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    close(masked_mean(w, m), 0.0)
    close(masked_var(w, m), 1.0)
    # shift_mean=False: scale only, mean 4 is added back -> 3, 4, 5
    w2 = masked_whiten(x, m, shift_mean=False)
    close(w2, [[3.0, 4.0, 0.0], [5.0, 0.0, 0.0]])
    close(masked_mean(w2, m), 4.0)


def test_all_zero_mask_gives_zero_not_nan():
    z = torch.zeros(2, 3)
    close(masked_mean(X, z), 0.0)
    close(masked_mean(X, z, dim=1), [0.0, 0.0])
    close(masked_sum(X, z), 0.0)
    close(masked_var(X, z), 0.0)
    close(masked_whiten(X, z), torch.zeros(2, 3))
    # a single empty row among non-empty ones
    close(masked_mean(X, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), dim=1), [1.5, 0.0])

    loss, stats = policy_loss(X, X - 1.0, X, z, 0.2)
    close(loss, 0.0)
    for v in stats.values():
        assert torch.isfinite(v).all()
    vloss, vstats = value_loss(X, X, X + 1.0, z, 0.2)
    close(vloss, 0.0)
    for v in vstats.values():
        assert torch.isfinite(v).all()
    adv, ret = compute_gae(X, X, z, 0.9, 0.8)
    close(adv, torch.zeros(2, 3))
    close(ret, torch.zeros(2, 3))


# ---------------------------------------------------------------------------
# logprobs / entropy
# ---------------------------------------------------------------------------

LN3 = math.log(3.0)


def test_logprobs_from_logits():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; logits [0, 0] -> [1/2, 1/2]
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0]])
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (1, 2)
    close(out, [[math.log(0.75), math.log(0.5)]])
    # half-precision input still gives float32 output
    out_bf16 = logprobs_from_logits(logits.to(torch.bfloat16), labels)
    assert out_bf16.dtype == torch.float32
    close(out_bf16, [[math.log(0.75), math.log(0.5)]], atol=1e-2)


@pytest.mark.parametrize("grad_in_place", [False, True], ids=["copy", "in_place"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_logits_gradient_is_log_softmax_gather(dtype, grad_in_place):
    """Values and gradients equal log_softmax + gather (the textbook form), also with banned (-inf) tokens
    and a temperature division in front, as the PPO update has it."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50).to(dtype)
    logits[0, 0, 7] = float("-inf")
    labels = torch.randint(0, 50, (3, 5))
    labels[0, 0] = 8
    weights = torch.randn(3, 5)
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = logprobs_from_logits(ours / 0.7, labels, grad_in_place=grad_in_place)
    expected = torch.log_softmax((ref / 0.7).float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(out, expected, atol=1e-6)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.isfinite(ours.grad.float()).all() and ours.grad[0, 0, 7] == 0
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-6, rtol=1e-5)


def test_logprobs_from_logits_backward_is_exact_and_guarded():
    from marl_exp.rl.functional import _TokenLogProbs

    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(lambda t: _TokenLogProbs.apply(t, labels, False), (x,))
    # create_graph (second derivatives) takes the recorded path even when in place was asked for
    assert torch.autograd.gradgradcheck(lambda t: _TokenLogProbs.apply(t * 1.0, labels, True), (x,))
    # in place: the logits became the gradient, so a second backward through the graph must fail loudly
    out = logprobs_from_logits(torch.randn(2, 3, 7, requires_grad=True) * 1.0, labels, grad_in_place=True)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated twice"):
        out.sum().backward()
    # without it the graph can be retained and gives the same gradient twice
    leaf = torch.randn(2, 3, 7, requires_grad=True)
    out = logprobs_from_logits(leaf * 1.0, labels)
    first = torch.autograd.grad(out.sum(), leaf, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(out.sum(), leaf)[0], first)
    with torch.inference_mode():  # scoring calls it without autograd
        close(logprobs_from_logits(leaf.detach(), labels), out.detach())


def test_entropy_from_logits():
    # uniform over 4 -> ln 4
    # [0, ln 3] -> p = [1/4, 3/4]: H = 1/4 ln 4 + 3/4 ln(4/3) = ln 4 - 3/4 ln 3
    # [0, -inf] -> p = [1, 0]: H = 0 (not NaN)
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, LN3, -1e9, -1e9], [0.0, float("-inf"), float("-inf"), float("-inf")]]]
    )
    h = entropy_from_logits(logits)
    assert h.shape == (1, 3)
    close(h, [[math.log(4), math.log(4) - 0.75 * LN3, 0.0]])


# ---------------------------------------------------------------------------
# KL penalties
# ---------------------------------------------------------------------------

LOGP = torch.tensor([[-1.0, -2.0]])
REF = torch.tensor([[-1.5, -1.0]])  # d = logp - ref = [0.5, -1.0]


def test_kl_k1_abs_mse():
    close(kl_per_token(LOGP, REF, "kl", "k1"), [[0.5, -1.0]])
    close(kl_per_token(LOGP, REF, "abs"), [[0.5, 1.0]])
    # 0.5 * 0.25 = 0.125; 0.5 * 1 = 0.5
    close(kl_per_token(LOGP, REF, "mse"), [[0.125, 0.5]])


def test_kl_k3():
    # d = 0.5:  r = e^-0.5 = 0.6065306597; (r - 1) - ln r = -0.3934693403 + 0.5 = 0.1065306597
    # d = -1:   r = e = 2.7182818285;      (r - 1) - ln r = 1.7182818285 - 1 = 0.7182818285
    k3 = kl_per_token(LOGP, REF, "kl", "k3")
    close(k3, [[0.1065306597, 0.7182818285]])
    # k3 is >= 0 everywhere (ln r <= r - 1), and 0 exactly when d = 0
    d = torch.linspace(-5, 5, 41).unsqueeze(0)
    k3_grid = kl_per_token(d, torch.zeros_like(d), "kl", "k3")
    assert (k3_grid >= 0).all()
    close(k3_grid[0, 20], 0.0)


def test_kl_full():
    # p = softmax([0, ln 3]) = [1/4, 3/4], q = softmax([0, 0]) = [1/2, 1/2]
    # KL(p||q) = 1/4 ln(1/4 / 1/2) + 3/4 ln(3/4 / 1/2)
    #          = 1/4 ln(1/2) + 3/4 ln(3/2)
    #          = -0.1732868 + 0.3040988 = 0.1308120
    # second position: identical distributions -> 0
    logits = torch.tensor([[[0.0, LN3], [1.0, 2.0]]])
    ref_logits = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    kl = kl_per_token(LOGP, REF, "full", logits=logits, ref_logits=ref_logits)
    assert kl.shape == (1, 2)
    close(kl, [[0.1308120, 0.0]])


def test_kl_errors():
    with pytest.raises(ValueError, match="'foo'.*kl, abs, mse, full"):
        kl_per_token(LOGP, REF, penalty="foo")
    with pytest.raises(ValueError, match="'k2'.*k1, k3"):
        kl_per_token(LOGP, REF, estimator="k2")
    logits = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="`logits`"):
        kl_per_token(LOGP, REF, "full", ref_logits=logits)
    with pytest.raises(ValueError, match="`ref_logits`"):
        kl_per_token(LOGP, REF, "full", logits=logits)


# ---------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------


def test_compute_rewards_ragged():
    scores = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 99.0, 99.0], [99.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    rewards, non_score = compute_rewards(scores, kl, mask, kl_coef=0.5)
    # non-score = -0.5 * kl on real tokens: -0.05, -0.1, -0.15 | -0.2 | nothing
    close(non_score, [[-0.05, -0.1, -0.15], [-0.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # score on the last real token: row 0 at t=2 (-0.15 + 1 = 0.85),
    # row 1 at t=0 (-0.2 + 2 = 1.8), row 2 has no tokens -> no score
    close(rewards, [[-0.05, -0.1, 0.85], [1.8, 0.0, 0.0], [0.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------


def test_gae_full_mask():
    # gamma = 0.9, lam = 0.8, gamma*lam = 0.72; V after t=2 is 0 (terminal)
    # r = [1, 0, 2], V = [0.5, 1.0, 1.5]
    # d2 = 2 + 0.9*0   - 1.5 = 0.5
    # d1 = 0 + 0.9*1.5 - 1.0 = 0.35
    # d0 = 1 + 0.9*1.0 - 0.5 = 1.4
    # A2 = 0.5
    # A1 = 0.35 + 0.72*0.5  = 0.71
    # A0 = 1.4  + 0.72*0.71 = 1.9112
    # returns = A + V = [2.4112, 1.71, 2.0]
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]], requires_grad=True)
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    close(adv, [[1.9112, 0.71, 0.5]])
    close(ret, [[2.4112, 1.71, 2.0]])
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_mask_ends_early():
    # row 0 ends after t=1; huge reward/value at t=2 must not leak back.
    # r = [1, 2, *], V = [0.5, 1.0, *], V after t=1 = 0
    # d1 = 2 + 0.9*0 - 1.0 = 1.0              A1 = 1.0
    # d0 = 1 + 0.9*1.0 - 0.5 = 1.4            A0 = 1.4 + 0.72*1.0 = 2.12
    # returns = [2.62, 2.0, 0]
    # row 1 (full, same as test above) shows rows do not interact.
    rewards = torch.tensor([[1.0, 2.0, 1e9], [1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1e9], [0.5, 1.0, 1.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[2.12, 1.0, 0.0], [1.9112, 0.71, 0.5]])
    close(ret, [[2.62, 2.0, 0.0], [2.4112, 1.71, 2.0]])


def test_gae_lambda_one_gamma_one_is_monte_carlo():
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t
    # r = [1, 2, 3], V = [4, 5, 6] -> returns-to-go [6, 5, 3], A = [2, 0, -3]
    adv, ret = compute_gae(
        torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[4.0, 5.0, 6.0]]), torch.ones(1, 3), 1.0, 1.0
    )
    close(adv, [[2.0, 0.0, -3.0]])
    close(ret, [[6.0, 5.0, 3.0]])


# ---------------------------------------------------------------------------
# policy loss
# ---------------------------------------------------------------------------


def _policy_case():
    # eps = 0.2 -> clip range [0.8, 1.2]; per token max(-A*r, -A*clip(r)):
    #  a: A=+1, r=1.1: -1.1 vs -1.1 -> -1.1  (inside, not clipped)
    #  b: A=+1, r=1.5: -1.5 vs -1.2 -> -1.2  (clipped active)
    #  c: A=+1, r=0.5: -0.5 vs -0.8 -> -0.5  (not clipped: pessimistic side)
    #  d: A=-1, r=0.5:  0.5 vs  0.8 ->  0.8  (clipped active)
    #  e: A=-1, r=1.5:  1.5 vs  1.2 ->  1.5  (not clipped: pessimistic side)
    #  f: A=-1, r=0.9:  0.9 vs  0.9 ->  0.9  (inside)
    #  g: masked, ratio e^50, A=100 -> ignored
    # loss = (-1.1 - 1.2 - 0.5 + 0.8 + 1.5 + 0.9) / 6 = 0.4 / 6
    ratios = [1.1, 1.5, 0.5, 0.5, 1.5, 0.9]
    logprobs = torch.tensor([[math.log(r) for r in ratios] + [50.0]], requires_grad=True)
    old_logprobs = torch.zeros(1, 7)
    advantages = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    return logprobs, old_logprobs, advantages, mask


def test_policy_loss_values_and_stats():
    logprobs, old, adv, mask = _policy_case()
    loss, stats = policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    close(loss, 0.4 / 6)
    # clipped active on b and d: 2/6
    close(stats["clipfrac"], 2.0 / 6.0)
    # ln r: ln1.1 = 0.0953102, ln1.5 = 0.4054651, ln0.5 = -0.6931472, ln0.9 = -0.1053605
    # squares: 0.0090840, 0.1644020, 0.4804530, 0.4804530, 0.1644020, 0.0111008
    # sum = 1.3098948; mean = 0.2183158; approxkl = 0.5 * mean = 0.1091579
    close(stats["approxkl"], 0.1091579)
    # (r-1) - ln r: 0.0046898, 0.0945349, 0.1931472, 0.1931472, 0.0945349, 0.0053605
    # sum = 0.5854145; mean = 0.0975691
    close(stats["approxkl_k3"], 0.0975691)
    # ratios 1.1+1.5+0.5+0.5+1.5+0.9 = 6.0 -> mean 1.0; max 1.5 (masked e^50 excluded)
    close(stats["ratio_mean"], 1.0)
    close(stats["ratio_max"], 1.5)
    for v in stats.values():
        assert v.dim() == 0 and not v.requires_grad


def test_policy_loss_unclipped_regime_equals_plain_surrogate():
    # all ratios inside [0.8, 1.2]: loss = mean(-A * r) = -(2*1.1 + (-1)*0.9) / 2 = -0.65
    logprobs = torch.log(torch.tensor([[1.1, 0.9]]))
    loss, stats = policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([[2.0, -1.0]]), torch.ones(1, 2), 0.2)
    close(loss, -0.65)
    close(stats["clipfrac"], 0.0)


def test_policy_loss_gradients():
    logprobs, old, adv, mask = _policy_case()
    loss, _ = policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    loss.backward()
    # d/dlogp of -A*r/6 is -A*r/6 where the unclipped term is active; 0 where clipped.
    # a: -1.1/6, b: 0, c: -0.5/6, d: 0, e: +1.5/6, f: +0.9/6, g (masked): 0
    close(logprobs.grad, [[-1.1 / 6, 0.0, -0.5 / 6, 0.0, 1.5 / 6, 0.9 / 6, 0.0]])


# ---------------------------------------------------------------------------
# value loss
# ---------------------------------------------------------------------------


def _value_case():
    # c = 0.2; v_clip = old + clip(v - old, -0.2, 0.2)
    #  1: old 1, v  1.5, R  2: v_clip 1.2;  (v-R)^2 0.25, (vc-R)^2 0.64 -> 0.64 (clipped)
    #  2: old 1, v  1.5, R  1: v_clip 1.2;  0.25 vs 0.04 -> 0.25
    #  3: old 1, v  1.1, R  0: v_clip 1.1;  1.21 vs 1.21 -> 1.21 (equal: not counted)
    #  4: old 0, v -0.5, R  0: v_clip -0.2; 0.25 vs 0.04 -> 0.25
    #  5: old 0, v -0.5, R -1: v_clip -0.2; 0.25 vs 0.64 -> 0.64 (clipped)
    #  6: masked, garbage
    # loss = 0.5 * (0.64+0.25+1.21+0.25+0.64)/5 = 0.5 * 2.99/5 = 0.299
    values = torch.tensor([[1.5, 1.5, 1.1, -0.5, -0.5, 1e4]], requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0, 0.0, -1.0, -1e4]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    return values, old_values, returns, mask


def test_value_loss_values_and_stats():
    values, old, ret, mask = _value_case()
    loss, stats = value_loss(values, old, ret, mask, cliprange_value=0.2)
    close(loss, 0.299)
    close(stats["clipfrac"], 2.0 / 5.0)
    # vpred = (1.5+1.5+1.1-0.5-0.5)/5 = 3.1/5 = 0.62
    close(stats["vpred"], 0.62)
    # error = (0.25+0.25+1.21+0.25+0.25)/5 = 2.21/5 = 0.442
    close(stats["error"], 0.442)


def test_value_loss_gradients():
    values, old, ret, mask = _value_case()
    loss, _ = value_loss(values, old, ret, mask, cliprange_value=0.2)
    loss.backward()
    # unclipped term active: d/dv 0.5*(v-R)^2/5 = (v-R)/5; clipped (saturated clamp): 0
    # 1: 0, 2: 0.5/5 = 0.1, 3: 1.1/5 = 0.22, 4: -0.5/5 = -0.1, 5: 0, 6 (masked): 0
    close(values.grad, [[0.0, 0.1, 0.22, -0.1, 0.0, 0.0]])


# ---------------------------------------------------------------------------
# ratio guard
# ---------------------------------------------------------------------------


def test_is_ratio_extreme():
    # ratios over real tokens: 1 and 4 -> mean 2.5; masked token has ratio e^20
    logprobs = torch.tensor([[0.0, math.log(4.0), 20.0]])
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    assert is_ratio_extreme(logprobs, old, mask, threshold=2.0) is True
    assert is_ratio_extreme(logprobs, old, mask, threshold=3.0) is False


# ---------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------


def test_adaptive_kl_update_clipped_high():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # error = 12/6 - 1 = 1 -> clipped to 0.2; value = 0.2 * (1 + 0.2*256/10000) = 0.2 * 1.00512
    ctl.update(12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024)


def test_adaptive_kl_update_clipped_low_and_inside():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # error = 0/6 - 1 = -1 -> clipped to -0.2; value = 0.2 * (1 - 0.00512) = 0.198976
    ctl.update(0.0, n_steps=256)
    assert ctl.value == pytest.approx(0.198976)
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # error = 6.6/6 - 1 = 0.1 (inside); value = 0.2 * (1 + 0.1*256/10000) = 0.2 * 1.00256 = 0.200512
    ctl.update(6.6, n_steps=256)
    assert ctl.value == pytest.approx(0.200512)


def test_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, 256)
    fresh = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value == pytest.approx(0.201024)

    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_make_kl_controller():
    assert isinstance(make_kl_controller(True, 0.2, 6.0, 10000), AdaptiveKLController)
    fixed = make_kl_controller(False, 0.1, None, None)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.1
    with pytest.raises(ValueError, match="target=0"):
        make_kl_controller(True, 0.2, 0.0, 10000)
    with pytest.raises(ValueError, match="horizon=-1"):
        make_kl_controller(True, 0.2, 6.0, -1)
    with pytest.raises(ValueError, match="init_kl_coef=-0.1"):
        make_kl_controller(False, -0.1, None, None)
