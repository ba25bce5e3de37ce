"""``marl-exp sample <run dir or policy adapter> [--prompts ...]``: what a trained policy writes, beside the reference.

The base, the policy adapter(s) and the run's reward adapters are loaded into one ``MultiAdapterModel``, as
the RL stage builds it. For every prompt a response is sampled from the policy and one from the reference
(the same base with every adapter off, through the same ``generate``), with the same random stream; each
is scored as the run's evaluation scores it (``rl.rollout.score``): the reward is the run's weighted sum of
its reward sources (``stage.rewards``: adapters and functions; the upstream reward adapter by default), shown
beside each source's score, with the KL of the policy's response to the reference (always: it needs no
reward) and, on the built-in task, the oracle's score.

Sampling settings (``max_new_tokens``, ``temperature``, ...) are the run's own PPO settings unless given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from marl_exp.config import RL_STAGES, PPOStageConfig, QuantConfig, RewardSource, reward_sources
from marl_exp.run import console

USAGE_ERROR = 2
# Scores nothing, weighs nothing: what scoring runs with when there is no reward (KL and the oracle only).
NO_REWARD = RewardSource("none", 0.0, function="marl_exp.sample:no_reward")


class SampleError(ValueError):
    """A bad argument of ``marl-exp sample``; one line."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="marl-exp sample", description="Sample from a trained policy and the reference, side by side.")
    parser.add_argument("path", help="a PPO run dir (outputs/runs/<date>/<time>_ppo) or a policy adapter dir "
                                     "(<run dir>/policies/<name>)")
    parser.add_argument("--prompts", nargs="+", help="prompts to answer (default: the run's held-out prompts)")
    parser.add_argument("-n", "--num-prompts", type=int, default=8, help="how many held-out prompts (default 8)")
    parser.add_argument("--policy", action="append", help="policy adapter name(s) of a run dir (default: all)")
    parser.add_argument("--base", help="base model (default: the run's SFT model / the adapter's recorded base)")
    parser.add_argument("--reward-adapter", help="reward adapter (default: the run's)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", action="store_true", help="one JSON object per sample instead of the table")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ inputs
def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """What to load: base, policy adapter dirs by name, reward adapter, and the run's config (or None)."""
    path = Path(args.path).expanduser().resolve()
    if not path.is_dir():
        raise SampleError(f"{args.path!r} does not exist; give a PPO run dir or a policy adapter dir")
    if (path / "adapter_config.json").is_file():  # one adapter: maybe inside a run's policies/
        policies = {path.name: path}
        run_dir = path.parent.parent if path.parent.name == "policies" else None
    else:
        run_dir = path
        found = sorted(p for p in (path / "policies").glob("*") if (p / "adapter_config.json").is_file()) \
            if (path / "policies").is_dir() else []
        if not found:
            raise SampleError(f"{args.path!r} has no policies/<name>/ adapter; give the dir of a finished PPO run "
                              "or a policy adapter dir")
        policies = {p.name: p for p in found if not p.name.endswith("_critic")}
    if args.policy:
        unknown = [name for name in args.policy if name not in policies]
        if unknown:
            raise SampleError(f"--policy {', '.join(unknown)} not found; this run has {', '.join(policies)}")
        policies = {name: policies[name] for name in args.policy}
    record = _read_json(run_dir / "run_record.json") if run_dir else {}
    cfg = OmegaConf.load(run_dir / "resolved_config.yaml") if run_dir and (run_dir / "resolved_config.yaml").is_file() \
        else None
    first = next(iter(policies.values()))
    base = args.base or record.get("inputs", {}).get("sft_model") or _read_json(first / "marl_exp_base.json").get(
        "base_model") or _read_json(first / "adapter_config.json").get("base_model_name_or_path")
    if not base:
        raise SampleError(f"no base model recorded for {args.path!r}; give it with --base <model dir or hub id>")
    reward = args.reward_adapter or record.get("inputs", {}).get("reward_adapter")
    return {"policies": policies, "base": base, "reward_adapter": reward, "cfg": cfg, "run_dir": run_dir,
            "rewards": run_reward_sources(cfg, reward)}


