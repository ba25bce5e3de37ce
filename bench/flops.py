"""FLOP accounting of an RL run: model FLOPs per phase of a step, achieved FLOP/s and MFU.

    python bench/flops.py <run dir>            # an RL stage's run dir (metrics.jsonl, resolved_config.yaml)
    python bench/flops.py <run dir> --json out.json

Model FLOPs count the work the model needs for the step's real tokens (no padding), as the MFU convention
does: 2 FLOPs per weight per token for a forward pass (every linear layer, the LM head where logits are
needed, each LoRA adapter's two small matrices) plus causal attention, 4 x context x attention width per token
and layer. A backward pass through a frozen base computes input gradients only (as much work as the forward)
plus the LoRA weight gradients; the base's weight gradients are never computed.

Per phase (one policy; ``P`` prompt tokens, ``R`` response tokens per reply, ``B`` replies):
- sample: prefill of the prompt (logits only at its last token), then one forward per response token;
- score: the policy (old log-probs; with values for PPO's value head), the reference and the reward model,
  each one forward over prompt + response (PPO's ``critic=adapter``: one more forward, its own adapter). No
  policy pass where the update's first forward gave the old log-probs (the step's
  ``perf/old_logprobs_from_update`` metric);
- update: per update of the batch (``ppo_epochs`` or ``num_iterations``), a forward and a backward over
  prompt + response (PPO's ``critic=adapter``: the critic's too).

Achieved FLOP/s = model FLOPs / the phase's own ``time/*`` metric; the peak is a matmul of the model's
shapes timed in this process, in the run's compute dtype and with its thread count. The machine, peak and
per-phase table are printed. Measure on a quiet machine: a loaded one lowers both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: E402  (bench/ is not a package)


@dataclass(frozen=True)
class Shapes:
    """What a decoder's FLOPs depend on."""

    layers: int
    hidden: int
    linears: tuple[tuple[int, int], ...]  # (in, out) of each linear layer of one block
    attention_width: int  # heads x head dim: the width of QK^T and AV
    vocab: int

    @classmethod
    def from_config(cls, config) -> "Shapes":
        """A Llama-style block (q, k, v, o; gate, up, down), as every family this bench runs."""
        d = config.hidden_size
        head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
        q_width = config.num_attention_heads * head_dim
        kv_width = getattr(config, "num_key_value_heads", config.num_attention_heads) * head_dim
        ffn = config.intermediate_size
        linears = ((d, q_width), (d, kv_width), (d, kv_width), (q_width, d), (d, ffn), (d, ffn), (ffn, d))
        return cls(config.num_hidden_layers, d, linears, q_width, config.vocab_size)

    @property
    def block_weights(self) -> int:
        return sum(i * o for i, o in self.linears)


def lora_flops_per_token(shapes: Shapes, rank: int) -> int:
    """One LoRA adapter on every linear of every block (target_modules=all-linear): x A then (x A) B."""
    return 2 * rank * sum(i + o for i, o in shapes.linears) * shapes.layers


def forward_flops(shapes: Shapes, tokens: int, start: int = 0, lm_head_tokens: int | None = None,
                  lora_rank: int = 0) -> float:
    """FLOPs of one forward pass over ``tokens`` positions after ``start`` cached ones (causal attention: the
    token at position p attends to p + 1 keys), logits at ``lm_head_tokens`` of them (default: all)."""
    lm_head_tokens = tokens if lm_head_tokens is None else lm_head_tokens
    dense = 2 * shapes.block_weights * shapes.layers * tokens
    keys = sum(range(start + 1, start + tokens + 1))  # attended keys summed over the new positions
    attention = 4 * shapes.attention_width * shapes.layers * keys
    head = 2 * shapes.hidden * shapes.vocab * lm_head_tokens
    return float(dense + attention + head + lora_flops_per_token(shapes, lora_rank) * tokens)


def backward_flops(shapes: Shapes, tokens: int, lora_rank: int) -> float:
    """Input gradients through the frozen base (the forward's work: dense, attention twice, LM head) and the
    LoRA weight gradients (as much as its forward again)."""
    forward = forward_flops(shapes, tokens, lora_rank=lora_rank)
    attention = 4 * shapes.attention_width * shapes.layers * sum(range(1, tokens + 1))
    return forward + attention + lora_flops_per_token(shapes, lora_rank) * tokens


def step_flops(shapes: Shapes, replies: int, prompt: float, response: float, updates: int, lora_rank: int,
               reward_rank: int, critic_adapter: bool = False, policy_scoring: bool = True) -> dict[str, float]:
    """Model FLOPs of one step's phases for ``replies`` replies of mean ``prompt`` + ``response`` tokens.
    ``policy_scoring=False``: scoring has no policy pass (the update's first forward gave the old log-probs)."""
    p, r = round(prompt), round(response)
    sample = forward_flops(shapes, p, lm_head_tokens=1, lora_rank=lora_rank) \
        + sum(forward_flops(shapes, 1, start=p + i, lora_rank=lora_rank) for i in range(r - 1))
    whole = p + r
    policy = forward_flops(shapes, whole, lora_rank=lora_rank)
    reference = forward_flops(shapes, whole)
    reward = forward_flops(shapes, whole, lm_head_tokens=0, lora_rank=reward_rank)
    critic = forward_flops(shapes, whole, lm_head_tokens=0, lora_rank=lora_rank) if critic_adapter else 0.0
    score = (policy if policy_scoring else 0.0) + reference + reward + critic
    update = updates * (policy + backward_flops(shapes, whole, lora_rank)
                        + (critic + backward_flops(shapes, whole, lora_rank) if critic_adapter else 0.0))
    return {"sample": replies * sample, "score": replies * score, "update": replies * update}


