"""The built-in tiny model and the loading code: deterministic build, cache reuse, clear load errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, compose
from marl_exp.config import TinyArchConfig
from marl_exp.data.reviews import ReviewGenerator
from marl_exp.modeling import tiny
from marl_exp.modeling.loading import (
    ModelLoadError,
    load_model,
    load_tokenizer,
    local_model_dir,
    resolve_device,
    resolve_model_path,
)

GPT2 = "openai-community/gpt2"


@pytest.fixture(scope="module")
def tiny_dir():
    """The default tiny model in the session's model cache (built on first use)."""
    return resolve_model_path(compose().model)


def small_arch(**overrides):
    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=96, vocab_size=300)
    return OmegaConf.merge(OmegaConf.structured(TinyArchConfig), {**values, **overrides})


# ------------------------------------------------------------------------------------------ build
def test_build_is_deterministic_across_cache_dirs(tmp_path, monkeypatch):
    arch = compose().model.tiny  # the default tiny model
    monkeypatch.setenv("MARL_EXP_CACHE", str(tmp_path / "a"))
    first = tiny.builtin_model_dir(arch)
    monkeypatch.setenv("MARL_EXP_CACHE", str(tmp_path / "b"))
    second = tiny.builtin_model_dir(arch)
    assert first.parent == tmp_path / "a" and second.parent == tmp_path / "b"
    assert first.name == second.name  # the cache key depends on the recipe only
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    # Nothing but the finished model is left in the cache (the build dir was renamed).
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [first.name]
    # The cache is readable by others, as files a plain mkdir would make.
    assert first.stat().st_mode & 0o055 == 0o055 & ~_umask()


def _umask() -> int:
    from marl_exp.io import current_umask

    return current_umask()


def test_recipe_changes_give_a_different_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MARL_EXP_CACHE", str(tmp_path))
    base = tiny.builtin_model_dir(small_arch())
    other = tiny.builtin_model_dir(small_arch(init_seed=1))
    assert base != other
    # The tokenizer's length limit follows the architecture.
    assert AutoTokenizer.from_pretrained(base).model_max_length == 96
    a, b = load_file(base / "model.safetensors"), load_file(other / "model.safetensors")
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])


def test_second_call_reuses_the_cache(tiny_dir, monkeypatch):
    weights = os.path.join(tiny_dir, "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the tiny model was rebuilt although it is cached")

    monkeypatch.setattr(tiny, "_build", no_rebuild)
    assert resolve_model_path(compose().model) == tiny_dir
    assert os.stat(weights).st_mtime_ns == mtime


def test_incomplete_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("MARL_EXP_CACHE", str(tmp_path))
    arch = small_arch()
    target = tiny.builtin_model_dir(arch)
    (target / "model.safetensors").unlink()  # e.g. a crash of an older version mid-copy
    assert tiny.builtin_model_dir(arch) == target
    assert (target / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------- loading
def test_tiny_model_loads_with_from_pretrained_from_the_cache(tiny_dir):
    cache = os.environ["MARL_EXP_CACHE"]
    assert os.path.dirname(tiny_dir) == cache and os.path.basename(tiny_dir).startswith("tiny-llama-")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama"
    cfg = compose()
    loaded = load_model(tiny_dir, cfg.model, cfg.quant, resolve_device("cpu"))
    assert loaded.config.vocab_size == model.config.vocab_size
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    n_params = sum(p.numel() for p in model.parameters())
    assert 200_000 <= n_params <= 5_000_000


def test_tokenizer_round_trips_reviews(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir, compose().model)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token_id not in (tokenizer.pad_token_id, tokenizer.eos_token_id)
    generator = ReviewGenerator(seed=42)
    for _ in range(200):
        text = generator.review().text
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id  # like Llama: BOS first
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
        assert len(ids) <= len(text.split()) + 2  # nearly one token per word
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id


def test_unknown_builtin_is_a_model_load_error():
    cfg = compose("model.path=builtin:nope")
    with pytest.raises(ModelLoadError, match="builtin:tiny"):
        resolve_model_path(cfg.model)


@pytest.fixture
def gpt2_not_cached():
    if local_model_dir(GPT2) is not None:
        pytest.skip("gpt2 is in the local HF cache on this machine")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_uncached_hub_model_offline_is_a_model_load_error_with_a_fix(gpt2_not_cached):
    cfg = compose("model=gpt2")
    path = resolve_model_path(cfg.model)
    assert path == GPT2
    for load in (lambda: load_tokenizer(path, cfg.model),
                 lambda: load_model(path, cfg.model, cfg.quant, resolve_device("cpu"))):
        with pytest.raises(ModelLoadError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message
        assert GPT2 in message and f"hf download {GPT2}" in message and "model.path" in message


def test_load_error_from_a_local_dir_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    cfg = compose()
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path), cfg.model, cfg.quant, resolve_device("cpu"))
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.slow
def test_cli_reports_a_missing_hub_model_in_one_line(gpt2_not_cached, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}  # that one asks for tracebacks
    result = subprocess.run(
        [sys.executable, "train.py", "model=gpt2", "stage=sft", "logger=none", f"output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("marl-exp: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert GPT2 in errors[0] and "hf download" in errors[0]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    # Found by the checks before the run starts (issue 15): no run dir is created for it.
    assert not (tmp_path / "runs").exists()


def test_build_leaves_the_callers_random_stream_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("MARL_EXP_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.builtin_model_dir(small_arch())  # a cache miss: builds (and seeds its own init)
    assert torch.equal(torch.rand(3), expected)
