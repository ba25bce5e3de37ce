"""Stage 3, RL: train policy adapter(s) on the SFT base against the reward, with PPO (``stage=ppo``) or a
critic-free algorithm (``stage=grpo|rloo|reinforce_pp``); one stage loop for all. The reward is the
weighted sum of ``stage.rewards``: frozen reward adapters on the same base and Python functions.

Output: ``<run_dir>/policies/<name>/`` — a PEFT adapter dir (loads with plain peft) plus
``value_head.safetensors`` (untrained under the critic-free stages) and ``marl_exp_base.json``;
checkpoints under ``checkpoints/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from marl_exp import console, distributed
from marl_exp.config import reward_sources
from marl_exp.data import build_task, chat
from marl_exp.interrupt import TrainingDiverged, stop_on_signal
from marl_exp.modeling.loading import context_length, load_model, load_tokenizer, local_model_dir, resolve_device
from marl_exp.modeling.multi_adapter import (
    MultiAdapterModel,
    base_record,
    check_label_index,
    check_same_base,
    disable_dropout,
    reward_adapter_pad_token_id,
    reward_head_labels,
)
from marl_exp.ppo.checkpoint import checkpoint_step, load_checkpoint, resolve_resume, save_checkpoint
from marl_exp.ppo.critic_free import CriticFreeTrainer
from marl_exp.ppo.evaluate import evaluate
from marl_exp.ppo.reward_sources import RewardSources
from marl_exp.ppo.roles import SeparateRoles, SharedRoles, critic_name
from marl_exp.ppo.rollout import PerfOptions
from marl_exp.ppo.trainer import PPOTrainer, RLTrainer
from marl_exp.stages.common import count_parameters, policy_lora_config
from marl_exp.tracking import Tracker

log = logging.getLogger(__name__)
POLICIES_SUBDIR = "policies"


def build_roles(cfg, sft_model: str, reward_adapter: str | None, device: torch.device, tokenizer=None):
    """The multi-adapter model with every policy (and critic) adapter and every reward adapter of
    ``stage.rewards``, wrapped in its sharing mode. ``reward_adapter``: the upstream reward adapter (the
    sources without adapter and function), None when no source reads it."""
    stage = cfg.stage
    sources = RewardSources(reward_sources(stage))
    adapters = {s.name: (s.adapter or reward_adapter, s.label_index) for s in sources.sources if s.function is None}
    missing = [name for name, (path, _) in adapters.items() if path is None]
    if missing:
        raise ValueError(f"reward source(s) {', '.join(missing)} read the upstream reward adapter, but none was given")
    primary_path, primary_label = adapters.get(sources.primary, (None, None))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(sft_model, cfg.model)
    torch.manual_seed(cfg.seed)  # LoRA and value-head init
    base = load_model(sft_model, cfg.model, cfg.quant, device)
    lora = policy_lora_config(cfg, base)
    shared = stage.sharing == "shared"
    model = MultiAdapterModel.build(
        base, policy_config=lora, policy_name=stage.policies[0],
        reward_adapter=primary_path if shared else None, reward_label_index=primary_label,
        base_path=sft_model, allow_base_mismatch=stage.allow_base_mismatch,
        gradient_checkpointing=stage.gradient_checkpointing, reward_pad_token_id=_reward_pad(primary_path, tokenizer))
    for name in stage.policies[1:]:
        model.add_policy(name, lora)
    if critic_of(stage) == "adapter":
        for name in stage.policies:
            model.add_policy(critic_name(name), lora)
    for name, adapter_name in sources.extra_adapters.items():  # after the policies: their init stays as it was
        path, label = adapters[name]
        model.add_reward_adapter(adapter_name, path, label, _reward_pad(path, tokenizer), base_path=sft_model,
                                 allow_base_mismatch=stage.allow_base_mismatch)
    model.activate_policy(stage.policies[0])
    if stage.disable_dropout:
        disable_dropout(model)
    if shared:
        return SharedRoles(model, sources)
    reference = load_model(sft_model, cfg.model, cfg.quant, device)
    # sharing=separate scores with one reward adapter at most (config.validate), in its own classifier.
    reward = None if primary_path is None else _reward_classifier(cfg, sft_model, primary_path, primary_label, device,
                                                                  tokenizer, model)
    return SeparateRoles(model, reference, reward, sources)


def _reward_classifier(cfg, sft_model: str, adapter: str, label_index: int | None, device, tokenizer,
                       model: MultiAdapterModel) -> PeftModel:
    """``stage.sharing=separate``: the reward adapter on its own copy of the base, as a sequence classifier."""
    check_same_base(adapter, sft_model, cfg.stage.allow_base_mismatch)
    num_labels = reward_head_labels(adapter)
    model.reward_label_index = check_label_index(label_index or 0, num_labels)
    classifier = load_model(sft_model, cfg.model, cfg.quant, device, task="seq-cls", num_labels=num_labels)
    classifier.config.get_text_config().pad_token_id = _reward_pad(adapter, tokenizer)  # as in its training
    return PeftModel.from_pretrained(classifier, adapter, adapter_name="reward")


def _reward_pad(adapter: str | None, tokenizer) -> int | None:
    """The pad id a reward adapter pooled by in training: its own saved tokenizer's, else this one's (the
    reward stage loads the same SFT tokenizer, with pad = EOS when it has no pad token)."""
    pad = reward_adapter_pad_token_id(adapter) if adapter is not None else None
    return tokenizer.pad_token_id if pad is None else pad


def critic_of(stage) -> str:
    """The PPO stage's critic (value_head | adapter); ``none`` for the critic-free stages."""
    return stage.critic if stage.name == "ppo" else "none"