def run_reward_sources(cfg: DictConfig | None, reward_adapter: str | None) -> list[RewardSource] | None:
    """The reward the run trained on (its ``stage.rewards``); without a run config, the reward adapter given
    alone; None when there is no reward."""
    if cfg is not None and cfg.get("stage", {}).get("name") in RL_STAGES:
        sources = reward_sources(cfg.stage)
        upstream = [s.name for s in sources if s.upstream]
        if upstream and not reward_adapter:
            raise SampleError(f"reward source(s) {', '.join(upstream)} of this run read the upstream reward adapter, "
                              "which the run does not record; give it with --reward-adapter")
        return sources
    return [RewardSource("reward", 1.0)] if reward_adapter else None


def no_reward(prompts, completions) -> list[float]:
    """``NO_REWARD``'s function: 0 for every completion."""
    return [0.0] * len(completions)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def sampling_config(cfg: DictConfig | None, args: argparse.Namespace) -> DictConfig:
    """The run's sampling and KL settings in a PPO stage config (current defaults for keys it lacks), with
    the command line's overrides. A run recorded before the stage config had headings holds them flat."""
    stage = OmegaConf.structured(PPOStageConfig)
    if cfg is not None and cfg.get("stage", {}).get("name") in RL_STAGES:
        recorded = OmegaConf.to_container(cfg.stage, resolve=True)
        for section in ("sampling", "kl"):
            given = recorded.get(section, recorded)
            stage[section] = OmegaConf.merge(stage[section], {k: v for k, v in given.items() if k in stage[section]})
    for key in ("max_new_tokens", "temperature", "top_k", "top_p"):
        if getattr(args, key) is not None:
            stage.sampling[key] = getattr(args, key)
    stage.sampling.min_new_tokens = min(stage.sampling.min_new_tokens, stage.sampling.max_new_tokens)
    return stage


# ------------------------------------------------------------------------------------------ models
class AdaptersOff:
    """The reference for ``rl.rollout.sample``: the model's own ``generate`` with every adapter disabled
    (peft's ``disable_adapter``), so both roles sample through exactly the same code."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def generate(self, input_ids, attention_mask, adapter: str | None = None, **kwargs):
        if adapter is not None and adapter != self.model.active_policy:
            self.model.activate_policy(adapter)  # outside the disabled block: no adapter switch happens inside it
        with self.model.peft_model.disable_adapter():
            return self.model.generate(input_ids, attention_mask, adapter=adapter, **kwargs)


def load(sources: dict[str, Any], device_name: str):
    """(MultiAdapterModel, tokenizer) with every policy and every reward adapter of the run's reward."""
    from marl_exp.modeling.loading import load_model, load_tokenizer, resolve_device
    from marl_exp.modeling.multi_adapter import MultiAdapterModel, reward_adapter_pad_token_id

    cfg = sources["cfg"]
    model_cfg = cfg.model if cfg is not None else None
    quant_cfg = cfg.quant if cfg is not None else OmegaConf.structured(QuantConfig)
    device = resolve_device(device_name)
    tokenizer = load_tokenizer(sources["base"], model_cfg)
    base = load_model(sources["base"], model_cfg, quant_cfg, device)
    names = list(sources["policies"])
    stage = cfg.stage if cfg is not None and cfg.stage.get("name") in RL_STAGES else {}
    allow_mismatch = bool(stage.get("allow_base_mismatch", False))
    adapters = reward_adapters(sources)
    primary = adapters.pop("reward", (None, None))
    model = MultiAdapterModel.build(
        base, policy_name=names[0], policy_adapter=str(sources["policies"][names[0]]), reward_adapter=primary[0],
        reward_label_index=primary[1], base_path=sources["base"], allow_base_mismatch=allow_mismatch)
    for name in names[1:]:
        model.add_policy(name, adapter_dir=str(sources["policies"][name]))
    for adapter_name, (path, label) in adapters.items():  # as the RL stage adds them (rl_models.build_roles)
        pad = reward_adapter_pad_token_id(path)
        model.add_reward_adapter(adapter_name, path, label, tokenizer.pad_token_id if pad is None else pad,
                                 base_path=sources["base"], allow_base_mismatch=allow_mismatch)
    model.eval()
    return model, tokenizer


