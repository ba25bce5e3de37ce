"""Reward-model overoptimization (Gao, Schulman & Hilton 2022) on the built-in task.

A policy trained against a learned reward model (the *proxy*) raises the proxy as far as the KL budget lets it,
while the true score (the *gold*) first rises, peaks and then falls: the policy learns what the reward model
over-rates. The built-in task has a gold that cannot be gamed the same way, the strict oracle `oracle_strict`
(the share of positive units of a well-formed review, 0 for anything that is not one), so the curve can be
measured rather than estimated with a bigger reward model, as the paper had to.

One command:

1. builds the SFT model once, exactly as the chain `python train.py` does (the stage cache, `upstream.sft.*`),
   by starting the gold-reward run first: it needs the SFT model and nothing else;
2. for each preference-set size `--sizes` (`data.num_pairs_train`), one PPO run (`+rewards=monitor_gold`) whose
   reward adapter the stage cache trains as the chain would (`upstream.reward.*`, its default epochs over the
   smaller set) on the shared SFT model (`stage.sft_model`); the strict gold is logged beside the proxy at
   weight 0;
3. the gold-reward PPO run (`+rewards=oracle_strict`: the strict gold is the reward) as the ceiling;

every PPO run with a light, fixed KL penalty (`stage.kl.adaptive_kl=false stage.kl.init_kl_coef=--kl-coef`) so the
policy moves far from the reference, and an evaluation on the held-out prompts every `--eval-every` steps.
`--jobs` runs start at once (each with `threads=1`); the first reward-model runs start as soon as the gold run
has the SFT model. Outputs: a table (printed and in bench/results/overoptimization.md), the raw curves
(bench/results/overoptimization.json) and the plot (docs/overoptimization.png).

    python bench/overoptimization.py                                   # sizes 300 1000 6000 + gold, ~15 min on 2 cores
    python bench/overoptimization.py --quick                           # smoke run on the debug=ppo settings, ~1 min
    python bench/overoptimization.py --from-json bench/results/overoptimization.json   # replot, no runs
    python bench/overoptimization.py --sizes 300 6000 -- quant=4bit    # extra train.py overrides after --

The plot puts each evaluation at √KL, KL = the mean per-response KL of the policy to the reference in nats
(`eval/<tag>/kl`, held-out prompts); the paper's x-axis. The proxy is standardised per reward model so the
curves share one axis: (mean RM score − its mean on the SFT policy's samples) / the std of the RM's scores
over the SFT policy's samples (`eval/before/...` and the first training step's `rewards/reward/std`: one
batch of the policy before any update). Each evaluation is a dot; as the KL of successive evaluations goes up
and down, the lines join the means over 0.5-√nat bins of √KL. The per-step training curves (`objective/kl`,
`rewards/<source>/mean` of each batch, on training prompts) are saved in the JSON beside the evaluations.

How the settings were chosen, from a first look at this commit's defaults (2 shared CPU cores): with the reward
stage's default epochs, 100 pairs leave a chance-level reward model (held-out accuracy 0.52), 300 pairs give
0.85, 1000 0.84, 3000 0.93 and 6000 (the default set) 0.94, so 300 / 1000 / 6000 span weak to default; a
6000-pair reward model trains in about 3 min. (The measured run's reward models, same configs, scored 0.77 /
0.89 / 0.99: the reward adapter's initialisation depends on the process's random state before the stage.) PPO at its default learning rate with the KL coefficient 0.01
passed 1-7 nats of KL within 10 steps and 20-60 nats by step 30-60 against both the 300- and the 6000-pair
reward model, so the runs evaluate every 5 steps (96 responses to the held-out prompts each, the stage default)
and 150 steps take the policy far past the gold's peak.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
GOLD = "oracle_strict"  # the gold score's metric: eval/<tag>/oracle_strict, rewards/oracle_strict/mean
BIN = 0.5  # width of the √KL bins whose means the plot's lines join (√nats)
QUICK = {"sizes": [64, 256], "steps": 6, "eval_every": 2, "overrides": ["debug=ppo"]}


# ----------------------------------------------------------------------------------------------- runs
def ppo_command(run_dir: Path, args, job: list[str]) -> list[str]:
    """`python train.py` for one PPO run of the experiment; ``job`` (reward source, size) comes last."""
    return [sys.executable, "train.py", "stage=ppo", "logger=none", "threads=1", f"hydra.run.dir={run_dir}",
            f"stage.steps={args.steps}", f"stage.eval.eval_every={args.eval_every}", "stage.kl.adaptive_kl=false",
            f"stage.kl.init_kl_coef={args.kl_coef}", "stage.save_every=0", *args.overrides, *job]


def run_all(args, out: Path) -> list[dict]:
    """Every run of the experiment, ``args.jobs`` at a time; the gold run first (it builds the SFT model)."""
    gold_dir = out / "gold"
    pending = [{"name": "gold", "pairs": None, "run_dir": gold_dir,
                "cmd": ppo_command(gold_dir, args, ["+rewards=oracle_strict"])}]
    for pairs in sorted(args.sizes, reverse=True):  # the largest reward model takes longest: start it first
        run_dir = out / f"rm{pairs}"
        pending.append({"name": f"rm{pairs}", "pairs": pairs, "run_dir": run_dir, "cmd": None})
    running, done, sft_model = [], [], None
    while pending or running:
        sft_model = sft_model or built_sft_model(gold_dir)
        while pending and len(running) < args.jobs and (pending[0]["cmd"] or sft_model):
            job = pending.pop(0)
            if job["cmd"] is None:
                job["cmd"] = ppo_command(job["run_dir"], args, ["+rewards=monitor_gold", f"stage.sft_model={sft_model}",
                                                                f"data.num_pairs_train={job['pairs']}"])
            job["run_dir"].parent.mkdir(parents=True, exist_ok=True)
            job["log"] = job["run_dir"].parent / f"{job['name']}.log"
            job["started"] = time.perf_counter()
            with open(job["log"], "w") as log:
                job["proc"] = subprocess.Popen(job["cmd"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            print(f"started {job['name']} ({job['log']})", flush=True)
            running.append(job)
        for job in [j for j in running if j["proc"].poll() is not None]:
            running.remove(job)
            job["minutes"] = (time.perf_counter() - job["started"]) / 60
            done.append(job)
            print(f"finished {job['name']} in {job['minutes']:.1f} min (exit {job['proc'].returncode})", flush=True)
            sft_model = sft_model or built_sft_model(gold_dir)
            if job["name"] == "gold" and sft_model is None:  # failed before its inputs: nothing else can run
                for other in pending:
                    other.update(proc=None, minutes=0.0, log=job["log"])
                done += pending
                pending = []
        time.sleep(1)
    order = {name: i for i, name in enumerate(["gold"] + [f"rm{p}" for p in args.sizes])}
    return [collect(job) for job in sorted(done, key=lambda j: order[j["name"]])]


def built_sft_model(run_dir: Path) -> str | None:
    """The SFT model a run reads, once it is built: the run record is written when the inputs are ready."""
    record = run_dir / "run_record.json"
    return json.loads(record.read_text())["inputs"]["sft_model"] if record.exists() else None


def collect(job: dict) -> dict:
    """The record of one finished run: its curves, and its reward model's held-out accuracy."""
    run = {"name": job["name"], "pairs": job["pairs"], "run_dir": str(job["run_dir"]), "minutes": job["minutes"],
           "log": str(job["log"])}
    proc = job.get("proc")
    if proc is None or proc.returncode != 0 or not (job["run_dir"] / "summary.json").exists():
        return {**run, "failed": True}
    inputs = json.loads((job["run_dir"] / "run_record.json").read_text())["inputs"]
    run.update(failed=False, sft_model=inputs["sft_model"], reward_adapter=inputs.get("reward_adapter"))
    if run["reward_adapter"]:
        rm_summary = json.loads((Path(run["reward_adapter"]).parent / "summary.json").read_text())
        run["rm_accuracy"] = rm_summary["eval/pairwise_accuracy"]
    run.update(curves(job["run_dir"] / "metrics.jsonl", proxy=None if job["pairs"] is None else "reward"))
    return run