def make_trainer(stage, roles, tokenizer, prompts: list[str], seed: int) -> RLTrainer:
    trainer_class = PPOTrainer if stage.name == "ppo" else CriticFreeTrainer
    return trainer_class(roles, tokenizer, stage, prompts, seed=seed, perf=PerfOptions(fused_scoring=stage.fused_scoring))


def run(cfg, run_dir: Path, tracker: Tracker, sft_model: str, reward_adapter: str | None = None) -> dict:
    # SIGINT/SIGTERM: finish the current step, save a checkpoint, then raise StageInterrupted.
    with stop_on_signal() as stop:
        return _run(cfg, run_dir, tracker, sft_model, reward_adapter, stop)


def _run(cfg, run_dir: Path, tracker: Tracker, sft_model: str, reward_adapter: str | None, stop) -> dict:
    stage = cfg.stage
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(sft_model, cfg.model)
    task = build_task(cfg.data)
    conversational = chat.is_conversational(task.prompts_train[0])  # message lists: the chat template renders them
    chat.apply_template(tokenizer, cfg.data, conversational)
    # Prompts that leave no room for the response fail (or are skipped) now, before the models load.
    context = context_length(sft_model, cfg.model)
    if context:
        task.fit_prompts(tokenizer, context - stage.max_new_tokens, cfg.data.on_bad_row)
    roles = build_roles(cfg, sft_model, reward_adapter, device, tokenizer)
    model = roles.model
    if distributed.is_main():
        console.say(console.memory_line(model.memory_footprint()))
    if conversational:  # replies end at the template's end-of-turn token (also when the SFT model did not say so)
        log.info("PPO stops responses at token ids %s", chat.stop_at_end_of_turn(model.generation_config, tokenizer))
    model.train(not stage.disable_dropout)  # eval mode = no dropout: ratio is exactly 1 at the first epoch
    # Data parallel: every rank samples its own prompts and responses (same weights, other seeds).
    sampling_seed = cfg.seed + 1000 * distributed.rank()
    trainer = make_trainer(stage, roles, tokenizer, task.prompts_train, sampling_seed)
    if distributed.rank() > 0:  # rank 0 (and a plain run) keeps the stream it had: same results as before
        torch.manual_seed(sampling_seed)
    saved_adapters = list(stage.policies) + ([critic_name(n) for n in stage.policies]
                                             if critic_of(stage) == "adapter" else [])

    def run_eval(tag: str, step: int) -> dict:
        metrics = {}
        if not distributed.is_main():  # the weights are the same on every rank: rank 0 evaluates
            return metrics
        # The headline split "eval" as eval/<tag>/<metric>, each extra split as eval/<tag>/<split>/<metric>.
        for i, name in enumerate(stage.policies):
            for split in ("eval", *task.extra_eval_splits):
                values, samples = evaluate(roles, tokenizer, task.prompts(split), name, stage, oracle=task.oracle,
                                           judge=task.judge)
                if split == "eval":
                    console.say(console.eval_line(tag, step, stage.steps, values,
                                                  name if len(stage.policies) > 1 else None))
                prefixes = [f"eval/{tag}/"] if i == 0 else []
                if len(stage.policies) > 1:
                    prefixes.append(f"eval/{tag}/{name}/")
                infix = "" if split == "eval" else f"{split}/"
                metrics.update({p + infix + k: v for p in prefixes for k, v in values.items()})
                _log_samples(tracker, run_dir, step, tag, name, samples, split)
        return metrics

    summary: dict = {**count_parameters(model), **{f"memory/{k}": v for k, v in model.memory_footprint().items()}}
    checkpoint = resolve_resume(stage.resume, run_dir)
    tracker.continue_from(checkpoint_step(checkpoint))  # a resume: metrics.jsonl cut back, W&B steps continue
    if checkpoint is not None:
        trainer_state, saved_summary = load_checkpoint(checkpoint, model, saved_adapters)
        trainer.load_state_dict(own_rank_state(trainer_state, fresh=trainer.state_dict()))
        summary.update(saved_summary)
        log.info("resumed from %s at step %d", checkpoint, trainer.step_count)
    else:
        before = run_eval("before", 0)
        summary.update(before)
        tracker.log(before, step=0)
    tracker.update_summary(summary)

    def checkpoint_now(step: int) -> Path:
        return save_checkpoint_on_main(run_dir, step, model, saved_adapters, trainer, summary)

    def interrupt_if_requested() -> None:
        if distributed.any_rank(bool(stop)):  # all ranks stop at the same step (a signal may reach one)
            step = trainer.step_count
            checkpoint = checkpoint_now(step)
            tracker.update_summary({"train/interrupted_at_step": step})
            stop.request_from_peer()
            stop.raise_if_requested(stage.name, step, checkpoint)

    interrupt_if_requested()  # a signal during loading or the first evaluation
    progress = tqdm(range(trainer.step_count, stage.steps), desc=stage.name.upper(), initial=trainer.step_count,
                    total=stage.steps, dynamic_ncols=True)
    for _ in progress:
        # Raises TrainingDiverged after stage.max_bad_steps non-finite steps in a row (no checkpoint
        # is written then: the last one saved stays the last good one).
        try:
            stats = distributed.mean_metrics(trainer.step())  # every rank's step, averaged
        except TrainingDiverged as err:
            tracker.log(getattr(err, "stats", {}), step=trainer.step_count)  # the counters of the last step
            raise
        step = trainer.step_count
        progress.set_postfix(reward=f"{stats.get('env/reward_mean', stats.get('reward', float('nan'))):.3f}",
                             kl=f"{stats.get('objective/kl', float('nan')):.2f}")
        if step % stage.log_every == 0 or stats.get("ppo/nonfinite_step"):
            tracker.log(stats, step=step)
        if stage.samples_every and step % stage.samples_every == 0 and distributed.is_main():
            for name, rollout in trainer.last_rollouts.items():
                _log_samples(tracker, run_dir, step, "train", name,
                             rollout_samples(rollout, tokenizer, task.oracle, task.judge), split="train")
        if stage.eval_every and step % stage.eval_every == 0 and step < stage.steps:
            tracker.log(run_eval("during", step), step=step)
        # Not after a step with non-finite values: the last checkpoint stays the last good one.
        if stage.save_every and step % stage.save_every == 0 and step < stage.steps and not stats.get("ppo/nonfinite_step"):
            checkpoint_now(step)
        if step < stage.steps:
            interrupt_if_requested()

    after = run_eval("after", trainer.step_count)
    tracker.log(after, step=trainer.step_count)
    summary.update(after)
    summary["train/steps"] = trainer.step_count
    if distributed.is_distributed():  # a check of the gradient synchronisation, cheap for adapters
        summary["dist/max_weight_divergence"] = _weight_divergence(model, saved_adapters)
    checkpoint_now(trainer.step_count)
    if distributed.is_main():
        record = base_record(sft_model, cfg.model.name, local_model_dir(sft_model, cfg.model))
        for name in saved_adapters:
            model.save_policy(run_dir / POLICIES_SUBDIR / name, adapter=name, base_record=record)
    tracker.update_summary(summary)
    return summary