def reward_adapters(sources: dict[str, Any]) -> dict[str, tuple[str, int | None]]:
    """The model's reward adapter name -> (path, label index) for each adapter source of the run's reward."""
    from marl_exp.config import reward_adapter_names

    rewards = sources.get("rewards") or []
    names = reward_adapter_names(rewards)
    return {names[s.name]: (s.adapter or sources["reward_adapter"], s.label_index) for s in rewards
            if s.function is None}


def scoring_roles(model, rewards: list[RewardSource] | None):
    """The roles ``rl.rollout.score`` reads: the model, and the run's reward sources (``NO_REWARD`` without)."""
    from marl_exp.rl.reward_sources import RewardSources
    from marl_exp.rl.roles import SharedRoles

    return SharedRoles(model, RewardSources(rewards or [NO_REWARD]))


# ---------------------------------------------------------------------------------------- sampling
def sample_side_by_side(model, tokenizer, prompts: list[str], policy: str, stage: DictConfig, seed: int,
                        oracle=None, roles=None) -> list[dict]:
    """One response per prompt from ``policy`` and from the reference, on the same random stream. With
    ``roles`` (``scoring_roles``) each is scored as the run's evaluation scores it: its reward (the weighted
    sum of the run's sources) and each source's score as ``rewards/<name>``, and the policy's KL to the
    reference; and the oracle's score where there is one."""
    import torch

    from marl_exp.rl.functional import masked_sum
    from marl_exp.rl.evaluate import source_columns
    from marl_exp.rl.rollout import response_texts, sample, score

    rows = []
    model.activate_policy(policy)
    rewarded = roles is not None and roles.reward_sources.sources != [NO_REWARD]
    for role, sampler in (("reference", AdaptersOff(model)), ("policy", model)):
        torch.manual_seed(seed)
        rollout = sample(sampler, tokenizer, prompts, policy, stage)
        rewards, kls = [None] * len(prompts), [None] * len(prompts)
        if roles is not None:
            rollout = score(roles, rollout, policy, "none", stage, tokenizer)
            rewards = rollout.raw_scores.tolist() if rewarded else rewards
            # KL(π‖π_ref) of the whole response: the sampled log-ratio sum (nats), as the evaluation estimates it.
            kls = masked_sum(rollout.logprobs - rollout.ref_logprobs, rollout.response_mask, dim=1).tolist()
        responses = response_texts(tokenizer, rollout)  # prompt + response: as the tokenizer writes them together
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            tokens = rollout.response_ids[i][rollout.response_mask[i].bool()].tolist()
            rows.append({"policy": policy, "role": role, "prompt": prompt, "response": response, "response_ids": tokens,
                         "reward": rewards[i], **(source_columns(rollout, i) if rewarded else {}),
                         "kl": kls[i] if role == "policy" else None,
                         "oracle": oracle(prompt + response) if oracle is not None else None})
    return rows


