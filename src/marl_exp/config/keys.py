"""Known keys and suggestions: every key must be declared by a schema; a mistake names the closest valid keys.

``+key=value`` on the command line adds a key that no schema declares (Hydra opens the struct flag for it): a
typo such as ``+adapter.lora_droput=0.1`` would be ignored silently. ``check_known_keys`` refuses it with the
closest valid keys, which Hydra's own errors reuse (``marl_exp.run.hydra_errors``).
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, ValueNode

from marl_exp.config.primary import STAGE_SCHEMAS, Config
from marl_exp.config.reward_sources import RewardSourceConfig
from marl_exp.config.rl_stages import CriticFreeStageConfig, PPOStageConfig
from marl_exp.errors import ConfigError

def _schema_fields(schema: type) -> dict[str, type | None]:
    """Field name -> nested dataclass schema (None for a leaf) of a dataclass schema."""
    hints = typing.get_type_hints(schema)
    nested = {}
    for f in fields(schema):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if typing.get_origin(kind) is typing.Union and len(args) == 1 else kind
        nested[f.name] = kind if is_dataclass(kind) else None
    return nested


def _node_schema(schema: type | None, key: str, stage_name: str | None) -> type | None:
    if schema is Config and key == "stage":  # typed by the chosen stage's own schema
        return STAGE_SCHEMAS.get(stage_name)
    return _schema_fields(schema).get(key) if schema is not None else None


def valid_keys(stage_name: str | None = "ppo", schema: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema declares (leaves and nodes), ``stage.*`` for ``stage_name``."""
    keys = []
    for name in _schema_fields(schema):
        key = f"{prefix}{name}"
        keys.append(key)
        nested = _node_schema(schema, name, stage_name)
        if nested is not None:
            keys += valid_keys(stage_name, nested, f"{key}.")
    return keys


# Short names people type for a key (``stage.lr``): matched as the key they stand for.
KEY_ALIASES = {"lr": "learning_rate", "bs": "batch_size", "batch": "batch_size", "epochs": "num_train_epochs",
               "rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "kl_coef": "init_kl_coef"}


def closest_keys(key: str, candidates: list[str], limit: int = 3) -> list[str]:
    """Valid keys a user most likely meant by ``key``: a close name beside it (same parent) if there is
    one; else the same or a close name elsewhere (``learning_rate`` -> ``stage.optim.learning_rate``); else any
    close dotted key. Nodes above ``key`` are never suggested."""
    parent, _, leaf = key.rpartition(".")
    leaf = KEY_ALIASES.get(leaf, leaf)
    ancestors = {key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)}
    candidates = [c for c in candidates if c not in ancestors and c != key]
    by_leaf: dict[str, list[str]] = {}
    for c in candidates:
        by_leaf.setdefault(c.rpartition(".")[2], []).append(c)

    def ranked(keys: list[str]) -> list[str]:  # the run's own stage first, then the shallowest
        return sorted(keys, key=lambda c: (not c.startswith("stage."), c.count("."), c))

    # The same name under a heading of the same node: stage.learning_rate -> stage.optim.learning_rate.
    under_heading = ranked([c for c in by_leaf.get(leaf, []) if parent and c.startswith(f"{parent}.")])
    if under_heading:
        return under_heading[:limit]
    siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == parent}
    found = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), limit, 0.6)]
    if not found:
        found = ranked(by_leaf.get(leaf, []))
        for match in difflib.get_close_matches(leaf, list(by_leaf), 3, 0.75):
            found += ranked(by_leaf[match])
    if not found:
        found = difflib.get_close_matches(key, candidates, limit, 0.6)
    return list(dict.fromkeys(found))[:limit]


def unknown_key_message(key: str, value: Any, candidates: list[str], stage_name: str | None = None) -> str:
    shown = f"{key}={value}" if value is not None else key
    leaf = key.rpartition(".")[2]
    own_stage_has_it = any(c.startswith("stage.") and c.endswith(f".{KEY_ALIASES.get(leaf, leaf)}") for c in candidates)
    if stage_name is not None and key.startswith("stage.") and not own_stage_has_it:
        # Another stage's key, as given (stage.finetune) or under its heading (stage.beta -> stage.kl.beta).
        owners = {n: k for n in STAGE_SCHEMAS if n != stage_name for k in valid_keys(n)
                  if k == key or (k.startswith("stage.") and k.endswith(f".{leaf}"))}
        if owners:
            owner_key = next(iter(owners.values()))
            what = shown if owner_key == key else f"{shown}: {owner_key}"
            return f"{what} is a key of stage={'/'.join(owners)}, not of stage={stage_name}; drop it or set stage=" \
                   f"{next(iter(owners))}"
    close = closest_keys(key, candidates + _source_keys(key))
    if not close:
        return f"{shown} is not a config key; `python train.py --cfg job` lists every key"
    others = f" (or {', '.join(close[1:])})" if len(close) > 1 else ""
    return f"{shown} is not a config key; did you mean {close[0]}{others}?"


def _source_keys(key: str) -> list[str]:
    """The keys of the reward source ``key`` lies under (``stage.rewards.<name>.*``): sources have no fixed
    names, so the schema alone does not list them."""
    stage, rewards, name, *rest = key.split(".") + [""] * 3
    if (stage, rewards) != ("stage", "rewards") or not name or not rest[0]:
        return []
    return [f"stage.rewards.{name}.{f.name}" for f in fields(RewardSourceConfig)]


def check_known_keys(cfg: DictConfig) -> None:
    """Every key of ``cfg`` is declared by its schema; else one line naming it and the closest valid keys."""
    stage_name = cfg.stage.get("name") if isinstance(cfg.get("stage"), DictConfig) else None
    candidates = valid_keys(stage_name)

    def walk(node: DictConfig, schema: type, prefix: str) -> None:
        known = _schema_fields(schema)
        for key in node.keys():
            if prefix == "" and key == "hydra":  # Hydra's own node (present in callbacks' view of the config)
                continue
            full = f"{prefix}{key}"
            child = node._get_node(key)
            if key not in known:
                value = child._value() if isinstance(child, ValueNode) else None
                raise ConfigError(unknown_key_message(full, value, candidates, stage_name))
            nested = _node_schema(schema, key, stage_name)
            if nested is not None and isinstance(child, DictConfig) and not child._is_missing():
                walk(child, nested, f"{full}.")

    walk(cfg, Config, "")



def _rl_sections() -> dict[str, str]:
    """Leaf key -> its heading in the RL stage configs (``learning_rate`` -> ``optim``)."""
    sections = {}
    for schema in (PPOStageConfig, CriticFreeStageConfig):
        for section, nested in _schema_fields(schema).items():
            if nested is not None and section != "rewards":
                sections.update({leaf: section for leaf in _schema_fields(nested)})
    return sections


def nest_rl_keys(flat: dict) -> dict:
    """RL stage settings given flat (``{"learning_rate": 1e-3, "steps": 4}``) under their headings
    (``{"optim": {"learning_rate": 1e-3}, "steps": 4}``), for code that builds a stage config."""
    sections, nested = _rl_sections(), {}
    for key, value in flat.items():
        if key in sections:
            nested.setdefault(sections[key], {})[key] = value
        else:
            nested[key] = value
    return nested

