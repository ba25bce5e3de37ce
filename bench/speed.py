"""Speed benchmark: where the time of a PPO step goes, shared base vs separate role models.

Per model size, in one process (runs interleaved, medians over steps, after a warm-up step):

* **step**: time per PPO step split into rollout / reference / reward / old log-probs and values /
  optimise, samples/s and generated tokens/s, for ``sharing=shared`` and ``sharing=separate``;
* **rollout vs plain generate**: our rollout (``rollout.sample``: tokenize, switch to the policy,
  generate, cut after EOS) against ``generate`` of the same peft model on the same batch — the
  ceiling — and, for scale, the bare base model's ``generate`` (no LoRA at all);
* **scaling**: shared step time against batch size and response length;
* **ablation** (``--ablation``): each speed-up of ``rollout.PerfOptions`` turned off, and all off,
  against the default, with peak memory of the step where that is the point.

Every step does the same work: one PPO epoch over one mini-batch of ``batch`` prompts and responses of
exactly ``new_tokens`` tokens (min = max). On a GPU every phase boundary synchronizes.

    python bench/speed.py                        # tiny and small, 5 timed steps each
    python bench/speed.py --sizes base --steps 3 --ablation
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_ROLLOUT_OVER_GENERATE = 0.9
TARGET_SHARED_OVER_SEPARATE_TIME = 1.0
PHASES = ("rollout", "reference", "reward", "policy", "score_other", "optimize")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ phase timer
class PhaseTimer:
    """Times the phases of ``PPOTrainer.step`` by wrapping what it calls (the trainer is unchanged).

    rollout = ``sample``; reference / reward / policy = the role passes inside scoring (one fused
    pass counts as ``policy``); score_other = the rest of scoring (log-probs, KL); optimize =
    ``_optimize``. Wall time, synchronized on a GPU.
    """

    def __init__(self):
        self.current: dict[str, float] = {}

    def _timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            sync()
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - started
            return out
        return wrapper

    @contextlib.contextmanager
    def installed(self, trainer):
        from marl_exp.rl import trainer as trainer_module

        roles, saved_module = trainer.roles, {n: getattr(trainer_module, n) for n in ("sample", "score_many")}
        try:
            trainer_module.sample = self._timed("rollout", saved_module["sample"])
            trainer_module.score_many = self._timed("score", saved_module["score_many"])
            roles.reference_logits = self._timed("reference", type(roles).reference_logits.__get__(roles))
            roles.reward_scores = self._timed("reward", type(roles).reward_scores.__get__(roles))
            roles.policy_outputs = self._timed("policy", type(roles).policy_outputs.__get__(roles))
            if hasattr(trainer.model, "score_roles"):  # absent before the fused pass existed (timing old commits)
                trainer.model.score_roles = self._timed("policy", type(trainer.model).score_roles.__get__(trainer.model))
            trainer._update = self._timed("optimize", type(trainer)._update.__get__(trainer))
            yield self
        finally:
            for name, fn in saved_module.items():
                setattr(trainer_module, name, fn)
            for obj, name in ((roles, "reference_logits"), (roles, "reward_scores"), (roles, "policy_outputs"),
                              (trainer.model, "score_roles"), (trainer, "_update")):
                obj.__dict__.pop(name, None)

    def step(self, trainer) -> dict:
        """One PPO step; returns seconds per phase, ``step``, the number of generated tokens and the
        step's peak memory above what was in use before it (``peak_mib``)."""
        self.current = {}
        with self.installed(trainer):
            before = _memory_now()
            sync()
            started = time.perf_counter()
            stats = trainer.step()
            sync()
            total = time.perf_counter() - started
            peak = _memory_peak() - before
        t = self.current
        out = {"step": total, "rollout": t.get("rollout", 0.0), "optimize": t.get("optimize", 0.0),
               "reference": t.get("reference", 0.0), "reward": t.get("reward", 0.0), "policy": t.get("policy", 0.0)}
        out["score_other"] = t.get("score", 0.0) - out["reference"] - out["reward"] - out["policy"]
        out["tokens"] = stats["env/response_length"] * trainer.stage.batch_size * len(trainer.policies)
        out["peak_mib"] = peak
        return out


