"""What a command line says before Hydra composes it: the stages a sweep runs (its dir's name), and the
reward sources it names (declared, so that ``stage.rewards.<name>.<key>=...`` works as written)."""

from __future__ import annotations

import os

from marl_exp.config.reward_sources import SOURCE_NAME
from marl_exp.errors import ConfigError

# ``python train.py -m stage=grpo,rloo,ppo``: Hydra resolves the sweep dir from each job's own config, so a
# dir named after stage.name would split one sweep into a dir per stage (and its end report would count one).
SWEEP_LABEL_ENV = "MARL_EXP_SWEEP_LABEL"
REWARDS_KEY = "stage.rewards"


def sweep_label(stage_name: str) -> str:
    """The sweep dir's suffix: the stages a command line sweeps over (set by ``cli.run_app``), else the stage."""
    return os.environ.get(SWEEP_LABEL_ENV) or stage_name


def swept_stages(argv: list[str]) -> str | None:
    """``grpo-rloo-ppo`` for a multirun command line that sweeps ``stage=grpo,rloo,ppo``; None otherwise."""
    if not any(arg in ("-m", "--multirun") for arg in argv):
        return None
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "stage" and "," in value:
            return "-".join(v.strip() for v in value.split(",") if v.strip())
        if sep and key.lstrip("+~") == "stage" and "(" in value:  # choice(...), glob(...): no plain list
            return "stages"
    return None


def declare_reward_sources(overrides: list[str]) -> list[str]:
    """``overrides`` with ``++stage.rewards={<name>:{}}`` before the first override that sets source ``<name>``,
    so that a user writes a source as any other key: ``stage.rewards.great.function=mod:fn
    stage.rewards.great.weight=0.5`` or ``stage.rewards={great:{function:mod:fn}}`` (with or without ``+``).

    Hydra changes only keys that exist, and ``+stage.rewards.great.function=...`` would create ``great`` as a
    plain dict, which the typed ``stage.rewards`` refuses; merging an empty source first makes it a source
    with its defaults, which the user's override then sets. A source that already exists (from a
    ``+rewards=`` preset) is left as it is: merging ``{}`` changes nothing.
    """
    declared: set[str] = set()
    result = []
    for override in overrides:
        names = [name for name in dict.fromkeys(_sources_set_by(override)) if name not in declared]
        if names:
            result.append(f"++{REWARDS_KEY}={{{','.join(f'{name}:{{}}' for name in names)}}}")
            declared.update(names)
        result.append(override)
    return result


def _sources_set_by(override: str) -> list[str]:
    """The sources an override (not a ``~`` deletion) sets: ``stage.rewards.<name>[.<key>]=...`` or
    ``stage.rewards={<name>: ..., ...}``; only names a source may have (letters, digits, ``_``, ``-``)."""
    key, sep, value = str(override).partition("=")
    key = key.lstrip("+")
    if not sep or key.startswith("~"):
        return []
    if key == REWARDS_KEY:
        names = _top_level_keys(value) if value.lstrip().startswith("{") else []
    elif key.startswith(f"{REWARDS_KEY}."):
        names = [key[len(REWARDS_KEY) + 1:].partition(".")[0]]
    else:
        names = []
    return [name for name in names if SOURCE_NAME.fullmatch(name)]


def check_reward_overrides(overrides: list[str]) -> None:
    """Hydra's override parser keeps the last of two equal keys of a dict silently (``{a:{},a:{}}``): a
    source named twice in a ``stage.rewards`` override is refused here (a YAML file's loader refuses it)."""
    for override in overrides:
        key, _, value = str(override).partition("=")
        if key.lstrip("+~") != "stage.rewards" or not value.lstrip().startswith("{"):
            continue
        names = _top_level_keys(value)
        twice = [name for i, name in enumerate(names) if name in names[:i]]
        if twice:
            raise ConfigError(f"{override} names the source {twice[0]!r} twice; give each source its own name")


def _top_level_keys(text: str) -> list[str]:
    """The keys of the outermost ``{k: v, ...}`` of a Hydra override value, in order (quotes honoured)."""
    keys, depth, quote, token, in_key = [], 0, None, "", False
    for char in text:
        if quote is not None:
            quote = None if char == quote else quote
            token += char if quote is not None and in_key else ""
        elif char in "'\"":
            quote = char
        elif char in "{[":
            depth += 1
            in_key, token = (True, "") if depth == 1 else (in_key, token)
        elif char in "}]":
            depth -= 1
        elif depth == 1 and char == ",":
            in_key, token = True, ""
        elif depth == 1 and char == ":" and in_key:
            keys.append(token.strip())
            in_key = False
        elif depth == 1 and in_key:
            token += char
    return keys