# ------------------------------------------------------------------------------------ curves and table
def curves(metrics_path: Path, proxy: str | None) -> dict:
    """The evaluation curve (held-out prompts) and the per-step training curve of one PPO run.

    ``proxy`` names the reward source whose score is the proxy (None for the gold-reward run). The proxy's
    standardised value is (score − score of the first evaluation) / the std of its scores at the first
    training step (the SFT policy's samples).
    """
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = {"step": [], "kl": [], "gold": [], "proxy": []}
    evals = {"step": [], "kl": [], "gold": [], "well_formed": [], "oracle": [], "proxy": []}
    proxy_std0 = None
    for record in records:
        if f"rewards/{GOLD}/mean" in record:
            if proxy and proxy_std0 is None:
                proxy_std0 = record[f"rewards/{proxy}/std"]
            train["step"].append(record["step"])
            train["kl"].append(record["objective/kl"])
            train["gold"].append(record[f"rewards/{GOLD}/mean"])
            train["proxy"].append(record[f"rewards/{proxy}/mean"] if proxy else None)
        for tag in ("before", "during", "after"):
            if f"eval/{tag}/{GOLD}" in record:
                evals["step"].append(record["step"])
                evals["kl"].append(record[f"eval/{tag}/kl"])
                evals["gold"].append(record[f"eval/{tag}/{GOLD}"])
                evals["well_formed"].append(record[f"eval/{tag}/well_formed"])
                evals["oracle"].append(record[f"eval/{tag}/oracle_score"])
                evals["proxy"].append(record[f"eval/{tag}/rewards/{proxy}/mean"] if proxy else None)
    if proxy and proxy_std0:
        start = evals["proxy"][0]
        evals["proxy_z"] = [(p - start) / proxy_std0 for p in evals["proxy"]]
    else:
        evals["proxy_z"] = [None] * len(evals["step"])
    evals["sqrt_kl"] = [math.sqrt(max(kl, 0.0)) for kl in evals["kl"]]  # a sampled KL estimate can dip below 0
    return {"eval": evals, "train": train, "proxy_std0": proxy_std0}


