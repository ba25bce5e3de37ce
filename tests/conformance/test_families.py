"""The family fixtures themselves: every family x convention builds, loads through transformers' Auto classes and
marl-exp's loaders, keeps its tokenizer convention, and is peaky enough for sampling tests; cache and RNG hygiene.

Build times are recorded in each fixture's marl_exp_fixture.json and printed (``-s``) by the first test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from marl_exp.config import ModelConfig, QuantConfig
from marl_exp.conformance import families
from marl_exp.conformance.families import (
    CONVENTIONS,
    EOT_TOKEN,
    FAMILIES,
    FIXTURE_FILE,
    HUB_SAMPLING,
    SPECS,
    build_family_model,
    family_info,
)
from marl_exp.data.reviews import ReviewGenerator, openings
from marl_exp.modeling.loading import load_model, load_tokenizer

CPU = torch.device("cpu")
MATRIX = [(family, convention) for family in FAMILIES for convention in CONVENTIONS]


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build (or find) every fixture once and print the build time each one recorded."""
    dirs = {key: build_family_model(*key) for key in MATRIX}
    print("\nfixture build seconds (measured when built):")
    for family in FAMILIES:
        seconds = [json.loads((dirs[family, c] / FIXTURE_FILE).read_text())["measured"]["build_seconds"]
                   for c in CONVENTIONS]
        print(f"  {family:9s} " + " ".join(f"{c}={s:.2f}" for c, s in zip(CONVENTIONS, seconds)))
    return dirs


def review_texts(seed: int, n: int) -> list[str]:
    generator = ReviewGenerator(seed=seed)
    return [generator.review().text for _ in range(n)]


def causal_lm(family: str, convention: str = "own_pad"):
    return AutoModelForCausalLM.from_pretrained(build_family_model(family, convention)).eval()


# ------------------------------------------------------------------------------------ build and load
@pytest.mark.parametrize("family,convention", MATRIX)
def test_fixture_loads_and_keeps_its_convention(family, convention):
    path = build_family_model(family, convention)
    info = family_info(family, convention)
    measured = json.loads((path / FIXTURE_FILE).read_text())["measured"]
    assert 0 < measured["build_seconds"] < 10  # designed for well under a second; this catches a runaway build

    # Tokenizer: the convention, and exactly the trained BPE whatever class transformers picks for the family.
    tokenizer = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in review_texts(seed=3, n=20):
        assert tokenizer(text, add_special_tokens=False).input_ids == raw.encode(text, add_special_tokens=False).ids
    ids = tokenizer("the movie was great").input_ids
    assert (ids[0] == info["bos_token_id"]) == info["adds_bos"]
    assert info["eos_token_id"] not in ids  # no tokenizer here appends EOS
    assert tokenizer.bos_token_id == info["bos_token_id"] and tokenizer.eos_token_id == info["eos_token_id"]
    assert tokenizer.pad_token_id == info["pad_token_id"]
    if info["pad_token_id"] is None:
        assert tokenizer.pad_token is None
    else:
        assert info["pad_token_id"] not in (info["eos_token_id"], info["bos_token_id"])
    assert tokenizer.convert_tokens_to_ids(EOT_TOKEN) == info["eot_token_id"]
    assert tokenizer.decode(tokenizer("a" + EOT_TOKEN).input_ids, skip_special_tokens=True) == "a"

    # config.json and generation_config.json.
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == info["model_type"]
    assert config.pad_token_id == info["pad_token_id"] and config.eos_token_id == info["eos_token_id"]
    assert len(tokenizer) == config.vocab_size  # no token the embedding lacks (e.g. an invented pad)
    generation = GenerationConfig.from_pretrained(path)
    assert _as_list(generation.eos_token_id) == info["eos_token_ids"]
    default = GenerationConfig()
    for key, value in HUB_SAMPLING.items():
        assert getattr(generation, key) == (value if convention == "gen_config" else getattr(default, key)), key
    assert info["generation_config"] == (HUB_SAMPLING if convention == "gen_config" else {})

    # Causal LM: the family's class, every weight from the file, none missing, tying as declared.
    model, loading = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(model).__name__ == SPECS[family].model_class
    assert not any(loading.values()), loading
    _assert_weights_from_file(model, path)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == info["tied_embeddings"]
    assert _as_list(model.generation_config.eos_token_id) == info["eos_token_ids"]
    batch = tokenizer(["the acting was very", "this film"], return_tensors="pt", padding=True) \
        if tokenizer.pad_token is not None else tokenizer(["the acting was very"], return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    assert logits.shape[-1] == config.vocab_size and torch.isfinite(logits).all()

    # Sequence classifier with one label: only the score head is new.
    classifier, loading = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                             output_loading_info=True)
    assert loading["missing_keys"] == {"score.weight"} and not loading["mismatched_keys"], loading
    with torch.no_grad():
        score = classifier.eval()(**tokenizer(["the acting was very"], return_tensors="pt")).logits
    assert score.shape == (1, 1) and torch.isfinite(score).all()

    # marl-exp's own loaders.
    ours = load_tokenizer(str(path))
    assert ours.pad_token_id == (info["pad_token_id"] if info["pad_token_id"] is not None else info["eos_token_id"])
    model_cfg = ModelConfig(path=str(path), local_files_only=True)
    base = load_model(str(path), model_cfg, QuantConfig(), CPU)
    with torch.no_grad():
        assert torch.equal(base.eval()(**batch).logits, logits)
    reward = load_model(str(path), model_cfg, QuantConfig(), CPU, task="seq-cls", num_labels=1)
    assert type(reward).__name__ == type(classifier).__name__ and reward.config.num_labels == 1


