"""Run every performance benchmark and write one markdown report with the four target ratios.

    python bench/run_all.py             # memory (tiny, small, base × fp32/8bit/4bit) + speed (tiny, small, ablations)
    python bench/run_all.py --quick     # a smoke run in about two minutes
    python bench/run_all.py --readme    # also put the table into README.md's "## Performance" section

Writes bench/results/perf-memory.json, perf-speed.json and perf.md (the report). Each benchmark runs in its
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

README = common.REPO / "README.md"
TABLE_START, TABLE_END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
LARGE = "base"  # the >= 100M size the memory target is read at


def run(script: str, args: list[str]) -> None:
    cmd = [sys.executable, str(common.REPO / "bench" / script), *args]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=common.REPO)


def targets(mem: dict, spd: dict) -> list[dict]:
    """The issue's four targets, each with what was measured and whether it is met."""
    rows = []
    sharing = mem["summary"]["shared_over_separate_peak"]
    size = LARGE if f"{LARGE}/fp32" in sharing else next(iter(sharing)).split("/")[0]
    by_key = {(r["size"], r["quant"], r["sharing"]): r for r in mem["rows"]
              if not r.get("failed") and not r.get("gradient_checkpointing")}
    shared, separate = by_key[(size, "fp32", "shared")], by_key[(size, "fp32", "separate")]
    ratio = sharing[f"{size}/fp32"]
    checkpointed = sharing.get(f"{size}/fp32/checkpointing")
    rows.append({"target": f"peak memory of a PPO step, shared ÷ separate ({size}, "
                           f"{shared['params'] / 1e6:.0f}M parameters, fp32)",
                 "measured": f"{memory.peak_mib(shared):.0f} ÷ {memory.peak_mib(separate):.0f} MiB",
                 "ratio": f"{ratio:.3f}" + (f" ({checkpointed:.3f} with gradient checkpointing)" if checkpointed else ""),
                 "goal": f"≤ {memory.TARGET_SHARED_OVER_SEPARATE} (ideal ⅓)",
                 "met": ratio <= memory.TARGET_SHARED_OVER_SEPARATE or (
                     "**no**; yes with gradient checkpointing"
                     if checkpointed and checkpointed <= memory.TARGET_SHARED_OVER_SEPARATE else False)})

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

    weights = mem["summary"]["quant_over_fp32_weights"].get(f"{size}/4bit")
    if weights:
        whole = weights.get("total_bf16_rest", weights["total"])
        rows.append({"target": f"4-bit weight memory ÷ fp32 ({size}): whole base with the rest in bf16 (QLoRA) "
                               f"· quantized linear layers · Llama-2-7B projection",
                     "measured": f"whole base, rest fp32: {weights['total']:.3f}",
                     "ratio": f"{whole:.3f} · {weights['linear_layers']:.3f} · "
                              f"{weights['llama2_7b_projected_bf16_rest']:.3f}",
                     "goal": f"≤ {memory.TARGET_4BIT_OVER_FP32}",
                     "met": "linear layers and 7B: yes; this small model whole: no"
                     if whole > memory.TARGET_4BIT_OVER_FP32 and weights["linear_layers"] <= memory.TARGET_4BIT_OVER_FP32
                     else whole <= memory.TARGET_4BIT_OVER_FP32})
    return rows


def summary(mem: dict, spd: dict) -> str:
    """The machine and the four targets: what README.md shows."""
    machine = common.machine_line(spd.get("machine") or mem["machine"])
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {machine} with `python bench/run_all.py` "
             f"(all tables: `bench/results/perf.md`, raw numbers: `bench/results/perf-*.json`).", "",
             "| target | measured | ratio | goal | met |", "|---|---|---|---|---|"]
    for t in targets(mem, spd):
        met = t["met"] if isinstance(t["met"], str) else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['measured']} | {t['ratio']} | {t['goal']} | {met} |")
    return "\n".join(lines)


def report(mem: dict, spd: dict) -> str:
    lines = [summary(mem, spd)]
    memory_note = ("GPU: `torch.cuda.max_memory_allocated` over the step." if any("cuda_step_peak_mib" in r for r in mem["rows"])
                   else "CPU: peak RSS during the step above the RSS before any model was loaded; weights copied "
                        "out of the checkpoint's memory map, freed blocks returned at once (docs/performance.md).")
    lines += ["", f"**Memory** (one PPO step, batch {mem['batch']}, {mem['new_tokens']} new tokens; {memory_note})", "",
              memory.markdown(mem), "", "**Speed**", "", speed.markdown(spd)]
    return "\n".join(lines)


def update_readme(table: str) -> None:
    text = README.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"README.md has no {TABLE_START} … {TABLE_END} block to replace")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    README.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model only, few steps")
    parser.add_argument("--readme", action="store_true", help="write the report into README.md")
    parser.add_argument("--skip-memory", action="store_true", help="reuse bench/results/perf-memory.json")
    parser.add_argument("--skip-speed", action="store_true", help="reuse bench/results/perf-speed.json")
    args = parser.parse_args()
    started = time.perf_counter()
    quick = ["--quick"] if args.quick else []
    if not args.skip_memory:
        run("memory.py", quick)
    if not args.skip_speed:
        run("speed.py", quick + (["--ablation"] if args.quick else ["--ablation", "tiny", "small"]))
    mem = json.loads((common.RESULTS / "perf-memory.json").read_text())
    spd = json.loads((common.RESULTS / "perf-speed.json").read_text())
    table = report(mem, spd)
    (common.RESULTS / "perf.md").write_text(table + "\n")
    print("\n" + table)
    if args.readme:
        update_readme(summary(mem, spd))
        print("\nupdated README.md")
    print(f"\nwrote {common.RESULTS / 'perf.md'} in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
