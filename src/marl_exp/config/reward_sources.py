"""``stage.rewards``: the reward of an RL stage as a weighted sum of sources, parsed once (``reward_sources``)."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from omegaconf import DictConfig

from marl_exp.errors import ConfigError


@dataclass
class RewardSourceConfig:
    """One term of an RL stage's reward: ``weight`` × the score of a reward adapter or of a Python function.

    ``adapter``: a reward adapter dir or hub id (LoRA + score head, trained on the same base);
    ``function``: ``module:function``, called with (prompts, completions) and returning one float per
    completion (TRL's reward-function argument names, passed by position); neither: the upstream reward
    adapter (``stage.reward_adapter``, else the stage cache builds it).
    """

    adapter: Optional[str] = None
    function: Optional[str] = None
    weight: float = 1.0  # any finite number; 0 = logged only (e.g. the gold score beside a learned reward)
    label_index: Optional[int] = None  # adapters: which output of a multi-label score head (null = 0)


DEFAULT_REWARD_SOURCE = "reward"  # the name of the one source of an empty ``stage.rewards`` (the default)
SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]+")  # part of metric names (rewards/<name>/mean) and adapter names


@dataclass(frozen=True)
class RewardSource:
    """A source of ``stage.rewards`` with the defaults filled in (``reward_sources``)."""

    name: str
    weight: float
    adapter: Optional[str] = None  # None with no function: the upstream reward adapter
    function: Optional[str] = None
    label_index: Optional[int] = None

    @property
    def upstream(self) -> bool:
        return self.adapter is None and self.function is None


def reward_sources(stage: DictConfig) -> list[RewardSource]:
    """The sources of an RL stage's reward, in order. An empty ``stage.rewards`` (the default) is one source,
    ``reward``: the upstream reward adapter with weight 1 and ``stage.reward_label_index``. (Empty rather
    than null, so that a Hydra override such as ``++stage.rewards={gold:{...}}`` merges into it.)"""
    nodes = stage.get("rewards")
    if not nodes:
        return [RewardSource(DEFAULT_REWARD_SOURCE, 1.0, label_index=stage.get("reward_label_index"))]
    sources = []
    for name, node in nodes.items():
        adapter, function, label = node.adapter or None, node.function or None, node.label_index
        if adapter is None and function is None and label is None:  # the upstream adapter: the stage's label
            label = stage.get("reward_label_index")
        sources.append(RewardSource(str(name), float(node.weight), adapter, function, label))
    return sources


def needs_upstream_reward(stage: DictConfig) -> bool:
    """Whether an RL stage scores with the upstream reward adapter (given, or built by the stage cache)."""
    return any(source.upstream for source in reward_sources(stage))


def load_reward_function(key: str, spec: str) -> Callable:
    """The callable ``module:function`` names (``function`` may be dotted: ``Class.method``); a
    ``ConfigError`` naming ``key`` when it cannot be imported, is missing or is not callable."""
    module_name, colon, attribute = spec.partition(":")
    example = "e.g. marl_exp.rewards:oracle_strict"
    if not colon or not module_name or not attribute:
        raise ConfigError(f"{key}={spec!r} is not module:function; give the module and the function, {example}")
    try:
        target = import_from_working_dir(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's module: one line naming it
        raise ConfigError(f"{key}={spec!r}: module {module_name!r} cannot be imported ({type(err).__name__}: "
                          f"{err}); check the name and that it is in the working directory or on PYTHONPATH") \
            from err
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key}={spec!r}: {module_name!r} has no {attribute!r}; give a function of that module")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{key}={spec!r} is a {type(target).__name__}, not callable; give a function that takes "
                          "(prompts, completions) and returns one float per completion")
    try:
        inspect.signature(target).bind([], [])
    except TypeError as err:
        raise ConfigError(f"{key}={spec!r} cannot be called as f(prompts, completions) ({err}); give a function "
                          "of those two arguments") from err
    except ValueError:  # no signature to inspect (some builtins): the first call will tell
        pass
    return target


def import_from_working_dir(module_name: str):
    """``module_name`` imported with the working directory on ``sys.path`` (after the installed packages, which
    it never shadows), so that a reward module beside the data needs no ``PYTHONPATH``. The directory stays
    on the path: the module may import its neighbours when it is called."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    return importlib.import_module(module_name)


def reward_adapter_names(sources: list[RewardSource]) -> dict[str, str]:
    """Source name -> the adapter name its reward adapter gets on the model: the first adapter source is
    ``reward`` (scored in the fused pass), each further one ``reward_<source>``."""
    adapters = [source.name for source in sources if source.function is None]
    return {name: "reward" if i == 0 else f"reward_{name}" for i, name in enumerate(adapters)}

