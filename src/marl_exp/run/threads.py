"""How many threads torch and OpenMP use: fit the machine, the other processes on it and parallel jobs.

Why: PyTorch's CPU default is one thread per physical core, and OpenMP threads spin while they wait for
each other. Beside any other busy process one thread loses its core, the others spin at every barrier
until it gets it back, and a step gets 10-50x slower (the issue measured 242 s instead of 14 s for 4 PPO
steps on 2 cores). The rule (``threads=auto``):

* ``min(physical cores, CPUs - 1) // parallel jobs`` threads, at least 1: one CPU stays free for whatever
  else runs (another job, an editor, data loading), and jobs started together (Hydra's joblib launcher:
  its ``n_jobs``; ``torchrun``/``accelerate``: the processes on this node) split the rest;
* ``OMP_WAIT_POLICY=PASSIVE``: a waiting thread sleeps instead of spinning (read when OpenMP starts, so it
  is set before torch is imported).

``threads=N`` overrides the rule; with ``threads=auto`` an ``OMP_NUM_THREADS`` set in the environment (by
you, SLURM or a launcher) is respected. The choice is logged once per process.

The wait follows the choice. ``threads=auto`` assumes a shared machine, so PASSIVE. An explicit ``threads=N``
of 2 or more says the cores are the run's own: there a thread spins a short while before it sleeps
(``GOMP_SPINCOUNT``, libgomp's, which torch's CPU wheels use). Sleeping at every barrier costs decoding, which
is hundreds of small parallel regions a token, about a quarter of its speed on a quiet machine
(docs/performance.md); a short spin keeps most of that and, unlike OpenMP's default spin, is bounded beside a
busy process. A wait policy or spin count set in the environment is always respected.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("marl_exp")
_applied: "ThreadChoice | None" = None
# Marks an OMP_NUM_THREADS this module set (inherited by child processes and later jobs of the process),
# so that it is not taken for the user's own setting.
OURS = "MARL_EXP_THREADS_CHOSEN"
FROM_ENV = "OMP_NUM_THREADS from the environment"
# Spin iterations before a waiting libgomp thread sleeps, for an explicit threads=N (N >= 2): long enough to span
# the gaps between a decoding step's parallel regions, short enough to bound the cost beside a busy process
# (bench/wait_policy.py: on a 2-core Xeon 0.86x PASSIVE's decoding time quiet, 1.34x beside a busy process).
SHORT_SPIN = "10000"


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # why this number, for the log line

    def short(self) -> str:
        return f"{self.threads} thread{'s' if self.threads != 1 else ''}"

    def describe(self) -> str:
        return (f"threads: {self.threads} torch/OpenMP thread{'s' if self.threads != 1 else ''} ({self.reason}; "
                f"{wait_setting()}); override with threads=N")


def wait_setting(env: dict | None = None) -> str:
    """How OpenMP's threads wait, as set in the environment: ``OMP_WAIT_POLICY=...`` and/or
    ``GOMP_SPINCOUNT=...``, else ``OMP_WAIT_POLICY=default``."""
    env = os.environ if env is None else env
    parts = [f"{var}={env[var]}" for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if env.get(var)]
    return ", ".join(parts) or "OMP_WAIT_POLICY=default"


def wait_policy(choice: "ThreadChoice", env: dict) -> dict[str, str]:
    """The variables to set for ``choice`` (none where the environment already says how threads wait)."""
    if env.get("OMP_WAIT_POLICY") or env.get("GOMP_SPINCOUNT"):
        return {}
    explicit = choice.reason.startswith("threads=")
    if explicit and choice.threads >= 2:
        return {"GOMP_SPINCOUNT": SHORT_SPIN}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


# ------------------------------------------------------------------------------------------- machine
def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_cpu_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyper-threads of one core count once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def parallel_jobs(cpus: int) -> tuple[int, str]:
    """(jobs started together on this machine, what started them): Hydra's joblib launcher or a data-parallel
    launcher; (1, "") otherwise."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1:
        return local, f"{local} processes on this node"
    n_jobs = _joblib_n_jobs()
    if n_jobs is None:
        return 1, ""
    jobs = cpus + 1 + n_jobs if n_jobs < 0 else n_jobs  # joblib's meaning of -1, -2, ...
    jobs = max(1, jobs)
    return jobs, f"{jobs} parallel launcher jobs" if jobs > 1 else ""


def _joblib_n_jobs() -> int | None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # not under Hydra
        return None
    launcher = hydra_cfg.get("launcher") or {}
    if hydra_cfg.mode != RunMode.MULTIRUN or "joblib" not in str(launcher.get("_target_", "")).lower():
        return None
    return int(launcher.get("n_jobs") or 1)


# --------------------------------------------------------------------------------------------- rule
def choose(setting: str | int = "auto", env: dict | None = None) -> ThreadChoice:
    """The thread count for ``threads=<setting>`` on this machine (see the module docstring)."""
    env = os.environ if env is None else env
    if str(setting) != "auto":
        return ThreadChoice(int(setting), "threads=" + str(setting))
    user_set = env.get("OMP_NUM_THREADS", "") != env.get(OURS)
    if user_set and str(env.get("OMP_NUM_THREADS", "")).isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return ThreadChoice(int(env["OMP_NUM_THREADS"]), FROM_ENV)
    cpus, cores = available_cpus(), physical_cores()
    jobs, why = parallel_jobs(cpus)
    return ThreadChoice(*auto_threads(cpus, cores, jobs, why))


def auto_threads(cpus: int, cores: int, jobs: int = 1, jobs_reason: str = "") -> tuple[int, str]:
    """``min(cores, cpus - 1) // jobs``, at least 1, and the reason in words."""
    usable = min(cores, cpus - 1) if cpus > 1 else 1
    threads = max(1, usable // max(1, jobs))
    parts = [f"{cpus} CPU{'s' if cpus != 1 else ''}"]
    if cores != cpus:
        parts.append(f"{cores} physical core{'s' if cores != 1 else ''}")
    if cpus > 1:
        parts.append("1 left free for other processes")
    if jobs > 1:
        parts.append(f"shared by {jobs_reason or f'{jobs} jobs'}")
    return threads, ", ".join(parts)


# ------------------------------------------------------------------------------------------- apply
def configure(setting: str | int = "auto") -> ThreadChoice:
    """Choose and apply the thread count: environment first (before torch loads), torch too when it is
    already loaded. Logged once per process."""
    global _applied
    choice = choose(setting)
    os.environ.update(wait_policy(choice, os.environ))  # read once, when OpenMP starts
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(choice.threads)  # torch reads it at import; child processes inherit it
    if choice.reason == FROM_ENV:
        os.environ.pop(OURS, None)
    else:
        os.environ[OURS] = str(choice.threads)
    if "torch" in sys.modules:
        apply_to_torch(choice.threads)
    if choice != _applied:
        log.info("%s", choice.describe())
        _applied = choice
    return choice


def apply_to_torch(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
