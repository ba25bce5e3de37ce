"""Run tracking: W&B (optional) plus local ``metrics.jsonl`` and ``summary.json`` in every run dir.

The local files are written whatever the logger, so runs can be compared without a W&B account.

A resumed run (``stage.resume`` in a run dir that has a summary) is one run, on disk and in W&B: the
W&B run of the first segment continues (same id, ``resume="allow"``), ``metrics.jsonl`` is cut back to
the checkpoint (``Tracker.continue_from``) and W&B receives each step once: the steps an earlier
segment already logged are not sent again (a resumed run recomputes them to the same values), the
steps it logged locally but W&B never got are replayed from ``metrics.jsonl``. See ``marl_exp.run.records``
for the segments recorded in ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import shlex
import struct
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from marl_exp.config import ARTIFACT_MODES, ConfigError
from marl_exp.io import atomic_write_json
from marl_exp.run import distributed, records

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
    info = {
        "multirun": multirun,
        "overrides": [str(o) for o in hydra_cfg.overrides.task],
        "override_dirname": str(hydra_cfg.job.get("override_dirname") or ""),
        "job_num": hydra_cfg.job.get("num") if multirun else None,
        "sweep_dir": str(hydra_cfg.sweep.dir) if multirun else None,
    }
    swept = swept_values(info) if multirun else None
    if swept is not None:
        info["swept"] = swept
    return info


def swept_values(info: dict[str, Any]) -> dict[str, str] | None:
    """This job's values of the keys its multirun sweeps (``adapter.r=8,16`` on the command line, or a
    preset's ``hydra.sweeper.params``), read from the sweep's ``multirun.yaml``; None without one."""
    path = Path(info["sweep_dir"]) / "multirun.yaml"
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        sweep_cfg = OmegaConf.load(path)
        parsed = OverridesParser.create().parse_overrides([str(o) for o in sweep_cfg.hydra.overrides.task])
    except Exception:  # noqa: BLE001 - no multirun.yaml (another sweeper), or one we cannot read: no keys
        return None
    swept = {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}
    swept |= {str(key) for key in (sweep_cfg.hydra.sweeper.get("params") or {})}
    job = {}
    for override in info["overrides"]:
        key, _, value = override.lstrip("+~").partition("=")
        job[key] = value
    return {key: value for key, value in job.items() if key in swept}


def sweep_group_name(sweep_dir: str) -> str:
    """W&B group of a multirun: its dir below ``multirun/`` ("2025-01-31_12-00-00_ppo"), else its name."""
    parts = Path(sweep_dir).parts
    if "multirun" in parts[:-1]:
        return "_".join(parts[len(parts) - 1 - parts[::-1].index("multirun") + 1:])
    return Path(sweep_dir).name


# The key W&B's dashboard, like `marl-exp compare --group`, averages over.
SEED_KEY = "seed"


def wandb_identity(cfg: DictConfig, run_dir: Path) -> tuple[str | None, str, dict[str, Any] | None]:
    """(group, default run name, hydra info for the W&B config) of a run.

    In a multirun every job is its own W&B run. Its group is the sweep (``logger.group`` wins when set)
    plus the swept values but the seed, so the dashboard groups seeds of one setting together (mean and
    band, as ``marl-exp compare --group`` does): ``2025-01-31_12-00-00_ppo:adapter.r=8``. Its name is
    ``<job num>:<swept values>`` (``3:adapter.r=8,seed=1``), or ``<job num>:<overrides>`` when the swept
    keys are unknown (a sweeper that writes no ``multirun.yaml``).
    """
    info = hydra_job_info()
    group = cfg.logger.group
    name = Path(run_dir).name
    if info and info["multirun"]:
        group = group or sweep_group_name(info["sweep_dir"])
        swept = info.get("swept")
        if swept:
            setting = ",".join(f"{k}={v}" for k, v in swept.items() if k != SEED_KEY)
            group = f"{group}:{setting}" if setting else group
            name = f"{info['job_num']}:" + ",".join(f"{k}={v}" for k, v in swept.items())
        else:
            name = f"{info['job_num']}:{info['override_dirname']}" if info["override_dirname"] else f"{group}/{name}"
    return group, name, info


def init_wandb_or_offline(publish=lambda path: path, **kwargs):
    """``wandb.init``; when an online init fails (host unreachable, bad API key, timeout), warn once and
    log offline instead: a logger problem never stops training. ``publish`` maps a path in the run dir to
    where it will be when the run is over (a cache entry is built elsewhere and renamed)."""
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
                    reason[:300], publish(Path(run.dir).parent))
        return run


class SegmentRun:
    """The W&B run as one segment of a resumed run may log to it: a step W&B already holds from an
    earlier segment is not sent again (online W&B would drop it with a warning; ``wandb sync`` of an
    offline segment would append it as a new row and shift the steps after it). Everything else is the
    wandb run's own."""

    def __init__(self, run, first_new_step: int = 0):
        self._run = run
        self.first_new_step = first_new_step

    def log(self, data: dict, step: int | None = None, **kwargs) -> None:
        if step is not None and step < self.first_new_step:
            return
        self._run.log(data, step=step, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._run, name)


