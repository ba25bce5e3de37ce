"""What computing a group's prompt once buys, on SmolLM2-135M-Instruct and the real task's requests.

Two samplers repeat one prompt over several rows: the GRPO rollout (``num_generations`` replies per request,
``experiment=smollm2_sentiment``: 4 requests x 4 replies, <= 40 tokens) and the pair sampler of the reward stage
(8 requests x 4 replies, <= 40 tokens). Each runs with ``PerfOptions.shared_prefill`` on and off, alternating,
from the same seed, so both sides sample the same tokens (checked: the responses must be equal, or the run stops).
Reported: median wall time with quartiles, the ratio on ÷ off, and the prompt and reply lengths.

    python bench/shared_prefill.py --out bench/results/shared_prefill.json     # ~4 min on 2 quiet EPYC cores
    python bench/shared_prefill.py --reps 3 --threads 1                        # smoke run, not published
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SAMPLERS = {"grpo_rollout": (4, 4), "pair_sampler": (8, 4)}  # (requests, replies per request)


def build(seed: int):
    """SmolLM2 with a policy LoRA of the preset's shape (random B, so the adapter changes the logits)."""
    import torch

    from marl_exp.modeling.gguf_import import smollm2_dir
    from marl_exp.modeling.loading import load_tokenizer
    from marl_exp.modeling.multi_adapter import MultiAdapterModel
    from marl_exp.stages.common import lora_config
    from transformers import AutoModelForCausalLM

    common.quiet()
    cfg = common.compose("experiment=smollm2_sentiment")
    path = smollm2_dir()
    tokenizer = load_tokenizer(str(path))
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model = MultiAdapterModel.build(base, lora_config(cfg.adapter, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return model, tokenizer, cfg


def one_sample(model, tokenizer, cfg, prompts, group: int, shared: bool, seed: int):
    import torch

    from marl_exp.rl.rollout import PerfOptions, sample

    torch.manual_seed(seed)
    started = time.perf_counter()
    rollout = sample(model, tokenizer, prompts, "policy", cfg.stage, perf=PerfOptions(shared_prefill=shared),
                     group=group)
    return time.perf_counter() - started, rollout


def measure(reps: int, seed: int, progress=print) -> dict:
    import torch

    from marl_exp.data import sentiment

    model, tokenizer, cfg = build(seed)
    requests = sentiment.requests("train", cfg.data.seed)
    out = {}
    for name, (count, group) in SAMPLERS.items():
        prompts = [p for p in requests[:count] for _ in range(group)]
        times = {True: [], False: []}
        lengths = None
        for i in range(reps + 1):  # the first round warms up
            order = (True, False) if i % 2 else (False, True)
            responses = {}
            for shared in order:
                seconds, rollout = one_sample(model, tokenizer, cfg, prompts, group, shared, seed + i)
                responses[shared] = rollout.response_ids
                if i:
                    times[shared].append(seconds)
                lengths = (rollout.query_ids.shape[1], float(rollout.response_mask.sum(1).float().mean()))
            if not torch.equal(responses[True], responses[False]):
                raise SystemExit(f"bench: error: {name} sampled different replies with the shared prefill on and off")
            progress(f"{name} round {i}: on {times[True][-1] if i else 0:.2f} s, off {times[False][-1] if i else 0:.2f} s")
        on, off = common.quartiles(times[True]), common.quartiles(times[False])
        out[name] = {"requests": count, "replies_per_request": group, "prompt_tokens_padded": lengths[0],
                     "mean_reply_tokens": lengths[1], "shared": on, "per_row": off,
                     "on_over_off": on["median"] / off["median"],
                     "paired_ratios": [a / b for a, b in zip(times[True], times[False])]}
    return out


def markdown(result: dict) -> str:
    lines = [f"Machine: {common.machine_line(result['machine'])}; {result['reps']} alternating rounds after a warm-up.",
             "", "| sampler | rows | prompt (padded) | reply (mean) | shared prefill | per-row prefill | on ÷ off |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["samplers"].items():
        cell = lambda q: f"{q['median']:.2f} s ({q['q1']:.2f}-{q['q3']:.2f})"  # noqa: E731
        lines.append(f"| {name} | {r['requests']} x {r['replies_per_request']} | {r['prompt_tokens_padded']} | "
                     f"{r['mean_reply_tokens']:.1f} | {cell(r['shared'])} | {cell(r['per_row'])} | "
                     f"{r['on_over_off']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    common.add_allow_dirty(parser)
    args = parser.parse_args(argv)
    common.refuse_dirty_publish(args.out, args.allow_dirty)
    import torch

    torch.set_num_threads(args.threads)
    result = {"machine": common.machine(), "reps": args.reps, "seed": args.seed,
              "samplers": measure(args.reps, args.seed)}
    print(markdown(result))
    if args.out:
        common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
