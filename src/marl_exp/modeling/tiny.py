"""The built-in tiny model: a random-init Llama and a byte-level BPE tokenizer trained on the reviews corpus.

Both are created deterministically on first use and saved with ``save_pretrained`` into a cache
directory keyed by their recipe; every later use loads them with ``from_pretrained``, so the tiny
model goes through exactly the loading code that serves hub ids and local paths.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from marl_exp.config import TinyArchConfig
from marl_exp.data.reviews import SUBJECTS, UNSEEN_SUBJECTS, ReviewGenerator, openings
from marl_exp.io import build_dir_atomically
from marl_exp.provenance import model_cache_root as cache_root  # the built-in models' dir, named so by its users

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
TOKENIZER_CORPUS_SIZE = 5000
RECIPE_VERSION = 2  # bump when the recipe changes so old caches are not reused


def builtin_model_dir(arch: TinyArchConfig) -> Path:
    """Directory of the built tiny model for this architecture; built on first call."""
    fields = asdict(arch) if is_dataclass(arch) else OmegaConf.to_container(arch)
    recipe = {"version": RECIPE_VERSION, **fields}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / f"tiny-llama-{key}"
    if not _complete(target):
        _build(arch, target)
    return target


def _complete(model_dir: Path) -> bool:
    return all((model_dir / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def _build(arch: TinyArchConfig, target: Path) -> None:
    def write(directory: Path) -> None:
        tokenizer = train_tokenizer(arch.vocab_size, model_max_length=arch.max_position_embeddings)
        tokenizer.save_pretrained(directory)
        _init_model(arch, tokenizer).save_pretrained(directory)

    build_dir_atomically(target, write, _complete)


def train_tokenizer(vocab_size: int, model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """Byte-level BPE on a fixed sample of reviews: lossless round trip, nearly one token per word.

    The sample opens with every subject, the unseen ones included: like a pretrained tokenizer, it knows
    every word of the task, and only the SFT corpus lacks the subjects held out from training.
    """
    generator = ReviewGenerator(seed=0, opening_pool=openings(SUBJECTS + UNSEEN_SUBJECTS))
    corpus = [generator.review().text for _ in range(TOKENIZER_CORPUS_SIZE)]
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    # Like Llama's tokenizer: every encoded text starts with BOS.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **SPECIAL_TOKENS)


def _init_model(arch: TinyArchConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed a private copy of the RNG: whether the model was cached must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(arch.init_seed)
        return LlamaForCausalLM(config)
