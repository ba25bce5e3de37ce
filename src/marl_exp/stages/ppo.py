"""Stage 3, PPO: train policy adapter(s) on the SFT base against the frozen reward adapter.

Output: ``<run_dir>/policies/<name>/`` — a PEFT adapter dir (loads with plain peft) plus
``value_head.safetensors`` and ``marl_exp_base.json``; checkpoints under ``checkpoints/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from marl_exp.data import build_task
from marl_exp.interrupt import TrainingDiverged, stop_on_signal
from marl_exp.modeling.loading import context_length, load_model, load_tokenizer, local_model_dir, resolve_device
from marl_exp.modeling.multi_adapter import MultiAdapterModel, base_record, check_same_base
from marl_exp.ppo.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from marl_exp.ppo.evaluate import evaluate
from marl_exp.ppo.roles import SeparateRoles, SharedRoles, critic_name
from marl_exp.ppo.trainer import PPOTrainer
from marl_exp.stages.common import count_parameters, lora_config
from marl_exp.tracking import Tracker

log = logging.getLogger(__name__)
POLICIES_SUBDIR = "policies"


def build_roles(cfg, sft_model: str, reward_adapter: str, device: torch.device):
    """The multi-adapter model with every policy (and critic) adapter, wrapped in its sharing mode."""
    stage = cfg.stage
    torch.manual_seed(cfg.seed)  # LoRA and value-head init
    base = load_model(sft_model, cfg.model, cfg.quant, device)
    lora = lora_config(cfg.adapter, task_type="CAUSAL_LM")
    shared = stage.sharing == "shared"
    model = MultiAdapterModel.build(
        base, policy_config=lora, policy_name=stage.policies[0],
        reward_adapter=reward_adapter if shared else None, reward_label_index=stage.reward_label_index,
        base_path=sft_model, allow_base_mismatch=stage.allow_base_mismatch,
        gradient_checkpointing=stage.gradient_checkpointing)
    for name in stage.policies[1:]:
        model.add_policy(name, lora)
    if stage.critic == "adapter":
        for name in stage.policies:
            model.add_policy(critic_name(name), lora)
    model.activate_policy(stage.policies[0])
    if shared:
        return SharedRoles(model)
    check_same_base(reward_adapter, sft_model, stage.allow_base_mismatch)
    reference = load_model(sft_model, cfg.model, cfg.quant, device)
    classifier = load_model(sft_model, cfg.model, cfg.quant, device, task="seq-cls", num_labels=1)
    reward = PeftModel.from_pretrained(classifier, reward_adapter, adapter_name="reward")
    return SeparateRoles(model, reference, reward)


def run(cfg, run_dir: Path, tracker: Tracker, sft_model: str, reward_adapter: str) -> dict:
    # SIGINT/SIGTERM: finish the current step, save a checkpoint, then raise StageInterrupted.
    with stop_on_signal() as stop:
        return _run(cfg, run_dir, tracker, sft_model, reward_adapter, stop)


def _run(cfg, run_dir: Path, tracker: Tracker, sft_model: str, reward_adapter: str, stop) -> dict:
    stage = cfg.stage
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(sft_model, cfg.model)
    task = build_task(cfg.data)
    # Prompts that leave no room for the response fail (or are skipped) now, before the models load.
    context = context_length(sft_model, cfg.model)
    if context:
        task.fit_prompts(tokenizer, context - stage.max_new_tokens, cfg.data.on_bad_row)
    roles = build_roles(cfg, sft_model, reward_adapter, device)
    model = roles.model
    model.train(not stage.disable_dropout)  # eval mode = no dropout: ratio is exactly 1 at the first epoch
    trainer = PPOTrainer(roles, tokenizer, stage, task.prompts_train, seed=cfg.seed)
    saved_adapters = list(stage.policies) + ([critic_name(n) for n in stage.policies] if stage.critic == "adapter" else [])

    def run_eval(tag: str, step: int) -> dict:
        metrics = {}
        for i, name in enumerate(stage.policies):
            values, samples = evaluate(roles, tokenizer, task.prompts_eval, name, stage, oracle=task.oracle)
            prefixes = [f"eval/{tag}/"] if i == 0 else []
            if len(stage.policies) > 1:
                prefixes.append(f"eval/{tag}/{name}/")
            metrics.update({p + k: v for p in prefixes for k, v in values.items()})
            _log_samples(tracker, run_dir, step, tag, name, samples)
        return metrics

    summary: dict = {**count_parameters(model), **{f"memory/{k}": v for k, v in model.memory_footprint().items()}}
    checkpoint = resolve_resume(stage.resume, run_dir)
    if checkpoint is not None:
        trainer_state, saved_summary = load_checkpoint(checkpoint, model, saved_adapters)
        trainer.load_state_dict(trainer_state)
        summary.update(saved_summary)
        log.info("resumed from %s at step %d", checkpoint, trainer.step_count)
    else:
        before = run_eval("before", 0)
        summary.update(before)
        tracker.log(before, step=0)
    tracker.update_summary(summary)

    def interrupt_if_requested() -> None:
        if stop:
            step = trainer.step_count
            checkpoint = save_checkpoint(run_dir, step, model, saved_adapters, trainer.state_dict(), summary)
            tracker.update_summary({"train/interrupted_at_step": step})
            stop.raise_if_requested("ppo", step, checkpoint)

    interrupt_if_requested()  # a signal during loading or the first evaluation
    progress = tqdm(range(trainer.step_count, stage.steps), desc="PPO", initial=trainer.step_count,
                    total=stage.steps, dynamic_ncols=True)
    for _ in progress:
        # Raises TrainingDiverged after stage.max_bad_steps non-finite steps in a row (no checkpoint
        # is written then: the last one saved stays the last good one).
        try:
            stats = trainer.step()
        except TrainingDiverged as err:
            tracker.log(getattr(err, "stats", {}), step=trainer.step_count)  # the counters of the last step
            raise
        step = trainer.step_count
        progress.set_postfix(reward=f"{stats.get('env/reward_mean', float('nan')):.3f}",
                             kl=f"{stats.get('objective/kl', float('nan')):.2f}")
        if step % stage.log_every == 0 or stats.get("ppo/nonfinite_step"):
            tracker.log(stats, step=step)
        if stage.eval_every and step % stage.eval_every == 0 and step < stage.steps:
            tracker.log(run_eval("during", step), step=step)
        # Not after a step with non-finite values: the last checkpoint stays the last good one.
        if stage.save_every and step % stage.save_every == 0 and step < stage.steps and not stats.get("ppo/nonfinite_step"):
            save_checkpoint(run_dir, step, model, saved_adapters, trainer.state_dict(), summary)
        if step < stage.steps:
            interrupt_if_requested()

    after = run_eval("after", trainer.step_count)
    tracker.log(after, step=trainer.step_count)
    summary.update(after)
    summary["train/steps"] = trainer.step_count
    save_checkpoint(run_dir, trainer.step_count, model, saved_adapters, trainer.state_dict(), summary)
    record = base_record(sft_model, cfg.model.name, local_model_dir(sft_model, cfg.model))
    for name in saved_adapters:
        model.save_policy(run_dir / POLICIES_SUBDIR / name, adapter=name, base_record=record)
    tracker.update_summary(summary)
    return summary


def _log_samples(tracker: Tracker, run_dir: Path, step: int, tag: str, policy: str, samples: list[dict]) -> None:
    """A few sampled responses: appended to samples.jsonl, and a W&B table when W&B is on."""
    import json

    with (run_dir / "samples.jsonl").open("a") as handle:
        for sample in samples:
            handle.write(json.dumps({"step": step, "eval": tag, "policy": policy, **sample}) + "\n")
    if tracker.wandb_run is not None:
        import wandb

        columns = ["query", "response", "reward", "oracle"]
        table = wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])
        tracker.wandb_run.log({f"samples/{policy}": table}, step=step)
