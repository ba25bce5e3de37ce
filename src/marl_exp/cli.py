"""Entry point logic behind ``train.py``: check, record the config, run the stage, report the result and errors.

Import-light on purpose: at module level only omegaconf/Hydra and marl_exp's light modules load, so a
config or path mistake is reported (one line, exit 2) before torch, transformers, peft, TRL or W&B are
imported; they load in ``_run`` once everything has been checked.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig

from marl_exp.config import RL_STAGES, ConfigError, reward_sources
from marl_exp.config.stage_graph import COMPLETE_MARKER, OUTPUT_SUBDIR, given_output, needed_upstream
from marl_exp.io import atomic_write_text
from marl_exp.provenance import check_same_base
from marl_exp.run import console, preflight, records, threads

log = logging.getLogger("marl_exp")
FAILURE_MARKER = "FAILED"
INPUT_ERROR_EXIT = 2
# The metric returned to an optimizing sweeper, per stage (minimize eval/loss, maximize the others).
OBJECTIVE = {"sft": "eval/loss", "reward": "eval/pairwise_accuracy",
             **{name: "eval/after/oracle_strict" for name in RL_STAGES}}


def run_app(config_dir: Path | str) -> None:
    """``python train.py`` / ``marl-exp train``: the Hydra app over ``config_dir``, with Hydra's own command-line
    errors reported as one line (exit 2) and Ctrl-C before a stage runs as one line (exit 130)."""
    import hydra

    from marl_exp.config import SWEEP_LABEL_ENV, declare_reward_sources, register_configs, swept_stages
    from marl_exp.run import hydra_errors

    # Hydra reads sys.argv: reward sources are declared there, as a user writes them (stage.rewards.<name>.*).
    sys.argv = [sys.argv[0], *declare_reward_sources(sys.argv[1:])]
    label = swept_stages(sys.argv[1:])
    if label is not None:  # one sweep dir for a sweep over stages (children inherit the environment)
        os.environ[SWEEP_LABEL_ENV] = label
    else:  # not from a parent process (a run started inside a job of a stage sweep)
        os.environ.pop(SWEEP_LABEL_ENV, None)
    try:
        register_configs()
        register_help_resolver()
        hydra_errors.install()
        hydra.main(version_base="1.3", config_path=str(Path(config_dir).resolve()), config_name="config")(main)()
    except KeyboardInterrupt:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print("marl-exp: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(130)


HELP_GROUPS_RESOLVER = "marl_exp.config_groups_help"  # used by conf/hydra/help/marl_exp.yaml


def register_help_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(HELP_GROUPS_RESOLVER):
        OmegaConf.register_new_resolver(HELP_GROUPS_RESOLVER, config_groups_help)


def config_groups_help() -> str:
    """Hydra's ``$APP_CONFIG_GROUPS`` for ``--help`` (``group: option, ...``) without the typed schemas."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    loader = GlobalHydra.instance().config_loader()
    lines = []
    for group in _app_groups(loader):
        options = [o for o in sorted(loader.get_group_options(group, ObjectType.CONFIG)) if not _is_schema(o)]
        if options:
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def _app_groups(loader, parent: str = ""):
    """Every config group below ``parent``, nested ones included, except Hydra's own (``hydra/...``)."""
    for name in sorted(loader.list_groups(parent)):
        group = f"{parent}/{name}" if parent else name
        if group != "hydra":
            yield group
            yield from _app_groups(loader, group)


def _is_schema(option: str) -> bool:
    """``<group>/schema`` and ``stage/<name>_schema`` (``config.register_configs``): extended, never chosen."""
    return option == "schema" or option.endswith("_schema")


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


def is_main_process() -> bool:
    """Rank 0 of a data-parallel launch (or a plain run), from the launcher's environment: torch may not be
    imported yet (``distributed.is_main`` agrees once it is)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def main(cfg: DictConfig, run_dir: Path | None = None) -> float | None:
    """Run one job; returns the stage's objective for sweepers. Bad input exits 2 with one line."""
    _setup_logging()
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra(cfg)
    try:
        preflight.check(cfg)  # the whole config, every path, the output dir: before the heavy imports
    except ConfigError as err:
        return _input_error(err, run_dir)
    console.quiet_libraries()
    choice = threads.configure(cfg.threads)  # before torch is imported: OpenMP reads its settings once
    try:
        with console.progress_as_lines():
            return _run(cfg, run_dir, choice)
    except KeyboardInterrupt:  # while the heavy stack loads (``_run`` handles it once the stage has begun)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if is_main_process():
            print("marl-exp: interrupted (Ctrl-C) before the stage started; nothing was trained", file=sys.stderr,
                  flush=True)
        sys.exit(130)


def _input_error(err: BaseException, run_dir: Path) -> float | None:
    """One line on stderr, ``FAILED`` in the run dir, exit 2 (a sweep job returns None and the sweep goes on)."""
    _mark_failed(run_dir, err)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    message = " ".join(str(err).split())  # one line, whatever the message
    if is_main_process():
        print(f"marl-exp: error: {message}", file=sys.stderr, flush=True)
    if in_multirun():  # one bad sweep point must not end the sweep (see hydra_callbacks.SweepReport)
        return None
    sys.exit(INPUT_ERROR_EXIT)


def _precision(cfg: DictConfig) -> str:
    """The plan's precision line for the device the run will use."""
    from marl_exp.modeling.loading import resolve_device
    from marl_exp.config import sft_finetune_mode
    from marl_exp.run.hardware import native_bf16

    device = resolve_device(cfg.device).type
    full = cfg.stage.name == "sft" and sft_finetune_mode(cfg) == "full"
    return console.precision(cfg.quant, native_bf16(device), device, full_finetune=full)


