"""Offline model fixtures: a tiny random-init model of each common causal-LM family, in each tokenizer convention.

Researchers point marl-exp at GPT-2, Llama, Qwen, Mistral, Gemma, OPT, Pythia (GPT-NeoX) or Phi-3, whose
architectures and tokenizers differ in ways a PPO loop can get silently wrong: tied embeddings, learned
positions, dropout inside the decoder layer, logit soft-capping; no pad token, no BOS, several EOS ids,
sampling settings shipped in ``generation_config.json``. Each fixture here is built from the family's own
transformers config class with the family's defaults kept (sizes aside), saved with ``save_pretrained`` and
loaded back with ``from_pretrained``: the loading path of a hub checkpoint, without a download.

Two changes to a plain random init make the fixtures useful to statistical tests:

- A random model's next-token distribution is nearly uniform (entropy ~ log V), against which a sampling
  test has no power. The final norm's weight is scaled so that the mean entropy over review text is
  ``ENTROPY_TARGET`` nats; the weights are initialised with a larger spread (``INIT_RANGE``) so that the
  layers, not just the last token's embedding, decide the distribution (tied-embedding models would
  otherwise predict "repeat the last token").
- In the ``multi_eos`` convention the LM-head row of the end-of-turn token is fitted so that it has
  probability about ``EOT_PROB`` in review text and in the model's own samples: most sampled responses
  end at it within 16 tokens (it is far from uniform across contexts: a linear row cannot track softmax).

The weights are the same in every convention but ``multi_eos`` (its end-of-turn row), so a test can compare
conventions on one model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

from marl_exp.data.reviews import ReviewGenerator
from marl_exp.io import build_dir_atomically
from marl_exp.modeling.tiny import SPECIAL_TOKENS, TOKENIZER_CORPUS_SIZE, cache_root

FAMILIES = ("llama", "gpt2", "opt", "gpt_neox", "qwen2", "mistral", "gemma2", "phi3", "qwen3", "gemma3")
CONVENTIONS = ("own_pad", "pad_is_eos", "no_bos", "multi_eos", "gen_config")
RECIPE_VERSION = 1  # bump when the recipe changes so old caches are not reused

EOT_TOKEN = "<|eot|>"  # end of turn, like Llama 3's <|eot_id|>: in every vocabulary, a stop id in multi_eos
VOCAB_SIZE = 512  # BPE target; the reviews corpus saturates below it (483 tokens + the end-of-turn token)
MAX_POSITIONS = 128
INIT_SEED = 0
INIT_RANGE = 0.2  # std of the random init (transformers' default 0.02 leaves the layers nearly silent)
GEMMA_INIT_RANGE = 0.02  # Gemma scales embeddings by sqrt(hidden): a larger init would drown the layers
ENTROPY_TARGET = 2.5  # nats, mean over review positions; log V is ~6.2
EOT_PROB = 0.2  # multi_eos: probability of the end-of-turn token after a review prefix
CALIBRATION_SEED, CALIBRATION_REVIEWS = 1, 32  # held apart from the tokenizer corpus (seed 0)
BISECTION_STEPS = 14
SAMPLED_ROWS, SAMPLED_TOKENS = 32, 24  # multi_eos: the model's own text, also fitted on
FIXTURE_FILE = "marl_exp_fixture.json"  # recipe, family_info and the numbers measured at build time

# What hub chat models ship in generation_config.json; the gen_config convention carries exactly these.
HUB_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.3,
                "no_repeat_ngram_size": 2}
_LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FamilySpec:
    """How to build one family: its transformers classes and the config values that differ from theirs."""

    config_class: str
    model_class: str
    arch: dict  # sizes (in the family's own key names) and the few values a tiny model must set
    final_norm: str  # the norm before the LM head; its weight sets the logits' scale
    lora_targets: tuple[str, ...]  # every linear layer of a decoder layer (what all-linear picks)
    lora_targets_short: tuple[str, ...]  # the usual short choice (attention projections)
    dropout_keys: tuple[str, ...]  # config keys of the dropout the causal LM applies
    in_layer_dropout: bool = False  # a dropout with p > 0 applied inside the decoder layer
    dropout_follows_layer_mode: bool = False  # ... by the layer's own `training` flag (functional dropout)
    norm_offset: float = 0.0  # the norm multiplies by (offset + weight): Gemma's (1 + w)


_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_POSITIONS)

SPECS: dict[str, FamilySpec] = {
    # Llama 3 style: grouped-query attention, untied embeddings.
    "llama": FamilySpec(
        "LlamaConfig", "LlamaForCausalLM",
        dict(_SIZES, intermediate_size=128, num_key_value_heads=2, initializer_range=INIT_RANGE),
        "model.norm", _LLAMA_LINEAR, ("q_proj", "v_proj"), ("attention_dropout",)),
    # Conv1D layers, learned positions, tied embeddings, dropout 0.1 everywhere (the class defaults).
    "gpt2": FamilySpec(
        "GPT2Config", "GPT2LMHeadModel",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, initializer_range=INIT_RANGE),
        "transformer.ln_f", ("c_attn", "c_proj", "c_fc"), ("c_attn",),
        ("embd_pdrop", "attn_pdrop", "resid_pdrop"), in_layer_dropout=True),
    # Learned positions with OPT's offset of 2, tied embeddings, functional dropout 0.1 in the decoder layer.
    "opt": FamilySpec(
        "OPTConfig", "OPTForCausalLM",
        dict(_SIZES, ffn_dim=256, init_std=INIT_RANGE),
        "model.decoder.final_layer_norm", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        ("q_proj", "v_proj"), ("dropout", "attention_dropout"), in_layer_dropout=True,
        dropout_follows_layer_mode=True),
    # Pythia: fused QKV with bias, rotary on a quarter of each head, parallel residual (class defaults).
    "gpt_neox": FamilySpec(
        "GPTNeoXConfig", "GPTNeoXForCausalLM",
        dict(_SIZES, intermediate_size=256, initializer_range=INIT_RANGE),
        "gpt_neox.final_layer_norm", ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        ("query_key_value",), ("attention_dropout", "hidden_dropout")),
    # Qwen2/2.5 0.5B style: QKV biases, grouped-query attention, tied embeddings.
    "qwen2": FamilySpec(
        "Qwen2Config", "Qwen2ForCausalLM",
        dict(_SIZES, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True,
             initializer_range=INIT_RANGE),
        "model.norm", _LLAMA_LINEAR, ("q_proj", "v_proj"), ("attention_dropout",)),
    # Qwen3 8B style: q/k norms, explicit head_dim (the class default is 128), untied embeddings.
    "qwen3": FamilySpec(
        "Qwen3Config", "Qwen3ForCausalLM",
        dict(_SIZES, intermediate_size=128, num_key_value_heads=2, head_dim=16, initializer_range=INIT_RANGE),
        "model.norm", _LLAMA_LINEAR, ("q_proj", "v_proj"), ("attention_dropout",)),
    # Mistral 7B v0.1: sliding-window attention, its window (4096 of 32k positions) scaled down to one that
    # applies within a review; otherwise the same network as Llama.
    "mistral": FamilySpec(
        "MistralConfig", "MistralForCausalLM",
        dict(_SIZES, intermediate_size=128, num_key_value_heads=2, sliding_window=16, initializer_range=INIT_RANGE),
        "model.norm", _LLAMA_LINEAR, ("q_proj", "v_proj"), ("attention_dropout",)),
    # Final and attention logit soft-capping, sqrt(hidden) embedding scale, (1 + w) norms, tied embeddings,
    # alternating sliding-window layers (window half the context, as Gemma 2's 4096 of 8192).
    "gemma2": FamilySpec(
        "Gemma2Config", "Gemma2ForCausalLM",
        dict(_SIZES, intermediate_size=128, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
             sliding_window=MAX_POSITIONS // 2, initializer_range=GEMMA_INIT_RANGE),
        "model.norm", _LLAMA_LINEAR, ("q_proj", "v_proj"), ("attention_dropout",), norm_offset=1.0),
    "gemma3": FamilySpec(
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(_SIZES, intermediate_size=128, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
             sliding_window=MAX_POSITIONS // 2, initializer_range=GEMMA_INIT_RANGE),
        "model.norm", _LLAMA_LINEAR, ("q_proj", "v_proj"), ("attention_dropout",), norm_offset=1.0),
    # Fused qkv_proj and gate_up_proj; nn.Dropout modules on both residual branches and the embeddings.
    # The class defaults of resid_pdrop/embd_pdrop are 0.0; 0.1 (as Phi-1/Phi-2 ship) makes Phi-3 the
    # fixture for dropout held in submodules of the decoder layer, next to OPT's functional dropout.
    "phi3": FamilySpec(
        "Phi3Config", "Phi3ForCausalLM",
        dict(_SIZES, intermediate_size=128, original_max_position_embeddings=MAX_POSITIONS, resid_pdrop=0.1,
             embd_pdrop=0.1, initializer_range=INIT_RANGE),
        "model.norm", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), ("qkv_proj",),
        ("embd_pdrop", "resid_pdrop", "attention_dropout"), in_layer_dropout=True),
}


@dataclass(frozen=True)
class ConventionSpec:
    """A tokenizer / generation-config convention; the special-token set is the same in all of them."""

    adds_bos: bool = True  # the tokenizer prepends BOS to every encoding (Llama style)
    has_pad: bool = True  # the tokenizer has its own <pad> (else no pad token at all, as GPT-2 and Llama)
    eot_stops: bool = False  # generation_config.eos_token_id = [eos, eot] (Llama 3 style)
    sampling: dict = field(default_factory=dict)  # sampling settings in generation_config.json


CONVENTION_SPECS: dict[str, ConventionSpec] = {
    "own_pad": ConventionSpec(),
    "pad_is_eos": ConventionSpec(has_pad=False),
    "no_bos": ConventionSpec(adds_bos=False),
    "multi_eos": ConventionSpec(eot_stops=True),
    "gen_config": ConventionSpec(sampling=HUB_SAMPLING),
}


# --------------------------------------------------------------------------------------------- public API
def build_family_model(family: str, convention: str = "own_pad", root: Path | None = None) -> Path:
    """Directory of the fixture for ``family`` in ``convention``, built on first call.

    It holds config.json, model.safetensors, generation_config.json, the tokenizer files and
    marl_exp_fixture.json (the recipe, :func:`family_info` and the numbers measured at build time), and loads
    with ``AutoModelForCausalLM``, ``AutoModelForSequenceClassification`` and ``AutoTokenizer``.
    """
    recipe = _recipe(family, convention)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    target = Path(root if root is not None else cache_root() / "conformance") / f"{family}-{convention}-{key}"
    if not _complete(target):
        _build(family, convention, recipe, target)
    return target


def family_info(family: str, convention: str) -> dict:
    """What a test needs to know about a fixture, without building it.

    eos_token_ids lists every id generation stops at (generation_config's); eos_token_id is the tokenizer's
    and config.json's. pad_token_id is the tokenizer's (None in pad_is_eos). dropout maps the nonzero
    dropout probabilities of the causal LM's config to their values. lora_target_modules names every linear
    layer of a decoder layer; lora_target_modules_short the usual attention-only choice.
    """
    spec, conv = _spec(family), _convention(convention)
    ids = _special_ids()
    config = _config(spec, conv)
    return {
        "family": family,
        "convention": convention,
        "model_type": config.model_type,
        "bos_token_id": ids["bos_token"],
        "adds_bos": conv.adds_bos,
        "eos_token_id": ids["eos_token"],
        "eos_token_ids": [ids["eos_token"], ids["eot_token"]] if conv.eot_stops else [ids["eos_token"]],
        "eot_token_id": ids["eot_token"],
        "pad_token_id": ids["pad_token"] if conv.has_pad else None,
        "tied_embeddings": bool(config.tie_word_embeddings),
        "has_in_layer_dropout": spec.in_layer_dropout,
        "dropout_follows_layer_mode": spec.dropout_follows_layer_mode,
        "dropout": {key: getattr(config, key) for key in spec.dropout_keys if getattr(config, key)},
        "final_logit_softcapping": getattr(config, "final_logit_softcapping", None),
        "lora_target_modules": list(spec.lora_targets),
        "lora_target_modules_short": list(spec.lora_targets_short),
        "generation_config": dict(conv.sampling),
    }


# ------------------------------------------------------------------------------------------------ build
def _spec(family: str) -> FamilySpec:
    if family not in SPECS:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return SPECS[family]


def _convention(convention: str) -> ConventionSpec:
    if convention not in CONVENTION_SPECS:
        raise ValueError(f"unknown tokenizer convention {convention!r}; known: {', '.join(CONVENTIONS)}")
    return CONVENTION_SPECS[convention]


def _recipe(family: str, convention: str) -> dict:
    return {
        "version": RECIPE_VERSION, "family": family, "convention": convention,
        "spec": asdict(_spec(family)), "conv": asdict(_convention(convention)),
        "tokenizer": {"vocab_size": VOCAB_SIZE, "corpus": TOKENIZER_CORPUS_SIZE, "special": SPECIAL_TOKENS,
                      "eot": EOT_TOKEN},
        "init_seed": INIT_SEED, "entropy_target": ENTROPY_TARGET, "eot_prob": EOT_PROB,
        "calibration": [CALIBRATION_SEED, CALIBRATION_REVIEWS, BISECTION_STEPS, SAMPLED_ROWS, SAMPLED_TOKENS],
    }


def _complete(model_dir: Path) -> bool:
    return all((model_dir / name).exists()
               for name in ("config.json", "model.safetensors", "tokenizer.json", FIXTURE_FILE))


def _build(family: str, convention: str, recipe: dict, target: Path) -> None:
    def write(directory: Path) -> None:
        start = time.perf_counter()
        _tokenizer(_convention(convention)).save_pretrained(directory)
        model, measured = _model(_spec(family), _convention(convention))
        model.save_pretrained(directory)
        measured["build_seconds"] = round(time.perf_counter() - start, 3)
        fixture = {"recipe": recipe, "info": family_info(family, convention), "measured": measured}
        (directory / FIXTURE_FILE).write_text(json.dumps(fixture, indent=2) + "\n")

    build_dir_atomically(target, write, _complete)


# -------------------------------------------------------------------------------------------- tokenizer
@functools.lru_cache(maxsize=1)
def _trained_bpe() -> str:
    """Byte-level BPE trained on the reviews corpus, once per process (as JSON, copied per convention)."""
    generator = ReviewGenerator(seed=0)
    corpus = [generator.review().text for _ in range(TOKENIZER_CORPUS_SIZE)]
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[*SPECIAL_TOKENS.values(), EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer.to_str()


@functools.lru_cache(maxsize=1)
def _vocab_size() -> int:
    return Tokenizer.from_str(_trained_bpe()).get_vocab_size()


@functools.lru_cache(maxsize=1)
def _special_ids() -> dict[str, int]:
    tokenizer = Tokenizer.from_str(_trained_bpe())
    ids = {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    return {**ids, "eot_token": tokenizer.token_to_id(EOT_TOKEN)}


def _tokenizer(conv: ConventionSpec) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer.from_str(_trained_bpe())
    if conv.adds_bos:
        bos = SPECIAL_TOKENS["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    special = dict(SPECIAL_TOKENS)
    if not conv.has_pad:
        # "<pad>" stays in the vocabulary, but is nobody's pad token. Saved as an explicit null: transformers
        # loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, whose default pad is a new "<|endoftext|>".
        special["pad_token"] = None
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=MAX_POSITIONS,
                                   extra_special_tokens=[EOT_TOKEN], **special)


# ------------------------------------------------------------------------------------------------ model
def _config(spec: FamilySpec, conv: ConventionSpec):
    ids = _special_ids()
    return getattr(transformers, spec.config_class)(
        **spec.arch, vocab_size=_vocab_size(), bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"],
        pad_token_id=ids["pad_token"] if conv.has_pad else None)


def _model(spec: FamilySpec, conv: ConventionSpec) -> tuple[PreTrainedModel, dict]:
    """The random-init model, sharpened (and with its end-of-turn row fitted in multi_eos); build numbers."""
    # Initialised with <pad> as pad token in every convention (some classes zero its embedding row), so
    # the weights are the same in all conventions but multi_eos; pad_is_eos then drops it from the config.
    config = _config(spec, CONVENTION_SPECS["own_pad"])
    with torch.random.fork_rng(devices=[]):  # a private RNG: a cache hit must not change the caller's stream
        torch.manual_seed(INIT_SEED)
        model = getattr(transformers, spec.model_class)(config)
    model.config.pad_token_id = _config(spec, conv).pad_token_id
    model.eval()
    batch = _calibration_batch()
    measured = {"norm_scale": _sharpen(model, spec, batch)}
    if conv.eot_stops:
        _fit_eot_row(model, [batch, _sampled_batch(model)])
    logits = _logits(model, batch)
    measured["entropy"] = round(_entropy(logits).mean().item(), 4)
    measured["eot_prob"] = round(logits.softmax(-1)[:, _special_ids()["eot_token"]].mean().item(), 4)
    ids = _special_ids()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token"], pad_token_id=model.config.pad_token_id,
        eos_token_id=[ids["eos_token"], ids["eot_token"]] if conv.eot_stops else ids["eos_token"],
        **conv.sampling)
    return model, measured


@functools.lru_cache(maxsize=1)
def _calibration_ids() -> tuple[tuple[int, ...], ...]:
    """BOS + review tokens, the same for every convention (so are the weights calibrated on them)."""
    tokenizer = Tokenizer.from_str(_trained_bpe())
    generator = ReviewGenerator(seed=CALIBRATION_SEED)
    bos = _special_ids()["bos_token"]
    return tuple((bos, *tokenizer.encode(generator.review().text).ids) for _ in range(CALIBRATION_REVIEWS))


def _calibration_batch() -> dict[str, torch.Tensor]:
    rows = _calibration_ids()
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), _special_ids()["pad_token"])
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):  # right padding: no real token attends to a pad
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def _logits(model: PreTrainedModel, batch: dict) -> torch.Tensor:
    """Next-token logits at every real position of ``batch``: [positions, vocab]."""
    return model(**batch).logits[batch["attention_mask"].bool()]


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def _sharpen(model: PreTrainedModel, spec: FamilySpec, batch: dict) -> float:
    """Scale the final norm (hence the logits) until the mean entropy is ENTROPY_TARGET; returns the scale."""
    norm = model.get_submodule(spec.final_norm)
    weight = norm.weight.detach().clone() + spec.norm_offset
    bias = norm.bias.detach().clone() if getattr(norm, "bias", None) is not None else None
    lo, hi = 0.0, math.log(1000.0)  # bisection on log(scale); entropy falls as the scale grows
    for step in range(BISECTION_STEPS + 1):
        scale = math.exp((lo + hi) / 2)
        norm.weight.copy_(weight * scale - spec.norm_offset)
        if bias is not None:
            norm.bias.copy_(bias * scale)
        if step == BISECTION_STEPS:
            return round(scale, 4)
        if _entropy(_logits(model, batch)).mean() > ENTROPY_TARGET:
            lo = (lo + hi) / 2
        else:
            hi = (lo + hi) / 2
    raise AssertionError("unreachable")


@torch.no_grad()
def _sampled_batch(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Text the model writes itself from BOS: the contexts a response is sampled in (seeded, private RNG)."""
    input_ids = torch.full((SAMPLED_ROWS, 1), _special_ids()["bos_token"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        for _ in range(SAMPLED_TOKENS):
            logits = model(input_ids=input_ids).logits[:, -1]
            input_ids = torch.cat([input_ids, torch.multinomial(logits.softmax(-1), 1)], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@torch.no_grad()
def _fit_eot_row(model: PreTrainedModel, batches: list[dict]) -> None:
    """Fit the LM-head row of the end-of-turn token so it has probability ~EOT_PROB at every position.

    The logit that gives probability p next to the other tokens is log(p / (1 - p)) + logsumexp(others);
    the row is the (ridge) least-squares fit of that target from the LM head's input (undoing a final soft-cap),
    over review text and the model's own samples (fitted on reviews alone, it rarely fires in the latter).
    """
    eot = _special_ids()["eot_token"]
    head = model.get_output_embeddings()
    hidden, logits = [], []
    hook = head.register_forward_hook(lambda module, args, output: hidden.append(args[0]))
    try:
        for batch in batches:
            logits.append(_logits(model, batch))
            hidden[-1] = hidden[-1][batch["attention_mask"].bool()]
    finally:
        hook.remove()
    hidden, logits = torch.cat(hidden), torch.cat(logits)
    others = logits.clone()
    others[:, eot] = -math.inf
    target = torch.logsumexp(others, -1) + math.log(EOT_PROB / (1 - EOT_PROB))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # logits = cap * tanh(raw / cap)
        target = cap * torch.atanh((target / cap).clamp(-0.999, 0.999))
    bias = head.bias[eot] if getattr(head, "bias", None) is not None else 0.0
    # Ridge, in float64: a LayerNorm's outputs span d - 1 dimensions only, and a plain least-squares solver
    # then fills the missing one with rounding noise that differs from call to call; this solution is unique.
    x, y = hidden.double(), (target - bias).double()
    gram = x.T @ x
    ridge = 1e-3 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    head.weight[eot] = torch.linalg.solve(gram + ridge, x.T @ y).to(head.weight.dtype)
