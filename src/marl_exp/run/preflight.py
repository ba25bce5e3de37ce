"""Checks of everything a run reads and writes, before the heavy stack is imported and before W&B starts.

``check(cfg)`` runs ``config.validate`` and then checks every path by its kind (a model directory, a PEFT
adapter, a reward adapter with a score head, a run directory), hub ids against the local Hugging Face
cache and, when not cached, the hub itself (one request, no retries), that the output dir can be written,
and that a given reward adapter was trained on the given SFT model (``marl_exp.provenance``). Only the standard
library, omegaconf, ``marl_exp.config`` and ``marl_exp.provenance`` are imported: a mistake is reported in about a second, not after the imports
(20-60 s on a busy machine) or after an upstream stage has trained for minutes.

``Preflight`` runs the same checks as a Hydra callback, before Hydra creates the run directory (so an
output dir that cannot be created is one line too, not a traceback).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from marl_exp.config import RL_STAGES, UPSTREAM, ConfigError, check_reward_overrides, reward_sources, validate
from marl_exp import provenance
from marl_exp.provenance import (  # noqa: F401 - local_model_dir: re-exported for callers
    BUILTIN_PREFIX,
    cached_snapshot,
    hub_cache_dir,
    local_model_dir,
    looks_local,
    model_cache_root,
)

HUB_TIMEOUT_S = 5.0
_checked: set[str] = set()  # configs already checked in this process (the callback, then cli.main)


def check(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """Validate ``cfg`` and every input and output it names; raise ``ConfigError`` (one line) on the first
    problem. Each distinct config is checked once per process. ``overrides``: the command line's (default:
    the running Hydra job's), for what composition hides (a reward source named twice)."""
    key = json.dumps(OmegaConf.to_container(cfg, resolve=False), sort_keys=True, default=str)
    if key in _checked:
        return
    validate(cfg)
    check_reward_overrides(_task_overrides() if overrides is None else overrides)
    check_output_dir(cfg.output_dir, "output_dir")
    check_inputs(cfg)
    _checked.add(key)


# ------------------------------------------------------------------------------------------ outputs
def check_output_dir(path: str, key: str) -> None:
    """``path`` exists as a directory (created if missing, like the run would) and a file can be written there."""
    reason = _unwritable(Path(path).expanduser())
    if reason:
        raise ConfigError(f"{key}={path!r} {reason}; choose a writable directory, e.g. {key}=$HOME/marl-exp-outputs")


def check_run_dir_parent(run_dir: str, key: str = "hydra.run.dir") -> None:
    """The directory Hydra is about to create can be created (its parent is made and written to)."""
    parent = Path(run_dir).expanduser().parent
    reason = _unwritable(parent)
    if reason:
        raise ConfigError(f"{key}={run_dir!r} cannot be created: {parent} {reason}; set output_dir (or {key}) to a "
                          "writable directory")


def _unwritable(target: Path) -> str | None:
    """Why ``target`` cannot be used as an output directory (None when it can: it exists or was created)."""
    if target.exists() and not target.is_dir():
        return "is a file, not a directory"
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".marl-exp-write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(target) else ""
        return f"cannot be created or written: {reason}{where}"
    return None


# ------------------------------------------------------------------------------------------- inputs
def check_inputs(cfg: DictConfig) -> None:
    stage = cfg.stage
    local_only = bool(cfg.model.local_files_only)
    sft_model = stage.get("sft_model") if "sft" in UPSTREAM[stage.name] else None
    if sft_model and sft_model.startswith(BUILTIN_PREFIX):  # e.g. an instruct model as its own SFT model
        check_model_path(sft_model, key="stage.sft_model")
    elif sft_model:
        check_model_source("stage.sft_model", sft_model, local_only)
    else:  # model.path is read only by an SFT stage (this one, or the upstream one the cache builds)
        check_model_path(cfg.model.path, cfg.model.get("revision"), local_only)
    reward_adapters = {}
    if stage.name in RL_STAGES:
        reward_adapters = {f"stage.rewards.{s.name}.adapter": s.adapter for s in reward_sources(stage) if s.adapter}
        if stage.get("reward_adapter"):
            reward_adapters = {"stage.reward_adapter": stage.reward_adapter, **reward_adapters}
    for key, reward_adapter in reward_adapters.items():
        check_reward_adapter(key, reward_adapter, local_only)
        if sft_model and not stage.allow_base_mismatch:  # an allowed mismatch: the model warns when it loads
            check_same_base(reward_adapter, sft_model, allow_mismatch=False, key=key)
    if cfg.data.name in ("imdb", "hh_rlhf") and cfg.data.path:
        check_dataset("data.path", cfg.data.path)


def check_model_path(path: str, revision: str | None = None, local_only: bool = False, key: str = "model.path") -> None:
    if path.startswith(BUILTIN_PREFIX):
        builtin = (f"{BUILTIN_PREFIX}tiny", f"{BUILTIN_PREFIX}smollm2")  # as modeling.loading.resolve_model_path
        if path not in builtin:
            raise ConfigError(f"{key}={path!r} is not a built-in model; they are {', '.join(builtin)}")
        return
    check_model_source(key, path, local_only, revision)


