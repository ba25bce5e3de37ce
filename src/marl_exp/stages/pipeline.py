"""Runs a stage after resolving the stages it needs, through a cache of upstream outputs.

Which upstream outputs a stage reads is the stage graph (``marl_exp.config.stage_graph``). An upstream
stage that the user did not give a path for is run with the *same* model, data and seed and
``upstream.<stage>``'s settings, into ``<output_dir>/cache/<stage>-<hash>``, where ``hash`` is
``config_hash`` of the config that produced it. A later run with the same upstream config finds it there
and reuses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from marl_exp.config import STAGE_SCHEMAS, UPSTREAM_ONLY_KEYS, AdapterConfig, Config, QuantConfig, to_yaml
from marl_exp.config.stage_graph import (
    COMPLETE_MARKER,
    INPUT_KEY,
    OUTPUT_SUBDIR,
    UPSTREAM,
    config_hash,
    given_output,
    needed_upstream,
)
from marl_exp.io import atomic_write_json, atomic_write_text
from marl_exp.provenance import BUILTIN_PREFIX
from marl_exp.run import distributed, lineage, records
from marl_exp.run.tracking import Tracker
from marl_exp.stages.common import environment_record

log = logging.getLogger(__name__)


def run_stage(cfg: DictConfig, run_dir: Path, publish_dir: Path | None = None) -> dict:
    """Run ``cfg.stage`` in ``run_dir`` (upstream stages first, when needed) and return its summary.

    With W&B, the run declares its inputs and logs its output as artifacts (``marl_exp.run.lineage``);
    ``publish_dir`` is where ``run_dir`` will be moved to, if it is (a cache entry), for their paths.
    """
    run_dir = Path(run_dir)
    inputs = resolve_inputs(cfg)
    save_run_record(cfg, run_dir, inputs)
    with Tracker(cfg, run_dir, job_type=cfg.stage.name, publish_dir=publish_dir) as tracker:
        lineage.use_inputs(tracker, cfg, inputs)
        summary = _runner(cfg.stage.name)(cfg, run_dir, tracker, **inputs)
        # Every segment of a resumed run counts (marl_exp.run.records).
        tracker.update_summary({"time/total_s": tracker.total_seconds(),
                                **({"dist/world_size": distributed.world_size()} if distributed.is_distributed() else {})})
        lineage.log_outputs(tracker, cfg, run_dir, tracker.summary, publish_dir or run_dir)
    return {**summary, "time/total_s": tracker.summary["time/total_s"]}


def _runner(stage: str):
    if stage == "sft":
        from marl_exp.stages import sft
        return lambda cfg, run_dir, tracker: sft.run(cfg, run_dir, tracker)
    if stage == "reward":
        from marl_exp.stages import reward
        return reward.run
    from marl_exp.stages import rl
    return rl.run


def resolve_inputs(cfg: DictConfig) -> dict:
    """Paths of the upstream outputs ``cfg.stage`` needs (``{"sft_model": ..., "reward_adapter": ...}``), in
    build order, running upstream stages when not given."""
    return {INPUT_KEY[name]: given_input(given_output(cfg.stage, name), cfg.model) or
            str(cached_output(upstream_config(cfg, name))) for name in needed_upstream(cfg.stage)}


def given_input(path: str | None, model_cfg) -> str | None:
    """A user-given input: a built-in model's name (``builtin:smollm2``, e.g. an instruct model as its own SFT
    model) as its directory in the model cache, built on first use; local directories made absolute (they are
    recorded, and read from other working directories later); anything else (a hub id) as is."""
    if path and path.startswith(BUILTIN_PREFIX):
        from marl_exp.modeling.loading import resolve_model_path  # imports torch: only for a built-in model

        return str(Path(resolve_model_path(OmegaConf.merge(model_cfg, {"path": path}))).resolve())
    if path and Path(path).expanduser().is_dir():
        return str(Path(path).expanduser().resolve())
    return path or None


def upstream_config(cfg: DictConfig, stage: str) -> DictConfig:
    """The config an upstream ``stage`` runs with: this run's model, data and seed, ``cfg.upstream.<stage>``.

    Its adapter and quantization are ``upstream.<stage>.adapter`` and ``upstream.<stage>.quant``: by
    default SFT trains in fp32 and the reward adapter under this run's quantization (the one PPO will
    use it under), both with the default LoRA.
    """
    upstream = OmegaConf.to_container(cfg.get("upstream", {}).get(stage, {}), resolve=True)
    own = {key: upstream.pop(key) for key in UPSTREAM_ONLY_KEYS if key in upstream}
    stage_node = OmegaConf.merge(OmegaConf.structured(STAGE_SCHEMAS[stage]), upstream)
    for name in UPSTREAM[stage]:  # an output given to this run is given to its upstream stages too
        key = INPUT_KEY[name]
        stage_node[key] = cfg.stage.get(key) or stage_node[key]
    node = {
        "model": cfg.model, "data": cfg.data, "logger": cfg.logger, "seed": cfg.seed, "device": cfg.device,
        "output_dir": cfg.output_dir, "quant": _upstream_quant(cfg, own.get("quant", "same" if stage == "reward" else "fp32")),
        "adapter": OmegaConf.merge(OmegaConf.structured(AdapterConfig), own.get("adapter", {})),
        "stage": stage_node, "upstream": cfg.get("upstream", {}),
    }
    return OmegaConf.merge(OmegaConf.structured(Config), node)


def _upstream_quant(cfg: DictConfig, mode: str) -> DictConfig:
    # "same" is this run's node and fp32 the schema's default node, as given: each node is part of the cache hash.
    if mode == "same":
        return cfg.quant
    if mode == "fp32":
        return OmegaConf.structured(QuantConfig)
    return OmegaConf.merge(cfg.quant, {"mode": mode})  # bnb_4bit_* settings from this run's quant group


def cache_dir(cfg: DictConfig) -> Path:
    # Absolute: the path is recorded in run records and adapter configs, and read from other dirs.
    return Path(cfg.output_dir).expanduser().resolve() / "cache" / f"{cfg.stage.name}-{config_hash(cfg)}"


def cached_output(cfg: DictConfig) -> Path:
    """Output of the stage ``cfg`` describes: reused from the cache, or produced now and cached.

    Concurrent jobs (e.g. a parallel multirun) that need the same entry build it once: the first
    takes a lock, the others wait for it and then reuse its result.
    """
    target = cache_dir(cfg)
    output = target / OUTPUT_SUBDIR[cfg.stage.name]
    if distributed.is_distributed():
        return _cached_output_distributed(cfg, target, output)
    if _complete(target, output):
        log.info("reusing cached %s stage output %s (same upstream config)", cfg.stage.name, output)
        return output
    with _build_lock(target):
        if _complete(target, output):
            log.info("reusing cached %s stage output %s (built by another job)", cfg.stage.name, output)
            return output
        log.info("no cached %s output for this config: running the %s stage into %s",
                 cfg.stage.name, cfg.stage.name, target)
        # Under the lock nobody else builds this entry: builds left by crashed jobs are garbage.
        for stale in target.parent.glob(f".{target.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        # Build beside the target and rename, so an interrupted build is never mistaken for a result.
        building = target.with_name(f".{target.name}.building-{os.getpid()}")
        # Named after the entry, not after the temporary dir (W&B run name); not part of the hash.
        try:
            run_stage(OmegaConf.merge(cfg, {"run_name": cfg.run_name or target.name}), building, publish_dir=target)
        except BaseException:  # failed or interrupted: no half-built entry stays behind (the run dir has FAILED)
            shutil.rmtree(building, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)  # a stale, incomplete dir from an older crash
        os.replace(building, target)
    return output


def _cached_output_distributed(cfg: DictConfig, target: Path, output: Path) -> Path:
    """All ranks build a missing entry together (its trainer is data parallel); rank 0 holds the lock,
    decides and publishes."""
    with _build_lock(target) if distributed.is_main() else contextlib.nullcontext():
        building = target.with_name(f".{target.name}.building-{os.getpid()}")
        decision = distributed.broadcast(None if _complete(target, output) else str(building))
        if decision is None:
            log.info("reusing cached %s stage output %s (same upstream config)", cfg.stage.name, output)
            return output
        log.info("no cached %s output for this config: running the %s stage on %d processes into %s",
                 cfg.stage.name, cfg.stage.name, distributed.world_size(), target)
        run_stage(OmegaConf.merge(cfg, {"run_name": cfg.run_name or target.name}), Path(decision), publish_dir=target)
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(target, ignore_errors=True)
            os.replace(decision, target)
        distributed.barrier()
    return output


def _complete(target: Path, output: Path) -> bool:
    return (target / COMPLETE_MARKER).exists() and output.exists()


@contextlib.contextmanager
def _build_lock(target: Path):
    """An exclusive lock on one cache entry (a no-op where ``fcntl`` is missing)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(target.with_name(f".{target.name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another job is building %s; waiting for it", target)
            _wait_for_lock(handle)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wait_for_lock(handle, poll_s: float = 0.2) -> None:
    """An exclusive lock on ``handle``, taken in short polls. A blocking flock returns on a signal only when the
    signal reaches this thread: a Ctrl-C that another thread receives would wait until the lock is free."""
    import fcntl

    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(poll_s)


def save_run_record(cfg: DictConfig, run_dir: Path, inputs: dict) -> None:
    """The resolved config, upstream inputs and environment, so a run can be traced and repeated."""
    if not distributed.is_main():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    config_name, record_name = records.run_record_names(cfg, run_dir)  # a resume's go beside the original's
    atomic_write_text(run_dir / config_name, to_yaml(cfg))
    atomic_write_json(run_dir / record_name, {"inputs": inputs, **environment_record()})