def _as_list(ids) -> list[int]:
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def _assert_weights_from_file(model, path) -> None:
    """Every stored tensor is a parameter of the model and every parameter a stored tensor (tied ones once).

    Matched by value, not name: transformers 5 renames keys on load (GPT-NeoX stores ``embed_out``, the
    model calls it ``lm_head``).
    """
    stored = list(load_file(str(path / "model.safetensors")).values())
    params = list({p.data_ptr(): p.detach() for p in model.state_dict().values()}.values())

    def same(a, b) -> bool:
        return a.shape == b.shape and torch.equal(a, b)

    assert all(any(same(p, t) for t in stored) for p in params)
    assert all(any(same(t, p) for p in params) for t in stored)


@pytest.mark.parametrize("family", FAMILIES)
def test_conventions_share_weights_but_multi_eos_changes_only_the_eot_row(family, built):
    reference = load_file(str(built[family, "own_pad"] / "model.safetensors"))
    eot = family_info(family, "multi_eos")["eot_token_id"]
    for convention in CONVENTIONS:
        weights = load_file(str(built[family, convention] / "model.safetensors"))
        assert weights.keys() == reference.keys()
        changed = set()
        for name, tensor in weights.items():
            if torch.equal(tensor, reference[name]):
                continue
            assert convention == "multi_eos", (convention, name)
            rows = (tensor != reference[name]).reshape(tensor.shape[0], -1).any(-1)
            assert rows.nonzero().flatten().tolist() == [eot], name  # the end-of-turn row, nothing else
            changed.add(name)
        assert bool(changed) == (convention == "multi_eos")