def check_model_source(key: str, value: str, local_only: bool = False, revision: str | None = None) -> None:
    """A model directory (config.json + weights) or a hub id that can be loaded from here."""
    path = Path(value).expanduser()
    if not looks_local(value):
        check_hub_id(key, value, "model", revision, local_only)
        return
    kind = local_kind(path)
    if kind == "model":
        return
    raise ConfigError(_wrong_kind(key, value, kind, wanted="a model directory (config.json and weights)"))


def check_reward_adapter(key: str, value: str, local_only: bool = False) -> None:
    """A PEFT adapter with a score head (``stage=reward``'s ``reward_adapter/``, TRL's RewardTrainer output)."""
    path = Path(value).expanduser()
    if not looks_local(value):
        check_hub_id(key, value, "model", None, local_only)
        return
    kind = local_kind(path)
    if kind in ("reward_adapter", "adapter_unknown_head"):
        return
    raise ConfigError(_wrong_kind(key, value, kind, wanted="a reward adapter (adapter_config.json and a score head)"))


def check_dataset(key: str, value: str) -> None:
    if looks_local(value):
        if not Path(value).expanduser().is_dir():
            raise ConfigError(f"{key}={value!r} does not exist; give a local copy of the dataset (a directory) "
                              "or a hub id")
        return
    check_hub_id(key, value, "dataset", None, False)


def check_same_base(reward_adapter: str, sft_model: str, allow_mismatch: bool, key: str = "stage.reward_adapter") -> None:
    """``provenance.check_same_base`` for a given ``stage.sft_model``, which may name a built-in model: checked
    once it is built (tiny's dir is named by a hash torch computes: the model's own check covers it)."""
    if sft_model.startswith(BUILTIN_PREFIX):
        built = built_in_model_dir(sft_model)
        if built is None or not (built / "config.json").is_file():
            return
        sft_model = str(built)
    provenance.check_same_base(reward_adapter, sft_model, allow_mismatch, key)


def built_in_model_dir(name: str) -> Path | None:
    """Where a built-in model is built (as ``modeling.loading.resolve_model_path`` builds it; None for
    ``builtin:tiny``, whose dir is named after its architecture's hash, computed where torch is loaded)."""
    if name != f"{BUILTIN_PREFIX}smollm2":
        return None
    from marl_exp.modeling.gguf_import import SMOLLM2_DIR_NAME  # standard library and marl_exp.config only

    return model_cache_root() / SMOLLM2_DIR_NAME