def summarize(run: dict) -> dict:
    """One row of the table: the gold at the start, at its peak (and where) and at the end."""
    if run["failed"]:
        return {"name": run["name"], "pairs": run["pairs"], "failed": True, "log": run["log"]}
    ev = run["eval"]
    peak = max(range(len(ev["gold"])), key=lambda i: ev["gold"][i])
    return {"name": run["name"], "pairs": run["pairs"], "failed": False, "rm_accuracy": run.get("rm_accuracy"),
            "gold_start": ev["gold"][0], "gold_peak": ev["gold"][peak], "peak_sqrt_kl": ev["sqrt_kl"][peak],
            "peak_step": ev["step"][peak], "gold_final": ev["gold"][-1], "proxy_final": ev["proxy_z"][-1],
            "well_formed_final": ev["well_formed"][-1], "kl_final": ev["kl"][-1], "minutes": run["minutes"]}


def binned(xs: list[float], ys: list[float], width: float) -> tuple[list[float], list[float]]:
    """Means of the points in each ``width``-wide bin of x (bins without points left out), in x order:
    the mean x and the mean y of each bin."""
    bins: dict[int, list[tuple[float, float]]] = {}
    for x, y in zip(xs, ys):
        bins.setdefault(int(x // width), []).append((x, y))
    means = [(sum(x for x, _ in b) / len(b), sum(y for _, y in b) / len(b)) for _, b in sorted(bins.items())]
    return [x for x, _ in means], [y for _, y in means]


def label(run: dict) -> str:
    return "gold reward (ceiling)" if run["pairs"] is None else f"RM on {run['pairs']} pairs"


def markdown(runs: list[dict]) -> str:
    lines = ["| reward | RM held-out accuracy | gold at start | peak gold (√KL, step) | final gold | final proxy (σ) "
             "| final well-formed | final KL (nats) | run time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = summarize(run)
        if s["failed"]:
            lines.append(f"| {label(run)} | failed ({s['log']}) | | | | | | | |")
            continue
        accuracy = "–" if s["rm_accuracy"] is None else f"{s['rm_accuracy']:.3f}"
        proxy = "–" if s["proxy_final"] is None else f"{s['proxy_final']:+.2f}"
        lines.append(f"| {label(run)} | {accuracy} | {s['gold_start']:.3f} | {s['gold_peak']:.3f} "
                     f"({s['peak_sqrt_kl']:.2f}, {s['peak_step']}) | {s['gold_final']:.3f} | {proxy} "
                     f"| {s['well_formed_final']:.3f} | {s['kl_final']:.2f} | {s['minutes']:.1f} min |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    rms = sorted((r for r in runs if r["pairs"] is not None and not r["failed"]), key=lambda r: r["pairs"])
    cmap = plt.get_cmap("viridis")
    for i, run in enumerate(rms + [r for r in runs if r["pairs"] is None and not r["failed"]]):
        ev = run["eval"]
        gold_run = run["pairs"] is None
        color = "black" if gold_run else cmap(0.85 * i / max(len(rms) - 1, 1))
        line = {"color": color, "linestyle": "--" if gold_run else "-"}
        panels = [(axes[0], ev["gold"]), (axes[2], ev["well_formed"])] + ([] if gold_run else [(axes[1], ev["proxy_z"])])
        for ax, values in panels:
            # The KL of successive evaluations goes up and down (one large update can throw the policy far
            # off for a step): each evaluation is a dot, the line joins the means of 0.5-√nat bins.
            ax.plot(ev["sqrt_kl"], values, linestyle="none", marker="o", markersize=3, alpha=0.45, color=color)
            ax.plot(*binned(ev["sqrt_kl"], values, BIN), label=label(run), **line)
        peak = max(range(len(ev["gold"])), key=lambda k: ev["gold"][k])
        axes[0].plot(ev["sqrt_kl"][peak], ev["gold"][peak], marker="*", markersize=13, color=color)
    titles = (f"gold: {GOLD} (★ the best evaluation)",
              "proxy: RM score, standardised (σ of the SFT policy's scores)", "well-formed share")
    for ax, text in zip(axes, titles):
        ax.set_title(text, fontsize=10)
        ax.set_xlabel("√KL to the reference (√nats)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="preference pairs per reward model (default 300 1000 6000)")
    parser.add_argument("--steps", type=int, help="PPO steps per run (default 150)")
    parser.add_argument("--eval-every", type=int, help="evaluate every N steps (default 5)")
    parser.add_argument("--kl-coef", type=float, default=0.01, help="fixed KL coefficient (default 0.01)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: debug=ppo data, 2 tiny sizes, 6 steps")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "overoptimization")
    parser.add_argument("--results", type=Path, help="default bench/results (--quick: the run's output dir)")
    parser.add_argument("--png", type=Path, help="default docs/overoptimization.png (--quick: the run's output dir)")
    parser.add_argument("--from-json", type=Path, help="no runs: table and plot from this results file")
    common.add_allow_dirty(parser)
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides (after --), for every run")
    args = parser.parse_args()
    if args.from_json:
        args.png = args.png or REPO / "docs" / "overoptimization.png"
        saved = json.loads(args.from_json.read_text())
        print(markdown(saved["runs"]))
        plot(saved["runs"], args.png, saved.get("title", ""))
        print(f"\nwrote {args.png}")
        return
    defaults = QUICK if args.quick else {"sizes": [300, 1000, 6000], "steps": 150, "eval_every": 5, "overrides": []}
    args.sizes = args.sizes or defaults["sizes"]
    args.steps = args.steps or defaults["steps"]
    args.eval_every = args.eval_every or defaults["eval_every"]
    args.overrides = defaults["overrides"] + args.overrides
    if any(o.split("=")[0].lstrip("+~") in ("data.num_pairs_train", "stage.sft_model", "stage.reward_adapter")
           for o in args.overrides):
        parser.error("data.num_pairs_train, stage.sft_model and stage.reward_adapter are set per run: use --sizes")
    if len(set(args.sizes)) != len(args.sizes) or min(args.sizes) < 1:
        parser.error(f"--sizes {args.sizes}: give distinct positive numbers of pairs")

    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    args.results = args.results or (out if args.quick else REPO / "bench" / "results")  # a smoke run publishes nothing
    common.refuse_dirty_publish(args.results, args.allow_dirty)
    args.png = args.png or (out if args.quick else REPO / "docs") / "overoptimization.png"
    # the machine as the runs see it: CPU and flags, torch, commit and tree (each run has 1 thread)
    machine = {**common.machine(), "torch_threads": 1, "runs_at_once": args.jobs}
    started = time.perf_counter()
    runs = run_all(args, out)
    minutes = (time.perf_counter() - started) / 60
    table = markdown(runs)
    print("\n" + table)
    settings = (f"{args.steps} PPO steps, fixed KL coefficient {args.kl_coef}, evaluation every {args.eval_every} "
                f"steps; overrides: {' '.join(args.overrides) or 'none'}")
    title = f"Overoptimization on the built-in task: {settings}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "overoptimization.md").write_text(
        f"Machine: {common.machine_line(machine)}, {args.jobs} runs at once; {minutes:.1f} min in all.\nSettings: {settings}.\n\n{table}\n")
    (args.results / "overoptimization.json").write_text(json.dumps(
        {"machine": machine, "minutes": minutes, "settings": settings, "title": title, "sizes": args.sizes,
         "steps": args.steps, "kl_coef": args.kl_coef, "eval_every": args.eval_every, "overrides": args.overrides,
         "summary": [summarize(r) for r in runs], "runs": runs}, indent=1))
    plot(runs, args.png, title)
    print(f"\n{minutes:.1f} min; wrote {args.results / 'overoptimization.md'}, {args.png}")
    sys.exit(1 if any(r["failed"] for r in runs) else 0)


if __name__ == "__main__":
    main()
