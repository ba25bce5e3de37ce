"""Peer benchmark: marl-exp's PPO step against TRL 0.11.4's ``PPOTrainer`` doing the same work.

TRL 0.11.4 is the last TRL with the classic ``PPOTrainer`` + ``AutoModelForCausalLMWithValueHead`` and its
``reward_adapter`` (multi-adapter RL: policy, reference and reward on one base, as marl-exp). Both train a LoRA
policy with a value head against the same reward adapter on the same base:

* **marl-exp** (``stage=ppo``, ``stage.critic=value_head``): one base; policy = LoRA adapter + value head,
  reference = adapters disabled, reward = the reward adapter with its score head (``stages.rl_models.build_roles``,
  ``RLTrainer``).
* **TRL 0.11.4**: ``AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=LoraConfig(...),
  reward_adapter=reward_dir)``, ``PPOTrainer(config, model, ref_model=None, tokenizer)`` (with a peft model the
  reference is the same model with adapters disabled), then per step as its docs' multi-adapter example:
  ``ppo_trainer.generate`` → ``model.compute_reward_score`` (the score at the last token) → ``ppo_trainer.step``.

TRL 0.11.4 needs transformers 4.46 and peft 0.13, so its worker runs in a venv of its own that this script builds
(``--build-venv``; default ``~/.cache/marl-exp/venv-trl-0.11.4``, or ``$MARL_EXP_TRL_VENV``, or ``--trl-venv``):
``TRL_VENV_PACKAGES`` plus the driver's own torch build (the same torch on both sides). The models are saved by
transformers 5 / peft 0.21; the TRL worker reads them through a temporary copy (links to the weights) that
transformers 4.46 and peft 0.13 understand: ``rope_parameters`` -> ``rope_theta``, the tokenizer class
``TokenizersBackend`` -> ``PreTrainedTokenizerFast``, and the reward adapter's config without the keys peft 0.13
does not know (all unused, see ``legacy_adapter_dir``); it then checks that every LoRA weight of the reward adapter
and its score head arrived (``check_reward_adapter``). The model cache is never changed.

Same work per step (checked, ``same_work``; a mismatch exits 1): ``--batch`` queries, the same prompts on both
sides (``common.prompts()`` drawn by ``random.Random(seed)`` as marl-exp draws them: same prompt tokens), one
response each of exactly ``--new-tokens`` tokens (``min_new_tokens = max_new_tokens``, top_k 0, top_p 1,
temperature 1); scoring = 3 forward passes: the policy's old log-probs and values, the reference's log-probs
(adapters disabled), the reward adapter's score of query + response + EOS (marl-exp's ``rollout.reward_inputs``:
the text as the reward trainer saw it; the TRL worker builds the same ids, left-padded); then ``--ppo-epochs``
epochs over ``batch / mini_batch`` shuffled mini-batches, one optimizer step each (counted on both sides by an
optimizer hook); no early stop (marl-exp ``early_stop_kl=null``, TRL ``early_stopping=False``), fixed KL
coefficient (adaptive off on both), same LoRA (marl-exp's ``adapter`` group, ``adapter.output_layer=false``:
peft's all-linear), Adam(W, no decay) at the same constant learning rate (small: marl-exp's ratio guard and TRL's
ratio threshold skip nothing), gradient clipping at 1.0 on both, same clip ranges, ``vf_coef``, gamma, lambda,
advantage whitening; fp32 on the CPU, dropout off (TRL's value head dropout set to 0), no gradient
checkpointing. Defaults follow TRL 0.11.4's ``PPOConfig`` conventions: ``mini_batch_size = batch_size`` (its
defaults are 128 and 128) and 4 PPO epochs (both frameworks' default): 4 optimizer steps per step.

Differences that remain, by design of each framework: TRL's forward passes compute the logits of every position
(prompt included) and, in the update, keep them for the entropy over the whole vocabulary; its reward pass runs
the LM head too (``compute_reward_score`` reads the last hidden state of a causal-LM forward). marl-exp computes
the logits of the response window only and scores the reward with the score head alone. These are the costs
being compared, not a difference in the work. TRL 0.11.4 keeps the trainable parameters for gradient clipping in
a ``filter`` iterator that is empty after the first update (only the first update of a run would be clipped);
the worker stores them as a list, so every update clips as in marl-exp (a one-line fix in the user's code, TRL
is not changed).

Each framework runs in its own process (its own venv for TRL), the two in lock step: the driver lets one process
run one step while the other waits, alternating which goes first (A B, B A, ...). Measured: step time (median over
``--steps`` after ``--warmup``; the median and quartiles of the per-round ratio marl-exp ÷ TRL, which cancels slow
drifts of a shared machine), split into sample (tokenize + generate) / score (policy + reference passes, reward
pass, KL rewards and advantages) / update (the epochs); TRL's own ``time/ppo/*`` timings and marl-exp's
``time/*`` stats are kept in the JSON. Memory (peak RSS above the RSS after imports, per phase) as in
``trl_peer.py``; it is secondary here (the venvs' libraries differ).

    python bench/trl_ppo_peer.py --build-venv     # once: the TRL 0.11.4 venv (~1.5 GB; 1-3 min with pip's cache)
    python bench/trl_ppo_peer.py                  # tiny, 2 warm-up + 10 timed rounds, 1 thread: ~1 min
    python bench/trl_ppo_peer.py --sizes smollm2 --new-tokens 40 --threads 2 --warmup 1 --steps 6 \\
        --out bench/results/trl_ppo_peer-smollm2.json   # the real SmolLM2-135M: ~10-15 min (estimated from
                                                        # trl_peer-smollm2.json's phase times, not yet run)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Module-level imports stay within the standard library and the two bench modules below (whose own module-level
# imports are standard library only): the TRL worker imports this file in the TRL 0.11.4 venv, without marl_exp.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import trl_peer  # noqa: E402  (emit, await_go, ready, finish, PhasePeaks, Worker: the GRPO peer's protocol)

FRAMEWORKS = ("marl-exp", "trl")
LABELS = {"marl-exp": "marl-exp", "trl": "TRL 0.11.4"}
TARGET_TIME = 0.7  # marl-exp ÷ TRL 0.11.4 step time
TRL_VERSION = "0.11.4"
# The TRL 0.11.4 venv: the newest releases of its time that it works with (plus the driver's torch, pinned at build).
# rich: TRL 0.11.4 imports it (trl.trainer.utils) without declaring it.
TRL_VENV_PACKAGES = (f"trl=={TRL_VERSION}", "transformers==4.46.3", "peft==0.13.2", "accelerate==1.1.1",
                     "datasets==3.1.0", "rich")
VENV_MARKER = "marl-exp-trl-venv.json"  # written last by a complete build
DEFAULT_STEPS = {"tiny": (2, 10), "smollm2": (1, 6)}  # warm-up, timed rounds; other sizes: (1, 4)


@dataclass(frozen=True)
class Work:
    """What one step does, the same in both frameworks."""

    batch: int = 16  # queries per step, one response each
    mini_batch_size: int = 16  # TRL 0.11.4's convention: = batch_size (its defaults 128, 128)
    ppo_epochs: int = 4
    new_tokens: int = 16  # every response exactly this long (min = max)
    learning_rate: float = 1e-5  # small: no update is skipped by either ratio guard
    kl_coef: float = 0.2  # fixed (TRL's init_kl_coef default); adaptive control off on both
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    ratio_threshold: float = 10.0
    temperature: float = 1.0
    seed: int = 0

    @property
    def optimizer_steps(self) -> int:
        return self.ppo_epochs * math.ceil(self.batch / self.mini_batch_size)


# --------------------------------------------------------------------------------------------- the TRL venv
def default_trl_venv() -> Path:
    """``$MARL_EXP_TRL_VENV``, else ``~/.cache/marl-exp/venv-trl-0.11.4`` (not under ``$MARL_EXP_CACHE``: the test
    suite points that at a fresh dir, and the venv takes minutes to build)."""
    return Path(os.environ.get("MARL_EXP_TRL_VENV", Path.home() / ".cache" / "marl-exp" / f"venv-trl-{TRL_VERSION}"))


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def venv_packages() -> list[str]:
    """What the venv installs: ``TRL_VENV_PACKAGES`` and the driver's torch (same build on both sides)."""
    from importlib.metadata import version

    return [*TRL_VENV_PACKAGES, f"torch=={version('torch')}"]