def _memory_now() -> float:
    """MiB in use now, and the peak counter reset: GPU memory allocated, else RSS."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    common.release_memory()
    common.reset_peak_rss()
    return common.rss_mib()


def _memory_peak() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return common.peak_rss_mib()


def median_phases(records: list[dict]) -> dict:
    keys = records[0].keys()
    return {k: common.median([r[k] for r in records]) for k in keys}


def run_interleaved(trainers: dict, steps: int, timer: PhaseTimer | None = None) -> dict[str, list[dict]]:
    """``steps`` timed steps of every trainer, interleaved, after one warm-up step each: the records.
    Every other round runs in reverse order, so neither trainer always follows the other."""
    timer = timer or PhaseTimer()
    for trainer in trainers.values():
        timer.step(trainer)
    records = {name: [] for name in trainers}
    for round_ in range(steps):
        names = list(trainers) if round_ % 2 == 0 else list(reversed(trainers))
        for name in names:
            records[name].append(timer.step(trainers[name]))
    return records


def quartiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 4], common.median(ordered), ordered[(3 * n) // 4]


def with_rates(phases: dict, batch: int) -> dict:
    return {**phases, "samples_per_s": batch / phases["step"], "tokens_per_s": phases["tokens"] / phases["step"],
            "rollout_tokens_per_s": phases["tokens"] / phases["rollout"]}


# ---------------------------------------------------------------------------------------- sections
def step_section(size: str, batch: int, new_tokens: int, steps: int, device: str) -> dict:
    trainers = {}
    for sharing in ("shared", "separate"):
        cfg = common.ppo_config(size, sharing=sharing, batch=batch, new_tokens=new_tokens, device=device)
        trainers[sharing] = common.build_trainer(cfg)[2]
    records = run_interleaved(trainers, steps)
    out = {sharing: with_rates(median_phases(r), batch) for sharing, r in records.items()}
    # Steps ran in pairs (shared, separate) back to back: the ratio of each pair cancels slow drifts of a
    # shared machine; its median and quartiles say how sure the comparison is.
    paired = [a["step"] / b["step"] for a, b in zip(records["shared"], records["separate"])]
    out["paired_ratio"] = dict(zip(("q1", "median", "q3"), quartiles(paired)))
    return out


def rollout_section(size: str, batch: int, new_tokens: int, repeats: int, device: str) -> dict:
    """Our rollout against plain ``generate`` of the same peft model and batch (and of the bare base)."""
    import torch

    from marl_exp.rl.rollout import sample

    cfg = common.ppo_config(size, batch=batch, new_tokens=new_tokens, device=device)
    roles, tokenizer, trainer = common.build_trainer(cfg)
    model, stage = roles.model, cfg.stage
    prompts = [common.prompts()[i % len(common.prompts())] for i in range(batch)]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    kwargs = dict(do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=stage.sampling.temperature,
                  top_k=stage.sampling.top_k, top_p=stage.sampling.top_p, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    model.activate_policy("policy")
    model.eval()

    perf = {"perf": trainer.perf} if hasattr(trainer, "perf") else {}

    def ours():
        return sample(model, tokenizer, prompts, "policy", stage, **perf)

    def plain():  # what a user would write: generate of the peft model, policy adapter active
        return model.peft_model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **kwargs)

    def bare():  # no LoRA layers at all: the base model's own generate
        with model.peft_model.disable_adapter():
            return model.peft_model.get_base_model().generate(input_ids=enc.input_ids,
                                                              attention_mask=enc.attention_mask, **kwargs)

    runs = {"rollout": ours, "plain_generate": plain, "base_generate": bare}
    times = {name: [] for name in runs}
    for i in range(repeats + 1):
        for name, fn in runs.items():
            torch.manual_seed(i)
            sync()
            started = time.perf_counter()
            fn()
            sync()
            if i:  # the first round is a warm-up
                times[name].append(time.perf_counter() - started)
    model.activate_policy("policy")
    tokens = batch * new_tokens
    out = {name: {"seconds": common.median(t), "tokens_per_s": tokens / common.median(t)} for name, t in times.items()}
    out["ratio_rollout_over_plain"] = out["rollout"]["tokens_per_s"] / out["plain_generate"]["tokens_per_s"]
    return out


def scaling_section(size: str, batches: list[int], lengths: list[int], base_batch: int, base_tokens: int,
                    steps: int, device: str) -> dict:
    """Shared step time as the batch grows (at ``base_tokens``) and as responses grow (at ``base_batch``)."""
    cfg = common.ppo_config(size, batch=base_batch, new_tokens=base_tokens, device=device)
    trainer = common.build_trainer(cfg)[2]
    points = [(b, base_tokens) for b in batches] + [(base_batch, n) for n in lengths if n != base_tokens]
    rows = []
    for batch, tokens in points:
        trainer.stage.batch_size = trainer.stage.optim.mini_batch_size = batch
        trainer.stage.sampling.max_new_tokens = trainer.stage.sampling.min_new_tokens = tokens
        phases = median_phases(run_interleaved({"shared": trainer}, steps)["shared"])
        rows.append({"batch": batch, "new_tokens": tokens, **with_rates(phases, batch)})
    return {"rows": rows}


def ablation_section(size: str, batch: int, new_tokens: int, steps: int, device: str) -> dict:
    """Each speed-up off (and all off) against the default, interleaved; step time and peak memory per phase."""
    from marl_exp.rl.rollout import PerfOptions

    default = PerfOptions()
    variants = {"default": default, "all off": PerfOptions(**{f.name: False for f in dataclasses.fields(PerfOptions)})}
    for field in dataclasses.fields(PerfOptions):
        flipped = not getattr(default, field.name)
        variants[f"{field.name}={flipped}"] = dataclasses.replace(default, **{field.name: flipped})
    cfg = common.ppo_config(size, batch=batch, new_tokens=new_tokens, device=device)
    trainer = common.build_trainer(cfg)[2]
    timer = PhaseTimer()
    records = {name: [] for name in variants}
    for i in range(steps + 1):
        for name, perf in (variants.items() if i % 2 else reversed(variants.items())):
            trainer.perf = perf
            record = timer.step(trainer)
            if i:  # the first round is a warm-up
                records[name].append(record)
    trainer.perf = default
    return {"variants": {name: dataclasses.asdict(perf) for name, perf in variants.items()},
            "results": {name: with_rates(median_phases(r), batch) for name, r in records.items()}}


# ---------------------------------------------------------------------------------------- report
def summarize(result: dict) -> dict:
    out = {}
    for size, section in result.get("steps", {}).items():
        out[f"{size}/shared_over_separate_step_time"] = section["paired_ratio"]["median"]
    for size, section in result.get("rollout", {}).items():
        out[f"{size}/rollout_over_plain_generate_tokens_per_s"] = section["ratio_rollout_over_plain"]
    return out


def markdown(result: dict) -> str:
    lines = [f"Batch {result['batch']} prompts, {result['new_tokens']} new tokens each, one PPO epoch over one "
             f"mini-batch; shared vs separate: medians of {result.get('pairs', result['steps_timed'])} back-to-back "
             f"pairs of steps; the other tables: medians of {result['steps_timed']} steps.", "",
             "| size | sharing | rollout | reference | reward | old log-probs + values | scoring rest | optimise "
             "| step | samples/s | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, section in result.get("steps", {}).items():
        for sharing in ("shared", "separate"):
            p = section[sharing]
            lines.append(f"| {size} | {sharing} | " + " | ".join(f"{p[k]:.3f} s" for k in PHASES)
                         + f" | {p['step']:.3f} s | {p['samples_per_s']:.1f} | {p['tokens_per_s']:.0f} |")
    if result.get("rollout"):
        lines += ["", "| size | our rollout | plain generate (same peft model) | bare base generate (no LoRA) "
                      "| rollout ÷ plain |", "|---|---|---|---|---|"]
        for size, r in result["rollout"].items():
            lines.append(f"| {size} | {r['rollout']['tokens_per_s']:.0f} tok/s | {r['plain_generate']['tokens_per_s']:.0f} "
                         f"tok/s | {r['base_generate']['tokens_per_s']:.0f} tok/s | {r['ratio_rollout_over_plain']:.2f} |")
    if result.get("scaling"):
        size = result["scaling_size"]
        lines += ["", f"Scaling ({size}, shared):", "", "| batch | new tokens | rollout | score | optimise | step | "
                  "tokens/s |", "|---|---|---|---|---|---|---|"]
        for r in result["scaling"]["rows"]:
            score = r["reference"] + r["reward"] + r["policy"] + r["score_other"]
            lines.append(f"| {r['batch']} | {r['new_tokens']} | {r['rollout']:.3f} s | {score:.3f} s | "
                         f"{r['optimize']:.3f} s | {r['step']:.3f} s | {r['tokens_per_s']:.0f} |")
    for size, ablation in result.get("ablation", {}).items():
        lines += ["", f"Ablation ({size}, shared; each speed-up flipped against the default):", "",
                  "| variant | rollout | scoring | optimise | step | step vs default | step peak memory |",
                  "|---|---|---|---|---|---|---|"]
        base = ablation["results"]["default"]["step"]
        for name, r in ablation["results"].items():
            score = r["reference"] + r["reward"] + r["policy"] + r["score_other"]
            lines.append(f"| {name} | {r['rollout']:.3f} s | {score:.3f} s | {r['optimize']:.3f} s | {r['step']:.3f} s "
                         f"| {r['step'] / base:.2f}× | {r['peak_mib']:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(common.SIZES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--pairs", type=int, default=15,
                        help="back-to-back shared/separate step pairs the step-time ratio is the median of")
    parser.add_argument("--scaling-size", default="tiny", choices=list(common.SIZES))
    parser.add_argument("--scaling-batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--scaling-lengths", type=int, nargs="+", default=[8, 16, 24, 48])
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--ablation", nargs="*", choices=list(common.SIZES), default=None,
                        help="sizes to run the ablation on (no value: the first of --sizes)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny only, small batch, 2 steps: a smoke run")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "perf-speed.json")
    common.add_allow_dirty(parser)
    args = parser.parse_args()
    common.refuse_dirty_publish(args.out, args.allow_dirty)
    if args.quick:
        args.sizes, args.batch, args.new_tokens, args.steps, args.pairs = ["tiny"], 8, 8, 2, 2
        args.scaling_batches, args.scaling_lengths = [4, 8], [8]
    result = run(args)
    common.write_json(args.out, result)
    print("\n" + markdown(result) + f"\n\nwrote {args.out}")


def run(args, progress=print) -> dict:
    import torch

    torch.manual_seed(0)
    result = {"batch": args.batch, "new_tokens": args.new_tokens, "steps_timed": args.steps, "pairs": args.pairs, "steps": {},
              "rollout": {}, "ablation": {}}
    for size in args.sizes:
        progress(f"speed: {size}: shared vs separate steps ...")
        result["steps"][size] = step_section(size, args.batch, args.new_tokens, args.pairs, args.device)
        progress(f"speed: {size}: rollout vs plain generate ...")
        result["rollout"][size] = rollout_section(size, args.batch, args.new_tokens, args.steps, args.device)
    if not args.no_scaling:
        progress(f"speed: scaling on {args.scaling_size} ...")
        result["scaling_size"] = args.scaling_size
        result["scaling"] = scaling_section(args.scaling_size, args.scaling_batches, args.scaling_lengths, args.batch,
                                            args.new_tokens, max(2, args.steps - 2), args.device)
    ablation_sizes = args.ablation if args.ablation else ([args.sizes[0]] if args.ablation is not None else [])
    for size in ablation_sizes:
        progress(f"speed: ablation on {size} ...")
        result["ablation"][size] = ablation_section(size, args.batch, args.new_tokens, args.steps, args.device)
    result["machine"] = common.machine()
    result["summary"] = summarize(result)
    return result


if __name__ == "__main__":
    main()