class Tracker:
    """One run's metrics sink. Use as a context manager so the W&B run is always finished and the
    segment recorded with how it ended.

    ``publish_dir``: where ``run_dir`` will be once the run is over (a cache entry is built in a temp dir
    and renamed), for the paths it prints.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, job_type: str, name: str | None = None,
                 publish_dir: Path | None = None):
        self.run_dir = Path(run_dir)
        self.publish_dir = Path(publish_dir) if publish_dir is not None else self.run_dir
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
        self.resuming = records.is_resuming(cfg, self.run_dir)
        info = hydra_job_info()
        self.segments = records.Segments(self.run_dir, self.resuming, overrides=info["overrides"] if info else None)
        if self.writes and "resume" in cfg.stage:  # a stage that can be resumed keeps its original Hydra files
            records.keep_original_hydra_files(self.run_dir, self.segments.index, records.hydra_output_dir())
        self.wandb_run = None
        if cfg.logger.name == "wandb" and self.writes:
            self.wandb_run = self._init_wandb(cfg, job_type, name)

    def _init_wandb(self, cfg: DictConfig, job_type: str, name: str | None):
        mode = resolve_wandb_mode(cfg.logger.mode)
        group, default_name, hydra_info = wandb_identity(cfg, self.run_dir)
        config = OmegaConf.to_container(cfg, resolve=True)
        if hydra_info:
            config["hydra"] = hydra_info
        # A resume continues the W&B run of the first segment.
        run_id = wandb_run_id(self.segments.earlier) if self.resuming else None
        run = init_wandb_or_offline(
            publish=self._published,
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
            **({"id": run_id, "resume": "allow"} if run_id else {}),
        )
        offline = bool(getattr(run, "offline", False))
        wandb_dir = Path(getattr(run, "dir", "") or ".").parent  # <run dir>/wandb/offline-run-<time>-<id>
        self.segments.current["wandb"] = {
            "id": getattr(run, "id", None), "mode": "offline" if offline else "online",
            "dir": str(wandb_dir.relative_to(self.run_dir) if wandb_dir.is_relative_to(self.run_dir) else wandb_dir)}
        if run_id:
            log.info("W&B: continuing run %s (%s)", run_id, "offline" if offline else "online")
        return SegmentRun(run)

    def _published(self, path: Path) -> Path:
        path = Path(path)
        return self.publish_dir / path.relative_to(self.run_dir) if path.is_relative_to(self.run_dir) else path

    def continue_from(self, step: int | None) -> None:
        """Called by a stage once it knows where a resume goes on: after ``step`` (its checkpoint), or
        from the start (None: no checkpoint was saved). Cuts ``metrics.jsonl`` back to ``step`` and sets
        which steps W&B still needs. Nothing happens in a run that is not a resume."""
        self.segments.current["resumed_from_step"] = step
        if not (self.writes and self.resuming):
            return
        dropped = records.cut_metrics(self.run_dir, step)
        if dropped:
            log.info("metrics.jsonl cut back to %s: %d row(s) of steps %s..%s are computed again",
                     f"step {step}" if step is not None else "the start", len(dropped), min(dropped), max(dropped))
        if self.wandb_run is not None:
            self._continue_wandb(step)

    def _continue_wandb(self, step: int | None) -> None:
        run, through = self.wandb_run, -1 if step is None else step
        if not getattr(run, "offline", False) and getattr(run, "resumed", False):
            first_new = int(run.starting_step)  # what the W&B server holds
        else:  # what `wandb sync` will upload: the earlier segments' offline files
            first_new = wandb_next_step(self.run_dir, self.segments.earlier)
        # Steps up to the checkpoint that W&B never got (the process died before wandb wrote them).
        missing = [row for row in records.read_metrics(self.run_dir) if first_new <= row["step"] <= through]
        for row in missing:
            run.log({k: _from_json(v) for k, v in row.items() if k != "step"}, step=row["step"])
        if missing:
            log.info("W&B: replayed %d row(s) of steps %d..%d from metrics.jsonl (the earlier segment's W&B run "
                     "never got them)", len(missing), missing[0]["step"], missing[-1]["step"])
        run.first_new_step = first_new
        if first_new > through + 1:
            log.info("W&B: steps %d..%d are in W&B already (logged before the interruption, computed again to "
                     "the same values); they go to metrics.jsonl only", through + 1, first_new - 1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.writes:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
        self.segments.current["last_step"] = max(step, self.segments.current["last_step"] or step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def update_summary(self, metrics: dict[str, Any]) -> None:
        self.summary.update({k: _jsonable(v) for k, v in metrics.items()})
        self._write_summary()
        if self.wandb_run is not None:
            self.wandb_run.summary.update(metrics)

    def _write_summary(self) -> None:
        if self.writes:
            atomic_write_json(self.run_dir / records.SUMMARY, {**self.summary, records.SEGMENTS: self.segments.all})

    def total_seconds(self) -> float:
        """Wall time of the run: every segment so far, this one up to now."""
        return self.segments.total_seconds()

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

    def finish(self, exit_code: int = 0, status: str | None = None) -> None:
        """Record how this segment ended (``status``: finished, interrupted, failed) and finish the W&B run."""
        if self.segments.current["status"] == records.RUNNING:
            self.segments.end(status or (records.FINISHED if exit_code == 0 else records.FAILED))
            # Only a summary the stage has started: an SFT or reward run that stops early leaves none.
            if (self.run_dir / records.SUMMARY).exists():
                self._write_summary()
        if self.wandb_run is not None:
            self._drop_stale_wandb_summary()
            self.wandb_run.finish(exit_code=exit_code)
            if getattr(self.wandb_run, "offline", False):
                log.info("W&B is offline; upload %s with: %s",
                         "this run" if self.segments.index == 0 else "every segment of this run, in order",
                         self.sync_command())
            self.wandb_run = None

    def sync_command(self) -> str:
        """``wandb sync`` for each offline W&B dir of this run, one after the other: a resumed segment
        must reach the server after the one before it (one ``wandb sync`` of several dirs uploads them at
        the same time). A killed segment's file ends with a cut record; its sync uploads what comes before
        and says so."""
        directories = wandb_dirs(self.segments.all, self.segments.current["wandb"]["id"])
        return " && ".join(f"wandb sync {shlex.quote(str(self._published(self.run_dir / d)))}" for d in directories)

    def _drop_stale_wandb_summary(self) -> None:
        """A resumed W&B run starts from the summary the earlier segments left; keys this segment did not
        write again (e.g. ``train/interrupted_at_step``) are removed."""
        if not self.resuming:
            return
        for key in set(self.segments.previous_summary) - set(self.summary):
            try:
                del self.wandb_run.summary[key]
            except Exception:  # noqa: BLE001 - a logger problem never stops training
                pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from marl_exp.run.interrupt import StageInterrupted

        status = records.FINISHED if exc_type is None else \
            records.INTERRUPTED if exc_type is not None and issubclass(exc_type, StageInterrupted) else records.FAILED
        self.finish(exit_code=0 if exc_type is None else 1, status=status)


def _from_json(value: Any) -> Any:
    """A metric as ``metrics.jsonl`` stores it, back to what was logged (non-finite floats are strings)."""
    return float(value) if value in ("nan", "inf", "-inf") else value


# --------------------------------------------------------------------- W&B files of a run's segments
def wandb_run_id(segments: list[dict[str, Any]]) -> str | None:
    """The W&B run of a run dir: the id of the first segment that logged to W&B."""
    for segment in segments:
        run_id = (segment.get("wandb") or {}).get("id")
        if run_id:
            return run_id
    return None


def wandb_dirs(segments: list[dict[str, Any]], run_id: str | None) -> list[str]:
    """The W&B run dirs (relative to the run dir) of the segments that logged to ``run_id``, in order."""
    found = []
    for segment in segments:
        record = segment.get("wandb") or {}
        if run_id and record.get("id") == run_id and record.get("dir"):
            found.append(record["dir"])
    return found


def wandb_next_step(run_dir: Path, segments: list[dict[str, Any]]) -> int:
    """The first step that the W&B files of ``segments`` do not hold: one past their last history row."""
    steps = []
    for directory in wandb_dirs(segments, wandb_run_id(segments)):
        for path in (Path(run_dir) / directory).glob("*.wandb"):
            steps.extend(wandb_history_steps(path))
    return max(steps) + 1 if steps else 0


_FILE_HEADER = 7  # ":W&B", format magic (2 bytes), version (1 byte)
_BLOCK = 32768  # LevelDB log format: records are cut into chunks that never cross a 32 KiB block
_CHUNK_HEADER = 7  # checksum (4 bytes), length (2), type (1): 1 full, 2 first, 3 middle, 4 last


def wandb_history_steps(path: Path) -> list[int]:
    """Steps of the history rows in a ``.wandb`` file, the record log ``wandb sync`` uploads (decoded
    with wandb's own protobuf classes). A file cut short by a killed process gives the rows before the cut."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        return []
    steps, chunks, pos = [], [], _FILE_HEADER
    while pos + _CHUNK_HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK_HEADER:  # the rest of a block too short for a header is padding
            pos += room
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + _CHUNK_HEADER])
        if length == 0 and kind == 0:  # zero padding
            pos += room
            continue
        end = pos + _CHUNK_HEADER + length
        if end > len(data):  # the file ends inside this chunk
            break
        chunks.append(data[pos + _CHUNK_HEADER:end])
        pos = end
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(b"".join(chunks))
            except Exception:  # noqa: BLE001 - a damaged record: what came before it is all we trust
                break
            chunks = []
            if record.WhichOneof("record_type") == "history":
                steps.append(record.history.step.num)
    return steps


# ------------------------------------------------------------------------------------ samples table
SAMPLE_COLUMNS = ("query", "response", "reward", "oracle", "well_formed")


def samples_table_columns(samples: list[dict[str, Any]]) -> list[str]:
    """The columns of a samples table: query, response, the weighted reward, then each reward source's score
    (``rewards/<name>``, in the samples' order), oracle and judge."""
    sources = [key for key in dict.fromkeys(k for sample in samples for k in sample) if key.startswith("rewards/")]
    return [*SAMPLE_COLUMNS[:3], *sources, *SAMPLE_COLUMNS[3:]]


def samples_table(samples: list[dict[str, Any]]):
    """A few sampled responses as a ``wandb.Table`` (``samples_table_columns``)."""
    import wandb

    columns = samples_table_columns(samples)
    return wandb.Table(columns=columns, data=[[sample.get(c) for c in columns] for sample in samples])


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
