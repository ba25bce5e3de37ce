"""SFT and reward stages end to end on the tiny model, the stage cache, reward quality and the CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors import safe_open

from conftest import QUICK, REPO, compose
from marl_exp.data import build_task
from marl_exp.data.reviews import well_formed
from marl_exp.modeling.loading import fingerprint
from marl_exp.stages import pipeline, reward, sft
from marl_exp.stages.pipeline import cache_dir, resolve_inputs, run_stage, upstream_config

QUANTS = ("fp32", "8bit", "4bit")




@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    """One output_dir for the quick runs, so their reward stages share one cached SFT run."""
    return tmp_path_factory.mktemp("quick")


def quick(out, *overrides):
    return compose(*QUICK, f"output_dir={out}", *overrides)


def check_run_dir(run_dir: Path, cfg, objective: str) -> dict:
    """The files every run dir holds; returns summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert objective in summary and summary["time/total_s"] > 0  # the callers check what it says
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict) and isinstance(record["step"], int)
    resolved = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    assert resolved == OmegaConf.to_container(cfg, resolve=True)
    record = json.loads((run_dir / "run_record.json").read_text())
    assert {"inputs", "python", "platform", "packages"} <= record.keys()
    assert record["packages"]["transformers"] and record["packages"]["trl"]
    assert not (run_dir / "FAILED").exists()
    return summary


def logits(model, tokenizer, texts):
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits


def assert_sft_loss_fell(summary: dict) -> None:
    """Even 3 steps from the tiny random model lower the held-out loss."""
    assert summary["eval/loss"] < summary["eval/loss_before"], (summary["eval/loss_before"], summary["eval/loss"])


def assert_lora_b_trained(adapter_dir: Path) -> None:
    """peft starts every lora_B at 0: a trained adapter has none left at 0."""
    with safe_open(Path(adapter_dir) / "adapter_model.safetensors", "pt") as weights:
        untrained = [k for k in weights.keys() if "lora_B" in k and not weights.get_tensor(k).any()]
        assert any("lora_B" in k for k in weights.keys())
    assert not untrained, untrained


# A pair whose HF margin is within this of 0 may rank either way in the stage's own forward: ours against HF +
# peft on the same batch differ by <= 5e-7 in every quant mode (test_multi_adapter); 1e-5 is float32 rounding here.
TIE = 1e-5


def hf_pairwise_accuracy(sft_model, adapter, pairs, quant_mode: str, batch_size: int) -> tuple[float, float]:
    """Held-out pairwise accuracy of a saved reward adapter, recomputed with HF's sequence classifier + plain peft
    at the run's precision, on the pairs as RewardTrainer joins them (prompt + side + EOS), in the stage's batches.
    Returned as the (lowest, highest) accuracy that pairs tied within TIE allow."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from marl_exp.modeling.loading import quantization_config, weights_dtype

    quant = compose(f"quant={quant_mode}").quant
    bnb = quantization_config(quant)
    load = {} if bnb is None else {"quantization_config": bnb, "device_map": {"": "cpu"}}
    seq_cls = AutoModelForSequenceClassification.from_pretrained(sft_model, num_labels=1, dtype=weights_dtype(quant),
                                                                 **load)
    for module in seq_cls.modules():  # the 4-bit kernel the stage uses (no repacking for bnb's CPU inference)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    seq_cls.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the last non-pad token
    model = PeftModel.from_pretrained(seq_cls, adapter).eval()

    def scores(side: str) -> torch.Tensor:
        prompts = pairs["prompt"] if "prompt" in pairs.column_names else [""] * len(pairs)
        texts = [p + t + tokenizer.eos_token for p, t in zip(prompts, pairs[side])]
        return torch.cat([logits(model, tokenizer, texts[i:i + batch_size])[:, 0] for i in range(0, len(texts), batch_size)])

    margin = scores("chosen") - scores("rejected")
    return (margin > TIE).float().mean().item(), (margin >= -TIE).float().mean().item()


# --------------------------------------------------------------------------------------------- SFT
SFT_CASES = {"fp32": ("quant=fp32", "stage.finetune=lora"), "8bit": ("quant=8bit",), "4bit": ("quant=4bit",)}


@pytest.mark.slow
@pytest.mark.parametrize("quant", QUANTS)
def test_sft_lora_end_to_end(quick_out, quant):
    """LoRA SFT (explicit for fp32, automatic for 8/4-bit): adapter/ plus a merged, plain fp32 model/."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = quick(quick_out, "stage=sft", *SFT_CASES[quant])
    run_dir = quick_out / f"sft-{quant}"
    result = run_stage(cfg, run_dir)
    summary = check_run_dir(run_dir, cfg, "eval/loss")
    assert summary["eval/loss"] == pytest.approx(result["eval/loss"])
    assert summary["train/steps"] == 3
    assert_sft_loss_fell(summary)
    assert_lora_b_trained(run_dir / "adapter")
    assert 0 < summary["params/trainable"] < summary["params/total"]
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()

    merged = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert "quantization_config" not in config
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    # The merged model is the base plus the trained adapter.
    base_path = pipeline_base_path(cfg)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    texts = ["the movie was great . i loved it .", "the plot felt"]
    base_logits = logits(base, tokenizer, texts)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), run_dir / "adapter")
    merged_logits = logits(merged, tokenizer, texts)
    assert torch.allclose(merged_logits, logits(with_adapter, tokenizer, texts), atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)  # training changed something


