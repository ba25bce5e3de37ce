"""Entry point logic behind ``train.py``: validate, record the config, run the stage, report errors."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig

from marl_exp import distributed, records
from marl_exp.config import ConfigError, to_yaml, validate
from marl_exp.interrupt import StageInterrupted, TrainingDiverged
from marl_exp.io import atomic_write_text
from marl_exp.modeling.loading import ModelLoadError

log = logging.getLogger("marl_exp")
FAILURE_MARKER = "FAILED"
# The metric returned to an optimizing sweeper, per stage (minimize eval/loss, maximize the others).
OBJECTIVE = {"sft": "eval/loss", "reward": "eval/pairwise_accuracy", "ppo": "eval/after/oracle_strict"}


def run_dir_from_hydra(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main (e.g. the compose API in tests)
        from datetime import datetime

        return Path(cfg.output_dir) / "runs" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under @hydra.main
        return False


def main(cfg: DictConfig, run_dir: Path | None = None) -> float | None:
    """Run one job; returns the stage's objective for sweepers. Bad input exits 2 with one line."""
    _setup_logging()
    distributed.init(cfg.device)  # under `accelerate launch` / `torchrun`: join the other processes
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra(cfg)
    # Each process's Hydra may have stamped its own time into the run dir; all work in rank 0's.
    run_dir = Path(distributed.broadcast(str(run_dir)))
    try:
        validate(cfg)
        run_dir = records.resume_run_dir(cfg, run_dir)  # stage.resume=auto without a run dir: find the run
        if distributed.is_main():
            print(to_yaml(cfg), flush=True)
        from marl_exp.stages.pipeline import run_stage

        summary = run_stage(cfg, run_dir)
    except (ConfigError, ModelLoadError) as err:
        _mark_failed(run_dir, err)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(err).split())  # one line, whatever the message
        if distributed.is_main():
            print(f"marl-exp: error: {message}", file=sys.stderr, flush=True)
        if in_multirun():  # one bad sweep point must not end the sweep (see hydra_callbacks.SweepReport)
            return None
        sys.exit(2)
    except StageInterrupted as err:  # SIGINT/SIGTERM: the stage saved what it could; say how to go on
        message = interrupted_message(cfg, run_dir, err)
        if distributed.is_main():
            atomic_write_text(run_dir / INTERRUPTED_MARKER, message + "\n")
            print(f"marl-exp: {message}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)  # 130 for SIGINT, 143 for SIGTERM
    except TrainingDiverged as err:  # too many non-finite steps: one line, no traceback
        _mark_failed(run_dir, err)
        print(f"marl-exp: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        if in_multirun():  # like any failed job: FAILED is written, the other jobs run
            return None
        sys.exit(1)
    except BaseException as err:
        _mark_failed(run_dir, err)
        if isinstance(err, Exception) and in_multirun():  # FAILED is written; let the other jobs run
            print(f"marl-exp: error: job {run_dir} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return None
        raise
    if not distributed.is_main():
        return None  # rank 0 reports the run and returns its objective
    (run_dir / INTERRUPTED_MARKER).unlink(missing_ok=True)  # an interrupted run, now resumed to the end
    log.info("run finished: %s", run_dir)
    value = summary.get(OBJECTIVE[cfg.stage.name])
    return float(value) if value is not None else None


INTERRUPTED_MARKER = "INTERRUPTED"


def resume_command(cfg: DictConfig, run_dir: Path) -> str:
    """``python train.py <same overrides> hydra.run.dir=<run_dir> [stage.resume=auto]``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [shlex.quote(str(o)) for o in HydraConfig.get().overrides.task
                     if not str(o).lstrip("+~").startswith("stage.resume=")]
    except ValueError:  # not under @hydra.main: the overrides are unknown
        overrides = ["<same overrides>"]
    launcher = ["python"] if not distributed.is_distributed() else \
        ["accelerate", "launch", "--num_processes", str(distributed.world_size())]
    parts = [*launcher, "train.py", *overrides, shlex.quote(f"hydra.run.dir={run_dir}")]
    if cfg.stage.name == "ppo":
        parts.append("stage.resume=auto")
    return " ".join(parts)


def interrupted_message(cfg: DictConfig, run_dir: Path, err: StageInterrupted) -> str:
    command = resume_command(cfg, run_dir)
    if err.checkpoint is not None:
        return f"{err}. Resume with: {command}"
    return (f"{err}; the SFT and reward stages keep no checkpoints (they are short): resuming means rerunning, "
            f"with: {command}")


def _mark_failed(run_dir: Path, err: BaseException) -> None:
    if not distributed.is_main():
        return
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
