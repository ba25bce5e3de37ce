"""Time to the first error: ``python train.py <a mistake>`` from start to exit, and what the heavy imports cost.

    python bench/first_error.py                  # this checkout, 3 repeats per mistake (~30 s)
    python bench/first_error.py --repo ../main   # another checkout (e.g. before a change), same mistakes
    python bench/first_error.py --out bench/results/first_error.json   # also the raw numbers and the machine

Every run is a fresh interpreter, as a user's command is. The import times (each package alone in a fresh
interpreter) say what a check that runs after the imports would cost on this machine at this moment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import common  # noqa: E402
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


def time_mistakes(repo: Path, env: dict, out: str, repeats: int, timeout: float) -> list[dict]:
    rows = []
    for name, overrides in MISTAKES.items():
        command = [sys.executable, "train.py", *overrides, "logger=none", f"output_dir={out}"]
        runs = [seconds(command, repo, env, timeout) for _ in range(repeats)]
        rows.append({"mistake": name, "overrides": overrides, "exit_codes": sorted({str(code) for _, code in runs}),
                     "seconds": [s for s, _ in runs], "median_s": statistics.median(s for s, _ in runs)})
    return rows


def time_imports(repo: Path, env: dict) -> list[dict]:
    rows = []
    for module in HEAVY + ("marl_exp.cli", "marl_exp.stages.pipeline"):
        took, code = seconds([sys.executable, "-c", f"import {module}"], repo, env)
        rows.append({"module": module, "seconds": took, "ok": code == 0})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose train.py is timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-imports", action="store_true", help="skip the import timings")
    parser.add_argument("--timeout", type=float, default=60, help="stop a run that is still going (it trains)")
    parser.add_argument("--out", type=Path, help="also write the raw numbers and the machine as JSON here")
    common.add_allow_dirty(parser)
    args = parser.parse_args()
    common.require_clean_tree(args.allow_dirty)
    repo = args.repo.resolve()
    out = tempfile.mkdtemp(prefix="first-error-")
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(Path(out) / "empty-hf-cache")}  # "not cached", whatever this machine holds
    env.pop("HYDRA_FULL_ERROR", None)
    # The machine (commit, tree state) is that of this checkout; --repo names the one timed.
    results = {"machine": common.machine(), "repo": str(repo), "repeats": args.repeats}
    print(f"time to the first error: {repo} (load average {results['machine']['load_avg_at_start']:.2f}, "
          f"{os.cpu_count()} CPUs), median of {args.repeats}; {common.machine_line(results['machine'])}")
    results["mistakes"] = time_mistakes(repo, env, out, args.repeats, args.timeout)
    print("\n| mistake | command | exit code | seconds (median) |\n|---|---|---|---|")
    for row in results["mistakes"]:
        print(f"| {row['mistake']} | `python train.py {' '.join(row['overrides'])}` | "
              f"{', '.join(row['exit_codes'])} | {row['median_s']:.2f} |")
    if not args.no_imports:
        results["imports"] = time_imports(repo, env)
        print("\n| import (fresh interpreter) | seconds |\n|---|---|")
        for row in results["imports"]:
            print(f"| `import {row['module']}` | {row['seconds']:.2f}{'' if row['ok'] else ' (failed)'} |")
    if args.out:
        common.write_json(args.out, results)


if __name__ == "__main__":
    main()
