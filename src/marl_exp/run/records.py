"""Run-dir records that stay true when a run is interrupted and resumed.

One run dir may be written by several processes in turn: the first one, then each ``stage.resume``
after a kill or Ctrl-C. Each process is a **segment**; ``summary.json`` lists them under ``segments``
(start and end time, seconds, status, first and last step, overrides, W&B run dir), and
``time/total_s`` adds up their seconds. A segment whose process died without a word (``kill -9``, a lost
node) still says ``running``; the next segment marks it ``killed``, ending at the last write the dead
process left in the run dir.

On resume:

- ``metrics.jsonl`` is cut back to the checkpoint's step (``cut_metrics``): the steps after it are
  computed again, and each step is written once;
- Hydra has already overwritten ``.hydra/*.yaml`` with the resume's; they are kept beside the
  originals as ``.hydra/<name>.resume-<n>.yaml`` and the originals, backed up by the first segment in
  ``.hydra/original/``, go back in place (``keep_original_hydra_files``); the resume's
  ``resolved_config.yaml`` and ``run_record.json`` are written as ``*.resume-<n>.*`` likewise.

``run_status`` reads all this back for ``marl-exp compare``; ``resume_run_dir`` finds the run that
``stage.resume=auto`` continues when no run dir was given.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from marl_exp.io import atomic_write_text

log = logging.getLogger(__name__)
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
SEGMENTS = "segments"
FAILURE_MARKER = "FAILED"  # the same names as marl_exp.cli (kept import-light here: compare reads them)
INTERRUPTED_MARKER = "INTERRUPTED"
HYDRA_DIR = ".hydra"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
ORIGINAL_HYDRA = "original"  # .hydra/original/: the first segment's Hydra files
# Statuses a segment can end with; "running" is only ever the current (or a dead) process's.
FINISHED, INTERRUPTED, FAILED, KILLED, RUNNING = "finished", "interrupted", "failed", "killed", "running"


# ------------------------------------------------------------------------------------------- reading
def read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        summary = json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a line cut by a crash is skipped."""
    rows = []
    try:
        text = (Path(run_dir) / METRICS).read_text(errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def last_step(rows: list[dict[str, Any]]) -> int | None:
    steps = [row["step"] for row in rows if isinstance(row.get("step"), int)]
    return max(steps) if steps else None


# ------------------------------------------------------------------------------------------ segments
def is_resuming(cfg, run_dir: Path) -> bool:
    """A resume continues this run dir's run: ``stage.resume`` is set and an earlier segment left
    something here (a summary, metrics or a checkpoint)."""
    return bool(cfg.stage.get("resume")) and not is_fresh(run_dir)


def segment_index(cfg, run_dir: Path) -> int:
    """0 for a new run, n for the n-th resume (a run dir from before segments were recorded counts as one)."""
    if not is_resuming(cfg, run_dir):
        return 0
    return max(len(read_summary(run_dir).get(SEGMENTS) or []), 1)


def run_record_names(cfg, run_dir: Path) -> tuple[str, str]:
    """Where this segment's resolved config and run record go: the run's own names, or beside them with
    ``.resume-<n>`` for a resume (the original run's files are kept)."""
    index = segment_index(cfg, run_dir)
    names = ("resolved_config.yaml", "run_record.json")
    if index == 0 or not (Path(run_dir) / names[0]).exists():  # no original to keep (a copied checkpoint)
        return names
    return tuple(resume_name(name, index) for name in names)


class Segments:
    """The segments of one run dir: the earlier ones (read from ``summary.json`` when resuming) and
    this process's, which ``Tracker`` keeps up to date and writes with the summary."""

    def __init__(self, run_dir: Path, resuming: bool, overrides: list[str] | None = None):
        self.run_dir = Path(run_dir)
        previous = read_summary(self.run_dir) if resuming else {}
        self.previous_summary = {k: v for k, v in previous.items() if k != SEGMENTS}
        self.earlier: list[dict[str, Any]] = [dict(s) for s in previous.get(SEGMENTS) or [] if isinstance(s, dict)]
        if resuming:
            self._close_dead(self.earlier)
        self._clock = time.perf_counter()
        self.current: dict[str, Any] = {
            "segment": max(len(self.earlier), 1) if resuming else 0, "status": RUNNING, "started_at": _now(),
            "ended_at": None, "seconds": None, "last_step": None, "pid": os.getpid(),
            "host": socket.gethostname(), "overrides": overrides, "resumed_from_step": None, "wandb": None}

    @property
    def index(self) -> int:
        return self.current["segment"]

    @property
    def all(self) -> list[dict[str, Any]]:
        return [*self.earlier, {**self.current, "seconds": self.current["seconds"] or self.seconds()}]

    def seconds(self) -> float:
        return time.perf_counter() - self._clock

    def total_seconds(self) -> float:
        """Wall time of every segment so far, this one up to now."""
        return sum(float(s.get("seconds") or 0.0) for s in self.earlier) + self.seconds()

    def end(self, status: str) -> None:
        self.current.update(status=status, ended_at=_now(), seconds=self.seconds())

    def _close_dead(self, segments: list[dict[str, Any]]) -> None:
        """A segment still ``running`` belongs to a process that died without a word: ``killed``, ending
        at the last write it left (metrics, summary or checkpoint), with the last step it logged."""
        dead = [segment for segment in segments if segment.get("status") == RUNNING]
        if not dead:
            return
        ended, logged = last_write_time(self.run_dir), last_step(read_metrics(self.run_dir))
        for segment in dead:
            started = _parse_time(segment.get("started_at"))
            segment.update(status=KILLED, ended_at=_iso(ended) if ended else None,
                           seconds=max(ended - started, 0.0) if ended and started else None)
            if logged is not None and (segment.get("last_step") is None or segment["last_step"] < logged):
                segment["last_step"] = logged


def last_write_time(run_dir: Path) -> float | None:
    """Latest modification time of what a running stage writes: metrics, summary, checkpoints."""
    run_dir = Path(run_dir)
    paths = [run_dir / METRICS, run_dir / SUMMARY, run_dir / "samples.jsonl", *(run_dir / "checkpoints").glob("step-*")]
    times = [p.stat().st_mtime for p in paths if p.exists()]
    return max(times) if times else None


def _now() -> str:
    return _iso(time.time())


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="milliseconds")


