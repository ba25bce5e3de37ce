"""One module per algorithm, each its advantages and its loss; ``RLTrainer`` (``marl_exp.rl.trainer``) runs
the object ``make_algorithm`` picks for a stage.

- ``ppo``: PPO (the ``PPO`` algorithm and its math);
- ``critic_free``: ``CriticFree``, what GRPO, RLOO and REINFORCE++ share (group sampling, the estimator by
  name, the loss by ``loss_type``); their advantages are ``grpo``, ``rloo`` and ``reinforce_pp``'s, and their
  losses ``grpo``'s (per token) and ``rloo``'s (per response);
- ``groups``: the group layout, settings and registry of the critic-free advantage estimators.

An algorithm object gives the loop: ``metric_prefix``, ``critic``, ``group_size``, ``epochs``,
``reads_old_logprobs_before_update`` (phases 3-4 read the sampling policy's log-probs, values or KL),
``trained_parameters``, ``shape_scores`` (phase 3), ``advantages`` (phase 4), ``loss_mask``, ``loss_weight``,
``loss`` -> ``(loss, stats)`` (phase 5; PPO with a critic adapter also ``critic_loss``), ``stop_epochs``,
``step_stats``, ``after_update``, ``skip_stats``, ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

# grpo, rloo and reinforce_pp register their advantage estimators when imported.
from marl_exp.rl.algorithms import grpo, reinforce_pp, rloo  # noqa: F401
from marl_exp.rl.algorithms.critic_free import CriticFree
from marl_exp.rl.algorithms.ppo import PPO


ALGORITHMS = {"ppo": PPO, "grpo": CriticFree, "rloo": CriticFree, "reinforce_pp": CriticFree}


def make_algorithm(stage, perf):
    """The algorithm object of an RL stage node (``stage.name``)."""
    if stage.name not in ALGORITHMS:
        raise ValueError(f"unknown RL stage {stage.name!r}; valid choices: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[stage.name](stage, perf)
