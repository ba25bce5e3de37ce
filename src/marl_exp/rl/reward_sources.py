"""The reward of an RL run: a weighted sum of sources (``stage.rewards``, ``config.RewardSource``).

A source is a reward adapter on the shared base (its own LoRA + score head) or a Python function of
(prompts, completions). Scoring (``rollout.score_many``) gives every source its score of each response;
the reward is Σ weight × score (TRL's ``reward_weights``). Each source's scores stay on the rollout and are
logged under TRL GRPOTrainer's names for its reward functions, ``rewards/<name>/mean`` and
``rewards/<name>/std``, before weighting.
"""

from __future__ import annotations

from typing import Sequence

import torch

from marl_exp.config import DEFAULT_REWARD_SOURCE, RewardSource, load_reward_function, reward_adapter_names


class RewardFunctionError(RuntimeError):
    """A reward function raised, or did not return one finite float per completion."""


class RewardSources:
    """Which sources make the reward, how each is scored, and their weighted sum."""

    def __init__(self, sources: Sequence[RewardSource]):
        if not sources:
            raise ValueError("a reward needs at least one source")
        self.sources = list(sources)
        # Source -> the model's adapter name: the first adapter is "reward" (the fused pass scores it).
        self.adapter_names = reward_adapter_names(self.sources)
        self.functions = {s.name: load_reward_function(f"stage.rewards.{s.name}.function", s.function)
                          for s in self.sources if s.function is not None}

    @classmethod
    def default(cls) -> "RewardSources":
        """One reward adapter, weight 1: the reward of every run before there were sources."""
        return cls([RewardSource(DEFAULT_REWARD_SOURCE, 1.0)])

    @property
    def primary(self) -> str | None:
        """The source whose adapter is the model's first reward adapter (None: no adapter source)."""
        return next((name for name, adapter in self.adapter_names.items() if adapter == "reward"), None)

    @property
    def extra_adapters(self) -> dict[str, str]:
        """Further adapter sources -> their adapter names (each scored in a pass of its own)."""
        return {name: adapter for name, adapter in self.adapter_names.items() if adapter != "reward"}

    def spec(self, name: str) -> str:
        source = next(s for s in self.sources if s.name == name)
        return source.function or source.adapter or "the upstream reward adapter"

    def call(self, name: str, prompts: Sequence, completions: Sequence[str]) -> torch.Tensor:
        """Scores [B] of function source ``name``; a ``RewardFunctionError`` naming it when it raises or does
        not return one finite float per completion."""
        what = f"reward source {name!r} ({self.spec(name)})"
        try:
            values = self.functions[name](list(prompts), list(completions))
        except Exception as err:  # noqa: BLE001 - the user's function: say which one, keep the cause chained
            raise RewardFunctionError(f"{what} raised {type(err).__name__}: {err}") from err
        return as_scores(values, len(completions), what)

    def combine(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ weight × score over the sources, in their order (one source of weight 1: its scores, unchanged)."""
        total = None
        for source in self.sources:
            term = scores[source.name] * source.weight
            total = term if total is None else total + term
        return total


def as_scores(values, count: int, what: str) -> torch.Tensor:
    """A function's return value as float32 scores [count]; ``RewardFunctionError`` unless it is ``count``
    finite numbers (a sequence, or a 1-D tensor or array)."""
    try:
        if isinstance(values, torch.Tensor):
            if values.dim() != 1:
                raise ValueError(f"a tensor of shape {tuple(values.shape)}")
            scores = values.detach().to(device="cpu", dtype=torch.float32)
        else:
            values = list(values)
            # "1.0" would convert; a function returning text is a bug to report, not to parse.
            text = next((i for i, v in enumerate(values) if isinstance(v, (str, bytes))), None)
            if text is not None:
                raise ValueError(f"{type(values[text]).__name__} {values[text]!r} for completion {text}")
            scores = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise RewardFunctionError(f"{what} returned {type(values).__name__} ({err}); it must return one float per "
                                  "completion") from err
    if len(scores) != count:
        raise RewardFunctionError(f"{what} returned {len(scores)} values for {count} completions; it must return "
                                  "one float per completion")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise RewardFunctionError(f"{what} returned {scores[bad[0]].item()} for completion {bad[0]} ({len(bad)} of "
                                  f"{count} values are not finite); it must return finite floats")
    return scores


def source_stats(source_scores: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """TRL GRPOTrainer's per-reward-function metrics: ``rewards/<name>/mean`` and ``/std`` (unweighted)."""
    stats = {}
    for name, scores in (source_scores or {}).items():
        stats[f"rewards/{name}/mean"] = scores.mean().item()
        stats[f"rewards/{name}/std"] = scores.std().item() if scores.numel() > 1 else 0.0
    return stats
