"""PPO step time with marl-exp's thread choice against torch's default, quiet, beside a busy process, and as two
parallel jobs: ``python bench/threads.py`` (about 2-4 minutes on a quiet 2-core machine, 16 at load average 7.5;
``--quick`` about 1 on a quiet one).

    python bench/threads.py --out bench/results/threads-tiny.json
    python bench/threads.py --size small --quick --out bench/results/threads-small.json
    python bench/threads.py --from-json bench/results/threads-tiny.json --out bench/results/threads-tiny.json

Each measurement runs in a fresh process (OpenMP reads its settings when torch loads): one warm-up step,
then ``--steps`` timed PPO steps (median) of the benchmark's ``--size`` model (default: the built-in tiny
model, the default of every stage) with batch 8 and 16 new tokens.

* quiet: nothing else running (as far as this script can see: check the load average it prints);
* busy: beside one other busy process (a pure-Python loop, one core at 100%);
* parallel: two runs at once, as the joblib launcher starts them (``n_jobs=2``).

Settings: "marl-exp auto" = what ``threads=auto`` picks (``marl_exp.run.threads``: ``min(cores, CPUs-1) // jobs``
threads, ``OMP_WAIT_POLICY=PASSIVE``); "torch default" = one thread per physical core, OpenMP's default wait
policy (what any script gets that sets nothing); "marl-exp threads=N" = what an explicit ``threads=<cores>``
gets: every core, a short spin before sleeping (``GOMP_SPINCOUNT``). The goal: busy ÷ quiet ≤ 2.5 with
marl-exp's choice.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_BUSY_OVER_QUIET = 2.5


# ------------------------------------------------------------------------------------- child process
def child(size: str, steps: int) -> None:
    """One measurement (in its own process, threads already set in the environment): prints JSON."""
    import torch

    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    cfg = common.ppo_config(size, batch=8, new_tokens=16, device="cpu")
    _, _, trainer = common.build_trainer(cfg)
    trainer.step()  # warm-up
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - started)
    from marl_exp.run.threads import wait_setting

    print(json.dumps({"threads": torch.get_num_threads(), "wait_policy": wait_setting(),
                      "median_s": common.median(times), "times_s": times}), flush=True)


# How each setting's threads wait: the environment marl_exp.run.threads sets (or nothing: OpenMP's default).
WAITS = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "default": {}, "short spin": {"GOMP_SPINCOUNT": "SHORT_SPIN"}}


def start_child(size: str, steps: int, threads: int, wait: str) -> subprocess.Popen:
    from marl_exp.run.threads import SHORT_SPIN

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    env.update({var: SHORT_SPIN if value == "SHORT_SPIN" else value for var, value in WAITS[wait].items()})
    return subprocess.Popen([sys.executable, __file__, "--child", "--size", size, "--steps", str(steps)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure(size: str, steps: int, threads: int, wait: str) -> dict:
    return finish(start_child(size, steps, threads, wait))


def busy_process() -> subprocess.Popen:
    """Another process keeping one core busy (what any shared machine has)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


# ---------------------------------------------------------------------------------------------- main
def run(size: str, steps: int) -> dict:
    from marl_exp.run import threads as marl_threads

    cpus, cores = marl_threads.available_cpus(), marl_threads.physical_cores()
    auto_one, _ = marl_threads.auto_threads(cpus, cores, 1)
    auto_two, _ = marl_threads.auto_threads(cpus, cores, 2, "2 parallel launcher jobs")
    # "all cores, passive wait" separates the two parts of the rule: the thread count and the wait policy.
    settings = {"marl-exp auto": (auto_one, "passive"), "torch default": (cores, "default"),
                "all cores, passive wait": (cores, "passive"), "marl-exp threads=N": (cores, "short spin")}
    results = {"machine": common.machine(), "cpus": cpus, "physical_cores": cores, "size": size, "steps": steps,
               "runs": {}}
    for name, (threads, wait) in settings.items():
        quiet = measure(size, steps, threads, wait)
        spinner = busy_process()
        try:
            time.sleep(0.5)
            busy = measure(size, steps, threads, wait)
        finally:
            spinner.kill()
            spinner.wait()
        results["runs"][name] = {"threads": threads, "passive": wait == "passive", "wait": wait, "quiet": quiet,
                                 "busy": busy}
    parallel = {**settings, "marl-exp auto": (auto_two, "passive")}
    for name, (threads, wait) in parallel.items():
        jobs = [start_child(size, steps, threads, wait) for _ in range(2)]
        results["runs"][name]["parallel"] = {"threads": threads, "jobs": [finish(job) for job in jobs]}
    return results


