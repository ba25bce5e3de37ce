"""Stage 3, RL: train policy adapter(s) on the SFT base against the reward, with PPO (``stage=ppo``) or a
critic-free algorithm (``stage=grpo|rloo|reinforce_pp``); one recipe for all. The reward is the weighted
sum of ``stage.rewards``: frozen reward adapters on the same base and Python functions.

Output: ``<run_dir>/policies/<name>/`` — a PEFT adapter dir (loads with plain peft) plus
``value_head.safetensors`` (PPO only: the critic-free stages train no value head) and
``marl_exp_base.json``; checkpoints under ``checkpoints/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from marl_exp.config import judge_label, reward_adapter_names, reward_sources
from marl_exp.data import build_task, chat
from marl_exp.data.checks import reward_end_tokens
from marl_exp.modeling.loading import context_length, load_tokenizer, local_model_dir, resolve_device
from marl_exp.provenance import base_record
from marl_exp.rl.checkpoint import checkpoint_step, load_checkpoint, own_rank_state, resolve_resume, save_checkpoint_on_main
from marl_exp.rl.evaluate import evaluate, source_columns
from marl_exp.rl.roles import critic_name
from marl_exp.rl.rollout import response_texts
from marl_exp.run import console, distributed
from marl_exp.run.interrupt import TrainingDiverged, stop_on_signal
from marl_exp.run.tracking import Tracker, samples_table
from marl_exp.stages.common import count_parameters
from marl_exp.stages.rl_models import build_roles, critic_of, make_trainer

log = logging.getLogger(__name__)
POLICIES_SUBDIR = "policies"


def run(cfg, run_dir: Path, tracker: Tracker, sft_model: str, reward_adapter: str | None = None) -> dict:
    # SIGINT/SIGTERM: finish the current step, save a checkpoint, then raise StageInterrupted.
    with stop_on_signal() as stop:
        recipe = RLRecipe(cfg, run_dir, tracker, sft_model, reward_adapter, stop)
        recipe.setup()
        recipe.train()
        return recipe.save()


class RLRecipe:
    """The RL stage in four parts, which ``run`` calls in this order:

    setup     tokenizer, task, the multi-adapter model with every role, the trainer; then resume from a
              checkpoint, or evaluate the starting policies ("before")
    train     the step loop (``RLTrainer.step``): log, log samples, evaluate, checkpoint, stop on a signal
    save      evaluate ("after"), the last checkpoint, each policy as a peft adapter dir, the summary
    evaluate  held-out metrics and samples of every policy (rank 0), called by the three above
    """

    def __init__(self, cfg, run_dir: Path, tracker: Tracker, sft_model: str, reward_adapter: str | None, stop):
        self.cfg, self.stage = cfg, cfg.stage
        self.run_dir, self.tracker, self.stop = run_dir, tracker, stop
        self.sft_model, self.reward_adapter = sft_model, reward_adapter
        self.summary: dict = {}

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, stage = self.cfg, self.stage
        device = resolve_device(cfg.device)
        self.tokenizer = load_tokenizer(self.sft_model, cfg.model)
        self.task = build_task(cfg.data)
        conversational = chat.is_conversational(self.task.prompts_train[0])  # message lists: the template renders
        chat.apply_template(self.tokenizer, cfg.data, conversational)
        # Prompts that leave no room for the response (and what a reward adapter reads after it) fail, or are
        # skipped, now, before the models load.
        context = context_length(self.sft_model, cfg.model)
        if context:
            reward_tokens = reward_end_tokens(self.tokenizer, conversational) if reward_adapter_names(
                reward_sources(stage)) else 0
            self.task.fit_prompts(self.tokenizer, context - stage.sampling.max_new_tokens, cfg.data.on_bad_row,
                                  reward_tokens)
        self.roles = build_roles(cfg, self.sft_model, self.reward_adapter, device, self.tokenizer)
        self.model = model = self.roles.model
        if distributed.is_main():
            console.say(console.memory_line(model.memory_footprint()))
        if conversational:  # replies end at the template's end-of-turn token (also when the SFT model did not say so)
            log.info("RL stops responses at token ids %s", chat.stop_at_end_of_turn(model.generation_config,
                                                                                     self.tokenizer))
        model.train(not stage.runtime.disable_dropout)  # eval mode = no dropout: ratio is exactly 1 at the first epoch
        # Data parallel: every rank samples its own prompts and responses (same weights, other seeds).
        sampling_seed = cfg.seed + 1000 * distributed.rank()
        self.trainer = make_trainer(stage, self.roles, self.tokenizer, self.task.prompts_train, sampling_seed)
        if distributed.rank() > 0:  # rank 0 (and a plain run) keeps the stream it had: same results as before
            torch.manual_seed(sampling_seed)
        self.saved_adapters = list(stage.policies) + ([critic_name(n) for n in stage.policies]
                                                      if critic_of(stage) == "adapter" else [])
        self.summary = {**count_parameters(model), **{f"memory/{k}": v for k, v in model.memory_footprint().items()}}
        self._resume_or_evaluate()

    def _resume_or_evaluate(self) -> None:
        checkpoint = resolve_resume(self.stage.resume, self.run_dir)
        self.tracker.continue_from(checkpoint_step(checkpoint))  # a resume: metrics.jsonl cut back, W&B continues
        if checkpoint is not None:
            trainer_state, saved_summary = load_checkpoint(checkpoint, self.model, self.saved_adapters)
            self.trainer.load_state_dict(own_rank_state(trainer_state, fresh=self.trainer.state_dict()))
            self.summary.update(saved_summary)
            log.info("resumed from %s at step %d", checkpoint, self.trainer.step_count)
        else:
            before = self.evaluate("before", 0)
            self.summary.update(before)
            self.tracker.log(before, step=0)
        self.tracker.update_summary(self.summary)

    # ------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        stage, trainer, tracker = self.stage, self.trainer, self.tracker
        self._interrupt_if_requested()  # a signal during loading or the first evaluation
        progress = tqdm(range(trainer.step_count, stage.steps), desc=stage.name.upper(), initial=trainer.step_count,
                        total=stage.steps, dynamic_ncols=True)
        for _ in progress:
            # Raises TrainingDiverged after stage.optim.max_bad_steps non-finite steps in a row (no checkpoint
            # is written then: the last one saved stays the last good one).
            try:
                stats = distributed.mean_metrics(trainer.step())  # every rank's step, averaged
            except TrainingDiverged as err:
                tracker.log(getattr(err, "stats", {}), step=trainer.step_count)  # the counters of the last step
                raise
            step = trainer.step_count
            progress.set_postfix(reward=f"{stats.get('env/reward_mean', stats.get('reward', float('nan'))):.3f}",
                                 kl=f"{stats.get('objective/kl', float('nan')):.2f}")
            if step % stage.log_every == 0 or stats.get(trainer.metric_key("nonfinite_step")):
                tracker.log(stats, step=step)
            if stage.eval.samples_every and step % stage.eval.samples_every == 0 and distributed.is_main():
                for name, rollout in trainer.last_rollouts.items():
                    self._log_samples(step, "train", name, rollout_samples(rollout, self.tokenizer, self.task),
                                      split="train")
            if stage.eval.eval_every and step % stage.eval.eval_every == 0 and step < stage.steps:
                tracker.log(self.evaluate("during", step), step=step)
            # Not after a step with non-finite values: the last checkpoint stays the last good one.
            if stage.save_every and step % stage.save_every == 0 and step < stage.steps \
                    and not stats.get(trainer.metric_key("nonfinite_step")):
                self._checkpoint(step)
            if step < stage.steps:
                self._interrupt_if_requested()

    def _checkpoint(self, step: int) -> Path:
        return save_checkpoint_on_main(self.run_dir, step, self.model, self.saved_adapters, self.trainer, self.summary)

    def _interrupt_if_requested(self) -> None:
        if distributed.any_rank(bool(self.stop)):  # all ranks stop at the same step (a signal may reach one)
            step = self.trainer.step_count
            checkpoint = self._checkpoint(step)
            self.tracker.update_summary({"train/interrupted_at_step": step})
            self.stop.request_from_peer()
            self.stop.raise_if_requested(self.stage.name, step, checkpoint)

    # ------------------------------------------------------------------------------------------- save
    def save(self) -> dict:
        steps = self.trainer.step_count
        after = self.evaluate("after", steps)
        self.tracker.log(after, step=steps)
        self.summary.update(after)
        self.summary["train/steps"] = steps
        if distributed.is_distributed():  # a check of the gradient synchronisation, cheap for adapters
            self.summary["dist/max_weight_divergence"] = _weight_divergence(self.model, self.saved_adapters)
        self._checkpoint(steps)
        if distributed.is_main():
            record = base_record(self.sft_model, self.cfg.model.name, local_model_dir(self.sft_model, self.cfg.model))
            for name in self.saved_adapters:
                self.model.save_policy(self.run_dir / POLICIES_SUBDIR / name, adapter=name, base_record=record,
                                       value_head=critic_of(self.stage) != "none")
        self.tracker.update_summary(self.summary)
        return self.summary

    # --------------------------------------------------------------------------------------- evaluate
    def evaluate(self, tag: str, step: int) -> dict:
        """Every policy on the held-out prompts: the headline split "eval" as ``eval/<tag>/<metric>``, each
        extra split as ``eval/<tag>/<split>/<metric>`` (and ``eval/<tag>/<policy>/...`` with several policies)."""
        metrics: dict = {}
        if not distributed.is_main():  # the weights are the same on every rank: rank 0 evaluates
            return metrics
        stage, task, several = self.stage, self.task, len(self.stage.policies) > 1
        for i, name in enumerate(stage.policies):
            for split in ("eval", *task.extra_eval_splits):
                values, samples = evaluate(self.roles, self.tokenizer, task.prompts(split), name, stage,
                                           oracle=task.oracle, judge=task.judge, judged_text=task.judged_text,
                                           on_task=task.on_task)
                if split == "eval":
                    console.say(console.eval_line(tag, step, stage.steps, values, name if several else None,
                                                  console.source_weights(stage), judge_label(self.cfg.data.name)))
                prefixes = ([f"eval/{tag}/"] if i == 0 else []) + ([f"eval/{tag}/{name}/"] if several else [])
                infix = "" if split == "eval" else f"{split}/"
                metrics.update({p + infix + k: v for p in prefixes for k, v in values.items()})
                self._log_samples(step, tag, name, samples, split)
        return metrics

    def _log_samples(self, step: int, tag: str, policy: str, samples: list[dict], split: str = "eval") -> None:
        """Sampled responses: appended to samples.jsonl, and a W&B table when W&B is on."""
        with (self.run_dir / "samples.jsonl").open("a") as handle:
            for sample in samples:
                handle.write(json.dumps({"step": step, "eval": tag, "split": split, "policy": policy, **sample}) + "\n")
        if self.tracker.wandb_run is not None:
            key = f"samples/{policy}" if split == "eval" else f"samples/{policy}/{split}"
            self.tracker.wandb_run.log({key: samples_table(samples)}, step=step)


def rollout_samples(rollout, tokenizer, task, limit: int = 8) -> list[dict]:
    """The first ``limit`` responses of a training rollout, decoded, with their reward and each source's score
    (and the task's oracle and judge, when it has them)."""
    oracle, judge = task.oracle, task.judge
    queries = tokenizer.batch_decode(rollout.query_ids[:limit], skip_special_tokens=True)
    responses = response_texts(tokenizer, rollout)[:limit]
    rewards = rollout.raw_scores[:limit].tolist() if rollout.raw_scores is not None else [None] * len(queries)
    # The judges read what the evaluation reads: a plain prompt and its continuation, a conversation's reply.
    prompts = rollout.conversations[:limit] if rollout.conversations is not None else queries
    judged = [task.judged_text(p, r) for p, r in zip(prompts, responses)]
    return [{"query": q, "response": r, "reward": w, **source_columns(rollout, i),
             "oracle": oracle(t) if oracle is not None else None,
             "well_formed": judge(t) if judge is not None else None,
             **({"on_task": task.on_task(p, r)} if task.on_task is not None else {})}
            for i, (q, r, w, t, p) in enumerate(zip(queries, responses, rewards, judged, prompts))]


def _weight_divergence(model, adapters: list[str]) -> float:
    """Largest difference of any trained weight between ranks (0 when gradients were synchronised)."""
    flat = torch.cat([p.detach().float().reshape(-1).cpu() for name in adapters
                      for p in model.trainable_parameters(name)])
    everyone = distributed.gather(flat)
    return max(float((other - everyone[0]).abs().max()) for other in everyone)