def venv_ready(venv: Path) -> bool:
    """Built completely, with the packages this version of the script asks for."""
    marker = Path(venv) / VENV_MARKER
    if not marker.exists() or not venv_python(venv).exists():
        return False
    try:
        return sorted(json.loads(marker.read_text())["requested"]) == sorted(venv_packages())
    except (ValueError, KeyError):
        return False


def build_venv(venv: Path, progress=print) -> dict:
    """Create the TRL 0.11.4 venv at ``venv`` with ``python -m venv`` and pip (again if incomplete or outdated);
    returns the versions installed."""
    venv = Path(venv)
    if venv_ready(venv):
        return json.loads((venv / VENV_MARKER).read_text())
    packages = venv_packages()
    if venv.exists():
        shutil.rmtree(venv)
    progress(f"trl_ppo_peer: building the TRL {TRL_VERSION} venv at {venv}: {' '.join(packages)}")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv_python(venv))
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *packages], check=True)
    names = ("trl", "transformers", "peft", "torch", "accelerate", "datasets", "tokenizers", "numpy", "safetensors")
    code = ("import json, importlib.metadata as m; "
            f"print(json.dumps({{n: m.version(n) for n in {names!r}}}))")
    installed = json.loads(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout)
    record = {"requested": packages, "installed": installed}
    (venv / VENV_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    progress(f"trl_ppo_peer: built {venv}: " + ", ".join(f"{k} {v}" for k, v in installed.items()))
    return record


# ------------------------------------------------------------------------------ models for transformers 4.46
def legacy_base_dir(base: Path, target: Path) -> tuple[Path, list[str]]:
    """``base`` (saved by transformers 5) as transformers 4.46 reads it, at ``target``: links to the weights and
    other files; ``config.json`` and ``tokenizer_config.json`` rewritten. Returns (dir, what was converted)."""
    base, target = Path(base), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    rewritten = ("config.json", "tokenizer_config.json")
    for item in base.iterdir():
        if item.name not in rewritten:
            (target / item.name).symlink_to(item.resolve())
    notes = []
    config = json.loads((base / "config.json").read_text())
    rope = config.pop("rope_parameters", None)
    if isinstance(rope, dict):
        rope = dict(rope)
        config["rope_theta"] = rope.pop("rope_theta", 10000.0)
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
        notes.append(f"config: rope_parameters -> rope_theta={config['rope_theta']}"
                     + (f", rope_scaling={rope}" if "rope_scaling" in config else ""))
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config.pop("dtype")
        notes.append("config: dtype -> torch_dtype")
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = json.loads((base / "tokenizer_config.json").read_text())
    if tokenizer.get("tokenizer_class") in (None, "TokenizersBackend"):
        notes.append(f"tokenizer_config: tokenizer_class {tokenizer.get('tokenizer_class')} -> PreTrainedTokenizerFast "
                     "(the same tokenizer.json)")
        tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("backend", "is_local", "local_files_only"):  # transformers 5's own; 4.46 would keep them as kwargs
        tokenizer.pop(key, None)
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2))
    return target, notes


