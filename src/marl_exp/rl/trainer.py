"""The RL loop for RLHF on a multi-adapter model, the same for every algorithm.

``RLTrainer.step`` runs five phases: sample responses from each policy adapter, score them (policy /
reference / reward on the one base), turn reward scores into the scores the algorithm optimises, estimate
advantages, update. The loop owns sampling, scoring, the forward and log-probs, the guards against
non-finite values and exploded ratios, backward and the optimizer; the algorithm object
(``marl_exp.rl.algorithms``: PPO, or the critic-free GRPO / RLOO / REINFORCE++) owns its scores, its
advantages and its loss, which ``_update`` calls directly: ``step -> _update -> algorithm.loss``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch
from transformers import get_scheduler

from marl_exp.rl.algorithms import make_algorithm
from marl_exp.rl.functional import is_ratio_extreme, list_mean, logprobs_from_logits
from marl_exp.rl.reward_sources import source_stats
from marl_exp.rl.roles import SharedRoles, critic_name
from marl_exp.rl.rollout import (
    DEFAULT_PERF,
    PerfOptions,
    PolicyForward,
    Rollout,
    response_slice,
    sample,
    score_many,
    stop_token_ids,
    temperature_scaled,
)
from marl_exp.run import distributed
from marl_exp.run.interrupt import TrainingDiverged

log = logging.getLogger(__name__)


@dataclass
class PolicyState:
    """What each trained policy carries across steps: its optimizer and LR schedule."""

    name: str
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list = field(default_factory=list)


class RLTrainer:
    """The loop every RL algorithm shares; ``stage`` is the RL stage node, whose ``name`` picks the algorithm."""

    @property
    def perf(self) -> PerfOptions:
        """Speed-ups only: results are the same with any of them off."""
        return self._perf

    @perf.setter
    def perf(self, perf: PerfOptions) -> None:
        # The algorithm's loss reads them too (lazy entropy): a switch must reach both, or a benchmark that
        # flips trainer.perf measures the default for that option.
        self._perf = self.algorithm.perf = perf

    def __init__(self, roles: SharedRoles, tokenizer, stage, prompts: list[str], seed: int,
                 perf: PerfOptions = DEFAULT_PERF):
        self.roles, self.model, self.tokenizer, self.stage = roles, roles.model, tokenizer, stage
        self.algorithm = make_algorithm(stage, perf)
        self.perf = perf
        self.prompts = prompts
        self.stop_ids = stop_token_ids(tokenizer, self.model)
        self.last_rollouts: dict[str, Rollout] = {}  # the latest step's, for sample logging
        self.prompt_rng = random.Random(seed)  # which prompts each step sees
        self.shuffle_gen = torch.Generator().manual_seed(seed)  # mini-batch order
        self.step_count = 0
        # Steps with non-finite values (their updates are skipped): in a row, and in all.
        self.bad_steps_in_a_row, self.bad_steps_total = 0, 0
        updates = stage.steps * self._updates_per_policy_step()
        self.policies = {name: self._policy_state(name, updates) for name in stage.policies}

    @property
    def critic(self) -> str:
        """What scoring computes values with: PPO's critic (value_head | adapter), or none."""
        return self.algorithm.critic

    def metric_key(self, name: str) -> str:
        """The loop's own metric ``name`` (e.g. nonfinite_step) as this algorithm logs it."""
        return self.algorithm.metric_prefix + name

    def _policy_state(self, name: str, updates: int) -> PolicyState:
        params = self.algorithm.trained_parameters(self.model, name)
        optimizer = _make_optimizer(self.stage, params)
        scheduler = get_scheduler(self.stage.optim.lr_scheduler, optimizer, num_warmup_steps=0,
                                  num_training_steps=updates)
        return PolicyState(name, optimizer, scheduler, params)

    # ------------------------------------------------------------------------------------ one step
    def step(self) -> dict:
        """One RL step for every policy adapter, in five phases:

        1. sample      responses to this step's prompts from each policy adapter
        2. score       policy log-probs (and values), reference log-probs, and the reward: Σ weight × score of
                       its sources (reward adapters on the one base, functions of the texts)
        3. rewards     reward scores -> the scores the algorithm optimises (``algorithm.shape_scores``)
        4. advantages  the algorithm's (``algorithm.advantages``)
        5. update      ``algorithm.epochs`` passes of the algorithm's loss over the batch (``_update``)

        Guards at the edges: a NaN/inf in the samples, scores or rewards skips the whole step on every
        rank (``_skip_step``); one in a loss or gradient skips that update (``_update``).
        """
        algorithm, timings = self.algorithm, {}
        t0 = time.perf_counter()
        rollouts, problem = self._sample(self._next_prompts())
        timings["time/rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if problem is None:
            deferred = self._old_logprobs_from_update(rollouts)
            score_many(self.roles, rollouts, self.critic, self.stage, self.tokenizer, perf=self.perf,
                       stop_ids=self.stop_ids, policy=not deferred)
            # Checked before the scores are shaped: NaN must not reach the running score statistics.
            problem = _nonfinite_rollout(rollouts)
        problem = _agreed(problem)  # in a data-parallel run every rank skips, or none does
        if problem is not None:
            return self._skip_step(problem, timings)
        for name, rollout in rollouts.items():
            rollout.scores = algorithm.shape_scores(name, rollout)
        problem = _agreed(_nonfinite_rollout(rollouts, fields=("scores",)))
        if problem is not None:
            return self._skip_step(problem, timings)
        for name, rollout in rollouts.items():
            rollout.advantages, rollout.returns = algorithm.advantages(name, rollout)
        timings["time/score"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        per_policy = {name: {**self._update(self.policies[name], rollout), **source_stats(rollout.source_scores)}
                      for name, rollout in rollouts.items()}
        timings["time/optimize"] = time.perf_counter() - t0

        stats = {"perf/old_logprobs_from_update": float(deferred)}  # which passes the step ran (bench/flops.py)
        for name, policy_stats in per_policy.items():
            stats.update(self._prefixed(name, policy_stats))
        for name, policy_stats in per_policy.items():  # after every update: controllers follow the step
            stats.update(self._prefixed(name, algorithm.after_update(name, policy_stats)))
        return self._finish_step(rollouts, stats, timings)

    def _old_logprobs_from_update(self, rollouts: dict[str, Rollout]) -> bool:
        """Whether scoring leaves out the policy pass, the update's first forward giving the old log-probs (as
        TRL's GRPOTrainer does when its first iteration is on-policy). That forward must run the weights that
        sampled every row: one mini-batch per epoch, so no optimizer step comes before any row's first forward,
        and eval mode, so no dropout (``generate`` and scoring run in eval mode). And the algorithm must not read
        the old log-probs before the update: PPO's rewards and GRPO's KL in the reward do."""
        return (self.perf.old_logprobs_from_update and not self.algorithm.reads_old_logprobs_before_update
                and not self.model.training
                and all(r.query_ids.shape[0] <= self.stage.optim.mini_batch_size for r in rollouts.values()))

    def _next_prompts(self) -> list[str]:
        """Each prompt ``algorithm.group_size`` times in a row: one group per prompt (PPO: groups of one)."""
        group = self.algorithm.group_size
        draws = self.stage.batch_size // group
        return [prompt for prompt in (self.prompt_rng.choice(self.prompts) for _ in range(draws)) for _ in range(group)]

    def _sample(self, prompts: list[str]) -> tuple[dict[str, Rollout], str | None]:
        """Phase 1 for every policy; a sampling error from non-finite logits becomes a skipped step."""
        try:
            return {name: sample(self.model, self.tokenizer, prompts, name, self.stage, perf=self.perf,
                                 stop_ids=self.stop_ids, group=self.algorithm.group_size)
                    for name in self.policies}, None
        except RuntimeError as err:  # torch.multinomial on NaN/inf probabilities
            if not _is_nonfinite_error(err):
                raise
            return {}, f"sampling hit non-finite logits ({' '.join(str(err).split())})"

    def _finish_step(self, rollouts: dict[str, Rollout], stats: dict, timings: dict) -> dict:
        self.last_rollouts = rollouts
        self.step_count += 1
        self._schedules_to_step_clock()
        skipped = sum(v for k, v in stats.items() if k.endswith(self.metric_key("skipped_nonfinite")))
        stats.update(self._count_bad_step(
            f"{int(skipped)} update(s) had non-finite losses or gradients" if skipped else None, stats))
        tokens = sum(int(r.response_mask.sum()) for r in rollouts.values())
        timings["time/step"] = sum(timings.values())
        stats.update(timings)
        stats["perf/tokens_per_s"] = tokens / max(timings["time/step"], 1e-9)
        stats["perf/rollout_tokens_per_s"] = tokens / max(timings["time/rollout"], 1e-9)
        return stats

    def _prefixed(self, name: str, stats: dict) -> dict:
        """A policy's metrics under ``<name>/`` when several policies train on the base."""
        prefix = "" if len(self.policies) == 1 else f"{name}/"
        return {prefix + k: v for k, v in stats.items()}

    # ------------------------------------------------------------------------------------- update
    def _update(self, policy: PolicyState, rollout: Rollout) -> dict:
        """Phase 5 for one policy: ``algorithm.epochs`` passes over the rollout in shuffled mini-batches, one
        optimizer step each, accumulated over micro-batches. Each micro-batch: the policy's forward, the
        guards, the algorithm's ``(loss, stats)``, backward (then a critic adapter's value loss, if any)."""
        algorithm = self.algorithm
        if rollout.advantages is None:  # called on its own (tests, benchmarks), not from ``step``
            rollout.advantages, rollout.returns = algorithm.advantages(policy.name, rollout)
        # Scoring left the old log-probs to this first forward (``_old_logprobs_from_update``): it runs the
        # sampling weights on every row. NaN marks a row it has not reached.
        fill_old = rollout.logprobs is None
        if fill_old:
            rollout.logprobs = torch.full(rollout.response_mask.shape, math.nan, device=rollout.response_mask.device)
        all_stats: list[dict] = []
        stopped_early, nonfinite_updates = False, 0
        for _ in range(algorithm.epochs):
            epoch_start = len(all_stats)
            for mini_batch in self._mini_batches(rollout):
                policy.optimizer.zero_grad(set_to_none=True)
                batch_stats = []
                for rows in self._micro_batches(mini_batch):
                    weight, tokens = algorithm.loss_weight(rollout, rows, mini_batch)
                    mb = rollout.select(rows)
                    forward = self._policy_forward(policy.name, mb)
                    if fill_old:
                        mb.logprobs = forward.logprobs.detach().clone()
                        rollout.logprobs[rows] = mb.logprobs
                    stats = self._guard(forward, mb)
                    if stats is None:
                        loss, stats = algorithm.loss(forward, mb, tokens)
                        del forward  # the [B, T, vocab] logits can go before backward
                        stats = self._backward(loss, weight, stats)
                    if algorithm.critic == "adapter" and not stats["skipped"]:
                        with self._critic_active(policy.name):
                            vf_loss, vf_stats = algorithm.critic_loss(self._critic_values(policy.name, mb), mb, stats)
                            stats = self._backward(vf_loss, weight, {**stats, **vf_stats})
                    batch_stats.append(stats)
                fill_old = False  # the next mini-batch runs updated weights
                skipped, nonfinite = self._optimizer_step(policy, batch_stats)
                nonfinite_updates += int(nonfinite)
                all_stats.extend(batch_stats)
                all_stats[-1][self.metric_key("skipped_batches")] = float(skipped)
            if algorithm.stop_epochs(all_stats[epoch_start:]):
                stopped_early = True
                break
        policy.optimizer.zero_grad(set_to_none=True)

        keys = sorted(set().union(*all_stats))
        stats = {k: list_mean([s[k] for s in all_stats if k in s]) for k in keys}
        stats.update(algorithm.step_stats(policy.name, rollout, stopped_early))
        stats[self.metric_key("skipped_nonfinite")] = float(nonfinite_updates)
        stats[self.metric_key("learning_rate")] = policy.scheduler.get_last_lr()[0]
        return stats

    def _mini_batches(self, rollout: Rollout):
        """One epoch's mini-batches: row indices of the rollout in a fresh shuffled order."""
        batch, size = rollout.query_ids.shape[0], self.stage.optim.mini_batch_size
        order = torch.randperm(batch, generator=self.shuffle_gen)
        return [order[start:start + size] for start in range(0, batch, size)]

    def _micro_batches(self, mini_batch: torch.Tensor) -> list[torch.Tensor]:
        micro = self.stage.optim.mini_batch_size // self.stage.optim.gradient_accumulation_steps
        return [mini_batch[start:start + micro] for start in range(0, len(mini_batch), micro)]

    def _policy_forward(self, name: str, mb: Rollout) -> PolicyForward:
        """Policy ``name``'s forward over a micro-batch with gradients, and its response tokens' log-probs."""
        window = response_slice(mb.query_ids.shape[1], mb.response_ids.shape[1])
        if self.perf.window_logits:
            out = self.model.policy_forward(mb.input_ids, mb.attention_mask, adapter=name, logits_positions=window)
            logits = temperature_scaled(out.logits, self.stage.sampling.temperature)
        else:
            out = self.model.policy_forward(mb.input_ids, mb.attention_mask, adapter=name)
            logits = temperature_scaled(out.logits[:, window], self.stage.sampling.temperature)
        # The logits are not read after backward, so they may become their own gradient.
        logprobs = logprobs_from_logits(logits, mb.response_ids, grad_in_place=self.perf.lean_logprobs)
        return PolicyForward(logprobs, logits, out.values, window)

    def _guard(self, forward: PolicyForward, mb: Rollout) -> dict | None:
        """The stats of a micro-batch that must not backward (``skipped``, ``nonfinite``), else None."""
        logprobs = forward.logprobs.detach()
        if not _all_finite(logprobs, self.algorithm.loss_mask(mb)):  # NaN/inf logits: no backward at all
            return {"skipped": True, "nonfinite": True}
        # A micro-batch whose probability ratio to the sampling policy exploded would only do damage.
        if is_ratio_extreme(logprobs, mb.logprobs, mb.response_mask, self.stage.optim.ratio_threshold):
            return {"skipped": True}
        return None

    @staticmethod
    def _backward(loss: torch.Tensor, weight: float, stats: dict) -> dict:
        """Backward ``loss × weight`` (its share of the mini-batch) unless it is non-finite; the stats as numbers."""
        if not torch.isfinite(loss.detach()):
            return {"skipped": True, "nonfinite": True}
        numbers = {k: float(v) for k, v in stats.items()}  # before backward, which may reuse the logits' memory
        (loss * weight).backward()
        return {**numbers, "skipped": False}

    @contextlib.contextmanager
    def _critic_active(self, name: str):
        """While a critic adapter's forward and backward run; then the policy again. (Activating the policy
        turns the critic's requires_grad off: its backward must come first, or autograd drops its gradients.)"""
        try:
            yield
        finally:
            self.model.activate_policy(name)

    def _critic_values(self, name: str, mb: Rollout) -> torch.Tensor:
        """The critic adapter's values [B, R] before each response token (its logits are not used)."""
        window = response_slice(mb.query_ids.shape[1], mb.response_ids.shape[1])
        no_logits = slice(0, 0) if self.perf.window_logits else None
        values = self.model.policy_forward(mb.input_ids, mb.attention_mask, adapter=critic_name(name),
                                           logits_positions=no_logits).values
        return values[:, window].float()

    def _optimizer_step(self, policy: PolicyState, batch_stats: list[dict]) -> tuple[bool, bool]:
        """One optimizer step from the mini-batch's accumulated gradients, unless a micro-batch (on any rank)
        was skipped or the gradient is non-finite. Returns (skipped, non-finite)."""
        skipped = any([s.pop("skipped") for s in batch_stats])  # a list: pop from every one
        nonfinite = any([s.pop("nonfinite", False) for s in batch_stats])
        skipped = distributed.any_rank(skipped)  # ranks skip together (or deadlock)
        if not skipped:
            # Data parallel: the mean gradient over ranks, before clipping, as DDP would have it.
            distributed.average_gradients(policy.params)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.params, self.stage.optim.max_grad_norm)
            if math.isfinite(float(grad_norm)):
                policy.optimizer.step()
                batch_stats[0][self.metric_key("grad_norm")] = float(grad_norm)
            else:  # never apply a NaN/inf gradient (the grads are zeroed before the next one)
                skipped = nonfinite = True
        policy.scheduler.step()  # a skipped update still uses up its place in the schedule
        return skipped, nonfinite

    def _updates_per_policy_step(self) -> int:
        """The optimizer updates a step plans for each policy: one per mini-batch, per epoch."""
        return self.algorithm.epochs * math.ceil(self.stage.batch_size / self.stage.optim.mini_batch_size)

    def _schedules_to_step_clock(self) -> None:
        """Every LR schedule at the update the step count has reached. The schedule runs on the step clock,
        as the run's length does: an update skipped, left out by an early stop, or lost with a skipped step
        still counts, so the learning rate at each step is a run's without skips, and 0 after the last."""
        planned = self.step_count * self._updates_per_policy_step()
        for policy in self.policies.values():
            while policy.scheduler.last_epoch < planned:
                policy.scheduler.step()

    # ------------------------------------------------------------------------- non-finite values
    def _skip_step(self, problem: str, timings: dict) -> dict:
        """A step whose rollout had non-finite values: nothing is updated (weights, optimizer, the
        algorithm's state); the step still counts, so the prompt stream and the LR schedule move on."""
        self.step_count += 1
        self._schedules_to_step_clock()
        timings["time/step"] = sum(timings.values())
        updates = self._updates_per_policy_step() * len(self.policies)
        stats = {**timings, self.metric_key("skipped_nonfinite"): float(updates)}
        for name in self.policies:
            stats.update(self._prefixed(name, self.algorithm.skip_stats(name)))
        stats.update(self._count_bad_step(problem, stats))
        return stats

    def _count_bad_step(self, problem: str | None, stats: dict) -> dict:
        """Update the bad-step counters; raise TrainingDiverged after ``max_bad_steps`` in a row."""
        if problem is None:
            self.bad_steps_in_a_row = 0
        else:
            self.bad_steps_in_a_row += 1
            self.bad_steps_total += 1
        counters = {self.metric_key("nonfinite_step"): float(problem is not None),
                    self.metric_key("nonfinite_steps_total"): float(self.bad_steps_total),
                    self.metric_key("nonfinite_steps_in_a_row"): float(self.bad_steps_in_a_row)}
        if problem is None:
            return counters
        limit, algorithm = self.stage.optim.max_bad_steps, self.stage.name.upper()
        log.warning("%s step %d: %s; its update was skipped (%d bad step(s) in a row, the run stops at %d)",
                    algorithm, self.step_count, problem, self.bad_steps_in_a_row, limit)
        if self.bad_steps_in_a_row >= limit:
            err = TrainingDiverged(
                f"{algorithm} stopped at step {self.step_count}: {self.bad_steps_in_a_row} steps in a row "
                f"had non-finite values (last: {problem}); stage.optim.max_bad_steps={limit}. No update of those steps was "
                "applied and the last checkpoint is intact; lower stage.optim.learning_rate or check the reward model, then "
                "resume with stage.resume=auto")
            err.stats = {**stats, **counters}
            raise err
        return counters

    # ----------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "prompt_rng": self.prompt_rng.getstate(),
            "shuffle_gen": self.shuffle_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "optimizers": {n: p.optimizer.state_dict() for n, p in self.policies.items()},
            "schedulers": {n: p.scheduler.state_dict() for n, p in self.policies.items()},
            "bad_steps": [self.bad_steps_in_a_row, self.bad_steps_total],
            **self.algorithm.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step"]
        self.bad_steps_in_a_row, self.bad_steps_total = state.get("bad_steps", (0, 0))
        self.prompt_rng.setstate(_as_tuple(state["prompt_rng"]))
        self.shuffle_gen.set_state(state["shuffle_gen"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        for name, policy in self.policies.items():
            policy.optimizer.load_state_dict(state["optimizers"][name])
            policy.scheduler.load_state_dict(state["schedulers"][name])
        self.algorithm.load_state_dict(state)


def _make_optimizer(stage, params) -> torch.optim.Optimizer:
    if stage.optim.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=stage.optim.learning_rate, weight_decay=stage.optim.weight_decay)
    return torch.optim.AdamW(params, lr=stage.optim.learning_rate, weight_decay=stage.optim.weight_decay)


_ROLLOUT_FIELDS = ("raw_scores", "logprobs", "ref_logprobs", "values", "kl")


def _agreed(problem: str | None) -> str | None:
    """The first rank's problem, on every rank, or None when no rank has one."""
    return next((p for p in distributed.gather(problem) if p is not None), None)


def _all_finite(x: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """True when every (unmasked) entry is finite; padded positions may hold anything."""
    if mask is not None and mask.shape == x.shape:
        x = x[mask.bool()]
    return bool(torch.isfinite(x).all())


def _nonfinite_rollout(rollouts: dict[str, Rollout], fields=_ROLLOUT_FIELDS) -> str | None:
    """Which rollout tensor holds NaN/inf (e.g. 'reward scores (raw_scores) of policy'), or None."""
    for name, rollout in rollouts.items():
        for field_name in fields:
            value = getattr(rollout, field_name)
            if value is not None and not _all_finite(value, rollout.response_mask):
                what = "reward scores" if "scores" in field_name else "rollout values"
                return f"non-finite {what} ({field_name}) of policy {name!r}"
    return None


def _is_nonfinite_error(err: RuntimeError) -> bool:
    message = str(err).lower()
    return "inf" in message and "nan" in message


def _as_tuple(state):
    """random.Random state comes back from torch.load with lists where tuples were."""
    return tuple(_as_tuple(s) if isinstance(s, list) else s for s in state)