# ------------------------------------------------------------------------------------------------- peak
def matmul_peak(dtype: str, threads: int, m: int, k: int, n: int, repeats: int = 7) -> float:
    """FLOP/s of an (m x k) @ (k x n) matmul in ``dtype`` on ``threads`` threads: the median of ``repeats``."""
    import torch

    torch.set_num_threads(threads)
    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(m, k, dtype=kind), torch.randn(k, n, dtype=kind)
    for _ in range(2):
        a @ b  # warm-up: kernels chosen, caches filled
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * m * k * n / statistics.median(times)


# ------------------------------------------------------------------------------------------------ a run
def run_counts(run_dir: Path) -> dict:
    """What the run's steps did: replies, mean prompt and response tokens, updates per step, phase times."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "resolved_config.yaml")
    stage = cfg.stage
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r]
    if not steps:
        raise SystemExit(f"bench: error: {run_dir}/metrics.jsonl has no RL steps (time/step)")
    updates = stage.optim.ppo_epochs if stage.name == "ppo" else stage.optim.num_iterations
    return {"cfg": cfg, "replies": stage.batch_size, "prompt_tokens": mean_prompt_tokens(cfg),
            "response_tokens": statistics.mean(_response_length(r) for r in steps),
            "updates": updates,  # passes over the whole batch, however it is split into mini-batches
            # Scoring ran the policy unless the update's first forward gave the old log-probs (not logged: it did).
            "policy_scoring": not steps[0].get("perf/old_logprobs_from_update", 0.0),
            "times": {phase: statistics.median(r[f"time/{key}"] for r in steps)
                      for phase, key in (("sample", "rollout"), ("score", "score"), ("update", "optimize"))},
            "steps": len(steps)}


def _response_length(step: dict) -> float:
    """Mean reply length of a step: PPO logs ``env/response_length``, the critic-free stages TRL's
    ``completions/mean_length``."""
    return step["env/response_length"] if "env/response_length" in step else step["completions/mean_length"]


def mean_prompt_tokens(cfg) -> float:
    """Mean token count of the training prompts as the policy sees them (chat template applied)."""
    from marl_exp.data import chat
    from marl_exp.data.task import build_task
    from marl_exp.modeling.loading import load_tokenizer
    from marl_exp.stages.pipeline import given_input

    # The SFT model as the run resolved it: a built-in name (builtin:smollm2) is its dir in the model cache.
    model_dir = given_input(cfg.stage.sft_model, cfg.model)
    tokenizer = load_tokenizer(model_dir)
    task = build_task(cfg.data, model_dir=model_dir)
    prompts = task.prompts("train")  # every training prompt (the step draws them uniformly)
    encoded = chat.encode_prompts(tokenizer, prompts)
    return float(encoded["attention_mask"].sum(1).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    common.add_allow_dirty(parser)
    args = parser.parse_args()
    common.refuse_dirty_publish(args.json, args.allow_dirty)
    from transformers import AutoConfig

    from marl_exp.stages.pipeline import given_input

    counts = run_counts(args.run_dir)
    cfg = counts["cfg"]
    shapes = Shapes.from_config(AutoConfig.from_pretrained(given_input(cfg.stage.sft_model, cfg.model)))
    dtype = "bf16" if cfg.quant.mode == "bf16" else "fp32"
    threads = int(cfg.threads) if str(cfg.threads).isdigit() else torch.get_num_threads()  # threads=auto: as here
    tokens = counts["replies"] * round(counts["prompt_tokens"] + counts["response_tokens"])
    peak = matmul_peak(dtype, threads, m=min(tokens, 2048), k=shapes.hidden, n=max(o for _, o in shapes.linears))
    flops = step_flops(shapes, counts["replies"], counts["prompt_tokens"], counts["response_tokens"],
                       counts["updates"], cfg.adapter.r, cfg.upstream.reward.adapter.r,
                       critic_adapter=cfg.stage.name == "ppo" and cfg.stage.critic == "adapter",
                       policy_scoring=counts["policy_scoring"])
    machine = common.machine()
    print(common.machine_line(machine))
    print(f"{args.run_dir}: {counts['steps']} steps of {counts['replies']} replies, prompt {counts['prompt_tokens']:.1f} "
          f"+ response {counts['response_tokens']:.1f} tokens, {counts['updates']} update(s) a step; {dtype}, "
          f"{threads} threads; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print("| phase | model GFLOP | median s | GFLOP/s | MFU |\n|---|---|---|---|---|")
    result = {"machine": machine, "run_dir": str(args.run_dir), "dtype": dtype, "threads": threads,
              "peak_flops": peak, "peak_gflop_per_s": peak / 1e9, "counts": {k: v for k, v in counts.items() if k != "cfg"}, "phases": {}}
    for phase, work in flops.items():
        seconds = counts["times"][phase]
        achieved = work / seconds
        result["phases"][phase] = {"model_flops": work, "seconds": seconds, "flops_per_s": achieved,
                                   "mfu": achieved / peak,  # and in the printed table's units:
                                   "model_gflop": work / 1e9, "gflop_per_s": achieved / 1e9}
        print(f"| {phase} | {work / 1e9:.1f} | {seconds:.2f} | {achieved / 1e9:.1f} | {achieved / peak:.2f} |")
    if args.json:
        common.write_json(args.json, result)


if __name__ == "__main__":
    main()