def legacy_adapter_dir(adapter: Path, target: Path, known_keys: set[str]) -> tuple[Path, list[str]]:
    """The reward adapter (saved by peft 0.21) as peft 0.13 reads it: ``adapter_config.json`` without the keys
    its ``LoraConfig`` does not know (``known_keys``), the weights linked. Returns (dir, what was dropped)."""
    adapter, target = Path(adapter), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for item in adapter.iterdir():
        if item.name != "adapter_config.json":
            (target / item.name).symlink_to(item.resolve())
    config = json.loads((adapter / "adapter_config.json").read_text())
    dropped = {k: v for k, v in config.items() if k not in known_keys}
    (target / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k in known_keys},
                                                           indent=2))
    notes = []
    if dropped:
        notes.append("reward adapter_config: dropped keys peft 0.13 does not know: "
                     + ", ".join(f"{k}={v!r}" for k, v in sorted(dropped.items())))
    return target, notes


def check_reward_adapter(pretrained_model, score, adapter_dir: Path, adapter_name: str) -> int:
    """Every LoRA tensor of the reward adapter's file and its score head, as loaded (peft 0.13 ignores keys it
    cannot place, which would leave the adapter at its init silently). Returns how many tensors were compared."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    params = dict(pretrained_model.named_parameters())
    compared = 0
    for key, tensor in saved.items():
        if ".lora_" in key:
            # base_model.model.<path>.lora_A.weight -> base_model.model.<path>.lora_A.<adapter>.weight
            stem, leaf = key.rsplit(".", 1)
            loaded = params.get(f"{stem}.{adapter_name}.{leaf}")
        elif key.rsplit(".", 2)[-2] == "score":
            loaded = getattr(score, key.rsplit(".", 1)[-1])
        else:
            continue
        if loaded is None or not torch.equal(loaded.detach().float().cpu(), tensor.float()):
            raise RuntimeError(f"TRL {TRL_VERSION} did not load the reward adapter's {key} as saved")
        compared += 1
    if compared == 0:
        raise RuntimeError(f"no LoRA weights found in {adapter_dir}")
    return compared


def left_padded_reward_inputs(queries, responses, eos_token_id: int, pad_token_id: int):
    """query + response + EOS (unless the response ends in it), as marl-exp's ``rollout.reward_inputs`` gives the
    reward adapter, left-padded so the last column is every row's last token; returns ids, mask, positions."""
    import torch

    rows = []
    for query, response in zip(queries, responses):
        ids = torch.cat([query, response])
        if int(ids[-1]) != eos_token_id:
            ids = torch.cat([ids, ids.new_tensor([eos_token_id])])
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = ids
        mask[i, width - len(ids):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, mask, positions


# ------------------------------------------------------------------------------------------------- workers
class Calls:
    """Times and counts calls of wrapped functions, by name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds, self.count = {}, {}

    def wrap(self, name: str, fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
                self.count[name] = self.count.get(name, 0) + 1
        return wrapper


def count_optimizer_steps(optimizer) -> list[int]:
    """A one-element counter that the optimizer's steps increase (torch's step post-hook)."""
    counter = [0]
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's

    def hook(*_):
        counter[0] += 1

    inner.register_step_post_hook(hook)
    return counter


def param_dtypes(model) -> list[str]:
    return sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})


def marl_config(base: Path, reward: Path, work: Work):
    return common.compose(
        # adapter.output_layer=false: TRL's LoRA (peft's all-linear) leaves the output layer out; so does ours here.
        "stage=ppo", "logger=none", f"model.path={base}", "adapter.output_layer=false", "quant=fp32", "device=cpu",
        f"seed={work.seed}", f"stage.sft_model={base}", f"stage.reward_adapter={reward}", "stage.critic=value_head",
        f"stage.batch_size={work.batch}", f"stage.optim.mini_batch_size={work.mini_batch_size}",
        "stage.optim.gradient_accumulation_steps=1", f"stage.optim.ppo_epochs={work.ppo_epochs}",
        "stage.optim.early_stop_kl=null", f"stage.optim.learning_rate={work.learning_rate}",
        "stage.optim.lr_scheduler=constant", "stage.optim.weight_decay=0.0", "stage.optim.optimizer=adamw",
        f"stage.optim.max_grad_norm={work.max_grad_norm}", f"stage.optim.ratio_threshold={work.ratio_threshold}",
        f"stage.sampling.max_new_tokens={work.new_tokens}", f"stage.sampling.min_new_tokens={work.new_tokens}",
        f"stage.sampling.temperature={work.temperature}", "stage.sampling.top_k=0", "stage.sampling.top_p=1.0",
        "stage.kl.adaptive_kl=false", f"stage.kl.init_kl_coef={work.kl_coef}", "stage.kl.kl_penalty=kl",
        "stage.kl.kl_estimator=k1", "stage.scores.whiten_scores=false", "stage.scores.score_scale=1.0",
        f"stage.advantages.gamma={work.gamma}", f"stage.advantages.lam={work.lam}",
        "stage.advantages.whiten_advantages=true", f"stage.loss.cliprange={work.cliprange}",
        f"stage.loss.cliprange_value={work.cliprange_value}", f"stage.loss.vf_coef={work.vf_coef}",
        "stage.loss.entropy_coef=0.0", "stage.runtime.disable_dropout=true",
        "stage.runtime.gradient_checkpointing=false", "stage.runtime.fused_scoring=false")


def marl_worker(spec: dict) -> None:
    """marl-exp's PPO stage: roles and trainer as ``stages.rl_models`` builds them, then ``spec['steps']`` steps."""
    import torch

    import memory
    from marl_exp.modeling.loading import load_tokenizer
    from marl_exp.rl import trainer as trainer_module
    from marl_exp.stages.rl_models import build_roles, make_trainer

    work, base, reward = Work(**spec["work"]), Path(spec["base"]), Path(spec["reward"])
    cfg = marl_config(base, reward, work)
    common.release_memory()
    baseline = common.rss_mib()
    common.quiet()
    tokenizer = load_tokenizer(str(base))
    roles = build_roles(cfg, str(base), str(reward), torch.device("cpu"), tokenizer)
    roles.model.train(not cfg.stage.runtime.disable_dropout)
    trainer = make_trainer(cfg.stage, roles, tokenizer, spec["prompts"], seed=work.seed)
    torch.manual_seed(work.seed)
    common.materialize_weights(roles.model)
    trl_peer.ready(baseline, base_params=memory.base_parameter_count(roles.model),
                   model_bytes=common.tensor_bytes(roles.model), precision=param_dtypes(roles.model),
                   versions=versions(), conversions=[])

    peaks = trl_peer.PhasePeaks(baseline)
    trainer_module.sample = peaks.after("sample", trainer_module.sample)
    trainer._update = peaks.after("update", peaks.before("score", trainer._update))
    calls = Calls()  # the scoring passes, by role
    for name in ("policy_outputs", "reference_logits", "reward_scores"):
        setattr(roles, name, calls.wrap(name, getattr(roles, name)))
    if hasattr(roles.model, "score_roles"):  # the fused pass (stage.runtime.fused_scoring): one pass for all roles
        roles.model.score_roles = calls.wrap("fused", roles.model.score_roles)
    optimizer_steps = count_optimizer_steps(trainer.policies[cfg.stage.policies[0]].optimizer)
    for _ in range(spec["steps"]):
        trl_peer.await_go()
        calls.reset()
        before = optimizer_steps[0]
        started = time.perf_counter()
        stats = trainer.step()
        seconds = time.perf_counter() - started
        rollout = trainer.last_rollouts[cfg.stage.policies[0]]
        steps_done = optimizer_steps[0] - before
        t = calls.seconds
        trl_peer.emit({
            "event": "step", "seconds": seconds, "sample": stats["time/rollout"], "score": stats["time/score"],
            "score_policy_reference": t.get("policy_outputs", 0.0) + t.get("reference_logits", 0.0),
            "score_reward": t.get("reward_scores", 0.0), "update": stats["time/optimize"],
            "tokens": int(rollout.response_mask.sum()), "prompt_tokens": int(rollout.query_mask.sum()),
            "optimizer_steps": steps_done, "skipped_updates": work.optimizer_steps - steps_done,
            "scoring_passes": sum(calls.count.values()), "kl": stats.get("objective/kl"),
            "native": {k: v for k, v in stats.items() if k.startswith("time/")}})
    trl_peer.await_go("finish")
    trl_peer.finish(peaks, trl_peer.optimizer_state_bytes(trainer.policies[cfg.stage.policies[0]].optimizer))


