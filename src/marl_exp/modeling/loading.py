"""Loading a base model and tokenizer from a hub id, a local directory or ``builtin:tiny``.

One code path for all three: the built-in model is materialised on disk first and then loaded with
``from_pretrained`` like any other checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from marl_exp.modeling.tiny import builtin_model_dir
# Re-exported for the model code: the provenance rules live without torch, so preflight applies them too.
from marl_exp.provenance import BUILTIN_PREFIX, fingerprint, local_model_dir, looks_local  # noqa: F401

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says which and how to fix it."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(device)


def resolve_model_path(model_cfg) -> str:
    """A loadable path or hub id for ``model.path`` (building a built-in model if needed)."""
    path = model_cfg.path
    if path == f"{BUILTIN_PREFIX}tiny":
        return str(builtin_model_dir(model_cfg.tiny))
    if path == f"{BUILTIN_PREFIX}smollm2":
        from marl_exp.modeling import gguf_import  # imported from its GGUF wheel on first use

        return str(gguf_import.smollm2_dir())
    if path.startswith(BUILTIN_PREFIX):
        raise ModelLoadError(f"model.path={path!r} is not a built-in model; they are 'builtin:tiny' and "
                             "'builtin:smollm2'")
    return path


def quantization_config(quant_cfg) -> BitsAndBytesConfig | None:
    if quant_cfg.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant_cfg.mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=quant_cfg.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=DTYPES[quant_cfg.bnb_4bit_compute_dtype],
        )
    return None


def weights_dtype(quant_cfg) -> torch.dtype:
    """dtype of the non-quantized weights (and of adapters/heads: they train in full precision)."""
    return torch.bfloat16 if quant_cfg.mode == "bf16" else torch.float32


def load_tokenizer(path: str, model_cfg=None) -> PreTrainedTokenizerBase:
    kwargs = _hub_kwargs(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_load_hint("tokenizer", path, err)) from err
    if tokenizer.pad_token is None:  # e.g. gpt2 and llama: pad with EOS, masked out everywhere
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def context_length(path: str, model_cfg=None) -> int | None:
    """Positions the model can attend over (None when its config does not say)."""
    try:
        config = AutoConfig.from_pretrained(path, **_hub_kwargs(model_cfg))
    except (OSError, ValueError) as err:
        raise ModelLoadError(_load_hint("model config", path, err)) from err
    return getattr(config, "max_position_embeddings", None)


def load_model(path: str, model_cfg, quant_cfg, device: torch.device, task: str = "causal-lm",
               num_labels: int = 1) -> PreTrainedModel:
    """Load the base for ``task`` = causal-lm or seq-cls, quantized as ``quant_cfg`` says."""
    auto = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}[task]
    kwargs = dict(_hub_kwargs(model_cfg), dtype=weights_dtype(quant_cfg))
    if task == "seq-cls":
        kwargs["num_labels"] = num_labels
    quant = quantization_config(quant_cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    try:
        model = auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:  # ValueError: e.g. a config of an unknown model type
        raise ModelLoadError(_load_hint("model", path, err)) from err
    if quant is None:
        model.to(device)
    else:
        keep_4bit_weights_differentiable(model)
    return model


def keep_4bit_weights_differentiable(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; undo it where it already happened.

    bitsandbytes >= 0.48 on a CPU with AVX512-BF16: the first eval-mode, no-grad forward of a
    ``Linear4bit`` rewrites its weight *in place* into an inference layout (absmax in bf16, not
    nested), and from then on every forward, in train mode too, uses ``gemv_4bit``, which has no
    autograd: backward silently gives no gradient through the base weights (only a UserWarning), and
    the outputs shift (~7e-3 on the tiny model). A rollout (generate, reward, reference: all eval and
    no-grad) would thus break every later PPO step. Returns the number of 4-bit layers seen.
    """
    seen = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        seen += 1
        module.support_avx512bf16_for_cpu = False  # bnb checks this before repacking
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            log.warning("a 4-bit layer had been repacked for CPU inference before the model was built; "
                        "unpacking it (its absmax statistics were rounded to bf16 by the repacking)")
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return seen


def _hub_kwargs(model_cfg) -> dict:
    if model_cfg is None:
        return {}
    return {
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "local_files_only": model_cfg.local_files_only,
    }


def _load_hint(what: str, path: str, err: Exception) -> str:
    """One line (it is the CLI's whole error message): what failed, why, and how to fix it."""
    reason = " ".join(str(err).split())  # library messages span several lines
    if Path(path).exists():
        return f"could not load the {what} from local path {path!r}: {type(err).__name__}: {reason}"
    if not isinstance(err, OSError):  # found, but not loadable (e.g. an unsupported architecture)
        return f"could not load the {what} {path!r}: {type(err).__name__}: {reason}"
    if looks_local(path):  # a filesystem path, not a hub id
        return f"could not load the {what}: {path!r} does not exist; give an existing model directory or a hub id"
    return (f"could not load the {what} {path!r}: it is not a local directory and not in the Hugging Face "
            f"cache, and the hub is unreachable or the id is wrong; on an offline machine download it first "
            f"(`hf download {path}`) or set model.path to a local directory ({type(err).__name__})")
