"""Convergence benchmark: the whole chain (SFT → reward → PPO) from scratch per quant mode and seed.

Each chain runs `python train.py` in a fresh output dir (nothing cached), so its wall time is the
whole chain's. Prints a markdown table, writes bench/results/convergence.{json,md} and a learning-curve
PNG (docs/convergence.png by default).

Judged by the strict gold (issue 13): per chain ``oracle_strict`` (the oracle on well-formed reviews, 0
elsewhere) after PPO at least 0.8 and up at least 0.25 from the SFT policy, ``well_formed`` at least 0.9 and
the KL to the reference at most 10 nats, on the held-out evaluation prompts.

    python bench/convergence.py --jobs 3                 # bench/seeds.json's "convergence" list × fp32 8bit 4bit
    python bench/convergence.py --seeds 0 --quants fp32 -- stage.steps=50   # extra overrides after --

The results record the machine (CPU, its flags, threads, torch, commit, clean or dirty tree) and the seed
list's origin; a dirty tree is refused unless ``--allow-dirty``. ``--from-json`` merges earlier results
files through this script, keeping each file's machine record.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
TARGET_STRICT, TARGET_RISE, TARGET_WELL_FORMED, TARGET_KL, TARGET_MINUTES = 0.8, 0.25, 0.9, 10.0, 15.0
TARGETS = {"oracle_strict_min": TARGET_STRICT, "oracle_strict_rise_min": TARGET_RISE,
           "well_formed_min": TARGET_WELL_FORMED, "kl_max": TARGET_KL, "chain_minutes_max": TARGET_MINUTES}
REPORTED = ("oracle_strict", "well_formed", "oracle_score", "reward_score", "kl", "response_length")


def run_chain(quant: str, seed: int, out: Path, extra: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "train.py", "stage=ppo", f"quant={quant}", f"seed={seed}", "logger=none",
           f"output_dir={out}", f"hydra.run.dir={out / 'ppo'}", *extra]
    started = time.perf_counter()
    with (out / "log.txt").open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    row = chain_row(quant, seed, out, (time.perf_counter() - started) / 60, proc.returncode == 0)
    common.write_json(out / "row.json", row)  # each chain's row as it ends: an interrupted benchmark keeps them
    return row


def collect(stamp_dir: Path) -> list[dict]:
    """Rows of the chains under ``stamp_dir`` (``<quant>-seed<seed>/``) whose run ended, from their run dirs:
    for a benchmark process that was stopped while its chains ran on. Wall time: the chain's log file, from
    its creation (birth time) to its last write."""
    rows = []
    for out in sorted(p for p in stamp_dir.iterdir() if p.is_dir()):
        quant, seed = out.name.rsplit("-seed", 1)
        if (out / "row.json").exists():
            rows.append(json.loads((out / "row.json").read_text()))
            continue
        if not (out / "ppo" / "summary.json").exists():
            print(f"{out.name}: not finished, left out", flush=True)
            continue
        rows.append(chain_row(quant, int(seed), out, _birth_minutes(out / "log.txt"), ok=True))
    return rows


def _birth_minutes(log: Path) -> float:
    """Minutes from the log's creation (``stat -c %W``: Python's os.stat has no birth time on Linux) to its
    last write."""
    born = float(subprocess.run(["stat", "-c", "%W", str(log)], capture_output=True, text=True).stdout.strip())
    if born <= 0:
        raise SystemExit(f"bench: error: {log}: the file system records no creation time; cannot time the chain")
    return (log.stat().st_mtime - born) / 60


def chain_row(quant: str, seed: int, out: Path, minutes: float, ok: bool) -> dict:
    run_dir = out / "ppo"
    if not ok:
        return {"quant": quant, "seed": seed, "failed": True, "minutes": minutes, "log": str(out / "log.txt")}
    summary = json.loads((run_dir / "summary.json").read_text())
    row = {"quant": quant, "seed": seed, "minutes": minutes, "failed": False,
           **{f"eval/{tag}/{k}": summary[f"eval/{tag}/{k}"] for tag in ("before", "after") for k in REPORTED}}
    row["passed"] = passed(row)
    row["curve"] = learning_curve(run_dir / "metrics.jsonl")
    record = run_dir / "run_record.json"  # the commit (and dirty flag) the chain's code was at
    row["git"] = json.loads(record.read_text()).get("git") if record.exists() else None
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
    parser.add_argument("--seeds", type=int, nargs="+", help="default: bench/seeds.json's convergence list")
    parser.add_argument("--quants", nargs="+", default=["fp32", "8bit", "4bit"])
    parser.add_argument("--jobs", type=int, default=1,
                        help="chains at once; with more than one, each runs with threads=1")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "convergence")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="convergence", help="results file stem (bench/results/<name>.json)")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "convergence.png")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="no runs: merge these results files into one table and plot")
    parser.add_argument("--collect", type=Path, metavar="STAMP_DIR",
                        help="no runs: the rows of the finished chains under an output dir of an earlier, stopped "
                             "run of this script (--out/<stamp>), recorded with the commit its tree was at")
    common.add_allow_dirty(parser)
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    args = parser.parse_args()
    if args.from_json:
        sources = [json.loads(path.read_text()) for path in args.from_json]
        rows = [row for source in sources for row in source["rows"]]
        # A collected file's machine is its collecting process's (its rows carry the commit they ran at).
        write_results(args, rows, {"merged_from": [{"file": str(path), "machine": source.get("machine") or
                                                    source.get("collected_by"), "seeds": source.get("seeds"),
                                                    "overrides": source.get("overrides")}
                                                   for path, source in zip(args.from_json, sources)],
                                   "targets": TARGETS})
        return

    if args.collect:
        rows = collect(args.collect)
        seeds = sorted({r["seed"] for r in rows})
        listed, listed_at = common.seeds("convergence")
        origin = f"bench/seeds.json at {listed_at}" if set(seeds) <= set(listed) else "command line of the stopped run"
        # The rows carry the commit each chain ran at; this machine record is the collecting process's.
        write_results(args, rows, {"collected_by": common.machine(), "collected_from": str(args.collect),
                                   "seeds": {"list": seeds, "from": origin},
                                   "overrides": args.overrides, "targets": TARGETS})
        sys.exit(0 if rows and all(r.get("passed") for r in rows) else 1)

    common.require_clean_tree(args.allow_dirty)
    machine = common.machine()  # before the runs: the commit and tree state they ran on
    seeds, seeds_commit = (args.seeds, "command line") if args.seeds else common.seeds("convergence")
    extra = [*args.overrides, *(["threads=1"] if args.jobs > 1 else [])]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    chains = [(quant, seed) for quant in args.quants for seed in seeds]
    print(f"{len(chains)} chains, {args.jobs} at once, on {common.machine_line(machine)}", flush=True)

    def one(chain):
        quant, seed = chain
        row = run_chain(quant, seed, args.out / stamp / f"{quant}-seed{seed}", extra)
        print(markdown([row]).splitlines()[-1], flush=True)
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(one, chains))
    machine["jobs"] = args.jobs
    write_results(args, rows, {"machine": machine, "seeds": {"list": seeds, "from": seeds_commit},
                               "overrides": extra, "targets": TARGETS})
    sys.exit(0 if all(r.get("passed") for r in rows) else 1)


def write_results(args, rows: list[dict], record: dict) -> None:
    table = markdown(rows)
    print("\n" + table)
    args.results.mkdir(parents=True, exist_ok=True)
    header = json.dumps({k: v for k, v in record.items()}, indent=None)
    (args.results / f"{args.name}.md").write_text(f"Written by bench/convergence.py. Record: {header}\n\n{table}\n")
    (args.results / f"{args.name}.json").write_text(json.dumps({**record, "rows": rows}, indent=2) + "\n")
    plot(rows, args.png)
    print(f"\nwrote {args.results / (args.name + '.json')}, {args.png}")


if __name__ == "__main__":
    main()
