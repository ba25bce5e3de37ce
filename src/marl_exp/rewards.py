"""Reward functions for ``stage.rewards.<name>.function=marl_exp.rewards:<function>``.

A reward function takes (prompts, completions) — the prompts as the task gives them (strings, or message
lists for conversational data) and the sampled completions as decoded text — and returns one float per
completion. These read the texts exactly as the evaluation does (``reviews_chat.judged_text``).

Import-light on purpose: the config check imports this module before anything heavy is loaded.
"""

from __future__ import annotations

from typing import Sequence


def _judged_texts(prompts: Sequence, completions: Sequence[str]) -> list[str]:
    """The texts as the reviews tasks' evaluation reads them (a chat reply as the review it gives for the
    requested opening: ``reviews_chat.judged_text``)."""
    from marl_exp.data.reviews_chat import judged_text  # at call time: marl_exp.data imports datasets

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; give one prompt per completion")
    return [judged_text(p, c) for p, c in zip(prompts, completions)]


def oracle_strict(prompts: Sequence, completions: Sequence[str]) -> list[float]:
    """The built-in reviews task's strict gold: the oracle on a well-formed review, 0 on any other text."""
    from marl_exp.data import reviews

    return [reviews.oracle_strict(text) for text in _judged_texts(prompts, completions)]


def oracle(prompts: Sequence, completions: Sequence[str]) -> list[float]:
    """The built-in reviews task's plain oracle: the share of positive units, whatever the text's shape."""
    from marl_exp.data import reviews

    return [reviews.oracle_score(text) for text in _judged_texts(prompts, completions)]


def vader_compound(prompts: Sequence, completions: Sequence[str]) -> list[float]:
    """``data=movie_sentiment``'s lexicon-gold reward: VADER's compound score of each reply, in [-1, 1] (the
    label its preference pairs were made with: the ceiling for a reward adapter trained on them)."""
    from marl_exp.data.sentiment import vader_score

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; give one prompt per completion")
    return [vader_score(text) for text in completions]
