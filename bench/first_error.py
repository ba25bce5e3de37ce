"""Time to the first error: ``python train.py <a mistake>`` from start to exit, and what the heavy imports cost.

    python bench/first_error.py                  # this checkout, 3 repeats per mistake (~30 s)
    python bench/first_error.py --repo ../main   # another checkout (e.g. before a change), same mistakes

Every run is a fresh interpreter, as a user's command is. The import times (each package alone in a fresh
interpreter) say what a check that runs after the imports would cost on this machine at this moment.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MISTAKES = {
    "value out of range": ["adapter.r=0"],
    "key typo added with +": ["+adapter.lora_droput=0.1"],
    "key at the wrong level": ["learning_rate=1e-4"],
    "group option typo": ["model=gtp2"],
    "missing model dir": ["model.path=/no/such/model"],
    "hub model, offline, not cached": ["model=gpt2"],
}
HEAVY = ("torch", "transformers", "peft", "trl", "wandb", "bitsandbytes", "datasets")


def seconds(command: list[str], cwd: Path, env: dict, timeout: float = 900) -> tuple[float, int | str]:
    """Wall time and exit code; a run still going after ``timeout`` (a mistake accepted: it trains) is stopped."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - started, "still running (accepted)"
    return time.perf_counter() - started, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose train.py is timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-imports", action="store_true", help="skip the import timings")
    parser.add_argument("--timeout", type=float, default=60, help="stop a run that is still going (it trains)")
    args = parser.parse_args()
    repo = args.repo.resolve()
    out = tempfile.mkdtemp(prefix="first-error-")
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(Path(out) / "empty-hf-cache")}  # "not cached", whatever this machine holds
    env.pop("HYDRA_FULL_ERROR", None)
    print(f"time to the first error: {repo} (load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs), "
          f"median of {args.repeats}")
    print("\n| mistake | command | exit code | seconds (median) |\n|---|---|---|---|")
    for name, overrides in MISTAKES.items():
        command = [sys.executable, "train.py", *overrides, "logger=none", f"output_dir={out}"]
        runs = [seconds(command, repo, env, args.timeout) for _ in range(args.repeats)]
        codes = sorted({code for _, code in runs})
        print(f"| {name} | `python train.py {' '.join(overrides)}` | {', '.join(map(str, codes))} | "
              f"{statistics.median(s for s, _ in runs):.2f} |")
    if args.no_imports:
        return
    print("\n| import (fresh interpreter) | seconds |\n|---|---|")
    for module in HEAVY + ("marl_exp.cli", "marl_exp.stages.pipeline"):
        took, code = seconds([sys.executable, "-c", f"import {module}"], repo, env)
        print(f"| `import {module}` | {took:.2f}{'' if code == 0 else ' (failed)'} |")


if __name__ == "__main__":
    main()