def _run(cfg: DictConfig, run_dir: Path, choice: threads.ThreadChoice) -> float | None:
    from marl_exp.modeling.loading import ModelLoadError
    from marl_exp.provenance import BaseMismatchError
    from marl_exp.rl.reward_sources import RewardFunctionError
    from marl_exp.run import distributed
    from marl_exp.run.interrupt import StageInterrupted, TrainingDiverged

    threads.apply_to_torch(choice.threads)
    distributed.init(cfg.device)  # under `accelerate launch` / `torchrun`: join the other processes
    # Each process's Hydra may have stamped its own time into the run dir; all work in rank 0's.
    run_dir = Path(distributed.broadcast(str(run_dir)))
    try:
        run_dir = records.resume_run_dir(cfg, run_dir)  # stage.resume=auto without a run dir: find the run
        from marl_exp.stages.pipeline import run_stage

        upstream = upstream_sources(cfg)
        if distributed.is_main():
            console.say(console.plan(cfg, run_dir, upstream, choice.short(), _precision(cfg)))
        summary = run_stage(cfg, run_dir)
    except (ConfigError, ModelLoadError, BaseMismatchError, RewardFunctionError) as err:  # the user's input
        return _input_error(err, run_dir)
    except StageInterrupted as err:  # SIGINT/SIGTERM: the stage saved what it could; say how to go on
        message = interrupted_message(cfg, run_dir, err)
        if distributed.is_main():
            atomic_write_text(run_dir / INTERRUPTED_MARKER, message + "\n")
            print(f"marl-exp: {message}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)  # 130 for SIGINT, 143 for SIGTERM
    except KeyboardInterrupt:  # Ctrl-C outside a stage's handler (waiting for a cache lock, loading) or a second one
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = f"interrupted (Ctrl-C); stopped at once. Rerun with: {resume_command(cfg, run_dir)}"
        if distributed.is_main():
            atomic_write_text(run_dir / INTERRUPTED_MARKER, message + "\n")
            print(f"marl-exp: {message}", file=sys.stderr, flush=True)
        sys.exit(130)
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
    console.say(console.result(cfg, run_dir, summary))
    value = summary.get(OBJECTIVE[cfg.stage.name])
    return float(value) if value is not None else None


def upstream_sources(cfg: DictConfig) -> dict[str, tuple[str, str]]:
    """Where the stage's upstream inputs come from: {stage: (path, given | cached | to build)}.

    A given reward adapter with a cached (or to-be-built) SFT model is checked against it here, before
    anything is built or loaded: it must have been trained on that model.
    """
    from marl_exp.stages.pipeline import cache_dir, upstream_config  # imports the tracker: not before the checks

    sources = {}
    for name in needed_upstream(cfg.stage):
        given = given_output(cfg.stage, name)
        if given:
            sources[name] = (given, "given")
            continue
        target = cache_dir(upstream_config(cfg, name))
        output = target / OUTPUT_SUBDIR[name]
        sources[name] = (str(output), "cached" if (target / COMPLETE_MARKER).exists() and output.exists() else "to build")
    if "sft" in sources and sources["sft"][1] != "given":
        given_rewards = {f"stage.rewards.{s.name}.adapter": s.adapter for s in reward_sources(cfg.stage) if s.adapter} \
            if cfg.stage.name in RL_STAGES else {}
        if "reward" in sources and sources["reward"][1] == "given":
            given_rewards = {"stage.reward_adapter": sources["reward"][0], **given_rewards}
        if cfg.stage.get("allow_base_mismatch"):  # the model reports an allowed mismatch when it loads the adapter
            given_rewards = {}
        for key, path in given_rewards.items():
            check_same_base(path, sources["sft"][0], allow_mismatch=False, key=key)
    return sources


INTERRUPTED_MARKER = "INTERRUPTED"


def resume_command(cfg: DictConfig, run_dir: Path) -> str:
    """``python train.py <same overrides> hydra.run.dir=<run_dir> [stage.resume=auto]``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [shlex.quote(str(o)) for o in HydraConfig.get().overrides.task
                     if not str(o).lstrip("+~").startswith("stage.resume=")]
    except ValueError:  # not under @hydra.main: the overrides are unknown
        overrides = ["<same overrides>"]
    from marl_exp.run import distributed

    launcher = ["python"] if not distributed.is_distributed() else \
        ["accelerate", "launch", "--num_processes", str(distributed.world_size())]
    parts = [*launcher, "train.py", *overrides, shlex.quote(f"hydra.run.dir={run_dir}")]
    if cfg.stage.name in RL_STAGES:
        parts.append("stage.resume=auto")
    return " ".join(parts)


def interrupted_message(cfg: DictConfig, run_dir: Path, err: StageInterrupted) -> str:
    command = resume_command(cfg, run_dir)
    if err.checkpoint is not None:
        return f"{err}. Resume with: {command}"
    return (f"{err}; the SFT and reward stages keep no checkpoints (they are short): resuming means rerunning, "
            f"with: {command}")


def _mark_failed(run_dir: Path, err: BaseException) -> None:
    if not is_main_process():
        return
    detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        atomic_write_text(run_dir / FAILURE_MARKER, f"{type(err).__name__}: {err}\n\n{detail}")
    except OSError:  # e.g. the output dir itself is what cannot be written: the error line says so
        pass


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