def table(rows: list[dict], header: str) -> str:
    lines = [header]
    by_prompt: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_prompt.setdefault((row["policy"], row["prompt"]), []).append(row)
    width = min(72, max((len(r["response"].strip()) for r in rows), default=0))
    for i, ((policy, prompt), pair) in enumerate(by_prompt.items(), 1):
        lines.append(f"[{i}] {prompt!r}")
        for row in pair:
            label = "reference" if row["role"] == "reference" else policy
            text = row["response"].strip().replace("\n", " ")
            text = text if len(text) <= width else text[:width - 1] + "…"
            lines.append(f"    {label:<12} {text:<{width}}  {_scores(row)}")
    for policy in dict.fromkeys(r["policy"] for r in rows):
        parts = []
        for role in ("reference", "policy"):
            chosen = [r for r in rows if r["policy"] == policy and r["role"] == role]
            parts.append(f"{'reference' if role == 'reference' else policy}: {_scores(_mean(chosen))}")
        lines.append(f"mean over {len(chosen)} prompts | " + " | ".join(parts))
    return "\n".join(lines)


def _mean(rows: list[dict]) -> dict:
    out = {}
    for key in ("reward", *_source_keys(rows), "oracle", "kl"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def _source_keys(rows: list[dict]) -> list[str]:
    return [key for key in dict.fromkeys(k for row in rows for k in row) if key.startswith("rewards/")]


def _scores(row: dict) -> str:
    """``reward +1.23 [rm +0.23, great +2.00]  oracle 0.50  KL 0.12``: the weighted reward, each source's score."""
    parts = []
    if row.get("reward") is not None:
        sources = [f"{key.removeprefix('rewards/')} {row[key]:+.2f}" for key in _source_keys([row])
                   if row[key] is not None]
        parts.append(f"reward {row['reward']:+.2f}" + (f" [{', '.join(sources)}]" if sources else ""))
    parts += [f"{name} {row[key]:.2f}" for key, name in (("oracle", "oracle"), ("kl", "KL"))
              if row.get(key) is not None]
    return "  ".join(parts)


def reward_description(sources: dict[str, Any]) -> str:
    """``reward = 1 × rm + 0.5 × great (rm: <adapter>, great: mod:fn)``, or that there is none."""
    rewards = sources["rewards"]
    if not rewards:
        return "no reward (KL only)"
    terms = " + ".join(f"{s.weight:g} × {s.name}" for s in rewards).replace("+ -", "- ")
    what = ", ".join(f"{s.name}: {s.function or s.adapter or sources['reward_adapter']}" for s in rewards)
    return f"reward = {terms} ({what})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console.quiet_libraries()
    with console.progress_as_lines():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        sources = resolve(args)
        stage = sampling_config(sources["cfg"], args)
        if args.num_prompts < 1:
            raise SampleError(f"--num-prompts={args.num_prompts} must be >= 1")
    except SampleError as err:
        print(f"marl-exp: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    cfg = sources["cfg"]
    data = cfg.data if cfg is not None else None
    oracle = None
    if data is None or data.name == "reviews":
        from marl_exp.data.reviews import oracle_score

        oracle = oracle_score
    prompts = args.prompts
    if not prompts:
        if data is None:
            print("marl-exp: error: no run config to take prompts from; give them with --prompts", file=sys.stderr)
            return USAGE_ERROR
        from marl_exp.data import build_task

        prompts = build_task(data).prompts_eval[:args.num_prompts]
    from marl_exp.modeling.loading import ModelLoadError

    try:
        model, tokenizer = load(sources, args.device)
        roles = scoring_roles(model, sources["rewards"])
    except (ModelLoadError, ValueError) as err:  # a missing base or reward function (ConfigError), a misfit adapter
        print(f"marl-exp: error: {' '.join(str(err).split())}", file=sys.stderr)
        return USAGE_ERROR
    rows = []
    for policy in sources["policies"]:
        rows += sample_side_by_side(model, tokenizer, prompts, policy, stage, args.seed, oracle, roles)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = (f"marl-exp sample: {args.path} | base {sources['base']} | {reward_description(sources)} | "
              "reference = adapters off | "
              f"seed {args.seed}, temperature {stage.sampling.temperature:g}, max {stage.sampling.max_new_tokens} new tokens")
    print(table(rows, header))
    return 0
