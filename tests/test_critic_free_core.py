"""Hand-computed checks for the critic-free math in marl_exp.rl.algorithms (GRPO, RLOO, REINFORCE++).

Every expected number is worked out in a comment next to it; the tests do not re-run the
implementation's formulas. Conventions checked are TRL 1.x's (Bessel std, + 1e-4 after the std,
group-by-group layout, clip_ratio/* metrics, loss_type denominators).
"""

import math

import pytest
import torch

from marl_exp import config
from marl_exp.rl.algorithms.critic_free import drop_truncated_completions
from marl_exp.rl.algorithms.groups import (
    AdvantageSettings,
    _ADVANTAGE_ESTIMATORS,
    advantage_estimators,
    broadcast_to_tokens,
    get_advantage_estimator,
    register_advantage_estimator,
    sequence_rewards,
    zero_std_groups,
)
from marl_exp.rl.algorithms.grpo import aggregate_loss, clipped_surrogate, group_relative_advantages, kl_loss_per_token
from marl_exp.rl.algorithms.reinforce_pp import reinforce_pp_advantages
from marl_exp.rl.algorithms.rloo import leave_one_out_advantages


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual.float(), expected, atol=atol, rtol=0)


# Three prompts, num_generations = 3, laid out group by group (TRL's RepeatSampler order):
#   prompt 0: [1, 2, 3]   prompt 1: [5, 5, 5] (all equal)   prompt 2: [0, 0, 6]
REWARDS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 0.0, 6.0])


# ---------------------------------------------------------------------------
# GRPO: group-normalised advantages
# ---------------------------------------------------------------------------


def test_grpo_scale_group_bessel_std_plus_eps():
    # prompt 0: mean 2, deviations -1, 0, 1; Bessel var (1 + 0 + 1) / 2 = 1, std 1
    #   A = [-1, 0, 1] / (1 + 1e-4) = ±0.99990001   (sqrt(var + 1e-4) would give 0.99995; biased std 0.8165)
    # prompt 1: all equal -> 0
    # prompt 2: mean 2, deviations -2, -2, 4; Bessel var (4 + 4 + 16) / 2 = 12, std sqrt(12) = 3.4641016
    #   A = [-2, -2, 4] / 3.4642016 = -0.5773336, -0.5773336, 1.1546672
    adv = group_relative_advantages(REWARDS, num_generations=3, scale_rewards="group")
    close(adv, [-0.99990001, 0.0, 0.99990001, 0.0, 0.0, 0.0, -0.5773336, -0.5773336, 1.1546672])


def test_grpo_scale_batch_uses_batch_std_and_group_mean():
    # batch of 9: sum 27, mean 3; deviations -2 -1 0 2 2 2 -3 -3 3; squares sum 4+1+0+4+4+4+9+9+9 = 44
    # Bessel var 44 / 8 = 5.5, std 2.3452079; divide (r - group mean) by 2.3453079:
    # prompt 0: [-1, 0, 1] -> ∓0.4263833; prompt 1: 0; prompt 2: [-2, -2, 4] -> -0.8527665, 1.7055330
    adv = group_relative_advantages(REWARDS, 3, scale_rewards="batch")
    close(adv, [-0.4263833, 0.0, 0.4263833, 0.0, 0.0, 0.0, -0.8527665, -0.8527665, 1.7055330])


def test_grpo_scale_none_is_centring_only():
    # Dr. GRPO: r - group mean, no division
    adv = group_relative_advantages(REWARDS, 3, scale_rewards="none")
    close(adv, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -2.0, -2.0, 4.0])


def test_grpo_layout_is_group_by_group():
    # the same six rewards, grouped [1, 3 | 10, 30] (consecutive), not [1, 10 | 3, 30] (interleaved):
    # G = 2, scale none: [1, 3] -> [-1, 1]; [10, 30] -> [-10, 10]
    adv = group_relative_advantages(torch.tensor([1.0, 3.0, 10.0, 30.0]), 2, scale_rewards="none")
    close(adv, [-1.0, 1.0, -10.0, 10.0])


