"""Which algorithm learns the built-in task best per generated response: PPO, GRPO, RLOO, REINFORCE++.

Every algorithm trains from the same SFT model and reward adapter (built once through the stage cache in
``--out``), with its stage defaults, for the same number of steps of the same number of generated responses
(``stage.batch_size`` = 64 responses per step in every stage: PPO 64 prompts, the critic-free stages 16
prompts x 4). Prints a markdown table (strict gold, well-formed share and reward before -> after, KL, wall
time) and writes ``<out>/algorithms.json``. Learning curves of the strict gold come from the eval/during points
(``stage.eval.eval_every``).

    python bench/algorithms.py                                    # seed 0, all four, default steps
    python bench/algorithms.py --seeds 0 1 2 --algorithms ppo grpo -- stage.steps=100
    python bench/algorithms.py --seed-list reviews_chat --algorithms ppo grpo -- data=reviews_chat
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
import common  # noqa: E402  (bench/ is not a package)
from convergence import (  # noqa: E402
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
    return {"algorithm": algorithm, "seed": seed, "overrides": extra, "failed": False, "minutes": minutes, "steps": steps,
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


SUMMARY_METRICS = {  # summary key: (what it is of a run, format in the table)
    "strict_after": (lambda r: r["eval/after/oracle_strict"], ".3f"),
    "well_formed_after": (lambda r: r["eval/after/well_formed"], ".3f"),
    "kl_after": (lambda r: r["eval/after/kl"], ".2f"),
    "mean_strict_over_run": (run_mean_strict, ".3f"),
    "responses_to_reach": (responses_to_reach, ".0f"),
    "minutes": (lambda r: r["minutes"], ".1f"),
}


def summarize(rows: list[dict]) -> dict:
    """Per algorithm over its seeds: runs meeting the target, and mean / min / max of each summary metric
    (responses_to_reach over the runs that reached it; ``never`` counts the others)."""
    summary = {}
    for algorithm in ALGORITHMS:
        runs = [r for r in rows if r["algorithm"] == algorithm]
        done = [r for r in runs if not r["failed"]]
        if not runs:
            continue
        entry = {"runs": len(runs), "meeting_target": sum(meets_target(r) for r in done)}
        for key, (of_run, _) in SUMMARY_METRICS.items():
            values = [of_run(r) for r in done]
            finite = [v for v in values if math.isfinite(v)]
            entry[key] = ({"mean": sum(finite) / len(finite), "min": min(finite), "max": max(finite)}
                          if finite else None)
            if len(finite) < len(values):
                entry[key + "_never"] = len(values) - len(finite)
        summary[algorithm] = entry
    return summary


def by_algorithm(rows: list[dict]) -> str:
    """One line per algorithm over its seeds: mean [min, max]."""
    lines = [f"| algorithm | runs meeting the target | strict gold after | well formed after | KL after (nats) "
             f"| mean strict over the run | responses to strict ≥ {REACHED} | minutes per run |",
             "|---|---|---|---|---|---|---|---|"]
    for algorithm, entry in summarize(rows).items():
        cells = []
        for key, (_, fmt) in SUMMARY_METRICS.items():
            stats = entry[key]
            cell = "–" if stats is None else f"{stats['mean']:{fmt}} [{stats['min']:{fmt}}, {stats['max']:{fmt}}]"
            if entry.get(key + "_never"):
                cell += f" ({entry[key + '_never']} never)"
            cells.append(cell)
        lines.append(f"| {algorithm} | {entry['meeting_target']} of {entry['runs']} | {' | '.join(cells)} |")
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
    parser.add_argument("--seeds", nargs="+", type=int, help="default: bench/seeds.json's --seed-list")
    parser.add_argument("--seed-list", default="algorithms",
                        help="the bench/seeds.json list to run (default: algorithms; reviews_chat for data=reviews_chat)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench-algorithms")
    parser.add_argument("--results", type=Path, default=None,
                        help="results file to write (e.g. bench/results/algorithms.json; default: <out>/algorithms.json)")
    parser.add_argument("--plot", type=Path, default=None, help="learning curves PNG (default: <out>/algorithms.png)")
    parser.add_argument("--from-json", nargs="*", type=Path, default=[],
                        help="tabulate and plot saved results files instead of running (merged through this script)")
    common.add_allow_dirty(parser)
    parser.add_argument("extra", nargs="*", help="overrides for every run, after --")
    args = parser.parse_args(argv)
    if args.from_json:
        sources = [json.loads(path.read_text()) for path in args.from_json]
        rows = [row for source in sources for row in (source if isinstance(source, list) else source["rows"])]
        record = {"merged_from": [{"file": str(path), **({} if isinstance(source, list) else
                                                         {k: source.get(k) for k in ("machine", "seeds", "overrides")})}
                                  for path, source in zip(args.from_json, sources)]}
    else:
        common.require_clean_tree(args.allow_dirty)
        machine = common.machine()
        listed, listed_at = common.seeds(args.seed_list)
        seeds = args.seeds or listed  # a few of a list's seeds per process (side by side) still come from the list
        seeds_from = f"bench/seeds.json at {listed_at} ({args.seed_list})" if set(seeds) <= set(listed) else "command line"
        rows = [run(a, s, args.out, args.extra) for s in seeds for a in args.algorithms]
        record = {"machine": machine, "seeds": {"list": seeds, "from": seeds_from}, "overrides": args.extra}
    rows.sort(key=lambda r: (ALGORITHMS.index(r["algorithm"]), r["seed"]))
    results = args.results or args.out / "algorithms.json"
    targets = {"oracle_strict_min": TARGET_STRICT, "oracle_strict_rise_min": TARGET_RISE,
               "well_formed_min": TARGET_WELL_FORMED, "kl_max": TARGET_KL}
    common.write_json(results, {**record, "targets": targets, "summary": summarize(rows), "rows": rows})
    print(markdown(rows))
    print()
    print(by_algorithm(rows))
    print(f"results: {results}; learning curves: {plot(rows, args.plot or args.out / 'algorithms.png')}")
    return int(any(r["failed"] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
