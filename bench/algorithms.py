"""Which algorithm learns the built-in task best per generated response: PPO, GRPO, RLOO, REINFORCE++.

Every algorithm trains from the same SFT model and reward adapter (built once through the stage cache in
``--out``), with its stage defaults, for the same number of steps of the same number of generated responses
(``stage.batch_size`` = 64 responses per step in every stage: PPO 64 prompts, the critic-free stages 16
prompts x 4). Prints a markdown table (strict gold, well-formed share and reward before -> after, KL, wall
time) and writes ``<out>/algorithms.json``. Learning curves of the strict gold come from the eval/during points
(``stage.eval.eval_every``).

    python bench/algorithms.py                                    # seed 0, all four, default steps
    python bench/algorithms.py --seeds 0 1 2 --algorithms ppo grpo -- stage.steps=100
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import (  # noqa: E402  (bench/ is not a package)
    TARGET_KL,
    TARGET_RISE,
    TARGET_STRICT,
    TARGET_WELL_FORMED,
    learning_curve,
)

ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp")


def run(algorithm: str, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{algorithm}-seed{seed}"
    cmd = [sys.executable, "train.py", f"stage={algorithm}", f"seed={seed}", "logger=none", f"output_dir={out}",
           f"hydra.run.dir={run_dir}", *extra]
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "log.txt").open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.perf_counter() - started) / 60
    if proc.returncode != 0:
        return {"algorithm": algorithm, "seed": seed, "failed": True, "minutes": minutes}
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = sum(1 for r in rows if "time/rollout" in r)  # logged steps (log_every=1)
    per_step = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())["stage"]["batch_size"]
    return {"algorithm": algorithm, "seed": seed, "failed": False, "minutes": minutes, "steps": steps,
            "responses_per_step": per_step,
            **{f"eval/{tag}/{k}": summary[f"eval/{tag}/{k}"] for tag in ("before", "after")
               for k in ("oracle_strict", "well_formed", "oracle_score", "reward_score", "kl", "response_length")},
            "curve": learning_curve(run_dir / "metrics.jsonl")}


def markdown(rows: list[dict]) -> str:
    lines = ["| algorithm | seed | steps | strict gold before → after | well formed before → after "
             "| reward before → after | KL (nats) | length | minutes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["failed"]:
            lines.append(f"| {r['algorithm']} | {r['seed']} | failed | | | | | | {r['minutes']:.1f} |")
            continue
        lines.append(f"| {r['algorithm']} | {r['seed']} | {r['steps']} | {r['eval/before/oracle_strict']:.3f} → "
                     f"{r['eval/after/oracle_strict']:.3f} | {r['eval/before/well_formed']:.3f} → "
                     f"{r['eval/after/well_formed']:.3f} | {r['eval/before/reward_score']:.2f} → "
                     f"{r['eval/after/reward_score']:.2f} | {r['eval/after/kl']:.2f} | "
                     f"{r['eval/after/response_length']:.1f} | {r['minutes']:.1f} |")
    return "\n".join(lines)


REACHED = 0.9  # "responses to reach": the first evaluation with the strict gold at or above this


def meets_target(r: dict) -> bool:
    """The convergence target of bench/convergence.py, without its wall-time limit (runs here share the CPU)."""
    after, before = r["eval/after/oracle_strict"], r["eval/before/oracle_strict"]
    return (after >= TARGET_STRICT and after - before >= TARGET_RISE and r["eval/after/well_formed"] >= TARGET_WELL_FORMED
            and r["eval/after/kl"] <= TARGET_KL)


def responses_to_reach(r: dict, level: float = REACHED) -> float:
    """Generated responses until the held-out strict gold first reached ``level`` (inf: never)."""
    curve = r["curve"]
    return next((s * r["responses_per_step"] for s, v in zip(curve["step"], curve["oracle_strict"]) if v >= level),
                math.inf)


def run_mean_strict(r: dict) -> float:
    """The strict gold averaged over the evaluations after the start: the area under the learning curve."""
    values = [v for s, v in zip(r["curve"]["step"], r["curve"]["oracle_strict"]) if s > 0]
    return sum(values) / len(values) if values else math.nan


def by_algorithm(rows: list[dict]) -> str:
    """One line per algorithm over its seeds: mean [min, max]."""
    def spread(values: list[float], fmt: str) -> str:
        if not values:
            return "–"
        return f"{sum(values) / len(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"

    lines = [f"| algorithm | runs meeting the target | strict gold after | well formed after | KL after (nats) "
             f"| mean strict over the run | responses to strict ≥ {REACHED} | minutes per run |",
             "|---|---|---|---|---|---|---|---|"]
    for algorithm in ALGORITHMS:
        runs = [r for r in rows if r["algorithm"] == algorithm]
        done = [r for r in runs if not r["failed"]]
        if not runs:
            continue
        reach = [responses_to_reach(r) for r in done]
        reach_cell = spread([x for x in reach if math.isfinite(x)], ".0f")
        if any(not math.isfinite(x) for x in reach):
            reach_cell += f" ({sum(not math.isfinite(x) for x in reach)} never)"
        lines.append(f"| {algorithm} | {sum(meets_target(r) for r in done)} of {len(runs)} "
                     f"| {spread([r['eval/after/oracle_strict'] for r in done], '.3f')} "
                     f"| {spread([r['eval/after/well_formed'] for r in done], '.3f')} "
                     f"| {spread([r['eval/after/kl'] for r in done], '.2f')} "
                     f"| {spread([run_mean_strict(r) for r in done], '.3f')} | {reach_cell} "
                     f"| {spread([r['minutes'] for r in done], '.1f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    """Held-out strict gold and KL against generated responses: a thin line per run, the seeds' mean thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip(ALGORITHMS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, key, label in ((axes[0], "oracle_strict", "held-out strict gold (oracle_strict)"),
                           (axes[1], "kl", "KL to the reference (nats per response)")):
        for algorithm in ALGORITHMS:
            runs = [r for r in rows if r["algorithm"] == algorithm and not r["failed"]]
            if not runs:
                continue
            for r in runs:
                ax.plot([s * r["responses_per_step"] for s in r["curve"]["step"]], r["curve"][key],
                        color=colours[algorithm], alpha=0.3, linewidth=0.8)
            points = min(len(r["curve"]["step"]) for r in runs)
            x = [s * runs[0]["responses_per_step"] for s in runs[0]["curve"]["step"][:points]]
            mean = [sum(r["curve"][key][i] for r in runs) / len(runs) for i in range(points)]
            ax.plot(x, mean, color=colours[algorithm], linewidth=2, label=f"{algorithm} (mean of {len(runs)})")
        ax.set_xlabel("generated responses")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench-algorithms")
    parser.add_argument("--plot", type=Path, default=None, help="learning curves PNG (default: <out>/algorithms.png)")
    parser.add_argument("--from-json", nargs="*", type=Path, default=[],
                        help="tabulate and plot saved algorithms.json files instead of running")
    parser.add_argument("extra", nargs="*", help="overrides for every run, after --")
    args = parser.parse_args(argv)
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(path.read_text())]
    else:
        rows = [run(a, s, args.out, args.extra) for s in args.seeds for a in args.algorithms]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "algorithms.json").write_text(json.dumps(rows, indent=1))
    rows.sort(key=lambda r: (ALGORITHMS.index(r["algorithm"]), r["seed"]))
    print(markdown(rows))
    print()
    print(by_algorithm(rows))
    print(f"learning curves: {plot(rows, args.plot or args.out / 'algorithms.png')}")
    return int(any(r["failed"] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
