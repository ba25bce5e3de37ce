"""Run every performance benchmark and write one markdown report with the four target ratios.

    python bench/run_all.py             # memory (tiny, small, base × fp32/8bit/4bit; large fp32; on a GPU Llama-2-7B
                                        # shapes' weights) + speed (tiny, small, ablations): ~14 min on 2 CPU cores
    python bench/run_all.py --quick     # a smoke run in about a minute
    python bench/run_all.py --readme    # also put the table into docs/performance.md (its perf-table block)

Writes bench/results/perf-memory.json, perf-speed.json and perf.md (the report; ``--results DIR`` elsewhere). Each benchmark runs in its
own process; memory runs one more process per configuration. Models are built once (random init, no
download) under $MARL_EXP_CACHE/bench (default ~/.cache/marl-exp/bench).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import memory  # noqa: E402
import speed  # noqa: E402

README = common.REPO / "docs" / "performance.md"  # the page holding the perf-table block
TABLE_START, TABLE_END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
MEMORY_TARGET_SIZES = ("base", "large")  # the >= 100M sizes the memory target is read at


def run(script: str, args: list[str]) -> None:
    cmd = [sys.executable, str(common.REPO / "bench" / script), *args]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=common.REPO)


def targets(mem: dict, spd: dict) -> list[dict]:
    """The issue's four targets, each with what was measured and whether it is met."""
    rows = []
    sharing = mem["summary"]["shared_over_separate_peak"]
    by_key = {(r["size"], r["quant"], r["sharing"]): r for r in mem["rows"]
              if not r.get("failed") and not r.get("gradient_checkpointing")}
    sizes = [s for s in MEMORY_TARGET_SIZES if f"{s}/fp32" in sharing] or [next(iter(sharing)).split("/")[0]]
    measured, ratios, met = [], [], []
    for size in sizes:
        shared, separate = by_key[(size, "fp32", "shared")], by_key[(size, "fp32", "separate")]
        ratio, checkpointed = sharing[f"{size}/fp32"], sharing.get(f"{size}/fp32/checkpointing")
        measured.append(f"{size} ({shared['params'] / 1e6:.0f}M): {memory.peak_mib(shared):.0f} ÷ "
                        f"{memory.peak_mib(separate):.0f} MiB")
        ratios.append(f"{ratio:.3f}" + (f" ({checkpointed:.3f} with gradient checkpointing)" if checkpointed else ""))
        ok = ratio <= memory.TARGET_SHARED_OVER_SEPARATE
        ok_ckpt = checkpointed is not None and checkpointed <= memory.TARGET_SHARED_OVER_SEPARATE
        met.append(f"{size}: " + ("yes" if ok else "**no**" + ("; yes with gradient checkpointing" if ok_ckpt else "")))
    rows.append({"target": "peak memory of a PPO step, shared ÷ separate (fp32, ≥ 100M parameters)",
                 "measured": ", ".join(measured), "ratio": " / ".join(ratios),
                 "goal": f"≤ {memory.TARGET_SHARED_OVER_SEPARATE} (ideal ⅓)", "met": "; ".join(met)})

    rollout = spd["rollout"]
    ratios = {s: r["ratio_rollout_over_plain"] for s, r in rollout.items()}
    rows.append({"target": "rollout tokens/s ÷ plain `generate` of the same model and batch",
                 "measured": ", ".join(f"{s}: {r['rollout']['tokens_per_s']:.0f} ÷ {r['plain_generate']['tokens_per_s']:.0f}"
                                       for s, r in rollout.items()),
                 "ratio": " / ".join(f"{v:.3f}" for v in ratios.values()),
                 "goal": f"≥ {speed.TARGET_ROLLOUT_OVER_GENERATE}",
                 "met": all(v >= speed.TARGET_ROLLOUT_OVER_GENERATE for v in ratios.values())})

    steps = spd["steps"]
    ratios = {s: v["paired_ratio"]["median"] for s, v in steps.items()}
    rows.append({"target": "PPO step time, shared ÷ separate (median of back-to-back pairs; quartiles)",
                 "measured": ", ".join(f"{s}: {v['shared']['step']:.3f} ÷ {v['separate']['step']:.3f} s"
                                       for s, v in steps.items()),
                 "ratio": " / ".join(f"{v['paired_ratio']['median']:.3f} ({v['paired_ratio']['q1']:.2f}–"
                                     f"{v['paired_ratio']['q3']:.2f})" for v in steps.values()),
                 "goal": f"≤ {speed.TARGET_SHARED_OVER_SEPARATE_TIME}",
                 "met": all(v <= speed.TARGET_SHARED_OVER_SEPARATE_TIME for v in ratios.values())})

    weights = mem["summary"]["quant_over_fp32_weights"]
    base = weights.get(f"{sizes[0]}/4bit")
    if base:
        llama = weights.get("llama2-7b/4bit")
        whole = base.get("total_bf16_rest", base["total"])
        big = (f"{llama['total_bf16_rest']:.3f} (measured)" if llama
               else f"{base['llama2_7b_projected_bf16_rest']:.3f} (projected from the bytes per parameter)")
        big_ratio = llama["total_bf16_rest"] if llama else base["llama2_7b_projected_bf16_rest"]
        rows.append({"target": f"4-bit weight memory ÷ fp32, rest in bf16 (QLoRA): whole {sizes[0]} model "
                               f"· its quantized linear layers · Llama-2-7B shapes",
                     "measured": f"{sizes[0]} whole, rest fp32: {base['total']:.3f}",
                     "ratio": f"{whole:.3f} · {base['linear_layers']:.3f} · {big}",
                     "goal": f"≤ {memory.TARGET_4BIT_OVER_FP32}",
                     "met": f"7B: {'yes' if big_ratio <= memory.TARGET_4BIT_OVER_FP32 else '**no**'}"
                            f"{'' if llama else ' (projected)'}; linear layers: "
                            f"{'yes' if base['linear_layers'] <= memory.TARGET_4BIT_OVER_FP32 else '**no**'}; "
                            f"{sizes[0]} whole: {'yes' if whole <= memory.TARGET_4BIT_OVER_FP32 else '**no**'}"})
    return rows


