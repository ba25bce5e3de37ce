"""Reward functions for ``stage.rewards.<name>.function=marl_exp.rewards:<function>``.

A reward function takes (prompts, completions) — the prompts as the task gives them (strings, or message
lists for conversational data) and the sampled completions as decoded text — and returns one float per
completion. These read the texts exactly as the evaluation does (``response_metrics.judged_text``).

Import-light on purpose: the config check imports this module before anything heavy is loaded.
"""

from __future__ import annotations

from typing import Sequence

from marl_exp.ppo.response_metrics import judged_texts


def oracle_strict(prompts: Sequence, completions: Sequence[str]) -> list[float]:
    """The built-in reviews task's strict gold: the oracle on a well-formed review, 0 on any other text."""
    from marl_exp.data import reviews  # at call time: marl_exp.data imports datasets

    return [reviews.oracle_strict(text) for text in judged_texts(prompts, completions)]


def oracle(prompts: Sequence, completions: Sequence[str]) -> list[float]:
    """The built-in reviews task's plain oracle: the share of positive units, whatever the text's shape."""
    from marl_exp.data import reviews

    return [reviews.oracle_score(text) for text in judged_texts(prompts, completions)]