# ----------------------------------------------------------------------------------- distributions
def _next_token_stats(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    mask = batch["attention_mask"].bool()
    logp = logits.log_softmax(-1)[mask]
    entropy = -(logp.exp() * logp).sum(-1)
    tokens = batch["input_ids"][mask]
    repeats = (logp.argmax(-1) == tokens).float().mean().item()
    # Same current token, different preceding context: how much does the context move the distribution?
    probs, distances = logp.exp(), []
    for token in tokens.unique():
        rows = probs[tokens == token]
        distances += [0.5 * (rows[0] - row).abs().sum().item() for row in rows[1:]]
    return entropy, repeats, sum(distances) / len(distances)


@pytest.mark.parametrize("family", FAMILIES)
def test_next_token_distribution_is_peaky_and_depends_on_context(family):
    """Entropy well below log V (~6.2) so sampling tests have power; the layers, not the last token, decide."""
    model = causal_lm(family)
    tokenizer = AutoTokenizer.from_pretrained(build_family_model(family))
    entropy, repeats, context_tv = _next_token_stats(model, tokenizer, review_texts(seed=2, n=16))
    assert 1.5 < entropy.mean().item() < 3.5  # calibrated to 2.5 on other reviews
    assert entropy.quantile(0.9).item() < 4.5 and entropy.quantile(0.1).item() > 0.05
    assert repeats < 0.2  # not the "repeat the last token" of a random tied-embedding model
    assert context_tv > 0.3
    # At the PPO prompts (the last position of each opening): the contexts sampling tests use.
    batch = tokenizer(openings(), return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    last = logits[torch.arange(len(logits)), batch["attention_mask"].sum(-1) - 1]
    logp = last.log_softmax(-1)
    at_prompts = -(logp.exp() * logp).sum(-1)
    assert 1.0 < at_prompts.mean().item() < 4.0 and at_prompts.max().item() < math.log(len(tokenizer)) - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_eos_responses_end_at_the_end_of_turn_token(family):
    path = build_family_model(family, "multi_eos")
    info = family_info(family, "multi_eos")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    batch = tokenizer(openings()[:16] * 2, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():  # the generation config's eos list stops generation
        out = model.generate(**batch, do_sample=True, top_k=0, max_new_tokens=16)
    new = out[:, batch["input_ids"].shape[1]:]
    stops = torch.isin(new, torch.tensor(info["eos_token_ids"]))
    assert stops.any(-1).float().mean().item() >= 0.75  # most responses end within 16 tokens
    assert (new == info["eot_token_id"]).any(-1).float().mean().item() >= 0.4  # mostly at the end-of-turn token
    assert stops[:, 0].float().mean().item() < 0.5  # ... after a few tokens, not at once
    # With the tokenizer's EOS alone (the bug this fixture exposes), responses run past the end-of-turn token.
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, top_k=0, max_new_tokens=16,
                             eos_token_id=tokenizer.eos_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    first_eot = torch.where(new == info["eot_token_id"], torch.arange(16), 16).min(-1).values
    assert (first_eot < 15).any() and any(
        (row[i + 1:] != tokenizer.pad_token_id).any() for row, i in zip(new, first_eot.tolist()) if i < 15)


# ----------------------------------------------------------------------------------- what info says
@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_flags_match_the_model(family):
    info = family_info(family, "own_pad")
    model = causal_lm(family)
    tokenizer = AutoTokenizer.from_pretrained(build_family_model(family))
    batch = tokenizer(review_texts(seed=4, n=2), return_tensors="pt", padding=True)

    def differs() -> bool:
        with torch.no_grad():
            torch.manual_seed(1)
            first = model(**batch).logits
            torch.manual_seed(2)
            return not torch.equal(first, model(**batch).logits)

    assert not differs()  # eval mode: deterministic
    model.train()
    assert differs() == bool(info["dropout"]) == info["has_in_layer_dropout"]
    # The decoder layers' own flag alone (what gradient checkpointing switches for the recomputation).
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == 2
    for layer in layers:
        layer.training = True
    assert differs() == info["dropout_follows_layer_mode"]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_name_every_linear_layer(family):
    info = family_info(family, "own_pad")

    def targeted(target_modules) -> set[str]:
        peft_model = get_peft_model(causal_lm(family), LoraConfig(r=2, target_modules=target_modules))
        return {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}

    assert targeted("all-linear") == set(info["lora_target_modules"])
    assert targeted(info["lora_target_modules_short"]) == set(info["lora_target_modules_short"])


# ------------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_loading_on_cpu(family, mode):
    import bitsandbytes as bnb

    path = build_family_model(family)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(review_texts(seed=5, n=4), return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = causal_lm(family)(**batch).logits
    quant = BitsAndBytesConfig(load_in_8bit=True) if mode == "8bit" else \
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    layer_type = bnb.nn.Linear8bitLt if mode == "8bit" else bnb.nn.Linear4bit
    direct = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": "cpu"})
    ours = load_model(str(path), ModelConfig(path=str(path)), QuantConfig(mode=mode), CPU)
    mask = batch["attention_mask"].bool()
    for model in (direct, ours):
        assert sum(isinstance(m, layer_type) for m in model.modules()) == 2 * len(SPECS[family].lora_targets)
        with torch.no_grad():
            logits = model.eval()(**batch).logits
        assert torch.isfinite(logits).all()
        error = (logits - reference)[mask].norm() / (reference - reference.mean(-1, keepdim=True))[mask].norm()
        assert error < (0.1 if mode == "8bit" else 0.6), error  # quantization noise, not a broken model
    classifier = load_model(str(path), ModelConfig(path=str(path)), QuantConfig(mode=mode), CPU, task="seq-cls")
    assert any(isinstance(m, layer_type) for m in classifier.modules())


# -------------------------------------------------------------------------------------- cache, errors
def test_second_call_reuses_the_cache(built, monkeypatch):
    path = built["gemma2", "multi_eos"]
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def no_rebuild(*args):
        raise AssertionError("rebuilt a cached fixture")

    monkeypatch.setattr(families, "_build", no_rebuild)
    assert build_family_model("gemma2", "multi_eos") == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps


def test_build_is_deterministic_and_leaves_the_callers_rng_alone(built, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    path = build_family_model("opt", "multi_eos", root=tmp_path)
    assert torch.equal(torch.rand(3), expected)
    assert path.parent == tmp_path and path.name == built["opt", "multi_eos"].name  # key: recipe only
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the build dir was renamed
    cached = built["opt", "multi_eos"]
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (path / name).read_bytes() == (cached / name).read_bytes(), name


def test_unknown_family_or_convention_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model family 'bloom'; known: llama, gpt2"):
        build_family_model("bloom")
    with pytest.raises(ValueError, match=r"unknown tokenizer convention 'chatml'; known: own_pad, pad_is_eos"):
        family_info("llama", "chatml")
