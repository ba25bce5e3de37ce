"""What GRPO, RLOO and REINFORCE++ share: the group layout of a batch, the reward per response, the
settings and the registry of advantage estimators (``grpo``, ``rloo``, ``reinforce_pp`` register theirs).

A batch holds num_prompts * num_generations responses laid out group by group, as TRL's RepeatSampler
yields them: prompt 0's num_generations responses first, then prompt 1's, ... (``rewards.view(-1,
num_generations)`` gives one row per prompt). Sequence-level tensors are ``[B]``, B = num_prompts *
num_generations; token-level ones ``[B, T]`` (``functional``'s conventions). Advantages are targets: they
are detached and computed in float32.

References: [GRPO] Shao et al. 2024 (DeepSeekMath, sec. 4.1); [RLOO] Ahmadian et al. 2024, Kool et al.
2019; [RPP] Hu 2025 (REINFORCE++, arXiv 2501.03262); [TRL] TRL 1.x ``GRPOTrainer`` / ``RLOOTrainer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from marl_exp.config import SCALE_REWARDS
from marl_exp.rl.functional import Tensor, as_bool, masked_sum

# TRL adds this to the std before dividing (advantages / (std + 1e-4)): a
# group with a tiny spread gets a large but finite advantage.
REWARD_STD_EPS = 1e-4


def group_view(rewards: Tensor, num_generations: int) -> Tensor:
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


def all_equal(groups: Tensor) -> Tensor:
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
    equal = all_equal(group_view(rewards, num_generations))
    return equal.sum(), equal.float().mean()


def sequence_rewards(
    scores: Tensor, mask: Tensor, kl: Optional[Tensor] = None, beta: float = 0.0
) -> Tensor:
    """Reward per response ``[B]`` with the KL penalty in the reward (TRL's RLOO).

        R_i = score_i - β · sum_t KL_{i,t}     (sum over i's response tokens)

    ``kl`` ``[B, T]`` is a per-token estimate from ``functional.kl_per_token``,
    computed with the log-probs of the policy that sampled the batch (TRL's
    RLOO uses k1, log π_old - log π_ref, which can be negative per token).
    ``kl=None`` (KL not in the reward, e.g. GRPO's KL loss term) gives the
    scores themselves.
    """
    scores = scores.detach().float()
    if kl is None:
        return scores
    return scores - beta * masked_sum(kl.detach().float(), mask, dim=1)


def broadcast_to_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """A per-response value ``[B]`` on every response token ``[B, T]``; 0 on padding.

    GRPO and RLOO give the whole response one advantage: every token of
    response i gets A_i.
    """
    mask_b = as_bool(mask)
    return torch.where(mask_b, values.unsqueeze(1).to(torch.float32), torch.zeros(mask_b.shape, device=values.device))


# ---------------------------------------------------------------------------
# Advantage estimators by name (one signature, so one loop runs them all)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvantageSettings:
    """What the estimators need besides the batch; TRL 1.x names.

    num_generations: responses per prompt (the group size G).
    beta: KL coefficient β, applied in the reward when the estimator is given
        a ``kl`` tensor (the KL as a loss term is ``grpo.kl_loss_per_token``).
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
