"""Where the update's time goes: one GRPO update pass (forward + backward) on SmolLM2-135M-Instruct, by operation.

The shape of a step of ``experiment=smollm2_sentiment``: 16 rows of a 45-token prompt and a 40-token reply (random
ids: the arithmetic does not depend on them), the policy LoRA of the preset (r 8 on every linear layer), the
forward of ``RLTrainer._policy_forward`` (logits over the reply window only) and the backward of the sum of the
reply's log-probs. After warm-up passes, ``torch.profiler`` records one pass; its time is split into the matrix
products by kind (the base model's linear layers, the LoRA products, the LM head, each with its GFLOP/s), the
attention kernel and the rest (element-wise ops, norms, autograd bookkeeping). The matmul peak of the base's
largest linear shape is timed in the same process, so each kind's share of it is shown.

    python bench/update_profile.py --threads 2 --out bench/results/update_profile.json   # ~2 min on 2 quiet cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROWS, PROMPT, REPLY = 16, 45, 40


def build():
    import torch

    from marl_exp.modeling.loading import load_tokenizer
    from marl_exp.rl.rollout import Rollout
    from marl_exp.rl.trainer import RLTrainer
    from marl_exp.stages.rl_models import build_roles

    common.quiet()
    base, reward = common.model_dirs("smollm2")
    cfg = common.compose("experiment=smollm2_sentiment", "logger=none", "device=cpu", f"stage.sft_model={base}",
                         f"stage.reward_adapter={reward}", f"model.path={base}")
    tokenizer = load_tokenizer(str(base), cfg.model)
    roles = build_roles(cfg, str(base), str(reward), torch.device("cpu"), tokenizer)
    roles.model.train(not cfg.stage.runtime.disable_dropout)
    trainer = RLTrainer(roles, tokenizer, cfg.stage, ["unused"], seed=0)
    generator = torch.Generator().manual_seed(0)
    query = torch.randint(100, tokenizer.vocab_size, (ROWS, PROMPT), generator=generator)
    reply = torch.randint(100, tokenizer.vocab_size, (ROWS, REPLY), generator=generator)
    rollout = Rollout(query, torch.ones_like(query), reply, torch.ones_like(reply),
                      has_eos=torch.ones(ROWS, dtype=torch.bool))
    return trainer, rollout, cfg


def one_pass(trainer, rollout) -> None:
    forward = trainer._policy_forward("policy", rollout)
    loss = forward.logprobs.sum()
    del forward
    loss.backward()


def kind_of(shapes, hidden: int, rank: int, vocab: int) -> str:
    """Which product an ``aten::mm`` of these input shapes is: the LM head, a LoRA product, or a base linear."""
    dims = {d for shape in shapes[:2] for d in shape}
    if vocab in dims:
        return "lm_head"
    if rank in dims:
        return "lora"
    return "base_linear"


def measure(threads: int, passes: int, progress=print) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import flops

    torch.set_num_threads(threads)
    trainer, rollout, cfg = build()
    config = trainer.model.config
    rank, vocab, hidden = cfg.adapter.r, config.vocab_size, config.hidden_size
    for _ in range(2):
        one_pass(trainer, rollout)
    seconds = []
    for _ in range(passes):
        started = time.perf_counter()
        one_pass(trainer, rollout)
        seconds.append(time.perf_counter() - started)
    progress(f"update pass: {statistics.median(seconds):.2f} s (median of {passes})")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        one_pass(trainer, rollout)
    kinds = {k: {"seconds": 0.0, "gflop": 0.0, "calls": 0} for k in ("base_linear", "lora", "lm_head")}
    other = {"attention": 0.0, "rest": 0.0}
    total = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        self_s = event.self_cpu_time_total / 1e6
        total += self_s
        if event.key == "aten::mm":
            (m, k), (_, n) = event.input_shapes[0], event.input_shapes[1]
            entry = kinds[kind_of(event.input_shapes, hidden, rank, vocab)]
            entry["seconds"] += self_s
            entry["gflop"] += 2 * m * k * n * event.count / 1e9
            entry["calls"] += event.count
        elif "attention" in event.key:
            other["attention"] += self_s
        else:
            other["rest"] += self_s
    shapes = flops.Shapes.from_config(config)
    peak = flops.matmul_peak("fp32", threads, m=ROWS * (PROMPT + REPLY), k=shapes.hidden,
                             n=max(o for _, o in shapes.linears))
    for entry in kinds.values():
        entry["gflop_per_s"] = entry["gflop"] / entry["seconds"] if entry["seconds"] else 0.0
        entry["of_peak"] = entry["gflop_per_s"] * 1e9 / peak
    return {"rows": ROWS, "prompt_tokens": PROMPT, "reply_tokens": REPLY, "lora_rank": rank, "threads": threads,
            "pass_seconds": seconds, "pass_median_s": statistics.median(seconds), "profiled_s": total,
            "peak_gflop_per_s": peak / 1e9, "matmuls": kinds, "attention_s": other["attention"],
            "rest_s": other["rest"]}


def markdown(result: dict) -> str:
    m = result["measured"]
    lines = [f"Machine: {common.machine_line(result['machine'])}; one update pass: {m['pass_median_s']:.2f} s "
             f"(median of {len(m['pass_seconds'])}), profiled {m['profiled_s']:.2f} s; fp32 matmul peak "
             f"{m['peak_gflop_per_s']:.1f} GFLOP/s.", "",
             "| part | seconds | share | GFLOP | GFLOP/s | of the peak |", "|---|---|---|---|---|---|"]
    for name, entry in m["matmuls"].items():
        lines.append(f"| {name} | {entry['seconds']:.2f} | {entry['seconds'] / m['profiled_s']:.2f} | "
                     f"{entry['gflop']:.1f} | {entry['gflop_per_s']:.1f} | {entry['of_peak']:.2f} |")
    for name in ("attention", "rest"):
        seconds = m[f"{name}_s"]
        lines.append(f"| {name} | {seconds:.2f} | {seconds / m['profiled_s']:.2f} | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--out", type=Path)
    common.add_allow_dirty(parser)
    args = parser.parse_args(argv)
    common.refuse_dirty_publish(args.out, args.allow_dirty)
    result = {"machine": {**common.machine(), "torch_threads": args.threads},
              "measured": measure(args.threads, args.passes)}
    print(markdown(result))
    if args.out:
        common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