def save_checkpoint_on_main(run_dir: Path, step: int, model, adapters: list[str], trainer: RLTrainer,
                            summary: dict) -> Path:
    """Rank 0 writes the checkpoint, with every rank's random state so a resume samples as before."""
    state = trainer.state_dict()
    rank_states = distributed.gather({key: state[key] for key in RANK_STATE_KEYS})
    path = None
    if distributed.is_main():
        if distributed.is_distributed():
            state["rank_states"] = rank_states
        path = save_checkpoint(run_dir, step, model, adapters, state, summary)
    distributed.barrier()
    return distributed.broadcast(path)


# The parts of the trainer's state that differ between ranks (each samples its own prompts).
RANK_STATE_KEYS = ("prompt_rng", "shuffle_gen", "torch_rng", "cuda_rng")


def own_rank_state(state: dict, fresh: dict) -> dict:
    """This rank's random state from a checkpoint (rank 0's in a plain run); ``fresh`` = this rank's new
    trainer state, whose seeds are used when the checkpoint came from another number of processes."""
    rank_states = state.pop("rank_states", None)
    if not distributed.is_distributed():
        return state
    if rank_states is None or len(rank_states) != distributed.world_size():
        log.warning("the checkpoint was written by %d process(es), this run has %d: ranks other than 0 sample "
                    "with fresh seeds", len(rank_states or [None]), distributed.world_size())
        return state if distributed.is_main() else {**state, **{k: fresh[k] for k in RANK_STATE_KEYS}}
    return {**state, **rank_states[distributed.rank()]}


