"""Hydra callbacks registered in ``conf/config.yaml`` (``hydra.callbacks``).

``SweepReport``: a failing job does not sink a sweep. Each job's outcome is collected in ``on_job_end``
(a job failed if Hydra saw it raise, or if it left a ``FAILED`` marker in its dir: in multirun mode
``cli.main`` writes the marker and returns ``None`` instead of raising, so the sweeper goes on). At the end of
the multirun ``on_multirun_end`` prints which jobs failed, with the first line of each error, writes
``<sweep_dir>/sweep_summary.json`` and exits with code 1 when any job failed.

With launchers that run jobs in other processes (joblib, submitit), ``on_job_end`` runs in the worker, so
the end-of-sweep report also scans the job dirs under the sweep dir for ``FAILED`` markers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

FAILURE_MARKER = "FAILED"  # the same name as marl_exp.cli.FAILURE_MARKER (kept import-light here)


def first_error_line(run_dir: Path) -> str:
    """First non-empty line of a run dir's ``FAILED`` marker ("" when there is none)."""
    try:
        text = (Path(run_dir) / FAILURE_MARKER).read_text(errors="replace")
    except OSError:
        return ""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


class SweepReport(Callback):
    """Collect every job's status during a multirun and report the failed ones at the end."""

    def __init__(self, exit_on_failure: bool = True) -> None:
        self.exit_on_failure = exit_on_failure
        self.jobs: dict[str, dict[str, Any]] = {}

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.runtime.output_dir))
        failed = job_return.status == JobStatus.FAILED or (run_dir / FAILURE_MARKER).exists()
        error = first_error_line(run_dir)
        if not error and job_return.status == JobStatus.FAILED:
            err = job_return._return_value  # the exception, without re-raising it
            error = f"{type(err).__name__}: {err}".splitlines()[0]
        self.jobs[str(run_dir)] = {
            "dir": str(run_dir), "num": config.hydra.job.get("num"),
            "overrides": list(config.hydra.overrides.task), "failed": failed, "error": error,
        }

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = dict(self.jobs)
        # Jobs run in other processes (joblib, submitit) never reached this process's on_job_end.
        for marker in sorted(sweep_dir.glob(f"**/{FAILURE_MARKER}")):
            run_dir = marker.parent
            jobs[f"scanned:{run_dir}"] = {"dir": str(run_dir), "num": None, "overrides": _overrides_of(run_dir),
                                          "failed": True, "error": first_error_line(run_dir)}
        jobs = _dedupe(jobs)
        failed = [job for job in jobs if job["failed"]]
        done = sum(1 for path in sweep_dir.glob("**/summary.json") if (path.parent / ".hydra").is_dir())
        try:
            (sweep_dir / "sweep_summary.json").write_text(json.dumps(
                {"jobs": jobs, "failed": len(failed), "completed_summaries": done}, indent=2) + "\n")
        except OSError:
            pass
        if not failed:
            print(f"marl-exp: sweep finished: {done} job(s) completed, none failed ({sweep_dir})", flush=True)
            return
        lines = [f"marl-exp: sweep finished with {len(failed)} failed job(s) ({done} completed) in {sweep_dir}:"]
        for job in failed:
            overrides = " ".join(job["overrides"])
            lines.append(f"  FAILED {job['dir']}  [{overrides}]")
            if job["error"]:
                lines.append(f"         {job['error']}")
        print("\n".join(lines), file=sys.stderr, flush=True)
        if self.exit_on_failure:
            sys.exit(1)


def _overrides_of(run_dir: Path) -> list[str]:
    try:
        from omegaconf import OmegaConf

        return [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    except Exception:  # noqa: BLE001 - best effort, for the report only
        return []


def _dedupe(jobs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for job in jobs.values():
        key = str(Path(job["dir"]).resolve())
        if key not in seen or (job["failed"] and not seen[key]["failed"]):
            seen[key] = job
    return sorted(seen.values(), key=lambda job: job["dir"])