def test_all_equal_groups_get_exactly_zero_advantage():
    # In float32 the mean of three copies of -1.3526537 is off by an ulp: r - mean = 1.19e-7 and the
    # std 1.46e-7, so (r - mean) / (std + 1e-4) = 1.2e-3, not 0 (TRL's formula; its isclose(std, 0)
    # test does not count the group either). Here every all-equal group gives exactly 0, under every
    # scaling and estimator.
    rewards = torch.tensor([-1.3526537, -1.3526537, -1.3526537, 0.7, 0.7, 0.7, 1.0, 2.0, 4.0])
    groups = rewards.view(3, 3)
    assert (groups[0] - groups[0].mean()).abs().max() > 0  # the rounding this test is about
    for scale in ("group", "batch", "none"):
        adv = group_relative_advantages(rewards, 3, scale_rewards=scale)
        assert (adv[:6] == 0).all() and (adv[6:] != 0).all(), scale
    for normalize in (False, True):
        adv = leave_one_out_advantages(rewards, 3, normalize_advantages=normalize)
        assert (adv[:6] == 0).all() and (adv[6:] != 0).all(), normalize


def test_zero_std_groups_count_and_fraction():
    # groups [1,2,3] [5,5,5] [0,0,6] [-1.3526537 x 3]: two of four all equal (the last one despite the
    # rounding of its mean, see above)
    count, frac = zero_std_groups(torch.cat([REWARDS, torch.full((3,), -1.3526537)]), 3)
    assert count.item() == 2
    close(frac, 0.5)


def test_group_errors_name_the_value():
    with pytest.raises(ValueError, match="num_generations=1 must be an int >= 2"):
        group_relative_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="9 rewards do not split into groups of num_generations=2"):
        leave_one_out_advantages(REWARDS, 2)
    with pytest.raises(ValueError, match=r"1-D.*\(3, 3\)"):
        zero_std_groups(REWARDS.view(3, 3), 3)
    with pytest.raises(ValueError, match="'std'.*group, batch, none"):
        group_relative_advantages(REWARDS, 3, scale_rewards="std")


# ---------------------------------------------------------------------------
# RLOO: leave-one-out baseline
# ---------------------------------------------------------------------------


def test_rloo_leave_one_out_baseline():
    # prompt 0 [1, 2, 3]: baselines (2+3)/2 = 2.5, (1+3)/2 = 2, (1+2)/2 = 1.5 -> A = -1.5, 0, 1.5
    # prompt 1 [5, 5, 5]: 0
    # prompt 2 [0, 0, 6]: baselines 3, 3, 0 -> A = -3, -3, 6
    #   (= G/(G-1) (r - mean) = 1.5 * [-2, -2, 4])
    adv = leave_one_out_advantages(REWARDS, 3)
    close(adv, [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0, -3.0, -3.0, 6.0])
    # G = 2: each response's baseline is the other one: [1, 3] -> [1 - 3, 3 - 1]
    close(leave_one_out_advantages(torch.tensor([1.0, 3.0]), 2), [-2.0, 2.0])


def test_rloo_normalize_advantages():
    # advantages above: mean 0; squares 2.25+0+2.25+0+0+0+9+9+36 = 58.5; Bessel var 58.5/8 = 7.3125
    # std 2.7041635, + 1e-4 = 2.7042635: 1.5 -> 0.5546797, 3 -> 1.1093594, 6 -> 2.2187187
    adv = leave_one_out_advantages(REWARDS, 3, normalize_advantages=True)
    close(adv, [-0.5546797, 0.0, 0.5546797, 0.0, 0.0, 0.0, -1.1093594, -1.1093594, 2.2187187])


