"""Reward functions for tests/test_reward_sources.py, named as ``reward_functions:<function>`` in
``stage.rewards`` (this directory is on ``sys.path`` under pytest). Each records what it was called with."""

from __future__ import annotations

import numpy as np
import torch

calls: list[tuple[list, list[str]]] = []
NOT_CALLABLE = 3


def word_count(prompts, completions):
    """Words in each completion: a score easy to compute by hand."""
    calls.append((list(prompts), list(completions)))
    return [float(len(c.split())) for c in completions]


def as_tensor(prompts, completions):
    return torch.arange(len(completions), dtype=torch.float64)


def as_array(prompts, completions):
    return np.linspace(0.0, 1.0, len(completions))


def raises(prompts, completions):
    return 1 / 0


def returns_nan(prompts, completions):
    return [0.0] * (len(completions) - 1) + [float("nan")]


def returns_inf(prompts, completions):
    return [float("-inf")] + [0.0] * (len(completions) - 1)


def too_few(prompts, completions):
    return [1.0] * (len(completions) - 1)


def not_numbers(prompts, completions):
    return ["good"] * len(completions)


def matrix(prompts, completions):
    return torch.ones(len(completions), 2)


def nothing(prompts, completions):
    return None


def one_argument(completions):
    return [0.0] * len(completions)


def returns_strings(prompts, completions):
    return ["1.0" for _ in completions]  # numbers as text: refused, never parsed
