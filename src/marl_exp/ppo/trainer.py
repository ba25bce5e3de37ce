"""The RL loop for RLHF on a multi-adapter model, and PPO on it (Ziegler et al. 2019; Stiennon et al. 2020).

``RLTrainer.step`` is the one loop every algorithm runs, in five phases: sample responses from each
policy adapter, score them (policy / reference / reward on the one base), turn reward scores into
rewards, estimate advantages, update. Only the advantages (and the loss they feed) differ by
algorithm: ``PPOTrainer`` here (KL-shaped per-token rewards, GAE with a value head, ``ppo_epochs``
clipped updates), ``critic_free.CriticFreeTrainer`` for GRPO, RLOO and REINFORCE++ (an estimator
registered in ``core``, no critic). The math itself lives in ``marl_exp.ppo.core``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch
from transformers import get_scheduler

from marl_exp import distributed
from marl_exp.interrupt import TrainingDiverged
from marl_exp.ppo import core
from marl_exp.ppo.reward_sources import source_stats
from marl_exp.ppo.roles import SharedRoles, critic_name
from marl_exp.ppo.rollout import (
    DEFAULT_PERF,
    PerfOptions,
    Rollout,
    response_slice,
    sample,
    score_many,
    stop_token_ids,
    temperature_scaled,
)

log = logging.getLogger(__name__)

class RunningMoments:
    """Running mean and variance of scores over all steps so far (Chan et al. parallel update); ``var`` is
    the population variance, ``std`` the sample one."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        n, mean, var = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.var * self.count + var * n + delta ** 2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        """The sample standard deviation of every score so far (Bessel-corrected, as TRL's RunningMoments)."""
        unbiased = self.var * self.count / (self.count - 1) if self.count > 1 else self.var
        return math.sqrt(max(unbiased, 1e-8))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


@dataclass
class PolicyState:
    """What each trained policy carries across steps: its optimizer and LR schedule."""

    name: str
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list = field(default_factory=list)


class RLTrainer:
    """The loop every RL algorithm shares; subclasses fill in the algorithm (see ``step``).

    Hooks: ``_next_prompts`` (the batch), ``_shape_scores`` (phase 3), ``_estimate_advantages`` (phase 4),
    ``_optimize`` (phase 5, usually ``_run_epochs`` with ``_micro_batch_backward``), ``_after_update``
    (controllers that follow the step's statistics), ``_updates_per_batch`` and ``_trained_parameters``.
    """

    critic = "none"  # what scoring computes values with (PPO: the stage's critic)

    def __init__(self, roles: SharedRoles, tokenizer, cfg, prompts: list[str], seed: int,
                 perf: PerfOptions = DEFAULT_PERF):
        self.roles, self.model, self.tokenizer, self.cfg = roles, roles.model, tokenizer, cfg
        self.perf = perf  # speed-ups only: results are the same with any of them off
        self.prompts = prompts
        self.stop_ids = stop_token_ids(tokenizer, self.model)
        self.last_rollouts: dict[str, Rollout] = {}  # the latest step's, for sample logging
        self.prompt_rng = random.Random(seed)  # which prompts each step sees
        self.shuffle_gen = torch.Generator().manual_seed(seed)  # mini-batch order
        self.step_count = 0
        # Steps with non-finite values (their updates are skipped): in a row, and in all.
        self.bad_steps_in_a_row, self.bad_steps_total = 0, 0
        updates = cfg.steps * self._updates_per_policy_step()
        self.policies = {name: self._policy_state(name, updates) for name in cfg.policies}

    def _policy_state(self, name: str, updates: int) -> PolicyState:
        params = self._trained_parameters(name)
        optimizer = _make_optimizer(self.cfg, params)
        scheduler = get_scheduler(self.cfg.optim.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=updates)
        return PolicyState(name, optimizer, scheduler, params)

    # ------------------------------------------------------------------------------------ one step
    def step(self) -> dict:
        """One RL step for every policy adapter, in five phases:

        1. sample      responses to this step's prompts from each policy adapter
        2. score       policy log-probs (and values), reference log-probs, and the reward: Σ weight × score of
                       its sources (reward adapters on the one base, functions of the texts)
        3. rewards     reward scores -> the scores the algorithm optimises (``_shape_scores``)
        4. advantages  the only part that differs by algorithm (``_estimate_advantages``)
        5. update      clipped policy-gradient updates of each policy adapter (``_optimize``)

        Guards at the edges: a NaN/inf in the samples, scores or rewards skips the whole step on every
        rank (``_skip_step``); one in a loss or gradient skips that update (``_run_epochs``).
        """
        prompts = self._next_prompts()
        timings = {}
        t0 = time.perf_counter()
        # step 1: sample
        rollouts, problem = self._sample(prompts)
        timings["time/rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # step 2: score the roles on the one base
        if problem is None:
            score_many(self.roles, rollouts, self.critic, self.cfg, self.tokenizer, perf=self.perf,
                       stop_ids=self.stop_ids)
            # Checked before the scores are shaped: NaN must not reach the running score statistics.
            problem = _nonfinite_rollout(rollouts)
        problem = _agreed(problem)  # in a data-parallel run every rank skips, or none does
        if problem is not None:
            return self._skip_step(problem, timings)
        # step 3: rewards
        for name, rollout in rollouts.items():
            rollout.scores = self._shape_scores(name, rollout)
        problem = _agreed(_nonfinite_rollout(rollouts, fields=("scores",)))
        if problem is not None:
            return self._skip_step(problem, timings)
        # step 4: advantages
        for name, rollout in rollouts.items():
            rollout.advantages, rollout.returns = self._estimate_advantages(name, rollout)
        timings["time/score"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # step 5: update
        stats = {}
        for name, rollout in rollouts.items():
            stats.update(self._prefixed(name, {**self._optimize(self.policies[name], rollout),
                                               **source_stats(rollout.source_scores)}))
        timings["time/optimize"] = time.perf_counter() - t0

        stats.update(self._after_update(stats))
        return self._finish_step(rollouts, stats, timings)

    def _sample(self, prompts: list[str]) -> tuple[dict[str, Rollout], str | None]:
        """Phase 1 for every policy; a sampling error from non-finite logits becomes a skipped step."""
        try:
            return {name: sample(self.model, self.tokenizer, prompts, name, self.cfg, perf=self.perf,
                                 stop_ids=self.stop_ids) for name in self.policies}, None
        except RuntimeError as err:  # torch.multinomial on NaN/inf probabilities
            if not _is_nonfinite_error(err):
                raise
            return {}, f"sampling hit non-finite logits ({' '.join(str(err).split())})"

    def _finish_step(self, rollouts: dict[str, Rollout], stats: dict, timings: dict) -> dict:
        self.last_rollouts = rollouts
        self.step_count += 1
        self._schedules_to_step_clock()
        skipped = sum(v for k, v in stats.items() if k.endswith("ppo/skipped_nonfinite"))
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

    # ---------------------------------------------------------------------- hooks of the algorithm
    def _next_prompts(self) -> list[str]:
        return [self.prompt_rng.choice(self.prompts) for _ in range(self.cfg.batch_size)]

    def _trained_parameters(self, name: str) -> list:
        return self.model.trainable_parameters(name)

    def _updates_per_batch(self) -> int:
        raise NotImplementedError

    def _shape_scores(self, name: str, rollout: Rollout) -> torch.Tensor:
        raise NotImplementedError

    def _estimate_advantages(self, name: str, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages [B, R], returns [B, R] or None) of one policy's rollout."""
        raise NotImplementedError

    def _optimize(self, policy: PolicyState, rollout: Rollout) -> dict:
        raise NotImplementedError

    def _micro_batch_backward(self, name: str, rollout: Rollout, rows: torch.Tensor, mini_batch: torch.Tensor) -> dict:
        """Backward the loss of ``rows`` (part of ``mini_batch``); returns its stats with ``skipped``
        (and ``nonfinite``) set when it did not backward."""
        raise NotImplementedError

    def _stop_epochs(self, epoch_stats: list[dict]) -> bool:
        """After an epoch over the batch: stop this step's updates now?"""
        return False

    def _after_update(self, stats: dict) -> dict:
        return {}

    def _skip_stats(self) -> dict:
        """Metrics a skipped step still reports (e.g. a KL coefficient that did not move)."""
        return {}

    # ------------------------------------------------------------------------------------- updates
    def _policy_on_responses(self, name: str, mb: Rollout):
        """Policy ``name``'s forward over a mini-batch with gradients: its output, the temperature-scaled
        logits that predict the response tokens, and those positions (``window``)."""
        window = response_slice(mb.query_ids.shape[1], mb.response_ids.shape[1])
        if self.perf.window_logits:
            out = self.model.policy_forward(mb.input_ids, mb.attention_mask, adapter=name, logits_positions=window)
            return out, temperature_scaled(out.logits, self.cfg.sampling.temperature), window
        out = self.model.policy_forward(mb.input_ids, mb.attention_mask, adapter=name)
        return out, temperature_scaled(out.logits[:, window], self.cfg.sampling.temperature), window

    def _run_epochs(self, policy: PolicyState, rollout: Rollout, epochs: int) -> tuple[list[dict], bool, int]:
        """``epochs`` passes over the rollout in shuffled mini-batches, one optimizer step each (gradient
        accumulation over micro-batches). Returns (per-micro-batch stats, stopped early, non-finite updates)."""
        cfg = self.cfg
        epoch_stats: list[dict] = []
        batch = rollout.query_ids.shape[0]
        micro = cfg.optim.mini_batch_size // cfg.optim.gradient_accumulation_steps
        stopped_early = False
        nonfinite_updates = 0
        for _ in range(epochs):
            epoch_start = len(epoch_stats)
            order = torch.randperm(batch, generator=self.shuffle_gen)
            for start in range(0, batch, cfg.optim.mini_batch_size):
                mb = order[start:start + cfg.optim.mini_batch_size]
                policy.optimizer.zero_grad(set_to_none=True)
                mb_stats = [self._micro_batch_backward(policy.name, rollout, mb[m_start:m_start + micro], mb)
                            for m_start in range(0, len(mb), micro)]
                skipped = any([s.pop("skipped") for s in mb_stats])  # a list: pop from every one
                nonfinite = any([s.pop("nonfinite", False) for s in mb_stats])
                skipped = distributed.any_rank(skipped)  # ranks skip together (or deadlock)
                if not skipped:
                    # Data parallel: the mean gradient over ranks, before clipping, as DDP would have it.
                    distributed.average_gradients(policy.params)
                    grad_norm = torch.nn.utils.clip_grad_norm_(policy.params, cfg.optim.max_grad_norm)
                    if math.isfinite(float(grad_norm)):
                        policy.optimizer.step()
                        mb_stats[0]["ppo/grad_norm"] = float(grad_norm)
                    else:  # never apply a NaN/inf gradient (the grads are zeroed before the next one)
                        skipped = nonfinite = True
                policy.scheduler.step()  # a skipped update still uses up its place in the schedule
                nonfinite_updates += int(nonfinite)
                epoch_stats.extend(mb_stats)
                epoch_stats[-1]["ppo/skipped_batches"] = float(skipped)
            if self._stop_epochs(epoch_stats[epoch_start:]):
                stopped_early = True
                break
        policy.optimizer.zero_grad(set_to_none=True)
        return epoch_stats, stopped_early, nonfinite_updates

    def _updates_per_policy_step(self) -> int:
        """The optimizer updates a step plans for each policy: one per mini-batch, per epoch."""
        return self._updates_per_batch() * math.ceil(self.cfg.batch_size / self.cfg.optim.mini_batch_size)

    def _schedules_to_step_clock(self) -> None:
        """Every LR schedule at the update the step count has reached. The schedule runs on the step clock,
        as the run's length does: an update skipped, left out by an early stop, or lost with a skipped step
        still counts, so the learning rate at each step is a run's without skips, and 0 after the last."""
        planned = self.step_count * self._updates_per_policy_step()
        for policy in self.policies.values():
            while policy.scheduler.last_epoch < planned:
                policy.scheduler.step()

    # ------------------------------------------------------------------------- non-finite values
    def _updates_per_step(self) -> int:
        return self._updates_per_policy_step() * len(self.policies)

    def _skip_step(self, problem: str, timings: dict) -> dict:
        """A step whose rollout had non-finite values: nothing is updated (weights, optimizer, KL
        controller, score statistics); the step still counts, so the prompt stream and the LR schedule move on."""
        self.step_count += 1
        self._schedules_to_step_clock()
        timings["time/step"] = sum(timings.values())
        stats = {**timings, "ppo/skipped_nonfinite": float(self._updates_per_step()), **self._skip_stats()}
        stats.update(self._count_bad_step(problem, stats))
        return stats

    def _count_bad_step(self, problem: str | None, stats: dict) -> dict:
        """Update the bad-step counters; raise TrainingDiverged after ``max_bad_steps`` in a row."""
        if problem is None:
            self.bad_steps_in_a_row = 0
        else:
            self.bad_steps_in_a_row += 1
            self.bad_steps_total += 1
        counters = {"ppo/nonfinite_step": float(problem is not None),
                    "ppo/nonfinite_steps_total": float(self.bad_steps_total),
                    "ppo/nonfinite_steps_in_a_row": float(self.bad_steps_in_a_row)}
        if problem is None:
            return counters
        limit, algorithm = self.cfg.optim.max_bad_steps, getattr(self.cfg, "name", "ppo").upper()
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


class PPOTrainer(RLTrainer):
    """PPO: per-token rewards with a KL penalty (adaptive coefficient), GAE advantages from a value head
    or critic adapter, ``ppo_epochs`` epochs of clipped policy and value updates."""

    def __init__(self, roles: SharedRoles, tokenizer, cfg, prompts: list[str], seed: int,
                 perf: PerfOptions = DEFAULT_PERF):
        self.critic = cfg.critic
        # Each policy its own KL coefficient and score statistics: they follow that policy's responses only.
        self.kl_ctls = {name: core.make_kl_controller(cfg.kl.adaptive_kl, cfg.kl.init_kl_coef, cfg.kl.target_kl, cfg.kl.kl_horizon)
                        for name in cfg.policies}
        self.score_moments = {name: RunningMoments() for name in cfg.policies}
        super().__init__(roles, tokenizer, cfg, prompts, seed, perf)

    def _trained_parameters(self, name: str) -> list:
        params = self.model.trainable_parameters(name)
        if self.cfg.critic == "adapter":
            params += self.model.trainable_parameters(critic_name(name))
        return params

    def _updates_per_batch(self) -> int:
        return self.cfg.optim.ppo_epochs

    def _after_update(self, stats: dict) -> dict:
        out = {}
        for name in self.policies:
            prefix = "" if len(self.policies) == 1 else f"{name}/"
            # Each controller sees its own policy's KL over every rank's responses (the same on all ranks).
            policy_kl = distributed.mean(stats[prefix + "objective/kl"])
            self.kl_ctls[name].update(policy_kl, self.cfg.batch_size * distributed.world_size())
            out[prefix + "objective/kl_coef"] = self.kl_ctls[name].value
        return out

    def _skip_stats(self) -> dict:
        return {("" if len(self.policies) == 1 else f"{name}/") + "objective/kl_coef": ctl.value
                for name, ctl in self.kl_ctls.items()}

    def _shape_scores(self, name: str, rollout: Rollout) -> torch.Tensor:
        """Score options, in the order applied: missing-EOS penalty, running whitening, scale, clip."""
        cfg, scores = self.cfg, rollout.raw_scores.clone()
        if cfg.scores.missing_eos_penalty is not None:
            scores = scores - cfg.scores.missing_eos_penalty * (~rollout.has_eos).float()
        if cfg.scores.whiten_scores:
            moments = self.score_moments[name]
            moments.update(distributed.cat_tensors(scores))  # every rank's scores of this policy
            scores = (scores - moments.mean) / moments.std
        scores = scores * cfg.scores.score_scale
        if cfg.scores.score_clip is not None:
            scores = scores.clamp(-cfg.scores.score_clip, cfg.scores.score_clip)
        return scores

    def _estimate_advantages(self, name: str, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rewards -β·KL on every response token, the score added at the last one; GAE."""
        cfg, mask = self.cfg, rollout.response_mask
        rewards, _ = core.compute_rewards(rollout.scores, rollout.kl, mask, self.kl_ctls[name].value)
        advantages, returns = core.compute_gae(rewards, rollout.values, mask, cfg.advantages.gamma, cfg.advantages.lam)
        if cfg.advantages.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask)
        return advantages, returns

    def _optimize(self, policy: PolicyState, rollout: Rollout) -> dict:
        cfg, mask = self.cfg, rollout.response_mask
        kl_coef = self.kl_ctls[policy.name].value
        if rollout.advantages is None:  # called on its own (tests, benchmarks), not from ``step``
            rollout.advantages, rollout.returns = self._estimate_advantages(policy.name, rollout)
        advantages, returns = rollout.advantages, rollout.returns
        epoch_stats, stopped_early, nonfinite_updates = self._run_epochs(policy, rollout, cfg.optim.ppo_epochs)

        keys = sorted(set().union(*epoch_stats))
        stats = {k: _mean([s[k] for s in epoch_stats if k in s]) for k in keys}
        kl_sum = core.masked_sum(rollout.kl, mask, dim=1)
        _, non_score = core.compute_rewards(rollout.scores, rollout.kl, mask, kl_coef)
        stats.update({
            "objective/kl": kl_sum.mean().item(),
            "objective/kl_per_token": core.masked_mean(rollout.kl, mask).item(),
            "objective/entropy_sampled": -core.masked_sum(rollout.logprobs, mask, dim=1).mean().item(),
            "objective/rlhf_reward": (rollout.scores - kl_coef * kl_sum).mean().item(),
            "env/reward_mean": rollout.raw_scores.mean().item(),
            "env/reward_std": rollout.raw_scores.std().item(),
            "env/score_mean": rollout.scores.mean().item(),
            "env/response_length": mask.sum(1).float().mean().item(),
            "env/eos_fraction": rollout.has_eos.float().mean().item(),
            "ppo/returns/mean": core.masked_mean(returns, mask).item(),
            "ppo/advantages/mean": core.masked_mean(advantages, mask).item(),
            "ppo/val/mean": core.masked_mean(rollout.values, mask).item(),
            "ppo/mean_non_score_reward": core.masked_sum(non_score, mask, dim=1).mean().item(),
            "ppo/early_stop": float(stopped_early),
            "ppo/skipped_nonfinite": float(nonfinite_updates),
            "ppo/learning_rate": policy.scheduler.get_last_lr()[0],
        })
        return stats

    def _micro_batch_backward(self, name: str, rollout: Rollout, rows: torch.Tensor, mini_batch: torch.Tensor) -> dict:
        weight = len(rows) / len(mini_batch)  # gradient accumulation averages over the mini-batch
        return self._loss_backward(name, rollout.select(rows), rollout.advantages[rows], rollout.returns[rows], weight)

    def _stop_epochs(self, epoch_stats: list[dict]) -> bool:
        # Decided on this epoch's mini-batches alone: an average over all epochs so far would be diluted
        # by the first one, whose approx-KL starts at 0 (the policy is the rollout policy there).
        approxkl = _mean([s["ppo/policy/approxkl"] for s in epoch_stats if "ppo/policy/approxkl" in s])
        approxkl = distributed.mean(approxkl)  # one decision for all ranks
        return self.cfg.optim.early_stop_kl is not None and approxkl > self.cfg.optim.early_stop_kl

    def _loss_backward(self, name: str, mb: Rollout, advantages, returns, weight: float) -> dict:
        cfg, mask = self.cfg, mb.response_mask
        out, logits, window = self._policy_on_responses(name, mb)
        # The logits are not read after backward (deleted below), so they may become their own gradient.
        logprobs = core.logprobs_from_logits(logits, mb.response_ids, grad_in_place=self.perf.lean_logprobs)
        if not _all_finite(logprobs.detach(), mask):  # NaN/inf logits: no backward at all
            return {"skipped": True, "nonfinite": True}
        # Guard: a mini-batch whose probability ratio exploded would only produce a destructive update.
        if core.is_ratio_extreme(logprobs.detach(), mb.logprobs, mask, cfg.optim.ratio_threshold):
            return {"skipped": True}
        pg_loss, pg_stats = core.policy_loss(logprobs, mb.logprobs, advantages, mask, cfg.loss.cliprange)
        if self.perf.lazy_entropy and cfg.loss.entropy_coef == 0:
            entropy = core.masked_mean(_entropy_for_logging(logits), mask)
        else:
            entropy = core.masked_mean(core.entropy_from_logits(logits), mask)
        loss = pg_loss - cfg.loss.entropy_coef * entropy
        if not torch.isfinite(loss.detach()):
            return {"skipped": True, "nonfinite": True}
        values = out.values
        del out, logits  # log_softmax keeps its own output for backward: the [B, T, vocab] logits can go
        if cfg.critic == "adapter":
            # The critic is its own adapter: backward the policy part first, then run the critic and
            # backward its loss while it is active; activating the policy again turns the critic's
            # requires_grad off, and autograd would then drop its gradients.
            (loss * weight).backward()
            no_logits = slice(0, 0) if self.perf.window_logits else None  # the critic's logits are not used
            values = self.model.policy_forward(mb.input_ids, mb.attention_mask, adapter=critic_name(name),
                                               logits_positions=no_logits).values
            try:
                vf_loss, vf_stats = core.value_loss(values[:, window].float(), mb.values, returns, mask,
                                                    cfg.loss.cliprange_value)
                if not torch.isfinite(vf_loss.detach()):
                    return {"skipped": True, "nonfinite": True}
                (cfg.loss.vf_coef * vf_loss * weight).backward()
            finally:
                self.model.activate_policy(name)
        else:
            vf_loss, vf_stats = core.value_loss(values[:, window].float(), mb.values, returns, mask,
                                                cfg.loss.cliprange_value)
            if not torch.isfinite(vf_loss.detach()):
                return {"skipped": True, "nonfinite": True}
            ((loss + cfg.loss.vf_coef * vf_loss) * weight).backward()
        return {
            "skipped": False,
            "ppo/loss/policy": pg_loss.item(),
            "ppo/loss/value": vf_loss.item(),
            "ppo/loss/total": (pg_loss + cfg.loss.vf_coef * vf_loss).item(),
            "ppo/policy/entropy": entropy.item(),
            "objective/entropy": entropy.item(),
            "ppo/policy/approxkl": pg_stats["approxkl"].item(),
            "ppo/policy/approxkl_k3": pg_stats["approxkl_k3"].item(),
            "ppo/policy/clipfrac": pg_stats["clipfrac"].item(),
            "ppo/policy/ratio_mean": pg_stats["ratio_mean"].item(),
            "ppo/policy/ratio_max": pg_stats["ratio_max"].item(),
            "ppo/val/vpred": vf_stats["vpred"].item(),
            "ppo/val/error": vf_stats["error"].item(),
            "ppo/val/clipfrac": vf_stats["clipfrac"].item(),
        }

    # ----------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "kl_ctl": {name: ctl.state_dict() for name, ctl in self.kl_ctls.items()},
            "score_moments": {name: m.state_dict() for name, m in self.score_moments.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name in self.policies:
            self.kl_ctls[name].load_state_dict(_per_policy(state["kl_ctl"], name))
            self.score_moments[name].load_state_dict(_per_policy(state["score_moments"], name))


@torch.no_grad()
def _entropy_for_logging(logits: torch.Tensor) -> torch.Tensor:
    """``core.entropy_from_logits`` when the entropy is only logged (no bonus): no autograd graph over
    [B, T, vocab], and a few rows at a time."""
    return core.by_rows(core.entropy_from_logits, logits, chunk_elements=2**19)


def _make_optimizer(cfg, params) -> torch.optim.Optimizer:
    if cfg.optim.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay)


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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _per_policy(state: dict, name: str) -> dict:
    """A policy's entry of a per-policy state; checkpoints written before per-policy state held one for all."""
    return state[name] if name in state and isinstance(state[name], dict) else state


def _as_tuple(state):
    """random.Random state comes back from torch.load with lists where tuples were."""
    return tuple(_as_tuple(s) if isinstance(s, list) else s for s in state)