def trl_worker(spec: dict) -> None:
    """TRL 0.11.4's PPOTrainer as its multi-adapter docs set it up; runs in the TRL venv (torch, transformers,
    peft and trl only: no marl_exp, no hydra)."""
    import dataclasses
    import warnings

    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    work = Work(**spec["work"])
    common.release_memory()
    baseline = common.rss_mib()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # PPOTrainer's and PPOConfig's deprecation notes
    tmp = Path(tempfile.mkdtemp(prefix="trl_ppo_peer-"))
    try:
        base, notes = legacy_base_dir(Path(spec["base"]), tmp / "base")
        reward, reward_notes = legacy_adapter_dir(Path(spec["reward"]), tmp / "reward_adapter",
                                                  {f.name for f in dataclasses.fields(LoraConfig)})
        notes += reward_notes
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        torch.manual_seed(work.seed)
        lora = LoraConfig(task_type="CAUSAL_LM", **spec["lora"])
        reward_name = "reward_adapter"
        model = AutoModelForCausalLMWithValueHead.from_pretrained(
            str(base), torch_dtype=torch.float32, peft_config=lora, reward_adapter=str(reward),
            reward_adapter_name=reward_name, summary_dropout_prob=0.0)  # the value head's dropout (default 0.1) off
        checked = check_reward_adapter(model.pretrained_model, model.score, reward, reward_name)
        notes.append(f"reward adapter: all {checked} LoRA and score-head tensors loaded as saved (checked)")
        config = PPOConfig(
            seed=work.seed, log_with=None, batch_size=work.batch, mini_batch_size=work.mini_batch_size,
            gradient_accumulation_steps=1, ppo_epochs=work.ppo_epochs, learning_rate=work.learning_rate,
            adap_kl_ctrl=False, init_kl_coef=work.kl_coef, kl_penalty="kl", gamma=work.gamma, lam=work.lam,
            cliprange=work.cliprange, cliprange_value=work.cliprange_value, vf_coef=work.vf_coef,
            max_grad_norm=work.max_grad_norm, early_stopping=False, ratio_threshold=work.ratio_threshold,
            use_score_scaling=False, use_score_norm=False, score_clip=None, whiten_rewards=False,
            gradient_checkpointing=False, accelerator_kwargs={"cpu": True})
        trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # loaded: the links and configs are no longer read
    assert trainer.ref_model is None and trainer.is_peft_model, "TRL built a separate reference model"
    # TRL 0.11.4 keeps these in a filter iterator that its first clip_grad_norm_ exhausts: every later update
    # would go unclipped. As a list, every update clips (as marl-exp's).
    trainer.model_params = [p for p in trainer.model.parameters() if p.requires_grad]
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    common.materialize_weights(unwrapped)
    params = {id(p): (n, p) for n, p in unwrapped.named_parameters()}
    base_params = sum(p.numel() for n, p in params.values()
                      if "lora_" not in n and not n.startswith(("v_head.", "score.")))
    model_bytes = sum(t.numel() * t.element_size() for t in [p for _, p in params.values()] + list(unwrapped.buffers()))
    trl_peer.ready(baseline, base_params=base_params, model_bytes=model_bytes, precision=param_dtypes(unwrapped),
                   versions=versions(), conversions=notes)

    peaks = trl_peer.PhasePeaks(baseline)
    trainer.compute_advantages = peaks.after("score", trainer.compute_advantages)  # the end of scoring in ``step``
    calls = Calls()
    forward = trainer.batched_forward_pass

    def counted_forward(*args, **kwargs):
        if torch.is_grad_enabled():  # the update's forward
            return forward(*args, **kwargs)
        return calls.wrap("policy_reference", forward)(*args, **kwargs)  # scoring: the policy's, the reference's

    trainer.batched_forward_pass = counted_forward
    reward_score = calls.wrap("reward", unwrapped.compute_reward_score)
    optimizer_steps = count_optimizer_steps(trainer.optimizer)
    generation = {"do_sample": True, "min_new_tokens": work.new_tokens, "max_new_tokens": work.new_tokens,
                  "top_k": 0, "top_p": 1.0, "temperature": work.temperature, "pad_token_id": tokenizer.pad_token_id}
    prompt_rng = random.Random(work.seed)  # marl-exp's draw (RLTrainer._next_prompts): the same prompts each step
    for _ in range(spec["steps"]):
        trl_peer.await_go()
        calls.reset()
        before = optimizer_steps[0]
        started = time.perf_counter()
        prompts = [prompt_rng.choice(spec["prompts"]) for _ in range(work.batch)]
        queries = [tokenizer(p, return_tensors="pt").input_ids[0] for p in prompts]
        responses = trainer.generate(queries, return_prompt=False, batch_size=len(queries), **generation)
        sample = time.perf_counter() - started
        peaks.mark("sample")
        scored = time.perf_counter()
        ids, mask, positions = left_padded_reward_inputs(queries, responses, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id)
        scores = reward_score(input_ids=ids, attention_mask=mask, position_ids=positions)[:, -1, 0]
        reward_seconds = time.perf_counter() - scored
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = trainer.step(queries, responses, list(scores))
        seconds = time.perf_counter() - started
        peaks.mark("update")
        skipped = sum("exceeds threshold" in str(w.message) for w in caught)  # TRL zeroes such a loss, still steps
        steps_done = optimizer_steps[0] - before
        native = {k: float(v) for k, v in stats.items() if k.startswith("time/")}
        score = (reward_seconds + native["time/ppo/forward_pass"] + native["time/ppo/compute_rewards"]
                 + native["time/ppo/compute_advantages"])
        trl_peer.emit({
            "event": "step", "seconds": seconds, "sample": sample, "score": score,
            "score_policy_reference": calls.seconds.get("policy_reference", 0.0), "score_reward": reward_seconds,
            "update": native["time/ppo/optimize_step"],
            "tokens": int(sum(len(r) for r in responses)), "prompt_tokens": int(sum(len(q) for q in queries)),
            "optimizer_steps": steps_done, "skipped_updates": skipped,
            "scoring_passes": sum(calls.count.values()), "kl": float(stats["objective/kl"]),
            "native": {**native, "time/generate": sample, "time/compute_reward_score": reward_seconds}})
    trl_peer.await_go("finish")
    trl_peer.finish(peaks, trl_peer.optimizer_state_bytes(getattr(trainer.optimizer, "optimizer", trainer.optimizer)))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("trl", "transformers", "peft", "torch", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# -------------------------------------------------------------------------------------------------- driver
class Worker(trl_peer.Worker):
    """One framework's process (``python``: the venv it runs in), driven step by step over its stdin/stdout."""

    def __init__(self, framework: str, python: Path, spec_path: Path, threads: int):
        self.framework = framework
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"trl_ppo_peer-{framework}-", suffix=".log", delete=False)
        env = {**os.environ, **trl_peer.memory.MALLOC_ENV, "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        if framework == "trl":  # nothing of the driver's environment may leak into the other venv
            for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
                env.pop(var, None)
        cmd = [str(python), __file__, "--worker", framework, "--spec", str(spec_path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)


def build_spec(size: str, out: Path) -> None:
    """What both workers read: the model dirs (built on first use), the prompts, the LoRA config (marl-exp's
    ``adapter`` group as plain values: the TRL worker builds peft 0.13's ``LoraConfig`` from them)."""
    base, reward = common.model_dirs(size)
    lora = trl_peer.lora_config()
    targets = lora.target_modules
    spec = {"size": size, "base": str(base), "reward": str(reward), "prompts": common.prompts(),
            "lora": {"r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout, "bias": lora.bias,
                     "target_modules": targets if isinstance(targets, str) else sorted(targets)}}
    common.write_json(out, spec)


def measure_size(size: str, work: Work, warmup: int, steps: int, threads: int, trl_python: Path,
                 progress=print) -> dict:
    """Both frameworks on ``size`` in lock step: ``warmup + steps`` rounds, alternating who goes first."""
    with tempfile.TemporaryDirectory(prefix="trl_ppo_peer-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        # Models built and prompts read in a process of their own: the driver holds no model.
        subprocess.run([sys.executable, __file__, "--build", "--sizes", size, "--spec", str(spec_path)], check=True)
        spec = json.loads(spec_path.read_text())
        common.write_json(spec_path, {**spec, "work": asdict(work), "steps": warmup + steps})
        pythons = {"marl-exp": Path(sys.executable), "trl": trl_python}
        workers = {}
        try:
            for fw in FRAMEWORKS:
                workers[fw] = Worker(fw, pythons[fw], spec_path, threads)
            out = {fw: {"load": w.read("ready"), "steps": []} for fw, w in workers.items()}
            for round_ in range(warmup + steps):
                order = FRAMEWORKS if round_ % 2 == 0 else tuple(reversed(FRAMEWORKS))
                records = {fw: workers[fw].step() for fw in order}
                if round_ >= warmup:
                    for fw in FRAMEWORKS:
                        out[fw]["steps"].append(records[fw])
                progress(f"  {size} round {round_ + 1}/{warmup + steps}" + ("" if round_ >= warmup else " (warm-up)")
                         + ": " + ", ".join(f"{LABELS[fw]} {records[fw]['seconds']:.2f} s" for fw in FRAMEWORKS))
            for fw, w in workers.items():
                w.send("finish")
                out[fw]["done"] = w.read("done")
        finally:
            for w in workers.values():
                w.close()
    return summarize_size(size, out, work)


def quartiles(values: list[float]) -> dict:
    q = sorted(values)
    return {"q1": q[len(q) // 4], "median": common.median(q), "q3": q[(3 * len(q)) // 4]}


PHASES = ("seconds", "sample", "score", "score_policy_reference", "score_reward", "update")


def summarize_size(size: str, out: dict, work: Work) -> dict:
    row = {"size": size}
    for fw in FRAMEWORKS:
        records = out[fw]["steps"]
        info = {k: v for record in (out[fw]["load"], out[fw]["done"]) for k, v in record.items() if k != "event"}
        native_keys = sorted({k for r in records for k in r.get("native", {})})
        row[fw] = {**info, "step": {k: common.median([r[k] for r in records]) for k in PHASES},
                   "native_median": {k: common.median([r["native"][k] for r in records if k in r["native"]])
                                     for k in native_keys},
                   "steps_timed": len(records),
                   "tokens_per_step": sorted({r["tokens"] for r in records}),
                   "prompt_tokens": [r["prompt_tokens"] for r in records],
                   "optimizer_steps_per_step": sorted({r["optimizer_steps"] for r in records}),
                   "skipped_updates": sum(r["skipped_updates"] for r in records),
                   "scoring_passes": sorted({r["scoring_passes"] for r in records}),
                   "kl": [r["kl"] for r in records],
                   "step_seconds_all": [r["seconds"] for r in records]}
    marl, trl = row["marl-exp"], row["trl"]
    paired = [a["seconds"] / b["seconds"] for a, b in zip(out["marl-exp"]["steps"], out["trl"]["steps"])]
    row["ratio"] = {
        "step_time_paired": quartiles(paired),
        "step_time_medians": marl["step"]["seconds"] / trl["step"]["seconds"],
        **{f"{phase}_time": marl["step"][phase] / trl["step"][phase] for phase in ("sample", "score", "update")
           if trl["step"][phase] > 0},
        "memory_steps_peak": marl["rss_steps_peak_above_baseline_mib"] / max(trl["rss_steps_peak_above_baseline_mib"],
                                                                              1e-9),
    }
    row["mismatches"] = work_mismatches(marl, trl, work)
    row["same_work"] = not row["mismatches"]
    return row


def work_mismatches(marl: dict, trl: dict, work: Work) -> list[str]:
    """What differs between the two sides' work (empty: the same work). ``marl``/``trl``: the per-framework rows."""
    problems = []
    tokens = [work.batch * work.new_tokens]
    for fw, r in (("marl-exp", marl), ("trl", trl)):
        if r["tokens_per_step"] != tokens:
            problems.append(f"{fw} generated {r['tokens_per_step']} tokens per step, not {tokens}")
        if r["optimizer_steps_per_step"] != [work.optimizer_steps]:
            problems.append(f"{fw} made {r['optimizer_steps_per_step']} optimizer steps per step, "
                            f"not {work.optimizer_steps}")
        if r["skipped_updates"]:
            problems.append(f"{fw} skipped {r['skipped_updates']} update(s) (ratio guard)")
        if any(kl is None for kl in r["kl"]):
            problems.append(f"{fw} reported no KL to the reference")
    if marl["prompt_tokens"] != trl["prompt_tokens"]:
        problems.append(f"prompt tokens per step differ: marl-exp {marl['prompt_tokens']}, TRL {trl['prompt_tokens']}")
    if marl["scoring_passes"] != trl["scoring_passes"]:
        problems.append(f"forward passes in scoring differ: marl-exp {marl['scoring_passes']}, "
                        f"TRL {trl['scoring_passes']}")
    if marl["precision"] != trl["precision"]:
        problems.append(f"precision differs: marl-exp {marl['precision']}, TRL {trl['precision']}")
    return problems


# -------------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    w = result["work"]
    lines = [f"{w['batch']} queries × 1 response of exactly {w['new_tokens']} tokens per step; "
             f"{w['ppo_epochs']} epochs × {w['batch'] // w['mini_batch_size']} mini-batch(es) of "
             f"{w['mini_batch_size']} "
             f"= {w['ppo_epochs'] * math.ceil(w['batch'] / w['mini_batch_size'])} optimizer steps; value-head critic, "
             f"fixed KL coefficient {w['kl_coef']}, learning rate {w['learning_rate']}, fp32 on the CPU, "
             f"{result['threads']} thread(s) per framework, each in its own process, in lock step. Times are medians "
             "over the timed steps; score = policy + reference passes, reward pass, KL rewards and advantages.", "",
             "| size | framework | step | sample | score (policy + ref · reward) | update | tokens / step "
             "| optimizer steps / step | scoring passes | precision | peak RSS over the steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["sizes"]:
        for fw in FRAMEWORKS:
            r, s = row[fw], row[fw]["step"]
            lines.append(f"| {row['size']} | {LABELS[fw]} | {s['seconds']:.3f} s | {s['sample']:.3f} s | "
                         f"{s['score']:.3f} s ({s['score_policy_reference']:.3f} · {s['score_reward']:.3f}) | "
                         f"{s['update']:.3f} s | {', '.join(str(t) for t in r['tokens_per_step'])} | "
                         f"{', '.join(str(t) for t in r['optimizer_steps_per_step'])} | "
                         f"{', '.join(str(t) for t in r['scoring_passes'])} | {', '.join(r['precision'])} | "
                         f"{r['rss_steps_peak_above_baseline_mib']:.0f} MiB |")
    lines += ["", f"| size | step time marl-exp ÷ TRL {TRL_VERSION}: paired median (quartiles) "
                  "| sample · score · update "
                  f"(ratio of medians) | same work | goal: time ≤ {TARGET_TIME} |", "|---|---|---|---|---|"]
    for row in result["sizes"]:
        r, p = row["ratio"], row["ratio"]["step_time_paired"]
        phases = " · ".join(f"{r[f'{ph}_time']:.2f}" if f"{ph}_time" in r else "—"
                            for ph in ("sample", "score", "update"))
        lines.append(f"| {row['size']} | {p['median']:.2f} ({p['q1']:.2f}–{p['q3']:.2f}) | {phases} | "
                     f"{'yes' if row['same_work'] else '**no**: ' + '; '.join(row['mismatches'])} | "
                     f"{'yes' if p['median'] <= TARGET_TIME else '**no**'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny"],
                        choices=[s for s, spec in common.SIZES.items() if not spec.weights_only])
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: 2 at tiny, 1 above)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed rounds (default: 10 at tiny, 6 at smollm2, 4 otherwise)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of each framework's process")
    parser.add_argument("--batch", type=int, default=Work.batch)
    parser.add_argument("--mini-batch-size", type=int, default=None, help="default: the batch (TRL 0.11.4's default)")
    parser.add_argument("--ppo-epochs", type=int, default=Work.ppo_epochs)
    parser.add_argument("--new-tokens", type=int, default=Work.new_tokens)
    parser.add_argument("--out", type=Path, default=common.RESULTS / "trl_ppo_peer.json")
    parser.add_argument("--trl-venv", type=Path, default=None,
                        help=f"the TRL {TRL_VERSION} venv (default: $MARL_EXP_TRL_VENV or "
                             f"~/.cache/marl-exp/venv-trl-{TRL_VERSION}); built on first use")
    parser.add_argument("--build-venv", action="store_true", help="build the TRL venv (if needed) and exit")
    # internal: one framework in this process, or building the models and the workers' spec
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    common.add_allow_dirty(parser)
    args = parser.parse_args(argv)

    if args.worker:
        import torch

        spec = json.loads(args.spec.read_text())
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        (marl_worker if args.worker == "marl-exp" else trl_worker)(spec)
        return 0
    if args.build:
        build_spec(args.sizes[0], args.spec)
        return 0
    venv = args.trl_venv or default_trl_venv()
    if args.build_venv:
        record = build_venv(venv)
        print(f"TRL {TRL_VERSION} venv at {venv}: " + ", ".join(f"{k} {v}" for k, v in record["installed"].items()))
        return 0
    common.refuse_dirty_publish(args.out, args.allow_dirty)
    build_venv(venv)  # nothing to do when it is there

    work = Work(batch=args.batch, mini_batch_size=args.mini_batch_size or args.batch, ppo_epochs=args.ppo_epochs,
                new_tokens=args.new_tokens)
    if work.batch % work.mini_batch_size:
        parser.error("--batch must be a multiple of --mini-batch-size (TRL 0.11.4 requires it)")
    started = time.perf_counter()
    rows = []
    for size in args.sizes:
        warmup, steps = DEFAULT_STEPS.get(size, (1, 4))
        warmup = warmup if args.warmup is None else args.warmup
        steps = steps if args.steps is None else args.steps
        print(f"trl_ppo_peer: {size}: {warmup} warm-up + {steps} timed rounds, marl-exp and TRL {TRL_VERSION} in "
              "lock step", flush=True)
        rows.append(measure_size(size, work, warmup, steps, args.threads, venv_python(venv)))
    machine = {**common.machine(), "torch_threads": args.threads}  # the workers' (the driver runs no model)
    venv_record = json.loads((Path(venv) / VENV_MARKER).read_text())
    result = {"work": asdict(work), "threads": args.threads, "sizes": rows,
              "versions": {"marl-exp": rows[0]["marl-exp"]["versions"], "trl": rows[0]["trl"]["versions"]},
              "trl_venv": {"path": str(venv), **venv_record},
              "conversions": {row["size"]: row["trl"]["conversions"] for row in rows},
              "machine": machine, "minutes": (time.perf_counter() - started) / 60}
    common.write_json(args.out, result)
    print("\n" + markdown(result) + f"\n\nwrote {args.out} ({result['minutes']:.1f} min)")
    return 0 if all(row["same_work"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