def summarize(results: dict) -> dict:
    """The ratios the docs quote, computed from the raw runs, so that they are in the results file."""
    runs = results["runs"]
    best_quiet = min(r["quiet"]["median_s"] for r in runs.values())
    results["goal_busy_over_quiet_max"] = TARGET_BUSY_OVER_QUIET
    results["summary"] = {
        name: {"busy_over_quiet": r["busy"]["median_s"] / r["quiet"]["median_s"],
               "quiet_over_best_quiet": r["quiet"]["median_s"] / best_quiet,
               "busy_over_best_quiet": r["busy"]["median_s"] / best_quiet,
               "parallel_job_over_quiet": [job["median_s"] / r["quiet"]["median_s"] for job in r["parallel"]["jobs"]]}
        for name, r in runs.items()}
    if "marl-exp threads=N" in runs:  # the short spin against the passive wait explicit threads=N had before
        spin, passive = runs["marl-exp threads=N"], runs["all cores, passive wait"]
        results["short_spin_over_passive"] = {
            "quiet": spin["quiet"]["median_s"] / passive["quiet"]["median_s"],
            "busy": spin["busy"]["median_s"] / passive["busy"]["median_s"],
            "parallel": _parallel(spin) / _parallel(passive)}
    return results


def _parallel(run: dict) -> float:
    return common.median([job["median_s"] for job in run["parallel"]["jobs"]])


def report(results: dict) -> str:
    m = results["machine"]
    runs = results["runs"]
    best_quiet = min(r["quiet"]["median_s"] for r in runs.values())
    lines = [f"threads benchmark: {results['size']} PPO step (batch 8, 16 new tokens, median of {results['steps']}), "
             f"{results['cpus']} CPUs / {results['physical_cores']} physical cores, load average at start "
             f"{m['load_avg_at_start']:.2f}; {common.machine_line(m)} ({m['tree']} tree)",
             "",
             "| setting | threads | quiet s/step | busy s/step | busy ÷ quiet | busy ÷ best quiet | 2 parallel jobs "
             "(threads each): s/step each |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        quiet, busy = r["quiet"]["median_s"], r["busy"]["median_s"]
        par = r["parallel"]
        each = " / ".join(f"{j['median_s']:.3f}" for j in par["jobs"])
        lines.append(f"| {name} | {r['threads']} | {quiet:.3f} | {busy:.3f} | {busy / quiet:.2f} | "
                     f"{busy / best_quiet:.2f} | {each} ({par['threads']}) |")
    auto = runs["marl-exp auto"]
    ratio = auto["busy"]["median_s"] / auto["quiet"]["median_s"]
    lines += ["", f"goal: marl-exp auto busy ÷ quiet ≤ {TARGET_BUSY_OVER_QUIET}: "
                  f"{ratio:.2f} -> {'met' if ratio <= TARGET_BUSY_OVER_QUIET else 'NOT met'}"]
    ratio = results.get("short_spin_over_passive")
    if ratio:
        lines.append(f"explicit threads=N, short spin ÷ passive wait: quiet {ratio['quiet']:.2f}, busy "
                     f"{ratio['busy']:.2f}, parallel {ratio['parallel']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(common.SIZES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="3 steps per measurement")
    parser.add_argument("--out", type=Path, help="also write the raw numbers as JSON here")
    parser.add_argument("--from-json", type=Path, help="no runs: summarize and report the raw numbers of a results "
                                                          "file of this script (write them with --out)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    common.add_allow_dirty(parser)
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    if args.child:
        child(args.size, steps)
        return
    if args.from_json:
        results = summarize(json.loads(args.from_json.read_text()))
    else:
        common.require_clean_tree(args.allow_dirty)
        common.model_dirs(args.size)  # build (and cache) the benchmark model once, outside the measurements
        results = summarize(run(args.size, steps))
    print(report(results))
    if args.out:
        common.write_json(args.out, results)


if __name__ == "__main__":
    main()