def test_sequence_rewards_kl_in_reward():
    # beta 0.5; row 0 sums KL over its 2 tokens (0.1 + 0.2 = 0.3; 99 is padding), row 1 over 3 (0.6)
    # R = [1 - 0.15, 2 - 0.3]
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 99.0], [0.5, -0.3, 0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    close(sequence_rewards(scores, mask, kl, beta=0.5), [0.85, 1.7])
    close(sequence_rewards(scores, mask), [1.0, 2.0])  # no KL in the reward


# ---------------------------------------------------------------------------
# REINFORCE++
# ---------------------------------------------------------------------------

RPP_SCORES = torch.tensor([1.0, 2.0])
RPP_KL = torch.tensor([[0.2, 0.4, 0.2], [0.4, 0.2, 99.0]])
RPP_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_reinforce_pp_gamma_one():
    # beta 0.5: token rewards -0.5 KL, score on the last token
    #   row 0: [-0.1, -0.2, -0.1 + 1] = [-0.1, -0.2, 0.9]      row 1: [-0.2, -0.1 + 2] = [-0.2, 1.9]
    # returns to go (gamma 1): row 0 [0.6, 0.7, 0.9], row 1 [1.7, 1.9]
    # whiten over the 5 tokens: mean 5.8/5 = 1.16; deviations -0.56 -0.46 -0.26 0.54 0.74
    # squares 0.3136 + 0.2116 + 0.0676 + 0.2916 + 0.5476 = 1.432; Bessel var 0.358; sqrt(0.358 + 1e-8) = 0.5983310
    adv = reinforce_pp_advantages(RPP_SCORES, RPP_MASK, RPP_KL, beta=0.5, gamma=1.0)
    close(adv, [[-0.9359368, -0.7688052, -0.4345421], [0.9025105, 1.2367736, 0.0]])


def test_reinforce_pp_discount():
    # gamma 0.5: row 0: G2 = 0.9, G1 = -0.2 + 0.45 = 0.25, G0 = -0.1 + 0.125 = 0.025
    #            row 1: G1 = 1.9, G0 = -0.2 + 0.95 = 0.75
    # mean (0.025 + 0.25 + 0.9 + 0.75 + 1.9) / 5 = 0.765; deviations -0.74 -0.515 0.135 -0.015 1.135
    # squares 0.5476 + 0.265225 + 0.018225 + 0.000225 + 1.288225 = 2.1195; var 2.1195/4 = 0.529875
    adv = reinforce_pp_advantages(RPP_SCORES, RPP_MASK, RPP_KL, beta=0.5, gamma=0.5)
    close(adv, [[-1.0165881, -0.7074903, 0.1854586], [-0.0206065, 1.5592263, 0.0]])


def test_reinforce_pp_without_kl():
    # returns = the score on every token: [1, 1, 1], [2, 2]; mean 1.4; squares 3*0.16 + 2*0.36 = 1.2
    # var 1.2/4 = 0.3, std 0.5477226: -0.4/std = -0.7302967, 0.6/std = 1.0954451
    adv = reinforce_pp_advantages(RPP_SCORES, RPP_MASK)
    close(adv, [[-0.7302967] * 3, [1.0954451, 1.0954451, 0.0]])


# ---------------------------------------------------------------------------
# masks: broadcast, truncation
# ---------------------------------------------------------------------------


def test_broadcast_to_tokens():
    out = broadcast_to_tokens(torch.tensor([1.5, -2.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    close(out, [[1.5, 1.5, 0.0], [-2.0, 0.0, 0.0]])


def test_drop_truncated_completions():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = drop_truncated_completions(mask, torch.tensor([True, False]))
    close(out, [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert out.dtype == mask.dtype and mask[0].sum() == 3  # input untouched


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------


def test_registry_names_and_estimators():
    assert advantage_estimators() == ("grpo", "reinforce_pp", "rloo")
    # G = 2, beta 1, KL in the reward: R = [1 - (0.5 + 0.5), 3 - 1] = [0, 2]  (99 is padding)
    scores = torch.tensor([1.0, 3.0])
    kl = torch.tensor([[0.5, 0.5], [1.0, 99.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    settings = AdvantageSettings(num_generations=2, beta=1.0, scale_rewards="none")
    # rloo: [0 - 2, 2 - 0] = [-2, 2]; grpo (scale none): [0 - 1, 2 - 1] = [-1, 1]; on every response token
    close(get_advantage_estimator("rloo")(scores, mask, kl, settings), [[-2.0, -2.0], [2.0, 0.0]])
    close(get_advantage_estimator("grpo")(scores, mask, kl, settings), [[-1.0, -1.0], [1.0, 0.0]])
    # without kl the scores themselves: grpo [1, 3] -> [-1, 1] as well; group scaling: std sqrt(2) -> ∓0.7070568
    close(get_advantage_estimator("grpo")(scores, mask, None, settings), [[-1.0, -1.0], [1.0, 0.0]])
    grouped = AdvantageSettings(num_generations=2, scale_rewards="group")
    close(get_advantage_estimator("grpo")(scores, mask, None, grouped), [[-0.7070568] * 2, [0.7070568, 0.0]])
    # reinforce_pp through the registry = the hand-computed case above
    rpp = AdvantageSettings(num_generations=1, beta=0.5, gamma=1.0)
    close(get_advantage_estimator("reinforce_pp")(RPP_SCORES, RPP_MASK, RPP_KL, rpp),
          [[-0.9359368, -0.7688052, -0.4345421], [0.9025105, 1.2367736, 0.0]])


def test_the_registry_and_the_losses_offer_what_config_validates():
    # config.py owns the choices (validation reads them without importing the rl package); the rl package
    # must implement exactly those: every estimator registered, every token-level loss_type aggregated.
    assert advantage_estimators() == config.ADVANTAGE_ESTIMATORS
    assert config.LOSS_TYPES == config.TOKEN_LOSS_TYPES + ("rloo",)
    per_token, mask = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    # grpo: (1.5 + 3) / 2; bnpo: 6 / 3 tokens; dapo: 6 / 3 tokens of the step; dr_grpo: 6 / (2 rows x 2)
    expected = {"grpo": 2.25, "bnpo": 2.0, "dapo": 2.0, "dr_grpo": 1.5}
    assert set(expected) == set(config.TOKEN_LOSS_TYPES)
    for loss_type in config.TOKEN_LOSS_TYPES:
        loss = aggregate_loss(per_token, mask, loss_type, max_completion_length=2, num_items_in_batch=3)
        close(loss, expected[loss_type])
    for scale in config.SCALE_REWARDS:
        AdvantageSettings(scale_rewards=scale)  # accepted
    with pytest.raises(ValueError, match="unknown loss_type 'rloo'"):
        aggregate_loss(per_token, mask, "rloo")


def test_registry_register_and_errors():
    with pytest.raises(ValueError, match="'ppo'.*grpo, reinforce_pp, rloo"):
        get_advantage_estimator("ppo")
    with pytest.raises(ValueError, match="'grpo' is already registered"):
        register_advantage_estimator("grpo")(lambda *a: None)
    try:
        @register_advantage_estimator("sign")
        def sign(scores, mask, kl, settings):
            return broadcast_to_tokens(scores.sign(), mask)

        assert get_advantage_estimator("sign") is sign
        close(sign(torch.tensor([-3.0, 2.0]), torch.ones(2, 1), None, AdvantageSettings()), [[-1.0], [1.0]])
    finally:
        _ADVANTAGE_ESTIMATORS.pop("sign", None)


def test_advantage_settings_validation():
    with pytest.raises(ValueError, match="num_generations=0"):
        AdvantageSettings(num_generations=0)
    with pytest.raises(ValueError, match="beta=-0.1"):
        AdvantageSettings(beta=-0.1)
    with pytest.raises(ValueError, match="'std'"):
        AdvantageSettings(scale_rewards="std")
    with pytest.raises(ValueError, match="gamma=1.5"):
        AdvantageSettings(gamma=1.5)


# ---------------------------------------------------------------------------
# clipped surrogate with clip higher
# ---------------------------------------------------------------------------


def _surrogate_case():
    # epsilon 0.2, epsilon_high 0.28 -> ratios clipped to [0.8, 1.28]; loss_t = -min(r A, clip(r) A)
    #  c: A=+1, r=1.5:  -min(1.5, 1.28)   = -1.28  high-clipped
    #  d: A=-1, r=0.5:  -min(-0.5, -0.8)  =  0.8   low-clipped
    #  a: A=+1, r=1.1:  -1.1                        inside
    #  b: A=+1, r=1.25: -1.25                       inside thanks to clip higher (symmetric 0.2 would clip it)
    #  e: A=-1, r=1.5:  -min(-1.5, -1.28) =  1.5   not clipped (pessimistic side)
    #  f: A=+1, r=0.5:  -min(0.5, 0.8)    = -0.5   not clipped (pessimistic side)
    # row 0: c d a b; row 1: d e f + padding; row 2: padding only. Padding holds garbage.
    ratios = [[1.5, 0.5, 1.1, 1.25], [0.5, 1.5, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0]]
    logprobs = torch.log(torch.tensor(ratios))
    logprobs[1, 3] = logprobs[2, 0] = 80.0
    logprobs.requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, 1.0, 1.0], [-1.0, -1.0, 1.0, float("inf")], [float("nan")] * 4])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    return logprobs, torch.zeros(3, 4), advantages, mask


def test_clipped_surrogate_clip_higher_values_and_metrics():
    logprobs, old, adv, mask = _surrogate_case()
    per_token, stats = clipped_surrogate(logprobs, old, adv, mask, epsilon=0.2, epsilon_high=0.28)
    close(per_token, [[-1.28, 0.8, -1.1, -1.25], [0.8, 1.5, -0.5, 0.0], [0.0] * 4])
    # 7 tokens: low-clipped d, d (2/7); high-clipped c (1/7); either 3/7
    close(stats["clip_ratio/low_mean"], 2 / 7)
    close(stats["clip_ratio/high_mean"], 1 / 7)
    close(stats["clip_ratio/region_mean"], 3 / 7)
    # per response: low 1/4, 1/3 -> min 1/4 (the empty row 2 is left out); high 1/4, 0 -> max 1/4
    close(stats["clip_ratio/low_min"], 0.25)
    close(stats["clip_ratio/high_max"], 0.25)
    for v in stats.values():
        assert v.dim() == 0 and not v.requires_grad
    # gradient of sum(loss_t) wrt logp_t: -A r where the unclipped term is the min, 0 where clipped
    # row 0: c 0, d 0, a -1.1, b -1.25; row 1: d 0, e +1.5, f -0.5; padding 0
    per_token.sum().backward()
    close(logprobs.grad, [[0.0, 0.0, -1.1, -1.25], [0.0, 1.5, -0.5, 0.0], [0.0] * 4])


def test_clipped_surrogate_symmetric_when_epsilon_high_is_none():
    # epsilon_high None -> 0.2: b (r = 1.25, A = +1) is now high-clipped at 1.2 and c at 1.2
    logprobs, old, adv, mask = _surrogate_case()
    per_token, stats = clipped_surrogate(logprobs, old, adv, mask, epsilon=0.2)
    close(per_token, [[-1.2, 0.8, -1.1, -1.2], [0.8, 1.5, -0.5, 0.0], [0.0] * 4])
    close(stats["clip_ratio/high_mean"], 2 / 7)
    close(stats["clip_ratio/high_max"], 0.5)


def test_clipped_surrogate_first_iteration_is_policy_gradient():
    # num_iterations = 1: old = logprobs.detach(), ratio 1, loss_t = -A_t, gradient -A_t, nothing clipped
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 3.0]], requires_grad=True)
    adv = torch.tensor([[2.0, 2.0], [-1.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    per_token, stats = clipped_surrogate(logprobs, logprobs.detach(), adv, mask, 0.2, 0.28)
    close(per_token, [[-2.0, -2.0], [1.0, 0.0]])
    per_token.sum().backward()
    close(logprobs.grad, [[-2.0, -2.0], [1.0, 0.0]])
    close(stats["clip_ratio/region_mean"], 0.0)


def test_clipped_surrogate_errors():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"advantages shape \(2,\).*broadcast_to_tokens"):
        clipped_surrogate(lp, lp, torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="epsilon=1.2"):
        clipped_surrogate(lp, lp, lp, torch.ones(2, 3), epsilon=1.2)
    with pytest.raises(ValueError, match="epsilon_high=-0.1"):
        clipped_surrogate(lp, lp, lp, torch.ones(2, 3), epsilon_high=-0.1)


# ---------------------------------------------------------------------------
# KL as a loss term (k3, GRPO)
# ---------------------------------------------------------------------------


def test_kl_loss_per_token_k3_and_gradient():
    # ref - logp = [-0.5, 1]: exp(-0.5) + 0.5 - 1 = 0.1065307; exp(1) - 1 - 1 = 0.7182818; padding 0
    logprobs = torch.tensor([[-1.0, -2.0, 1e4]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -1e4]])
    kl = kl_loss_per_token(logprobs, ref, torch.tensor([[1, 1, 0]]))
    close(kl, [[0.1065307, 0.7182818, 0.0]])
    # d/dlogp = 1 - exp(ref - logp): 1 - 0.6065307 = 0.3934693; 1 - 2.7182818 = -1.7182818; padding 0 (not NaN)
    kl.sum().backward()
    close(logprobs.grad, [[0.3934693, -1.7182818, 0.0]])


# ---------------------------------------------------------------------------
# loss aggregation
# ---------------------------------------------------------------------------

# row 0: 3 tokens with losses 1, 2, 3; row 1: 1 token with loss 4; garbage on padding
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 1e9, float("nan")]])
LOSS_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_aggregate_loss_types():
    # grpo: mean of sequence means (2 + 4) / 2 = 3
    close(aggregate_loss(LOSS, LOSS_MASK, "grpo"), 3.0)
    # bnpo: token mean (1 + 2 + 3 + 4) / 4 = 2.5
    close(aggregate_loss(LOSS, LOSS_MASK, "bnpo"), 2.5)
    # dr_grpo: token sum / (B * max_completion_length) = 10 / (2 * 5) = 1
    close(aggregate_loss(LOSS, LOSS_MASK, "dr_grpo", max_completion_length=5), 1.0)
    # dapo: token sum / (global tokens / processes): 10 / 4 = 2.5; 10 / (8 / 2) = 2.5; 10 / 8 = 1.25
    close(aggregate_loss(LOSS, LOSS_MASK, "dapo", num_items_in_batch=4), 2.5)
    close(aggregate_loss(LOSS, LOSS_MASK, "dapo", num_items_in_batch=torch.tensor(8.0), num_processes=2), 2.5)
    close(aggregate_loss(LOSS, LOSS_MASK, "dapo", num_items_in_batch=8), 1.25)


def test_aggregate_loss_gradient_accumulation():
    # grpo, bnpo and dr_grpo are divided by the accumulation steps: 3/2, 2.5/2, 1/2
    close(aggregate_loss(LOSS, LOSS_MASK, "grpo", gradient_accumulation_steps=2), 1.5)
    close(aggregate_loss(LOSS, LOSS_MASK, "bnpo", gradient_accumulation_steps=2), 1.25)
    close(aggregate_loss(LOSS, LOSS_MASK, "dr_grpo", max_completion_length=5, gradient_accumulation_steps=2), 0.5)
    # dapo is not: the step's token count already covers the micro-batches.
    # Split the batch into micro-batches row 0 | row 1, 4 tokens in the step:
    # dapo: 6/4 + 4/4 = 2.5 = the token mean of the whole batch (bnpo of it, above)
    # bnpo: (6/3)/2 + (4/1)/2 = 3 = a mean of micro-batch means, not the token mean
    dapo = sum(aggregate_loss(LOSS[i:i + 1], LOSS_MASK[i:i + 1], "dapo", num_items_in_batch=4,
                              gradient_accumulation_steps=2) for i in range(2))
    bnpo = sum(aggregate_loss(LOSS[i:i + 1], LOSS_MASK[i:i + 1], "bnpo", gradient_accumulation_steps=2)
               for i in range(2))
    close(dapo, 2.5)
    close(bnpo, 3.0)


def test_aggregate_loss_empty_mask_and_errors():
    empty = torch.zeros(2, 3)
    for loss_type, kwargs in (("grpo", {}), ("bnpo", {}), ("dr_grpo", {"max_completion_length": 3}),
                              ("dapo", {"num_items_in_batch": 0})):
        close(aggregate_loss(LOSS, empty, loss_type, **kwargs), 0.0)
    with pytest.raises(ValueError, match="'token'.*grpo, bnpo, dapo, dr_grpo"):
        aggregate_loss(LOSS, LOSS_MASK, "token")
    with pytest.raises(ValueError, match="max_completion_length > 0 \\(got None\\)"):
        aggregate_loss(LOSS, LOSS_MASK, "dr_grpo")
    with pytest.raises(ValueError, match="needs num_items_in_batch"):
        aggregate_loss(LOSS, LOSS_MASK, "dapo")


def test_grpo_step_end_to_end():
    # One GRPO update on 2 prompts x 2 generations, every piece together, checked by hand:
    # scores [1, 3 | 2, 2]: group 0 -> A = ∓1 / (sqrt(2) + 1e-4) = ∓0.7070568; group 1 all equal -> 0
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]])
    adv = get_advantage_estimator("grpo")(scores, mask, None, AdvantageSettings(num_generations=2))
    # first iteration (ratio 1), KL term with beta 0.1 against a reference equal to the policy (KL 0)
    logprobs = torch.tensor([[-1.0, -1.0], [-2.0, 0.0], [-1.0, -1.0], [-1.0, 0.0]], requires_grad=True)
    surrogate, _ = clipped_surrogate(logprobs, logprobs.detach(), adv, mask, 0.2, 0.28)
    per_token = surrogate + 0.1 * kl_loss_per_token(logprobs, logprobs.detach(), mask)
    loss = aggregate_loss(per_token, mask, "bnpo")
    # per-token loss -A: [0.7070568, 0.7070568], [-0.7070568], [0, 0], [0]; token mean over 6 tokens
    # (2 * 0.7070568 - 0.7070568) / 6 = 0.1178428
    close(loss, 0.1178428)
    loss.backward()
    # gradient -A_t / 6 on each response token (the k3 term has zero gradient where logp = ref)
    g = 0.7070568 / 6
    close(logprobs.grad, [[g, g], [-g, 0.0], [0.0, 0.0], [0.0, 0.0]])


def test_inputs_are_not_modified():
    scores, rewards = RPP_SCORES.clone(), REWARDS.clone()
    kl, mask = RPP_KL.clone(), RPP_MASK.clone()
    group_relative_advantages(rewards, 3)
    leave_one_out_advantages(rewards, 3, normalize_advantages=True)
    reinforce_pp_advantages(scores, mask, kl, 0.5, 0.9)
    logprobs, old, adv, smask = _surrogate_case()
    before = [t.detach().clone() for t in (logprobs, old, adv, smask)]
    clipped_surrogate(logprobs, old, adv, smask, 0.2, 0.28)
    kl_loss_per_token(logprobs, old, smask)
    aggregate_loss(LOSS, LOSS_MASK, "grpo")
    torch.testing.assert_close(rewards, REWARDS)
    torch.testing.assert_close(scores, RPP_SCORES)
    torch.testing.assert_close(kl, RPP_KL)
    torch.testing.assert_close(mask, RPP_MASK)
    for t, b in zip((logprobs, old, adv, smask), before):
        torch.testing.assert_close(t.detach(), b, equal_nan=True)
    assert math.isnan(LOSS[1, 2])  # the shared constant still holds its garbage