def pipeline_base_path(cfg) -> str:
    from marl_exp.modeling.loading import resolve_model_path

    return resolve_model_path(cfg.model)


# ------------------------------------------------------------------------------------------ reward
@pytest.mark.slow
@pytest.mark.parametrize("quant", QUANTS)
def test_reward_end_to_end(quick_out, quant):
    cfg = quick(quick_out, "stage=reward", f"quant={quant}")
    run_dir = quick_out / f"reward-{quant}"
    run_stage(cfg, run_dir)
    summary = check_run_dir(run_dir, cfg, "eval/pairwise_accuracy")
    assert summary["train/steps"] == 3
    assert_lora_b_trained(run_dir / "reward_adapter")
    # 3 steps rank no better than chance reliably; the accuracy reported is that of the adapter saved.
    sft_model = cache_dir(upstream_config(cfg, "sft")) / "model"
    low, high = hf_pairwise_accuracy(sft_model, run_dir / "reward_adapter", build_task(cfg.data).pairs_eval, quant,
                                     cfg.stage.eval_batch_size)
    assert low <= summary["eval/pairwise_accuracy"] <= high, (summary["eval/pairwise_accuracy"], low, high)

    # The SFT model came through the stage cache: one entry, shared by every quant mode, and it is
    # a full fp32 fine-tune whatever this run's quantization.
    (entry,) = (quick_out / "cache").glob("sft-*")
    assert entry == cache_dir(upstream_config(cfg, "sft"))
    sft_model = entry / "model"
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["inputs"] == {"sft_model": str(sft_model)}
    upstream = yaml.safe_load((entry / "resolved_config.yaml").read_text())
    assert upstream["quant"]["mode"] == "fp32" and upstream["stage"]["name"] == "sft"
    assert upstream["stage"]["finetune"] == "auto"  # = full for fp32
    sft_summary = json.loads((entry / "summary.json").read_text())
    assert sft_summary["params/trainable"] == sft_summary["params/total"]
    assert not (entry / "adapter").exists()
    assert "quantization_config" not in json.loads((sft_model / "config.json").read_text())

    adapter = run_dir / "reward_adapter"
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert any(k.endswith("score.weight") for k in keys), keys
    assert any("lora_A" in k for k in keys)
    base = json.loads((adapter / "marl_exp_base.json").read_text())
    assert base["base_model"] == str(sft_model) and base["base_model_name"] == "tiny"
    assert base["fingerprint"] == fingerprint(sft_model)
    assert not (adapter / "training_args.bin").exists()


