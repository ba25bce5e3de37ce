"""Real-model benchmark: SmolLM2-135M-Instruct on the movie_sentiment task, per algorithm, quant mode and seed.

Each (quant, seed) gets one output dir, so its algorithms share the seed's reward adapter through the stage
cache (the reward stage runs once, inside the first algorithm's run); the pairs' replies are cached under
the model cache (they depend on the task, not the run's seed). Each run evaluates every 10 steps for the
curves. Prints a markdown table and writes it with the rows and plots under the run's stamp dir
(<stamp>/real_model.{json,md,png}); ``--collect <stamp>`` publishes them as bench/results/real_model.{json,md},
docs/real_model.png (curves) and docs/real_model_overoptimization.png (the reward trained on against the judge,
over sqrt(KL)), or where ``--results`` says.

Judged by AFINN on held-out requests (titles and phrasings no training request uses): the share of replies
AFINN scores > 0 (``eval/*/well_formed``). Beside it: fluency (the reference model's NLL of the reply,
nats/token), diversity (distinct-2), KL to the reference (nats per reply) and the reward trained on. The
targets were committed with this file, before any run on the seed list ``real_model`` (bench/seeds.json).

    python bench/real_model.py                                # seeds 4301-4303 x grpo ppo ppo_critic_adapter rloo, fp32
    python bench/real_model.py --algorithms grpo --quants 4bit --seeds 4301
    python bench/real_model.py --collect outputs/bench/real_model/<stamp>   # rows of a stopped benchmark
    python bench/real_model.py --seeds 4302 --stamp outputs/bench/real_model/<stamp> -- threads=1  # side by side
    python bench/real_model.py --from-json a.json b.json        # merge results files (each keeps its machine)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = {
    "grpo": ["experiment=smollm2_sentiment"],
    "ppo": ["experiment=smollm2_sentiment_ppo"],
    "ppo_critic_adapter": ["experiment=smollm2_sentiment_ppo", "stage.critic=adapter"],
    "rloo": ["experiment=smollm2_sentiment_rloo"],
}
EVAL_EVERY = 10
# Set before any run on the real_model seeds (issue 25's proposal, kept as written).
TARGETS = {
    "judge_after_min": 0.85,  # AFINN-positive share of held-out replies after RL
    "judge_rise_min": 0.20,  # ... up at least this much from the instruct model
    "ref_nll_rise_max": 0.5,  # fluency: reference NLL up at most this (nats/token)
    "distinct_2_ratio_min": 0.75,  # diversity: distinct-2 after >= 0.75 x before
    "kl_max": 10.0,  # nats per reply, held-out
    "default_chain_minutes_max": 45.0,  # experiment=smollm2_sentiment from a fresh cache, 2 quiet cores, fp32
    # Added after the seed runs above (session 14), before any run that reports it: the on-task check
    # (marl_exp.data.sentiment.on_task) came in when one chain's training replies were found upbeat non-reviews.
    # The share of on-task replies may fall at most 2 standard errors of the difference of two 64-reply shares
    # near 0.9 (sqrt(2 x 0.9 x 0.1 / 64) = 0.053): no drift off the task beyond the evaluation's noise.
    "on_task_drop_max": 0.10,
}
REPORTED = ("well_formed", "on_task", "well_formed_on_task", "ref_nll", "distinct_2", "kl", "reward_score",
            "response_length")
CURVE = ("well_formed", "on_task", "well_formed_on_task", "reward_score", "kl", "ref_nll", "distinct_2")


def run(algorithm: str, quant: str, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / algorithm
    cmd = [sys.executable, "train.py", *ALGORITHMS[algorithm], f"quant={quant}", f"seed={seed}", "logger=none",
           f"stage.eval.eval_every={EVAL_EVERY}", f"output_dir={out}", f"hydra.run.dir={run_dir}", *extra]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (run_dir.parent / f"{algorithm}.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    row = run_row(algorithm, quant, seed, run_dir, (time.perf_counter() - started) / 60, proc.returncode == 0)
    row["command"] = " ".join(["python train.py", *cmd[2:]])
    common.write_json(run_dir / "row.json", row)  # as each run ends: a stopped benchmark keeps its rows
    return row


def run_row(algorithm: str, quant: str, seed: int, run_dir: Path, minutes: float | None, ok: bool) -> dict:
    """``minutes`` is None for a run stopped and resumed outside the benchmark: its wall time spans the stop."""
    row = {"algorithm": algorithm, "quant": quant, "seed": seed,
           "minutes": None if minutes is None else round(minutes, 2)}
    if not ok or not (run_dir / "summary.json").exists():
        return {**row, "failed": True, "log": str(run_dir.parent / f"{algorithm}.log")}
    summary = json.loads((run_dir / "summary.json").read_text())
    row.update({f"{when}/{k}": summary.get(f"eval/{when}/{k}") for when in ("before", "after") for k in REPORTED})
    row["reward_stage_ran"] = _reward_stage_ran(run_dir)
    row["reward_heldout_accuracy"] = _reward_accuracy(run_dir)
    row["resumed_at_step"] = resumed_at(run_dir)
    row["phases_min"] = phases(run_dir)
    row["threads"] = _threads(run_dir / "resolved_config.yaml")
    row["reward"] = _reward(run_dir / "resolved_config.yaml")
    row["curve"] = curve(run_dir / "metrics.jsonl")
    row["samples"] = held_out_samples(run_dir / "samples.jsonl")
    row.update(top_openings(run_dir / "samples.jsonl"))
    row["passed"] = passed(row)
    row["git"] = json.loads((run_dir / "run_record.json").read_text()).get("git") \
        if (run_dir / "run_record.json").exists() else None
    return row


def _reward_stage_ran(run_dir: Path) -> bool:
    log = run_dir.parent / f"{run_dir.name}.log"
    return log.exists() and "running the reward stage" in log.read_text()


def _reward_accuracy(run_dir: Path) -> float | None:
    """The held-out pairwise accuracy of the reward adapter this run trained (None: it reused the seed's)."""
    log = run_dir.parent / f"{run_dir.name}.log"
    if not log.exists():
        return None
    found = re.search(r"held-out pairwise accuracy ([0-9.]+)", log.read_text(errors="replace"))
    return float(found.group(1)) if found else None


def _reward(resolved_config: Path) -> str | None:
    """What the run was trained on: "reward adapter", or the reward functions of ``stage.rewards`` (the
    lexicon-gold ceiling: ``vader_compound``)."""
    if not resolved_config.exists():
        return None
    from omegaconf import OmegaConf

    stage = OmegaConf.load(resolved_config).get("stage", {})
    sources = stage.get("rewards") or {}
    if not sources:
        return "reward adapter"
    return " + ".join(name if source.get("function") else f"{name} (adapter)" for name, source in sources.items())


def _threads(resolved_config: Path) -> str | None:
    """The run's ``threads`` setting as it resolved (wall times depend on it)."""
    if not resolved_config.exists():
        return None
    line = next((ln for ln in resolved_config.read_text().splitlines() if ln.startswith("threads:")), None)
    return line.split(":", 1)[1].strip().strip("'\"") if line else None


# Log lines that mark where a run's phases begin and end (their timestamps; see phases()).
PHASE_MARKS = {"start": "] - threads:", "reward_stage": "running the reward stage",
               "pairs_train": "movie_sentiment train:", "pairs_eval": "movie_sentiment eval:",
               "reward_done": "reward adapter saved", "rl_start": "RL stops responses", "end": "run finished"}


def phases(run_dir: Path, log: Path | None = None) -> dict:
    """Minutes per phase from the run's log (line timestamps) and metrics (``time/step``): ``pairs`` (sampling
    the pairs' replies; ~0 when cached), ``reward_training``, ``rl_steps`` (the sum of the steps' own times) and
    ``evaluations`` (the rest of the RL stage), plus ``start`` (launch to the first stage: model import, loads).
    Phases a run did not have (the reward stage of a later algorithm on a seed) are absent."""
    log = log or run_dir.parent / f"{run_dir.name}.log"
    if not log.exists():
        return {}
    stamps = log_stamps(log)
    minutes = lambda a, b: round((stamps[b] - stamps[a]) / 60, 2)  # noqa: E731
    out = {}
    if "start" in stamps:
        out["start"] = minutes("start", "reward_stage" if "reward_stage" in stamps else "rl_start")
    if {"reward_stage", "pairs_eval", "reward_done"} <= stamps.keys():
        out["pairs"] = minutes("reward_stage", "pairs_eval")
        out["reward_training"] = minutes("pairs_eval", "reward_done")
    if {"rl_start", "end"} <= stamps.keys() and (run_dir / "metrics.jsonl").exists():
        rows = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
        steps = sum(row.get("time/step", 0.0) for row in rows)
        out["rl_steps"] = round(steps / 60, 2)
        if resumed_at(run_dir) is None:  # a resumed run's wall time spans the stop
            out["evaluations"] = round(minutes("rl_start", "end") - steps / 60, 2)
    return out


def log_stamps(log: Path) -> dict[str, float]:
    """The time (epoch seconds) of the first log line carrying each of ``PHASE_MARKS``."""
    stamps = {}
    for line in log.read_text(errors="replace").splitlines():
        for name, mark in PHASE_MARKS.items():
            if mark in line and name not in stamps and line.startswith("[20"):
                stamps[name] = time.mktime(time.strptime(line[1:20], "%Y-%m-%d %H:%M:%S")) + float(line[21:24]) / 1e3
    return stamps


def chain_row(log: Path) -> dict:
    """The default chain as a user runs it (``python train.py experiment=smollm2_sentiment > <log> 2>&1``, fresh
    cache): its minutes from the log's first line to "run finished" (the interpreter's start-up before the first
    line, seconds, is not in them), the phases, before -> after, and whether it met the time target."""
    found = re.search(r"run finished: (\S+)", log.read_text(errors="replace"))
    if not found:
        raise SystemExit(f"bench: error: {log} has no 'run finished: <run dir>' line; was the run complete?")
    run_dir = Path(found.group(1))
    stamps = log_stamps(log)
    minutes = (stamps["end"] - stamps["start"]) / 60
    row = run_row("grpo", "fp32", _seed(run_dir / "resolved_config.yaml"), run_dir, minutes, True)
    row["phases_min"] = phases(run_dir, log)
    row["reward_stage_ran"] = "reward_stage" in stamps
    found = re.search(r"held-out pairwise accuracy ([0-9.]+)", log.read_text(errors="replace"))
    row["reward_heldout_accuracy"] = float(found.group(1)) if found else None
    row["passed"]["default_chain_minutes"] = minutes <= TARGETS["default_chain_minutes_max"]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [step for step in steps if "time/step" in step]
    row["step_median_s"] = {key: common.median([step[key] for step in steps])
                            for key in ("time/rollout", "time/score", "time/optimize", "time/step") if key in steps[0]}
    return row


def _seed(resolved_config: Path) -> int | None:
    line = next((ln for ln in resolved_config.read_text().splitlines() if ln.startswith("seed:")), None)
    return int(line.split(":", 1)[1]) if line else None


def resumed_at(run_dir: Path) -> int | None:
    """The step a run was resumed from (``stage.resume``), or None if it ran in one go."""
    log = run_dir.parent / f"{run_dir.name}.log"
    found = re.search(r"resumed from \S+ at step (\d+)", log.read_text(errors="replace")) if log.exists() else None
    return int(found.group(1)) if found else None


def curve(metrics: Path) -> dict:
    points = {"step": [], **{k: [] for k in CURVE}}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        tag = next((t for t in ("before", "during", "after") if f"eval/{t}/well_formed" in row), None)
        if tag is None:
            continue
        points["step"].append(row.get("step", 0))
        for k in CURVE:
            points[k].append(row.get(f"eval/{tag}/{k}"))
    return points


def held_out_samples(path: Path, per_tag: int = 4) -> dict:
    """The first few held-out replies before and after (the same requests: evaluation samples with a fixed seed)."""
    out = {"before": [], "after": []}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        if sample.get("eval") in out and sample.get("split") == "eval" and len(out[sample["eval"]]) < per_tag:
            out[sample["eval"]].append({k: sample.get(k) for k in ("query", "response", "reward", "well_formed",
                                                                   "on_task")})
    return out


def top_openings(path: Path, words: int = 3) -> dict:
    """The most common opening (first ``words`` words) of the held-out replies before and after, and how many of
    the evaluation's kept replies begin with it: a policy that finds the reward's favourite voice repeats it, which
    distinct-2 over whole replies barely shows. Empty where the run kept no held-out samples."""
    from collections import Counter

    if not path.exists():
        return {}
    openings: dict[str, Counter] = {"before": Counter(), "after": Counter()}
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        if sample.get("eval") in openings and sample.get("split") == "eval":
            openings[sample["eval"]][" ".join(sample["response"].split()[:words])] += 1
    out = {}
    for when, counts in openings.items():
        if counts:
            text, count = counts.most_common(1)[0]
            out[f"{when}/top_opening"] = {"text": text, "count": count, "of": sum(counts.values())}
    return out


def passed(row: dict) -> dict:
    b, a = (lambda k: row[f"before/{k}"]), (lambda k: row[f"after/{k}"])
    verdicts = {
        "judge_after": a("well_formed") >= TARGETS["judge_after_min"],
        "judge_rise": a("well_formed") - b("well_formed") >= TARGETS["judge_rise_min"],
        "fluency": a("ref_nll") - b("ref_nll") <= TARGETS["ref_nll_rise_max"],
        "diversity": a("distinct_2") >= TARGETS["distinct_2_ratio_min"] * b("distinct_2"),
        "kl": a("kl") <= TARGETS["kl_max"],
    }
    if row.get("after/on_task") is not None:  # runs before the on-task check have none
        verdicts["on_task"] = a("on_task") >= b("on_task") - TARGETS["on_task_drop_max"]
    return verdicts


def collect(stamp_dir: Path) -> list[dict]:
    """Rows of the runs under ``stamp_dir`` (``<quant>-seed<seed>/<algorithm>/``), rebuilt from their run dirs
    (so fields added since are filled). A run that wrote its row.json keeps the wall time and command the
    benchmark recorded as it ended. A run stopped and finished by ``stage.resume=auto`` outside the benchmark
    has no row.json: its row is built from the run dir, with no wall time. A run stopped to be resumed
    (``INTERRUPTED`` in its dir) has no row, even where the benchmark wrote a failed row.json as it stopped."""
    rows = []
    for run_dir in sorted({p.parent for p in stamp_dir.glob("*-seed*/*/summary.json")}
                          | {p.parent for p in stamp_dir.glob("*-seed*/*/row.json")}):
        if (run_dir / "INTERRUPTED").exists():  # stopped with a checkpoint, to be resumed: not a result yet
            continue
        recorded = json.loads((run_dir / "row.json").read_text()) if (run_dir / "row.json").exists() else None
        if recorded and recorded.get("failed") and resumed_at(run_dir) is not None:
            recorded = None  # the row its first process wrote as it stopped; the resumed run finished since
        if recorded:
            row = run_row(recorded["algorithm"], recorded["quant"], recorded["seed"], run_dir, recorded["minutes"],
                          not recorded.get("failed"))
            rows.append({**row, "command": recorded.get("command")})
        elif run_dir.name in ALGORITHMS and resumed_at(run_dir) is not None:  # resumed, and ran to the end
            quant, seed = run_dir.parent.name.split("-seed")
            rows.append({**run_row(run_dir.name, quant, int(seed), run_dir, None, True), "command": None})
    return rows


# ------------------------------------------------------------------------------------------------ report
def fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| algorithm | quant | seed | judge (AFINN+) | on task | NLL nat/tok | distinct-2 | KL | reward "
             "| min (threads) | targets |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["quant"], list(ALGORITHMS).index(r["algorithm"]), r["seed"])):
        if r.get("failed"):
            lines.append(f"| {r['algorithm']} | {r['quant']} | {r['seed']} | failed: {r['log']} ||||||||")
            continue
        cell = lambda k, d=2: f"{fmt(r.get(f'before/{k}'), d)} → {fmt(r.get(f'after/{k}'), d)}"  # noqa: E731
        missed = [k for k, ok in r["passed"].items() if not ok]
        verdict = "met" if not missed else "missed: " + ", ".join(missed)
        spent = "resumed" if r["minutes"] is None else f"{r['minutes']:.1f}"
        minutes = f"{spent}{'*' if r.get('reward_stage_ran') else ''} ({r.get('threads') or '?'})"
        on_task = cell("on_task") if r.get("after/on_task") is not None else "not checked"
        gold = f" ({r['reward']})" if r.get("reward") not in (None, "reward adapter") else ""
        lines.append(f"| {r['algorithm']}{gold} | {r['quant']} | {r['seed']} | {cell('well_formed')} | {on_task} | "
                     f"{cell('ref_nll')} | {cell('distinct_2')} | {cell('kl', 1)} | {cell('reward_score')} | {minutes} "
                     f"| {verdict} |")
    return "\n".join(lines)


def plot(rows: list[dict], curves_png: Path, overopt_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("failed")]
    colors = {a: c for a, c in zip(ALGORITHMS, ("tab:blue", "tab:orange", "tab:red", "tab:green"))}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, title in zip(axes, ("well_formed", "reward_score", "kl", "ref_nll"),
                              ("judge: AFINN-positive share", "reward trained on", "KL (nats/reply)", "reference NLL")):
        for r in ok:
            style = "--" if r["quant"] != "fp32" else "-"
            ax.plot(r["curve"]["step"], r["curve"][key], style, color=colors[r["algorithm"]], alpha=0.8,
                    label=f"{r['algorithm']} {r['quant']}" if r["seed"] == min(x["seed"] for x in ok) else None)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    curves_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(curves_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in ok:
        root_kl = [max(k, 0.0) ** 0.5 for k in r["curve"]["kl"]]
        ax.plot(root_kl, r["curve"]["reward_score"], "-", color=colors[r["algorithm"]], alpha=0.5)
        ax.plot(root_kl, r["curve"]["well_formed"], ":", color=colors[r["algorithm"]], alpha=0.9)
    ax.set_xlabel("sqrt(KL to the reference)")
    ax.set_ylabel("reward trained on (solid) / judge share (dotted)")
    ax.set_title("Real model: proxy vs judge over sqrt(KL)")
    fig.tight_layout()
    fig.savefig(overopt_png, dpi=110)
    plt.close(fig)


def plot_path(results: Path, plot: Path | None) -> Path:
    """The curves' image: ``plot`` if given; the docs' image only with the published results file (a partial
    results file must not replace the published plots); else beside ``results``."""
    if plot is not None:
        return plot
    published = (common.RESULTS / "real_model.json").resolve()
    return REPO / "docs" / "real_model.png" if results.resolve() == published else results.with_suffix(".png")


def write_results(rows: list[dict], seeds_info: dict, args, machines: list[dict]) -> None:
    results = {"machines": machines, "seeds": seeds_info, "targets": TARGETS, "eval_every": EVAL_EVERY,
               "algorithms": ALGORITHMS, "rows": rows}
    common.write_json(args.results, results)
    md = [f"Real model (SmolLM2-135M-Instruct, movie_sentiment), {len(rows)} runs. Machine: "
          + "; ".join(common.machine_line(m) for m in machines) + ".",
          f"Seeds: {seeds_info}. Targets: {TARGETS}. `*`: the run's minutes include the reward stage.", "",
          table(rows)]
    args.results.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(rows, args.plot, args.plot.with_name(args.plot.stem + "_overoptimization.png"))
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--quants", nargs="+", default=["fp32"], choices=["fp32", "bf16", "8bit", "4bit"])
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: bench/seeds.json's real_model")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "real_model")
    parser.add_argument("--results", type=Path, help="default: <stamp>/real_model.json for runs (a run never "
                        "replaces the published rows), bench/results/real_model.json for --collect and --from-json, "
                        "bench/results/default_chain.json for --chain-log")
    parser.add_argument("--plot", type=Path, help="default: docs/real_model.png with the published results file, "
                        "else beside --results")
    parser.add_argument("--collect", type=Path, help="rebuild the rows of a stopped benchmark's finished runs")
    parser.add_argument("--stamp", type=Path, help="run under this dir instead of a new <out>/<time>: processes "
                        "running other seeds side by side, or a later process adding algorithms to a seed, share "
                        "it (and so the seed's reward adapter, through its stage cache)")
    parser.add_argument("--from-json", nargs="+", type=Path, help="merge results files written by this script")
    parser.add_argument("--chain-log", type=Path, help="record the default chain run by hand with its output in this "
                        "log (python train.py experiment=smollm2_sentiment > <log> 2>&1, from a fresh cache) into "
                        "--results: its minutes against the 45-minute target, phases and before -> after")
    common.add_allow_dirty(parser)
    parser.add_argument("extra", nargs="*", help="overrides for every run, after --")
    args = parser.parse_args()
    if args.results is None and (args.chain_log or args.collect or args.from_json):
        args.results = common.RESULTS / ("default_chain.json" if args.chain_log else "real_model.json")

    if args.from_json:
        args.plot = plot_path(args.results, args.plot)
        parts = [json.loads(p.read_text()) for p in args.from_json]
        rows = [r for p in parts for r in p["rows"]]
        write_results(rows, parts[0]["seeds"], args, [m for p in parts for m in p["machines"]])
        return
    if args.chain_log:
        row = chain_row(args.chain_log)
        common.write_json(args.results, {"machines": [{**common.machine(), "role": "recorded by"}], "targets": TARGETS,
                                         "rows": [row]})
        print(table([row]) + f"\n\nminutes {row['minutes']} (target <= {TARGETS['default_chain_minutes_max']}); "
              f"phases {row['phases_min']}; wrote {args.results}")
        return
    common.require_clean_tree(args.allow_dirty)
    if args.seeds is None:
        seeds, commit = common.seeds("real_model")
        seeds_info = {"list": "real_model", "seeds": seeds, "seeds_commit": commit}
    else:
        seeds, seeds_info = args.seeds, {"seeds": args.seeds, "seeds_commit": "given on the command line"}
    machine = common.machine()
    if args.collect:
        args.plot = plot_path(args.results, args.plot)
        write_results(collect(args.collect), seeds_info, args, [{**machine, "role": "collected by"}])
        return
    stamp = args.stamp or args.out / time.strftime("%Y%m%d-%H%M%S")
    args.results = args.results or stamp / "real_model.json"  # publish with --collect <stamp> (or --from-json)
    args.plot = plot_path(args.results, args.plot)
    print(f"{common.machine_line(machine)}\nruns under {stamp}", flush=True)
    rows = []
    for quant in args.quants:
        for seed in seeds:
            for algorithm in args.algorithms:
                row = run(algorithm, quant, seed, stamp / f"{quant}-seed{seed}", args.extra)
                print(json.dumps({k: row.get(k) for k in ("algorithm", "quant", "seed", "minutes", "after/well_formed",
                                                          "after/kl", "passed", "failed")}), flush=True)
                rows.append(row)
    write_results(rows, seeds_info, args, [machine])


if __name__ == "__main__":
    main()
