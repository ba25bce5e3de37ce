"""Convergence benchmark: the whole chain (SFT → reward → PPO) from scratch per quant mode and seed.

Each chain runs `python train.py` in a fresh output dir (nothing cached), so its wall time is the
whole chain's. Prints a markdown table, writes bench/results/convergence.{json,md} and a learning-curve
PNG (docs/convergence.png by default).

    python bench/convergence.py                                   # seeds 0 1 2 × fp32 8bit 4bit
    python bench/convergence.py --seeds 0 --quants fp32 -- stage.steps=50   # extra overrides after --
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_ORACLE, TARGET_RISE, TARGET_KL, TARGET_MINUTES = 0.8, 0.2, 20.0, 10.0


def run_chain(quant: str, seed: int, out: Path, extra: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "ppo"
    cmd = [sys.executable, "train.py", "stage=ppo", f"quant={quant}", f"seed={seed}", "logger=none",
           f"output_dir={out}", f"hydra.run.dir={run_dir}", *extra]
    started = time.perf_counter()
    with (out / "log.txt").open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.perf_counter() - started) / 60
    if proc.returncode != 0:
        return {"quant": quant, "seed": seed, "failed": True, "minutes": minutes, "log": str(out / "log.txt")}
    summary = json.loads((run_dir / "summary.json").read_text())
    row = {"quant": quant, "seed": seed, "minutes": minutes, "failed": False,
           **{k: summary[k] for k in ("eval/before/oracle_score", "eval/after/oracle_score", "eval/before/reward_score",
                                      "eval/after/reward_score", "eval/after/kl", "eval/after/response_length")}}
    rise = row["eval/after/oracle_score"] - row["eval/before/oracle_score"]
    row["passed"] = (row["eval/after/oracle_score"] >= TARGET_ORACLE and rise >= TARGET_RISE
                     and row["eval/after/kl"] <= TARGET_KL and minutes < TARGET_MINUTES)
    row["curve"] = learning_curve(run_dir / "metrics.jsonl")
    return row


def learning_curve(metrics_path: Path) -> dict:
    steps, oracle, reward, kl = [], [], [], []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        for tag in ("before", "during", "after"):
            if f"eval/{tag}/oracle_score" in record:
                steps.append(record["step"])
                oracle.append(record[f"eval/{tag}/oracle_score"])
                reward.append(record[f"eval/{tag}/reward_score"])
                kl.append(record[f"eval/{tag}/kl"])
    return {"step": steps, "oracle": oracle, "reward": reward, "kl": kl}


def markdown(rows: list[dict]) -> str:
    lines = ["| quant | seed | oracle before → after | reward before → after | KL (nats) | chain wall time | target met |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["failed"]:
            lines.append(f"| {r['quant']} | {r['seed']} | failed ({r['log']}) | | | {r['minutes']:.1f} min | no |")
            continue
        lines.append(
            f"| {r['quant']} | {r['seed']} | {r['eval/before/oracle_score']:.3f} → {r['eval/after/oracle_score']:.3f} "
            f"| {r['eval/before/reward_score']:.2f} → {r['eval/after/reward_score']:.2f} | {r['eval/after/kl']:.2f} "
            f"| {r['minutes']:.1f} min | {'yes' if r['passed'] else 'no'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"fp32": "tab:blue", "8bit": "tab:orange", "4bit": "tab:green", "bf16": "tab:red"}
    styles = ["-", "--", ":", "-."]
    for r in rows:
        if r["failed"]:
            continue
        c = r["curve"]
        for ax, key in zip(axes, ("oracle", "reward", "kl")):
            ax.plot(c["step"], c[key], color=colors.get(r["quant"]), linestyle=styles[r["seed"] % len(styles)],
                    alpha=0.85, marker=".", label=f"{r['quant']} seed {r['seed']}")
    for ax, title in zip(axes, ("oracle score (held-out prompts)", "reward-model score", "KL to reference (nats)")):
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[0].axhline(TARGET_ORACLE, color="gray", linestyle="--", linewidth=1)
    axes[2].axhline(TARGET_KL, color="gray", linestyle="--", linewidth=1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quants", nargs="+", default=["fp32", "8bit", "4bit"])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "convergence")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "convergence.png")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="no runs: merge these results files into one table and plot")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    args = parser.parse_args()
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(path.read_text())["rows"]]
        print(markdown(rows))
        plot(rows, args.png)
        return

    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for quant in args.quants:
        for seed in args.seeds:
            print(f"running chain quant={quant} seed={seed} ...", flush=True)
            row = run_chain(quant, seed, args.out / stamp / f"{quant}-seed{seed}", args.overrides)
            rows.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print("\n" + table)
    machine = f"{os.cpu_count()} CPU cores, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "convergence.md").write_text(f"Machine: {machine}\n\n{table}\n")
    (args.results / "convergence.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    plot(rows, args.png)
    print(f"\nwrote {args.results / 'convergence.md'}, {args.png}")
    sys.exit(0 if all(r.get("passed") for r in rows) else 1)


if __name__ == "__main__":
    main()