def _weight_divergence(model, adapters: list[str]) -> float:
    """Largest difference of any trained weight between ranks (0 when gradients were synchronised)."""
    flat = torch.cat([p.detach().float().reshape(-1).cpu() for name in adapters
                      for p in model.trainable_parameters(name)])
    everyone = distributed.gather(flat)
    return max(float((other - everyone[0]).abs().max()) for other in everyone)


def rollout_samples(rollout, tokenizer, oracle=None, judge=None, limit: int = 8) -> list[dict]:
    """The first ``limit`` responses of a training rollout, decoded, with their raw reward (and the task's
    oracle and judge, when it has them)."""
    queries = tokenizer.batch_decode(rollout.query_ids[:limit], skip_special_tokens=True)
    responses = tokenizer.batch_decode(rollout.response_ids[:limit], skip_special_tokens=True)
    rewards = rollout.raw_scores[:limit].tolist() if rollout.raw_scores is not None else [None] * len(queries)
    # A conversation's judges read the assistant turn only; a plain text's, the prompt and its continuation.
    judged = responses if rollout.conversations is not None else [q + r for q, r in zip(queries, responses)]
    return [{"query": q, "response": r, "reward": w, "oracle": oracle(t) if oracle is not None else None,
             "well_formed": judge(t) if judge is not None else None}
            for q, r, w, t in zip(queries, responses, rewards, judged)]


def _log_samples(tracker: Tracker, run_dir: Path, step: int, tag: str, policy: str, samples: list[dict],
                 split: str = "eval") -> None:
    """A few sampled responses: appended to samples.jsonl, and a W&B table when W&B is on."""
    import json

    with (run_dir / "samples.jsonl").open("a") as handle:
        for sample in samples:
            handle.write(json.dumps({"step": step, "eval": tag, "split": split, "policy": policy, **sample}) + "\n")
    if tracker.wandb_run is not None:
        import wandb

        columns = ["query", "response", "reward", "oracle", "well_formed"]
        table = wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])
        key = f"samples/{policy}" if split == "eval" else f"samples/{policy}/{split}"
        tracker.wandb_run.log({key: table}, step=step)