def _parse_time(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------- resume
def cut_metrics(run_dir: Path, through_step: int | None) -> list[int]:
    """Keep the rows of ``metrics.jsonl`` up to ``through_step`` (none when None: the run starts over);
    returns the steps of the rows dropped. The file is replaced atomically."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = read_metrics(run_dir)
    limit = -1 if through_step is None else through_step
    kept = [row for row in rows if isinstance(row.get("step"), int) and row["step"] <= limit]
    dropped = [row.get("step") for row in rows if row not in kept]
    if dropped or len(kept) != len(path.read_text(errors="replace").splitlines()):
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
    return dropped


def hydra_output_dir() -> Path | None:
    """Where Hydra wrote this process's ``config.yaml``, ``overrides.yaml``, ``hydra.yaml``; None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:
        return None
    from omegaconf import OmegaConf

    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", throw_on_missing=False)
    if hydra_cfg.output_subdir is None or output_dir is None:  # composed, not run: no dir was made
        return None
    return Path(output_dir) / str(hydra_cfg.output_subdir)


def keep_original_hydra_files(run_dir: Path, segment: int, hydra_dir: Path | None = None) -> None:
    """Segment 0 backs up ``.hydra/*.yaml`` in ``.hydra/original/``; segment n >= 1 (a resume) keeps the
    files Hydra wrote for it (in ``hydra_dir``: the run's own ``.hydra``, which Hydra overwrote, or the
    new dir Hydra made when ``stage.resume=auto`` found the run elsewhere, then removed) as
    ``.hydra/<name>.resume-<n>.yaml`` and puts the originals back. Outside Hydra nothing happens."""
    if hydra_dir is None:
        return
    own = Path(run_dir) / HYDRA_DIR
    backup = own / ORIGINAL_HYDRA
    if segment == 0:
        for name in HYDRA_FILES:
            if (own / name).is_file():
                backup.mkdir(parents=True, exist_ok=True)
                shutil.copy2(own / name, backup / name)
        return
    for name in HYDRA_FILES:
        if (hydra_dir / name).is_file():
            own.mkdir(parents=True, exist_ok=True)
            shutil.copy2(hydra_dir / name, own / resume_name(name, segment))
        if (backup / name).is_file():
            shutil.copy2(backup / name, own / name)
    if hydra_dir.resolve() != own.resolve() and remove_if_only_hydra_files(hydra_dir.parent):
        log.info("removed %s: Hydra made it for this process, which resumes %s instead", hydra_dir.parent, run_dir)


def resume_name(name: str, segment: int) -> str:
    """``overrides.yaml`` → ``overrides.resume-1.yaml``: the file written by resume number ``segment``."""
    stem, dot, suffix = name.partition(".")
    return f"{stem}.resume-{segment}{dot}{suffix}"


# ------------------------------------------------------------------------------------------- status
def run_status(run_dir: Path, summary: dict[str, Any] | None = None) -> str:
    """``ok``, ``FAILED``, ``interrupted`` (stopped by a signal, with a checkpoint to resume from),
    ``running`` (its process is alive on this host) or ``incomplete`` (killed, or never finished).
    A run resumed to its end is ``ok`` whatever its earlier segments left."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir) if summary is None else summary
    segments = summary.get(SEGMENTS)
    last = segments[-1] if segments and isinstance(segments[-1], dict) else None
    failed_marker = (run_dir / FAILURE_MARKER).is_file()
    if last is not None:
        status = last.get("status")
        if status == FINISHED:
            return "ok"
        if status == FAILED or failed_marker:  # the marker: a resume that failed before it started
            return "FAILED"
        if status == INTERRUPTED:
            return "interrupted"
        return "running" if status == RUNNING and _alive(last.get("pid"), last.get("host")) else "incomplete"
    # A run dir from before segments were recorded: the total time is the last thing a run writes.
    if failed_marker:
        return "FAILED"
    if (run_dir / INTERRUPTED_MARKER).is_file():
        return "interrupted"
    return "ok" if "time/total_s" in summary else "incomplete"


def _alive(pid: Any, host: Any) -> bool:
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process with that id
        return True
    return True


# ------------------------------------------------------------------------------ stage.resume=auto
# Keys that say where a run is logged, not what it computes: a resume may change them.
NOT_THE_RUN = ("logger", "run_name")


def resume_key(container: dict[str, Any]) -> str:
    """What two runs must share for one to continue the other: the resolved config without
    ``stage.resume`` and the logger settings."""
    config = {k: v for k, v in container.items() if k not in NOT_THE_RUN}
    config["stage"] = {k: v for k, v in dict(config.get("stage") or {}).items() if k != "resume"}
    return json.dumps(config, sort_keys=True, default=str)


def is_fresh(run_dir: Path) -> bool:
    """Nothing of an earlier segment here: no summary, no metrics, no checkpoint."""
    run_dir = Path(run_dir)
    return not any((run_dir / name).exists() for name in (SUMMARY, METRICS, "checkpoints"))


def find_interrupted_runs(output_dir: Path, container: dict[str, Any], exclude: Path | None = None) -> list[Path]:
    """Run dirs under ``<output_dir>/runs`` and ``<output_dir>/multirun`` with the same config
    (``resume_key``) that never finished, newest first."""
    key = resume_key(container)
    found = []
    for tree in ("runs", "multirun"):
        for resolved in sorted((Path(output_dir) / tree).glob("**/resolved_config.yaml")):
            run_dir = resolved.parent
            if exclude is not None and run_dir.resolve() == Path(exclude).resolve():
                continue
            if run_status(run_dir) not in ("interrupted", "incomplete") or is_fresh(run_dir):
                continue
            try:
                import yaml

                if resume_key(yaml.safe_load(resolved.read_text()) or {}) != key:
                    continue
            except (OSError, ValueError, yaml.YAMLError):
                continue
            found.append(run_dir)
    return sorted(found, key=lambda d: last_write_time(d) or 0.0, reverse=True)


def remove_if_only_hydra_files(run_dir: Path) -> bool:
    """Remove a run dir Hydra made for this process when it holds nothing but Hydra's own files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    entries = list(run_dir.iterdir())
    if not all(e.name == HYDRA_DIR or (e.is_file() and e.suffix == ".log") for e in entries):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    try:  # Hydra's date dir above it, when nothing else is in it
        run_dir.parent.rmdir()
    except OSError:
        pass
    return True


def run_dir_given() -> bool:
    """True when this process was told its run dir: ``hydra.run.dir`` (``hydra.sweep.dir`` in a
    multirun) on the command line, or no Hydra at all (a caller passes the dir)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:
        return True
    key = "hydra.sweep.dir=" if hydra_cfg.mode == RunMode.MULTIRUN else "hydra.run.dir="
    return any(str(o).lstrip("+").startswith(key) for o in hydra_cfg.overrides.hydra)


def resume_run_dir(cfg, run_dir: Path) -> Path:
    """The run dir this process works in. With ``stage.resume=auto`` and no run dir given, Hydra made a
    new, empty one: the latest interrupted run of the same config is resumed instead, or a ``ConfigError``
    says how to pass the run dir."""
    if cfg.stage.get("resume") != "auto" or run_dir_given() or not is_fresh(run_dir):
        return Path(run_dir)
    from omegaconf import OmegaConf

    from marl_exp.config import ConfigError

    output_dir = Path(cfg.output_dir).expanduser()
    found = find_interrupted_runs(output_dir, OmegaConf.to_container(cfg, resolve=True), exclude=run_dir)
    if not found:
        raise ConfigError(
            f"stage.resume=auto found no interrupted run of this config under {output_dir}/runs or "
            f"{output_dir}/multirun; pass the run dir to resume: hydra.run.dir=<run dir> stage.resume=auto "
            "(hydra.sweep.dir=<sweep dir> for a -m sweep), or drop stage.resume to start a new run")
    others = f" ({len(found) - 1} older one(s) too)" if len(found) > 1 else ""
    log.info("stage.resume=auto: resuming %s, the latest interrupted run of this config%s", found[0], others)
    return found[0]
