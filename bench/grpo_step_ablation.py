"""What each speed-up of the RL step buys on the real task: GRPO steps of ``experiment=smollm2_sentiment``.

SmolLM2-135M-Instruct with the preset's policy LoRA, GRPO as the preset sets it (4 requests x 4 replies of <= 40
tokens, 2 iterations over one mini-batch, KL in the loss), on the task's training requests. The reward adapter is
the benchmarks' random one (``common.model_dirs("smollm2")``): what it scores does not change the work. Variants:
the defaults, then each ``PerfOptions`` speed-up that acts on this step turned off on its own. The variants take
turns step by step (the order rotates each round), every step from the same weights and the same sampling seed,
so all sample the same replies (checked) and do the same update (its loss is checked equal to 1e-5). Reported per
variant: the median and quartiles of the step and of its phases (the trainer's own ``time/*``), and the ratio of
the default's step to the variant's.

    python bench/grpo_step_ablation.py --out bench/results/grpo_step_ablation.json   # ~5 min on 2 quiet EPYC cores
    python bench/grpo_step_ablation.py --quant bf16 --only-default --out bench/results/grpo_step_ablation-bf16.json
    python bench/grpo_step_ablation.py --rounds 1 --threads 1                         # smoke run, not published
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# The speed-ups that change this step's work (the others act on PPO, or on every step alike).
ABLATED = ("old_logprobs_from_update", "shared_prefill")
PHASES = ("time/rollout", "time/score", "time/optimize", "time/step")
LOSS_TOLERANCE = 1e-5  # the variants differ only by fp32 rounding of the same forwards


def build(seed: int, quant: str = "fp32"):
    import torch

    from marl_exp.data import chat, sentiment
    from marl_exp.modeling.loading import load_tokenizer
    from marl_exp.stages.rl_models import build_roles

    common.quiet()
    base, reward = common.model_dirs("smollm2")
    cfg = common.compose("experiment=smollm2_sentiment", "logger=none", "device=cpu", f"seed={seed}", f"quant={quant}",
                         f"stage.sft_model={base}", f"stage.reward_adapter={reward}", f"model.path={base}")
    tokenizer = load_tokenizer(str(base), cfg.model)
    chat.apply_template(tokenizer, cfg.data, conversational=True)
    roles = build_roles(cfg, str(base), str(reward), torch.device("cpu"), tokenizer)
    roles.model.train(not cfg.stage.runtime.disable_dropout)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a policy that is not the reference: random LoRA B
        for name, param in roles.model.peft_model.named_parameters():
            if ".lora_B.policy." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return roles, tokenizer, cfg, sentiment.requests("train", cfg.data.seed)


def variants() -> dict:
    from marl_exp.rl.rollout import PerfOptions

    default = PerfOptions()
    return {"default": default, **{f"{name} off": dataclasses.replace(default, **{name: False}) for name in ABLATED}}


def measure(rounds: int, seed: int, progress=print, quant: str = "fp32", only_default: bool = False) -> dict:
    import torch

    from marl_exp.stages.rl_models import make_trainer

    roles, tokenizer, cfg, requests = build(seed, quant)
    trainable = [p for p in roles.model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    perfs = {"default": variants()["default"]} if only_default else variants()
    trainers = {name: make_trainer(cfg.stage, roles, tokenizer, requests, seed=seed) for name in perfs}
    for name, trainer in trainers.items():
        trainer.perf = perfs[name]
    times = {name: {phase: [] for phase in PHASES} for name in perfs}
    names = list(perfs)
    for i in range(rounds + 1):  # round 0 warms up
        order = names[i % len(names):] + names[:i % len(names)]
        replies, losses = {}, {}
        for name in order:
            trainer = trainers[name]
            trainer.prompt_rng.seed(seed + i)  # the same requests, the same sampled replies, for every variant
            torch.manual_seed(seed + i)
            stats = trainer.step()
            replies[name], losses[name] = trainer.last_rollouts["policy"].response_ids, stats["loss"]
            with torch.no_grad():  # every step from the same weights
                for param, saved in zip(trainable, start):
                    param.copy_(saved)
            if i:
                for phase in PHASES:
                    times[name][phase].append(stats[phase])
        for name in names[1:]:
            if not torch.equal(replies[name], replies["default"]):
                raise SystemExit(f"bench: error: '{name}' sampled other replies than the default")
            if abs(losses[name] - losses["default"]) > LOSS_TOLERANCE:
                raise SystemExit(f"bench: error: '{name}' gave loss {losses[name]!r}, the default {losses['default']!r}")
        progress(f"round {i}: " + ", ".join(f"{n} {times[n]['time/step'][-1]:.2f} s" if i else n for n in order))
    out = {name: {phase: common.quartiles(values) for phase, values in phases.items()} for name, phases in times.items()}
    for name in names:
        out[name]["default_over_this"] = out["default"]["time/step"]["median"] / out[name]["time/step"]["median"]
    return {"variants": out, "replies": cfg.stage.batch_size, "max_new_tokens": cfg.stage.sampling.max_new_tokens,
            "num_generations": cfg.stage.sampling.num_generations, "num_iterations": cfg.stage.optim.num_iterations}


def markdown(result: dict) -> str:
    m = result["measured"]
    lines = [f"Machine: {common.machine_line(result['machine'])}; quant {result.get('quant', 'fp32')}; "
             f"{result.get('wait_setting') or 'OMP_WAIT_POLICY ' + result.get('omp_wait_policy', 'unset')}; "
             f"{result['rounds']} rounds after a warm-up; "
             f"{m['replies']} replies of <= {m['max_new_tokens']} tokens, {m['num_iterations']} iterations.", "",
             "| variant | rollout | score | update | step | default ÷ this |", "|---|---|---|---|---|---|"]
    for name, r in m["variants"].items():
        cells = [f"{r[p]['median']:.2f} s" for p in PHASES[:3]]
        step = r["time/step"]
        lines.append(f"| {name} | {' | '.join(cells)} | {step['median']:.2f} s ({step['q1']:.2f}-{step['q3']:.2f}) | "
                     f"{r['default_over_this']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quant", default="fp32", choices=("fp32", "bf16"),
                        help="the preset's quant mode (bf16: bf16 weights and compute, the reward adapter's too)")
    parser.add_argument("--only-default", action="store_true",
                        help="time the defaults alone (bf16: a speed-up's rounding moves the sampled replies, so the "
                             "variants cannot be checked against the same replies)")
    parser.add_argument("--out", type=Path)
    common.add_allow_dirty(parser)
    args = parser.parse_args(argv)
    common.refuse_dirty_publish(args.out, args.allow_dirty)
    import torch

    torch.set_num_threads(args.threads)
    # OpenMP's wait setting moves the decoding's speed (train.py sets one: marl_exp.run.threads); this script sets
    # none, so the environment's is recorded.
    from marl_exp.run.threads import wait_setting

    result = {"machine": common.machine(), "rounds": args.rounds, "seed": args.seed, "quant": args.quant,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "wait_setting": wait_setting(),
              "measured": measure(args.rounds, args.seed, quant=args.quant, only_default=args.only_default)}
    print(markdown(result))
    if args.out:
        common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
