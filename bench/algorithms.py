"""Which algorithm learns the built-in task best per generated response: PPO, GRPO, RLOO, REINFORCE++.

Every algorithm trains from the same SFT model and reward adapter (built once through the stage cache in
``--out``), with its stage defaults, for the same number of steps of the same number of generated responses
(``stage.batch_size`` = 64 responses per step in every stage: PPO 64 prompts, the critic-free stages 16
prompts x 4). Prints a markdown table (strict gold, well-formed share and reward before -> after, KL, wall
time) and writes ``<out>/algorithms.json``. Learning curves of the strict gold come from the eval/during points
(``stage.eval_every``).

    python bench/algorithms.py                                    # seed 0, all four, default steps
    python bench/algorithms.py --seeds 0 1 2 --algorithms ppo grpo -- stage.steps=100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import learning_curve  # noqa: E402  (bench/ is not a package)

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


def plot(rows: list[dict], path: Path) -> Path:
    """Held-out strict gold against generated responses, one line per run, one colour per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(ALGORITHMS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for r in rows:
        if r["failed"]:
            continue
        per_step = r["responses_per_step"]
        ax.plot([s * per_step for s in r["curve"]["step"]], r["curve"]["oracle_strict"], color=colours[r["algorithm"]],
                alpha=0.8, label=r["algorithm"] if r["seed"] == min(x["seed"] for x in rows) else None)
    ax.set_xlabel("generated responses")
    ax.set_ylabel("held-out strict gold (oracle_strict)")
    ax.grid(alpha=0.3)
    ax.legend()
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
    print(f"learning curves: {plot(rows, args.plot or args.out / 'algorithms.png')}")
    return int(any(r["failed"] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
