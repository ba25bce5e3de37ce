"""Convergence benchmark: the whole chain (SFT → reward → PPO) from scratch per quant mode and seed.

Each chain runs `python train.py` in a fresh output dir (nothing cached), so its wall time is the
whole chain's. Prints a markdown table, writes bench/results/convergence.{json,md} and a learning-curve
PNG (docs/convergence.png by default).

Judged by the strict gold (issue 13): per chain ``oracle_strict`` (the oracle on well-formed reviews, 0
elsewhere) after PPO at least 0.8 and up at least 0.25 from the SFT policy, ``well_formed`` at least 0.9 and
the KL to the reference at most 10 nats, on the held-out evaluation prompts.

    python bench/convergence.py --seeds 2026 2027 2028             # × fp32 8bit 4bit
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
TARGET_STRICT, TARGET_RISE, TARGET_WELL_FORMED, TARGET_KL, TARGET_MINUTES = 0.8, 0.25, 0.9, 10.0, 15.0
REPORTED = ("oracle_strict", "well_formed", "oracle_score", "reward_score", "kl", "response_length")


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
           **{f"eval/{tag}/{k}": summary[f"eval/{tag}/{k}"] for tag in ("before", "after") for k in REPORTED}}
    row["passed"] = passed(row)
    row["curve"] = learning_curve(run_dir / "metrics.jsonl")
    return row


def passed(row: dict) -> bool:
    after = {k: row[f"eval/after/{k}"] for k in REPORTED}
    return (after["oracle_strict"] >= TARGET_STRICT
            and after["oracle_strict"] - row["eval/before/oracle_strict"] >= TARGET_RISE
            and after["well_formed"] >= TARGET_WELL_FORMED and after["kl"] <= TARGET_KL
            and row["minutes"] < TARGET_MINUTES)


CURVES = {"oracle_strict": "oracle_strict", "well_formed": "well_formed", "reward": "reward_score", "kl": "kl"}


def learning_curve(metrics_path: Path) -> dict:
    curve = {"step": [], **{name: [] for name in CURVES}}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        for tag in ("before", "during", "after"):
            if f"eval/{tag}/oracle_strict" in record:
                curve["step"].append(record["step"])
                for name, key in CURVES.items():
                    curve[name].append(record[f"eval/{tag}/{key}"])
    return curve


def markdown(rows: list[dict]) -> str:
    lines = ["| quant | seed | strict gold | well formed | plain oracle | reward | KL (nats) | length "
             "| chain wall time | target met |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["failed"]:
            lines.append(f"| {r['quant']} | {r['seed']} | failed ({r['log']}) | | | | | | {r['minutes']:.1f} min | no |")
            continue
        cells = [f"{r[f'eval/before/{k}']:{fmt}} → {r[f'eval/after/{k}']:{fmt}}"
                 for k, fmt in (("oracle_strict", ".3f"), ("well_formed", ".3f"), ("oracle_score", ".3f"),
                                ("reward_score", ".2f"))]
        lines.append(f"| {r['quant']} | {r['seed']} | {' | '.join(cells)} | {r['eval/after/kl']:.2f} "
                     f"| {r['eval/before/response_length']:.1f} → {r['eval/after/response_length']:.1f} "
                     f"| {r['minutes']:.1f} min | {'yes' if r['passed'] else 'no'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    colors = {"fp32": "tab:blue", "8bit": "tab:orange", "4bit": "tab:green", "bf16": "tab:red"}
    styles = ["-", "--", ":", "-."]
    for r in rows:
        if r["failed"]:
            continue
        c = r["curve"]
        for ax, key in zip(axes, CURVES):
            ax.plot(c["step"], c[key], color=colors.get(r["quant"]), linestyle=styles[r["seed"] % len(styles)],
                    alpha=0.85, marker=".", label=f"{r['quant']} seed {r['seed']}")
    titles = ("strict gold (held-out prompts)", "well-formed share", "reward-model score", "KL to reference (nats)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[0].axhline(TARGET_STRICT, color="gray", linestyle="--", linewidth=1)
    axes[1].axhline(TARGET_WELL_FORMED, color="gray", linestyle="--", linewidth=1)
    axes[3].axhline(TARGET_KL, color="gray", linestyle="--", linewidth=1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2026, 2027, 2028])
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