# -------------------------------------------------------------------------------------- stage cache
@pytest.fixture
def log_records():
    """Records of the "marl_exp" loggers (attached directly: independent of propagation)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("marl_exp")
    handler, level = Collect(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def stub_reward(monkeypatch):
    """Replace the reward trainer: the cache tests are about the SFT input it receives."""
    calls = []

    def fake(cfg, run_dir, tracker, sft_model):
        calls.append(sft_model)
        tracker.update_summary({"eval/pairwise_accuracy": 1.0})
        return {"eval/pairwise_accuracy": 1.0}

    monkeypatch.setattr(reward, "run", fake)
    return calls


@pytest.fixture
def count_sft(monkeypatch):
    """Count SFT runs, delegating to the real stage."""
    calls = []
    real = sft.run

    def counted(cfg, run_dir, tracker):
        calls.append(Path(run_dir))
        return real(cfg, run_dir, tracker)

    monkeypatch.setattr(sft, "run", counted)
    return calls


@pytest.fixture
def fake_sft(monkeypatch):
    """A stand-in SFT stage that writes a model dir instantly."""
    calls = []

    def fake(cfg, run_dir, tracker):
        calls.append(Path(run_dir))
        (Path(run_dir) / "model").mkdir(parents=True)
        (Path(run_dir) / "model" / "config.json").write_text(json.dumps({"seed": cfg.seed}))
        tracker.update_summary({"eval/loss": 1.0})
        return {"eval/loss": 1.0}

    monkeypatch.setattr(sft, "run", fake)
    return calls


@pytest.mark.slow
def test_reward_twice_runs_sft_once(quick_out, stub_reward, count_sft, log_records):
    cfg = quick(quick_out, "stage=reward")
    run_stage(cfg, quick_out / "cache-test-1")  # builds the SFT entry unless an earlier test did
    (entry,) = (quick_out / "cache").glob("sft-*")
    before = (entry / "summary.json").stat().st_mtime_ns, (entry / "model" / "model.safetensors").stat().st_mtime_ns
    runs_so_far = len(count_sft)
    assert runs_so_far <= 1
    log_records.clear()

    run_stage(cfg, quick_out / "cache-test-2")
    assert len(count_sft) == runs_so_far  # no SFT run the second time
    assert any("reusing cached" in r.getMessage() for r in log_records)
    assert [p.name for p in (quick_out / "cache").glob("sft-*")] == [entry.name]
    after = (entry / "summary.json").stat().st_mtime_ns, (entry / "model" / "model.safetensors").stat().st_mtime_ns
    assert after == before
    assert stub_reward[-2:] == [str(entry / "model")] * 2


def test_cache_key_depends_on_what_determines_the_output(tmp_path):
    def key(*overrides):
        return cache_dir(upstream_config(compose("stage=reward", f"output_dir={tmp_path}", *overrides), "sft"))

    base = key()
    # The reward run's own settings, logger and quantization do not change its SFT input.
    for same in ("adapter.r=4", "stage.learning_rate=0.1", "logger=none", "quant=4bit", "run_name=x"):
        assert key(same) == base, same
    for different in ("seed=1", "data.num_sft_train=10", "model.tiny.init_seed=3", "data.seed=5"):
        assert key(different) != base, different
    assert base.parent == tmp_path.resolve() / "cache" and base.name.startswith("sft-")
    # Relative output dirs give absolute cache paths (they are recorded and read from elsewhere).
    assert cache_dir(upstream_config(compose("stage=reward", "output_dir=rel"), "sft")).is_absolute()


def test_different_seed_makes_a_new_cache_entry(tmp_path, stub_reward, fake_sft):
    run_stage(quick(tmp_path, "stage=reward"), tmp_path / "r0")
    run_stage(quick(tmp_path, "stage=reward"), tmp_path / "r0-again")
    assert len(fake_sft) == 1
    run_stage(quick(tmp_path, "stage=reward", "seed=1"), tmp_path / "r1")
    assert len(fake_sft) == 2
    entries = sorted((tmp_path / "cache").glob("sft-*"))
    assert len(entries) == 2
    assert {json.loads((e / "model" / "config.json").read_text())["seed"] for e in entries} == {0, 1}
    assert stub_reward[0] == stub_reward[1] != stub_reward[2]


def test_explicit_sft_model_bypasses_the_cache(tmp_path, stub_reward, fake_sft):
    model_dir = tmp_path / "my_sft"
    model_dir.mkdir()
    cfg = quick(tmp_path, "stage=reward", f"stage.sft_model={model_dir}")
    assert resolve_inputs(cfg) == {"sft_model": str(model_dir)}
    run_stage(cfg, tmp_path / "run")
    assert fake_sft == [] and stub_reward == [str(model_dir)]
    assert not (tmp_path / "cache").exists()
    assert json.loads((tmp_path / "run" / "run_record.json").read_text())["inputs"] == {"sft_model": str(model_dir)}
    # A hub id is passed through as is.
    assert resolve_inputs(quick(tmp_path, "stage=reward", "stage.sft_model=org/name")) == {"sft_model": "org/name"}


def test_interrupted_build_is_never_a_result(tmp_path, fake_sft, log_records):
    cfg = quick(tmp_path, "stage=reward")
    target = cache_dir(upstream_config(cfg, "sft"))
    # A build killed after writing everything but before the rename, and a stale half-made entry.
    interrupted = target.with_name(f".{target.name}.building-123")
    (interrupted / "model").mkdir(parents=True)
    (interrupted / "summary.json").write_text("{}")
    (target / "model").mkdir(parents=True)  # no summary.json: incomplete
    inputs = resolve_inputs(cfg)
    assert len(fake_sft) == 1
    assert inputs == {"sft_model": str(target / "model")}
    assert (target / "summary.json").exists()
    assert not any("reusing cached" in r.getMessage() for r in log_records)
    assert not interrupted.exists()  # the lock holder cleans up dead builds
    assert [p.name for p in target.parent.iterdir() if ".building-" in p.name] == []
    resolve_inputs(cfg)
    assert len(fake_sft) == 1


def test_failed_upstream_build_leaves_no_entry(tmp_path, monkeypatch):
    def broken(cfg, run_dir, tracker):
        (Path(run_dir) / "model").mkdir()
        raise RuntimeError("sft crashed")

    monkeypatch.setattr(sft, "run", broken)
    cfg = quick(tmp_path, "stage=reward")
    with pytest.raises(RuntimeError, match="sft crashed"):
        resolve_inputs(cfg)
    assert not cache_dir(upstream_config(cfg, "sft")).exists()


def test_concurrent_job_waits_for_the_build_and_reuses_it(tmp_path, fake_sft, log_records):
    cfg = upstream_config(quick(tmp_path, "stage=reward"), "sft")
    target = cache_dir(cfg)
    result = {}
    with pipeline._build_lock(target):  # another job is building this entry
        worker = threading.Thread(target=lambda: result.setdefault("path", pipeline.cached_output(cfg)))
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and fake_sft == []
        # ... and finishes it
        (target / "model").mkdir(parents=True)
        (target / "summary.json").write_text("{}")
    worker.join(timeout=30)
    assert result["path"] == target / "model" and fake_sft == []
    assert any("waiting" in r.getMessage() for r in log_records)


# ---------------------------------------------------------------------------------- reward quality
@pytest.mark.slow
def test_trained_chain_reward_quality(trained_chain):
    summary = trained_chain["reward_summary"]
    assert summary["eval/pairwise_accuracy"] >= 0.9
    sft_summary = json.loads(Path(trained_chain["sft_summary_path"]).read_text())
    assert sft_summary["eval/loss"] < sft_summary["eval/loss_before"] - 2.0


@pytest.mark.slow
def test_trained_sft_model_writes_reviews(trained_chain):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained_chain["sft_model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained_chain["sft_model"])
    prompts = build_task(trained_chain["cfg"].data).prompts_eval
    # Sampled, as PPO samples it (greedy decoding of a small model falls into loops that sampling never sees).
    ok, texts = 0, []
    torch.manual_seed(0)
    for prompt in prompts * 4:
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=40, do_sample=True, top_k=0, pad_token_id=tokenizer.pad_token_id)[0]
        texts.append(tokenizer.decode(out, skip_special_tokens=True))
        ok += out[-1].item() == tokenizer.eos_token_id and well_formed(texts[-1])
    assert ok >= 0.75 * len(texts), texts


@pytest.mark.slow
def test_reward_adapter_reloads_with_plain_peft(trained_chain):
    """HF + plain peft on the saved adapter ranks the held-out pairs well above chance, as the stage reported."""
    cfg = trained_chain["cfg"]
    low, high = hf_pairwise_accuracy(trained_chain["sft_model"], trained_chain["reward_adapter"],
                                     build_task(cfg.data).pairs_eval, "fp32", cfg.stage.eval_batch_size)
    assert low >= 0.9
    reported = trained_chain["reward_summary"]["eval/pairwise_accuracy"]
    assert low <= reported <= high, (reported, low, high)


# --------------------------------------------------------------------------------------------- CLI
def run_cli(*args, timeout=600):
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


@pytest.mark.slow
def test_cli_single_run(tmp_path):
    run_cli("stage=sft", *QUICK, f"output_dir={tmp_path}")
    (run_dir,) = (tmp_path / "runs").glob("*/*_sft")
    hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert hydra_cfg["stage"]["max_steps"] == 3 and hydra_cfg["output_dir"] == str(tmp_path)
    summary = check_run_dir(run_dir, compose("stage=sft", *QUICK, f"output_dir={tmp_path}"), "eval/loss")
    assert summary["params/trainable"] == summary["params/total"]  # fp32 default: full fine-tune
    assert_sft_loss_fell(summary)
    assert (run_dir / "model" / "model.safetensors").exists() and not (run_dir / "adapter").exists()
    # Our log messages reach Hydra's per-run log file.
    assert "run finished" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_cli_multirun(tmp_path):
    run_cli("-m", "stage=sft", "stage.finetune=lora", "adapter.r=4,8", *QUICK, f"output_dir={tmp_path}")
    (sweep,) = (tmp_path / "multirun").glob("*/*_sft")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    ranks = []
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert_sft_loss_fell(summary)
        assert_lora_b_trained(job / "adapter")
        ranks.append(json.loads((job / "adapter" / "adapter_config.json").read_text())["r"])
        assert (job / ".hydra" / "config.yaml").exists()
    assert ranks == [4, 8]


def test_reward_adapter_init_does_not_depend_on_the_process_random_state(quick_out):
    """The score head and LoRA are created from the run's seed, not from whatever the process drew before (a
    reward adapter trained inside a PPO process through the stage cache differed from the same one trained alone)."""
    import torch
    from safetensors.torch import load_file

    weights = []
    for draws in (0, 1000):
        torch.rand(draws)  # a different process random state before each run
        run_dir = quick_out / f"reward-seeded-{draws}"
        run_stage(quick(quick_out, "stage=reward", "stage.max_steps=1"), run_dir)
        weights.append(load_file(str(run_dir / "reward_adapter" / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
