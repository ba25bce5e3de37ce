"""Run tracking: W&B (optional) plus local ``metrics.jsonl`` and ``summary.json`` in every run dir.

The local files are written whatever the logger, so runs can be compared without a W&B account.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from marl_exp import distributed
from marl_exp.config import ARTIFACT_MODES, ConfigError
from marl_exp.io import atomic_write_json

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(configured: str) -> str:
    """``auto`` → online with credentials, else offline. An explicit WANDB_MODE env var wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if configured != "auto":
        return configured
    return "online" if wandb_has_credentials() else "offline"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # tensors and numpy scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # more than one element
            return value.tolist() if hasattr(value, "tolist") else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def hydra_job_info() -> dict[str, Any] | None:
    """This job's Hydra overrides and sweep position, or None outside ``@hydra.main``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:
        return None
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return {
        "multirun": multirun,
        "overrides": [str(o) for o in hydra_cfg.overrides.task],
        "override_dirname": str(hydra_cfg.job.get("override_dirname") or ""),
        "job_num": hydra_cfg.job.get("num") if multirun else None,
        "sweep_dir": str(hydra_cfg.sweep.dir) if multirun else None,
    }


def sweep_group_name(sweep_dir: str) -> str:
    """W&B group of a multirun: its dir below ``multirun/`` ("2025-01-31_12-00-00_ppo"), else its name."""
    parts = Path(sweep_dir).parts
    if "multirun" in parts[:-1]:
        return "_".join(parts[len(parts) - 1 - parts[::-1].index("multirun") + 1:])
    return Path(sweep_dir).name


def wandb_identity(cfg: DictConfig, run_dir: Path) -> tuple[str | None, str, dict[str, Any] | None]:
    """(group, default run name, hydra info for the W&B config) of a run.

    In a multirun every job is its own W&B run in one group, the sweep (``logger.group`` wins when
    set), named ``<job num>:<overrides>`` so the runs of a sweep tell apart at a glance.
    """
    info = hydra_job_info()
    group = cfg.logger.group
    name = Path(run_dir).name
    if info and info["multirun"]:
        group = group or sweep_group_name(info["sweep_dir"])
        name = f"{info['job_num']}:{info['override_dirname']}" if info["override_dirname"] else f"{group}/{name}"
    return group, name, info


def init_wandb_or_offline(**kwargs):
    """``wandb.init``; when an online init fails (host unreachable, bad API key, timeout), warn once and
    log offline instead: a logger problem never stops training."""
    import wandb

    try:
        return wandb.init(**kwargs)
    except Exception as err:  # noqa: BLE001 - wandb raises CommError, AuthenticationError, UsageError, ...
        if kwargs.get("mode") != "online":
            raise
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        for secret in (os.environ.get("WANDB_API_KEY"), os.environ.get("HF_TOKEN")):
            if secret:
                reason = reason.replace(secret, "***")
        run = wandb.init(**{**kwargs, "mode": "offline"})
        log.warning("W&B online init failed (%s); logging offline instead, upload later with: wandb sync %s",
                    reason[:300], Path(run.dir).parent)
        return run


class Tracker:
    """One run's metrics sink. Use as a context manager so the W&B run is always finished."""

    def __init__(self, cfg: DictConfig, run_dir: Path, job_type: str, name: str | None = None):
        self.run_dir = Path(run_dir)
        # In a distributed run only rank 0 writes files and logs; the others keep the summary in memory.
        self.writes = distributed.is_main()
        if self.writes:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary: dict[str, Any] = {}
        self.artifacts = cfg.logger.get("artifacts", "auto")
        if self.artifacts not in ARTIFACT_MODES:
            raise ConfigError(f"logger.artifacts={self.artifacts!r} is not valid; use one of {', '.join(ARTIFACT_MODES)}")
        self.artifact_max_upload_mb = float(cfg.logger.get("artifact_max_upload_mb", 100.0))
        self.wandb_run = None
        if cfg.logger.name == "wandb" and self.writes:
            self.wandb_run = self._init_wandb(cfg, job_type, name)

    def _init_wandb(self, cfg: DictConfig, job_type: str, name: str | None):
        mode = resolve_wandb_mode(cfg.logger.mode)
        group, default_name, hydra_info = wandb_identity(cfg, self.run_dir)
        config = OmegaConf.to_container(cfg, resolve=True)
        if hydra_info:
            config["hydra"] = hydra_info
        run = init_wandb_or_offline(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=group,
            job_type=job_type,
            name=name or cfg.run_name or default_name,
            tags=list(cfg.logger.tags),
            dir=str(self.run_dir),
            config=config,
            mode=mode,
            reinit="finish_previous",
        )
        if mode == "offline":
            log.info("W&B is offline; upload later with: wandb sync %s", Path(run.dir).parent)
        return run

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.writes:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def update_summary(self, metrics: dict[str, Any]) -> None:
        self.summary.update({k: _jsonable(v) for k, v in metrics.items()})
        if self.writes:
            atomic_write_json(self.run_dir / "summary.json", self.summary)
        if self.wandb_run is not None:
            self.wandb_run.summary.update(metrics)

    @property
    def logs_artifacts(self) -> bool:
        """True when stage outputs go to W&B as artifacts (a live run, not disabled, logger.artifacts != none)."""
        run = self.wandb_run
        return run is not None and not getattr(run, "disabled", False) and self.artifacts != "none"

    def log_artifact(self, artifact) -> None:
        """Log ``artifact`` (a ``wandb.Artifact``) as an output of this run; offline it waits for ``wandb sync``."""
        if self.logs_artifacts:
            self.wandb_run.log_artifact(artifact)

    def use_artifact(self, artifact) -> None:
        """Declare ``artifact``, built here from the files this run reads, as an input of this run.

        Online this is ``run.use_artifact(artifact)``. Offline, wandb refuses ``use_artifact``; the run
        records instead what online ``use_artifact`` sends for an artifact object: the artifact with
        ``use_after_commit``. Artifacts are content-addressed, so on ``wandb sync`` the server finds the
        version with the same digest (the one the upstream run logged) and marks it used by this run.
        """
        if not self.logs_artifacts:
            return
        if not getattr(self.wandb_run, "offline", False):
            self.wandb_run.use_artifact(artifact)
            return
        self.wandb_run._log_artifact(artifact, is_user_created=True, use_after_commit=True)

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


# Hugging Face Trainer log keys → our path-like names.
_HF_KEY_RENAMES = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
                   "epoch": "train/epoch"}


def hf_to_metric_name(key: str) -> str:
    if key in _HF_KEY_RENAMES:
        return _HF_KEY_RENAMES[key]
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "train/" + key


class TrackerCallback(TrainerCallback):
    """Forwards TRL/HF Trainer logs into our tracker, so trainers report into the same W&B run."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.tracker.log({hf_to_metric_name(k): v for k, v in logs.items()}, step=state.global_step)
