"""Entry point logic behind ``train.py``: validate, record the config, run the stage, report errors."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig

from marl_exp.config import ConfigError, to_yaml, validate
from marl_exp.io import atomic_write_text
from marl_exp.modeling.loading import ModelLoadError

log = logging.getLogger("marl_exp")
FAILURE_MARKER = "FAILED"
# The metric returned to an optimizing sweeper, per stage (minimize eval/loss, maximize the others).
OBJECTIVE = {"sft": "eval/loss", "reward": "eval/pairwise_accuracy", "ppo": "eval/after/oracle_score"}


def run_dir_from_hydra(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main (e.g. the compose API in tests)
        from datetime import datetime

        return Path(cfg.output_dir) / "runs" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")


def main(cfg: DictConfig, run_dir: Path | None = None) -> float | None:
    """Run one job; returns the stage's objective for sweepers. Bad input exits 2 with one line."""
    _setup_logging()
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra(cfg)
    try:
        validate(cfg)
        print(to_yaml(cfg), flush=True)
        from marl_exp.stages.pipeline import run_stage

        summary = run_stage(cfg, run_dir)
    except (ConfigError, ModelLoadError) as err:
        _mark_failed(run_dir, err)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(err).split())  # one line, whatever the message
        print(f"marl-exp: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BaseException as err:
        _mark_failed(run_dir, err)
        raise
    log.info("run finished: %s", run_dir)
    value = summary.get(OBJECTIVE[cfg.stage.name])
    return float(value) if value is not None else None


def _mark_failed(run_dir: Path, err: BaseException) -> None:
    detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    atomic_write_text(run_dir / FAILURE_MARKER, f"{type(err).__name__}: {err}\n\n{detail}")


def _setup_logging() -> None:
    logger = logging.getLogger("marl_exp")
    logger.setLevel(logging.INFO)
    if logging.getLogger().handlers:
        # Under @hydra.main the root logger writes to the console and to <run_dir>/train.log (and
        # under pytest it is captured): propagate to it, so our messages end up in train.log too.
        return
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