# ----------------------------------------------------------------------------------- kinds of paths
def local_kind(path: Path) -> str:
    """What a local path holds: model | reward_adapter | policy_adapter | sft_adapter | adapter_unknown_head |
    run_dir | config_only | file | missing | other."""
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    if (path / "adapter_config.json").is_file():
        if (path / "value_head.safetensors").is_file():
            return "policy_adapter"
        keys = _safetensors_keys(path / "adapter_model.safetensors")
        if keys is not None:
            return "reward_adapter" if any(k.endswith("score.weight") for k in keys) else "sft_adapter"
        return "adapter_unknown_head"  # an old adapter_model.bin: the loader checks it (needs torch)
    if (path / "config.json").is_file():
        weights = [*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.index.json")]
        return "model" if weights else "config_only"
    if (path / "run_record.json").is_file() or (path / ".hydra").is_dir() or (path / "summary.json").is_file():
        return "run_dir"  # a run's dir, or a stage-cache entry (the dir of the run that built it)
    return "other"


def _wrong_kind(key: str, value: str, kind: str, wanted: str) -> str:
    path = Path(value).expanduser()
    what = {
        "missing": "does not exist",
        "file": "is a file",
        "policy_adapter": "is a PPO policy adapter (LoRA + value head)",
        "reward_adapter": "is a reward adapter (LoRA + score head)",
        "sft_adapter": "is a LoRA adapter without a score head (e.g. an SFT or policy adapter)",
        "adapter_unknown_head": "is a LoRA adapter",
        "config_only": "has a config.json but no weights (*.safetensors, *.bin)",
        "model": "is a model directory",
        "run_dir": "is a run directory",
        "other": "is a directory without a model or an adapter",
    }[kind]
    inside = [f"{path / sub}" for sub in ("model", "reward_adapter") if (path / sub).is_dir()]
    inside += [str(p) for p in sorted((path / "policies").glob("*"))] if (path / "policies").is_dir() else []
    if inside:
        fix = f"it holds {', '.join(inside)}: give the one you mean, e.g. {key}={inside[0]}"
    elif kind == "reward_adapter" and key == "stage.sft_model":
        fix = (f"pass it as stage.reward_adapter={value} and give the model it was trained on as stage.sft_model "
               "(or leave stage.sft_model empty to use the stage cache)")
    elif kind == "model" and key == "stage.reward_adapter":
        fix = "give the reward_adapter/ dir of a stage=reward run, or leave it empty to use the stage cache"
    else:
        fix = f"give {wanted} or a hub id"
    return f"{key}={value!r} {what}, not {wanted}; {fix}"


def _safetensors_keys(path: Path) -> list[str] | None:
    """Tensor names of a safetensors file, read from its JSON header (no torch, no loading)."""
    try:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return None
    return [k for k in header if k != "__metadata__"]


# --------------------------------------------------------------------------------------------- hub
def _dataset_cached(repo_id: str) -> bool:
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or hub_cache_dir().parent / "datasets").expanduser()
    return cached_snapshot(repo_id, "dataset") is not None or (datasets_cache / repo_id.replace("/", "___")).is_dir()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_hub_id(key: str, repo_id: str, repo_type: str, revision: str | None, local_only: bool) -> None:
    """A hub id is usable when it is cached (offline, the libraries then read the cache at once) or the
    hub answers for it. One request with a short timeout: never the libraries' minute of retries."""
    cached = cached_snapshot(repo_id, repo_type, revision) is not None if repo_type == "model" else \
        _dataset_cached(repo_id)
    offline = hub_offline() or local_only
    if cached and offline:
        return
    where = f"not a local path and not in the Hugging Face cache ({hub_cache_dir()})"
    if offline:
        switch = "model.local_files_only=true" if local_only else "HF_HUB_OFFLINE=1"
        raise ConfigError(f"{key}={repo_id!r} is {where}, and the hub is off ({switch}); download it on a machine "
                          f"with access (`hf download {repo_id}{' --repo-type dataset' if repo_type == 'dataset' else ''}`"
                          ") and copy the cache, or give a local directory")
    status = hub_status(repo_id, repo_type)
    if status == "ok":
        return
    if status == "unreachable":
        if cached:  # use the cached copy at once: the libraries would retry the hub for a minute or two
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["HF_DATASETS_OFFLINE"] = "1"
            print(f"marl-exp: the hub ({hub_endpoint()}) is unreachable; using the cached {repo_id} "
                  "(HF_HUB_OFFLINE=1 for this run)", file=sys.stderr, flush=True)
            return
        raise ConfigError(f"{key}={repo_id!r} is {where}, and the hub ({hub_endpoint()}) is unreachable; connect, "
                          f"or download it where the hub is reachable (`hf download {repo_id}`) and copy the cache, "
                          "or give a local directory")
    if status == "missing":
        raise ConfigError(f"{key}={repo_id!r} is {where}, and the hub has no {repo_type} of that name (or it is "
                          "private or gated: log in with `hf auth login`); check the id or give a local directory")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_status(repo_id: str, repo_type: str = "model") -> str:
    """ok | missing | unreachable, from one HEAD request to the hub's API (timeout ``HUB_TIMEOUT_S``)."""
    url = f"{hub_endpoint()}/api/{repo_type}s/{urllib.parse.quote(repo_id, safe='/')}"
    request = urllib.request.Request(url, method="HEAD")
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=HUB_TIMEOUT_S):
            return "ok"
    except urllib.error.HTTPError as err:
        return "missing" if err.code in (401, 403, 404) else "unreachable"
    except (urllib.error.URLError, OSError, ValueError):
        return "unreachable"


# --------------------------------------------------------------------------------- Hydra callback
try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - Hydra is a dependency; this keeps the module importable alone
    Callback = object


class Preflight(Callback):
    """Runs ``check`` before Hydra creates the run dir (registered in conf/config.yaml).

    Hydra turns a callback's exception into a warning and carries on, so a mistake is reported here
    (one line, exit 2) and the process exits; with ``HYDRA_FULL_ERROR=1`` the checks are left to the
    job, which raises them with a traceback.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._checked(lambda: (check(_without_hydra(config), list(config.hydra.overrides.task)),
                               check_run_dir_parent(str(config.hydra.run.dir))))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The jobs' values come from the sweeper: each job validates its own; here only where they write.
        self._checked(lambda: (check_output_dir(str(config.output_dir), "output_dir"),
                               check_run_dir_parent(str(config.hydra.sweep.dir), "hydra.sweep.dir")))

    @staticmethod
    def _checked(checks) -> None:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            return
        try:
            checks()
        except ConfigError as err:
            if int(os.environ.get("RANK", "0") or 0) == 0:  # one line, not one per process of a parallel launch
                print(f"marl-exp: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
            sys.exit(2)


def _task_overrides() -> list[str]:
    """The running Hydra job's command-line overrides ([] outside Hydra, e.g. the compose API)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _without_hydra(config: DictConfig) -> DictConfig:
    """The job's view of the config (what cli.main receives): everything but the ``hydra`` node."""
    cfg = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
    OmegaConf.set_struct(cfg, True)
    return cfg