def summary(mem: dict, spd: dict, results: Path = common.RESULTS) -> str:
    """The machine and the four targets: what docs/performance.md shows."""
    machine = common.machine_line(spd.get("machine") or mem["machine"])
    where = results.resolve().relative_to(common.REPO) if results.resolve().is_relative_to(common.REPO) else results
    how = mem.get("how") or "`python bench/run_all.py`"  # results assembled from several runs name theirs
    lines = [f"Measured {mem.get('date') or time.strftime('%Y-%m-%d')} on {machine} with {how} "
             f"(all tables: `{where}/perf.md`, raw numbers: `{where}/perf-*.json`).", "",
             "| target | measured | ratio | goal | met |", "|---|---|---|---|---|"]
    for t in targets(mem, spd):
        met = t["met"] if isinstance(t["met"], str) else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['measured']} | {t['ratio']} | {t['goal']} | {met} |")
    return "\n".join(lines)


def report(mem: dict, spd: dict, results: Path = common.RESULTS) -> str:
    lines = [summary(mem, spd, results)]
    memory_note = ("GPU: `torch.cuda.max_memory_allocated` over the step." if any("cuda_step_peak_mib" in r for r in mem["rows"])
                   else "CPU: peak RSS during the step above the RSS before any model was loaded; weights copied "
                        "out of the checkpoint's memory map, freed blocks returned at once (docs/performance.md).")
    lines += ["", f"**Memory** (one PPO step, batch {mem['batch']}, {mem['new_tokens']} new tokens; {memory_note})", "",
              memory.markdown(mem), "", "**Speed**", "", speed.markdown(spd)]
    return "\n".join(lines)


def update_readme(table: str) -> None:
    text = README.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"docs/performance.md has no {TABLE_START} … {TABLE_END} block to replace")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    README.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model only, few steps")
    parser.add_argument("--readme", action="store_true", help="write the report into docs/performance.md")
    parser.add_argument("--skip-memory", action="store_true", help="reuse bench/results/perf-memory.json")
    parser.add_argument("--skip-speed", action="store_true", help="reuse bench/results/perf-speed.json")
    parser.add_argument("--results", type=Path, default=common.RESULTS,
                        help="folder of perf-memory.json, perf-speed.json and perf.md (default bench/results)")
    common.add_allow_dirty(parser)
    args = parser.parse_args()
    common.refuse_dirty_publish(args.results, args.allow_dirty)
    started = time.perf_counter()
    quick = (["--quick"] if args.quick else []) + (["--allow-dirty"] if args.allow_dirty else [])
    memory_json, speed_json = args.results / "perf-memory.json", args.results / "perf-speed.json"
    if not args.skip_memory:
        run("memory.py", quick + ["--out", str(memory_json)])
    if not args.skip_speed:
        run("speed.py", quick + (["--ablation"] if args.quick else ["--ablation", "tiny", "small"]) + ["--out", str(speed_json)])
    mem = json.loads(memory_json.read_text())
    spd = json.loads(speed_json.read_text())
    table = report(mem, spd, args.results)
    (args.results / "perf.md").write_text(table + "\n")
    print("\n" + table)
    if args.readme:
        update_readme(summary(mem, spd, args.results))
        print("\nupdated docs/performance.md")
    print(f"\nwrote {args.results / 'perf.md'} in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
