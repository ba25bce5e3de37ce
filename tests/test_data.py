"""Real-data loaders (imdb, hh_rlhf, local files) on small fixtures of each schema, bad-data errors,
and the experiment / debug presets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from omegaconf import OmegaConf

from conftest import CONF_DIR, QUICK, REPO, compose
from marl_exp.config import ConfigError, DataConfig, validate
from marl_exp.data import build_task
from marl_exp.data.checks import DataError

FIXTURES = REPO / "tests" / "fixtures" / "data"


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def local_cfg(train_file, **values):
    return data_cfg(name="local", train_file=str(train_file), **values)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------------------- the schemas
def test_imdb_loader_maps_reviews_labels_and_prompts():
    task = build_task(data_cfg(name="imdb", path=str(FIXTURES / "imdb"), prompt_words=3))
    assert len(task.sft_train) == 8 and len(task.sft_eval) == 4
    assert not any("<br />" in text for text in task.sft_train["text"])  # HTML breaks removed
    pairs = task.pairs_train
    assert len(pairs) == 4  # 4 positive reviews, each against a negative one
    positives = {json.loads(line)["text"].replace("<br />", " ") for line in (FIXTURES / "imdb" / "train.jsonl")
                 .read_text().splitlines() if json.loads(line)["label"] == 1}
    assert set(pairs["chosen"]) == positives and not set(pairs["rejected"]) & positives
    assert task.prompts_train[0] == "A warm and" and all(len(p.split()) == 3 for p in task.prompts_train)
    assert task.prompt_origins["train"][0].endswith("[train] row 0")
    assert task.oracle is None


def test_hh_rlhf_loader_cuts_prompts_at_the_last_assistant_turn():
    task = build_task(data_cfg(name="hh_rlhf", path=str(FIXTURES / "hh_rlhf")))
    assert len(task.pairs_train) == 4 and len(task.pairs_eval) == 2
    assert list(task.sft_train["text"]) == list(task.pairs_train["chosen"])
    two_turns = task.prompts_train[1]
    assert two_turns.startswith("\n\nHuman: How do I boil an egg?")
    assert two_turns.endswith("\n\nHuman: Hard.\n\nAssistant:")  # the last turn, not the first
    assert all(p.endswith("Assistant:") for p in task.prompts_train + task.prompts_eval)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_files_in_every_format_with_a_column_mapping(tmp_path, fmt):
    rows = {"question": [f"question {i}?" for i in range(10)], "good": [f"good answer {i}" for i in range(10)],
            "bad": [f"bad answer {i}" for i in range(10)]}
    dataset = Dataset.from_dict(rows)
    path = tmp_path / f"data.{fmt}"
    {"jsonl": lambda: dataset.to_json(path), "json": lambda: path.write_text(json.dumps(dataset.to_list())),
     "csv": lambda: dataset.to_csv(path, index=False), "parquet": lambda: dataset.to_parquet(path)}[fmt]()
    cfg = local_cfg(path, eval_fraction=0.2, columns={"prompt": "question", "chosen": "good", "rejected": "bad",
                                                      "text": "good"})
    validate_data_only(cfg)
    task = build_task(cfg)
    assert len(task.prompts_train) == 8 and len(task.prompts_eval) == 2
    assert set(task.prompts_train + task.prompts_eval) == set(rows["question"])  # a split, no overlap, no loss
    assert {"chosen", "rejected"} == set(task.pairs_train.column_names)
    assert sorted(list(task.pairs_train["chosen"]) + list(task.pairs_eval["chosen"])) == sorted(rows["good"])
    assert task.sft_train["text"][0].startswith("good answer")


def test_local_fixture_files_with_their_own_column_names():
    sft = build_task(local_cfg(FIXTURES / "local" / "sft.jsonl", columns={"text": "body"}))
    assert len(sft.sft_train) + len(sft.sft_eval) == 12
    pairs = build_task(local_cfg(FIXTURES / "local" / "pairs.csv", eval_file=str(FIXTURES / "local" / "pairs.csv"),
                                 columns={"chosen": "good", "rejected": "bad"}))
    assert len(pairs.pairs_train) == 6 and pairs.pairs_train[0]["chosen"].startswith("A warm")
    prompts = build_task(local_cfg(FIXTURES / "local" / "prompts.json", columns={"prompt": "question"}))
    assert len(prompts.prompts_train) + len(prompts.prompts_eval) == 6


def test_a_stage_only_needs_its_own_columns(tmp_path):
    task = build_task(local_cfg(write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(20)])))
    assert len(task.prompts_train) == 19  # PPO prompts load although there is no text/chosen column


def test_max_samples_caps_after_a_shuffle_so_sorted_splits_keep_both_labels():
    task = build_task(data_cfg(name="imdb", path=str(FIXTURES / "imdb"), max_train_samples=4))
    assert len(task.sft_train) == 4
    assert len(task.pairs_train) >= 1  # the fixture is sorted by label; the first 4 rows are all positive


def validate_data_only(data):
    validate(OmegaConf.merge(compose("logger=none"), {"data": data}))


# ------------------------------------------------------------------------------------- per-stage files
def stage_files(tmp_path, n=40):
    return {"sft_file": str(write_jsonl(tmp_path / "texts.jsonl", [{"text": f"text {i}"} for i in range(n)])),
            "pairs_file": str(write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": f"good {i}", "rejected": f"bad {i}"}
                                                                    for i in range(n)])),
            "prompts_file": str(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"ask {i}"} for i in range(n)]))}


def test_each_stage_reads_a_file_of_its_own_and_holds_out_its_eval_rows_from_it(tmp_path):
    task = build_task(data_cfg(name="local", eval_fraction=0.25, **stage_files(tmp_path)))
    sft = (list(task.sft_train["text"]), list(task.sft_eval["text"]))
    pairs = (list(task.pairs_train["chosen"]), list(task.pairs_eval["chosen"]))
    prompts = (task.prompts_train, task.prompts_eval)
    for (train, held_out), word in ((sft, "text"), (pairs, "good"), (prompts, "ask")):
        assert {row.split()[0] for row in train + held_out} == {word}
        assert (len(train), len(held_out)) == (30, 10) and not set(train) & set(held_out)


def test_a_stage_file_replaces_the_shared_file_for_its_stage_only(tmp_path):
    shared = write_jsonl(tmp_path / "all.jsonl", [{"text": f"t {i}", "chosen": "c", "rejected": "r", "prompt": "shared"}
                                                  for i in range(20)])
    own = stage_files(tmp_path)["prompts_file"]
    task = build_task(local_cfg(shared, eval_file=str(shared), prompts_file=own))
    assert set(task.prompts_train + task.prompts_eval) <= {f"ask {i}" for i in range(40)}
    assert len(task.sft_train) == len(task.sft_eval) == 20  # the shared file and its eval file, as before


def test_a_missing_column_names_the_file_the_stage_that_wanted_it_and_both_fixes(tmp_path):
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "t"}] * 20)
    with pytest.raises(DataError, match=r"texts.jsonl has no column 'prompt' \(data.columns.prompt\), which the RL "
                                        r"stage's prompts need; its columns are text; set data.columns.prompt=<one "
                                        r"of them>, or give the stage a file of its own: data.prompts_file=<file>$"):
        build_task(local_cfg(texts)).prompts_train


def test_rows_of_a_stage_file_are_named_by_their_line_in_it(tmp_path):
    files = stage_files(tmp_path)
    rows = [{"prompt": "fine"}] * 6 + [{"prompt": 42}] + [{"prompt": "fine"}] * 3
    files["prompts_file"] = str(write_jsonl(tmp_path / "prompts.jsonl", rows))
    with pytest.raises(DataError, match=r"prompts.jsonl line 7, column 'prompt' is a number \(42\) where text belongs"):
        task = build_task(data_cfg(name="local", **files))
        task.prompts_train, task.prompts_eval


@pytest.mark.parametrize("overrides, message", [
    # The default chain trains SFT, reward and PPO: each needs a file, the shared one or its own.
    (["data.prompts_file={prompts_file}"], "data=local gives the sft stage no file"),
    (["data.sft_file={sft_file}", "data.prompts_file={prompts_file}"], "data=local gives the reward stage no file"),
    (["data.sft_file={sft_file}", "data.pairs_file={pairs_file}"], "data=local gives the ppo stage no file"),
    (["data.sft_file={sft_file}", "data.pairs_file={pairs_file}", "data.prompts_file={prompts_file}"], None),
    # Given upstream outputs are not trained, so the RL stage's prompts are all it needs.
    (["data.prompts_file={prompts_file}", "stage.sft_model={tmp}", "stage.reward_adapter={tmp}"], None),
])
def test_data_local_needs_a_file_for_every_stage_the_run_trains(tmp_path, overrides, message):
    values = {**stage_files(tmp_path), "tmp": str(tmp_path)}
    cfg = compose("data=local", *(o.format(**values) for o in overrides))
    if message is None:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match=f"data.train_file=None: {message}; set data.train_file="):
            validate(cfg)


# ------------------------------------------------------------------------------------------- bad data
def test_empty_string_names_the_row_and_column(tmp_path):
    rows = [{"prompt": "fine"}] * 30 + [{"prompt": "   "}] + [{"prompt": "fine"}] * 9
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(DataError, match=r"prompts.jsonl line 31, column 'prompt' is empty \(1 bad cell in all\)"):
        build_task(local_cfg(path, eval_file=str(path))).prompts_train


def test_null_cell_is_reported_as_missing(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "a", "rejected": "b"}, {"chosen": None, "rejected": "b"}])
    with pytest.raises(DataError, match=r"pairs.jsonl line 2, column 'chosen' is missing"):
        build_task(local_cfg(path, eval_file=str(path))).pairs_train


def test_bad_rows_can_be_skipped_and_counted(tmp_path, caplog):
    rows = [{"prompt": "fine"}] * 8 + [{"prompt": ""}, {"prompt": None}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with caplog.at_level("WARNING"):
        prompts = build_task(local_cfg(path, eval_file=str(path), on_bad_row="skip")).prompts_train
    assert prompts == ["fine"] * 8
    assert "skipped 2 rows" in caplog.text


@pytest.mark.parametrize("content", [b"", b"prompt\n"], ids=["empty-jsonl", "header-only-csv"])
def test_empty_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / ("data.jsonl" if not content else "data.csv")
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"data\.(jsonl|csv) has no rows"):
        build_task(local_cfg(path, eval_file=str(path))).prompts_train


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl: line 2 is not UTF-8 \(byte 0xe9 at column 16\); re-save"):
        build_task(local_cfg(path, eval_file=str(path))).prompts_train


def test_a_malformed_json_line_is_named_by_its_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "fine"}\n\n{"prompt": \n')  # the blank line counts: the user's editor shows it
    with pytest.raises(DataError, match=r"broken.jsonl line 3 is not valid JSON \(Expecting value at column 12\); fix that line$"):
        build_task(local_cfg(path, eval_file=str(path))).prompts_train


def test_unreadable_file_names_the_file_and_format(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "fine"}, {"prompt": ]\n')  # a JSON array: no line to name
    with pytest.raises(DataError, match=r"broken.json: could not be read as json"):
        build_task(local_cfg(path, eval_file=str(path))).prompts_train


def test_hh_rlhf_row_without_an_assistant_turn(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"chosen": "\n\nHuman: hi", "rejected": "x"}) + "\n")
    with pytest.raises(DataError, match=r"row 0: no 'Assistant:' turn"):
        build_task(data_cfg(name="hh_rlhf", path=str(tmp_path))).prompts_train


def test_imdb_without_negative_reviews(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": 1}] * 3)
    with pytest.raises(DataError, match=r"pairs need both positive \(label 1\)"):
        build_task(data_cfg(name="imdb", path=str(tmp_path))).pairs_train


def test_unavailable_hub_dataset_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"data.path='nobody/no-such-dataset' split 'train' could not be loaded"):
        build_task(data_cfg(name="imdb", path="nobody/no-such-dataset")).sft_train


def test_too_long_prompts_are_an_error_or_skipped(tokenizer):
    prompts = ["the movie was", "word " * 200, "i liked it"]
    origins = [f"prompts.jsonl row {i}" for i in range(3)]
    from marl_exp.data.checks import fit_prompts

    with pytest.raises(DataError, match=r"prompts.jsonl row 1: prompt has \d+ tokens, more than the 40 .*stage."
                                        r"sampling.max_new_tokens or set data.on_bad_row=skip"):
        fit_prompts(prompts, origins, tokenizer, 40, "error", what="train prompts")
    assert fit_prompts(prompts, origins, tokenizer, 40, "skip", what="train prompts") == [prompts[0], prompts[2]]
    with pytest.raises(DataError, match="row 0"):  # skipping every prompt leaves nothing to train on
        fit_prompts(prompts[:2], origins, tokenizer, 2, "skip", what="train prompts")


@pytest.mark.parametrize("override, message", [
    ("data=local", "data.train_file=None: data=local gives the sft stage no file"),
    ("data=local data.train_file=missing.jsonl", "data.train_file='missing.jsonl' does not exist"),
    ("data=local data.prompts_file=missing.jsonl", "data.prompts_file='missing.jsonl' does not exist"),
    ("data=imdb data.path=x data.pairs_file=p.jsonl", "data.pairs_file='p.jsonl' is for data=local"),
    ("data=local data.train_file=x.txt", "data.train_file='x.txt' has an unknown format"),
    ("data=imdb data.path=null", "data.path=None: data=imdb needs a hub id"),
    ("data.on_bad_row=ignore", "data.on_bad_row='ignore' is not valid"),
    ("data=imdb data.max_train_samples=0", "data.max_train_samples=0 must be > 0"),
    ("upstream.sft.learning_rate=-1", "upstream.sft.learning_rate=-1"),
    ("stage=reward upstream.sft.finetune=partial", "upstream.sft.finetune='partial' is not valid"),
])
def test_bad_data_configs_fail_before_loading(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate(compose(*override.split()))


# ------------------------------------------------------------------------------------- stages and presets
@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes_and_validates(preset):
    cfg = compose(f"experiment={preset}")
    validate(cfg)
    expected = {"smollm2_sentiment": ("grpo", "movie_sentiment"), "smollm2_sentiment_ppo": ("ppo", "movie_sentiment"),
                "smollm2_sentiment_rloo": ("rloo", "movie_sentiment")}.get(preset, ("ppo", None))
    assert cfg.stage.name == expected[0]
    assert cfg.data.name == expected[1] if expected[1] else cfg.data.name in ("imdb", "hh_rlhf")


def test_llama_hh_preset_is_the_seed_setup():
    cfg = compose("experiment=llama7b_hh_multi_adapter")
    assert cfg.model.path == "huggyllama/llama-7b" and cfg.stage.sft_model == cfg.model.path
    assert cfg.stage.reward_adapter == "trl-lib/llama-7b-hh-rm-adapter"
    assert (cfg.quant.mode, cfg.quant.bnb_4bit_quant_type) == ("4bit", "nf4")
    assert (cfg.adapter.r, cfg.adapter.lora_alpha, cfg.adapter.lora_dropout) == (16, 32, 0.05)
    stage = cfg.stage
    assert (stage.optim.learning_rate, stage.batch_size, stage.optim.mini_batch_size, stage.sampling.top_p, stage.sampling.max_new_tokens) == \
        (1e-5, 8, 2, 0.9, 32)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "debug").glob("*.yaml")))
def test_every_debug_preset_composes_and_validates(preset):
    cfg = compose(f"debug={preset}")
    validate(cfg)
    # debug=rl keeps the stage chosen beside it (any RL stage; ppo by default); the others set their own.
    assert cfg.model.name == "tiny" and cfg.logger.name == "none" and cfg.stage.name == ("ppo" if preset == "rl" else preset)


def test_upstream_settings_reach_the_cached_stage(tmp_path):
    from marl_exp.stages.pipeline import config_hash, upstream_config

    cfg = compose("stage=ppo", "upstream.sft.max_steps=7", "upstream.reward.learning_rate=0.01")
    sft = upstream_config(cfg, "sft")
    reward = upstream_config(cfg, "reward")
    assert sft.stage.max_steps == 7 and reward.stage.learning_rate == 0.01
    # The reward stage builds its own SFT upstream from the same settings (one SFT entry, not two).
    assert config_hash(upstream_config(reward, "sft")) == config_hash(sft)
    assert config_hash(sft) != config_hash(upstream_config(compose("stage=ppo"), "sft"))


def test_sft_and_reward_stages_train_on_imdb_fixture(tmp_path):
    from marl_exp.stages.pipeline import cache_dir, run_stage, upstream_config
    from test_stages import assert_lora_b_trained, assert_sft_loss_fell, hf_pairwise_accuracy

    cfg = compose("stage=reward", *QUICK, f"output_dir={tmp_path}", "data=imdb", f"data.path={FIXTURES / 'imdb'}",
                  "upstream.sft.max_steps=3", "upstream.sft.batch_size=4", "stage.batch_size=4")
    summary = run_stage(cfg, tmp_path / "run")
    sft_run, adapter = cache_dir(upstream_config(cfg, "sft")), tmp_path / "run" / "reward_adapter"
    assert_sft_loss_fell(json.loads((sft_run / "summary.json").read_text()))
    assert_lora_b_trained(adapter)
    # The accuracy reported is that of the adapter saved, on the fixture's held-out pairs.
    low, high = hf_pairwise_accuracy(sft_run / "model", adapter, build_task(cfg.data).pairs_eval, "fp32",
                                     cfg.stage.eval_batch_size)
    assert low <= summary["eval/pairwise_accuracy"] <= high, (summary["eval/pairwise_accuracy"], low, high)


def test_ppo_on_hh_rlhf_fixture(trained_chain, tmp_path):
    from marl_exp.stages.pipeline import run_stage

    cfg = compose("stage=ppo", "logger=none", f"output_dir={tmp_path}", f"stage.sft_model={trained_chain['sft_model']}",
                  f"stage.reward_adapter={trained_chain['reward_adapter']}", "data=hh_rlhf",
                  f"data.path={FIXTURES / 'hh_rlhf'}", "stage.steps=1", "stage.batch_size=4", "stage.optim.mini_batch_size=2",
                  "stage.optim.ppo_epochs=1", "stage.eval.eval_samples=2", "stage.sampling.max_new_tokens=8")
    summary = run_stage(cfg, tmp_path / "run")
    assert "eval/after/reward_score" in summary and "eval/after/oracle_score" not in summary  # no oracle
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(sample["query"].endswith("Assistant:") for sample in samples)


def test_ppo_refuses_prompts_longer_than_the_context_before_loading_models(trained_chain, tmp_path):
    from marl_exp.stages.pipeline import run_stage

    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the movie was"}, {"prompt": "great " * 150}])
    cfg = compose("stage=ppo", "logger=none", f"output_dir={tmp_path}", f"stage.sft_model={trained_chain['sft_model']}",
                  f"stage.reward_adapter={trained_chain['reward_adapter']}", "data=local", f"data.train_file={path}",
                  f"data.eval_file={path}")
    # Context 128 - 24 response tokens - the EOS the reward model reads after the response = 103.
    with pytest.raises(DataError, match=r"prompts.jsonl line 2: prompt has \d+ tokens, more than the 103 that fit in "
                                        r"the context with the response and the 1 token the reward model reads"):
        run_stage(cfg, tmp_path / "run")


def test_bad_data_through_the_cli_is_one_line_and_exit_2(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"body": "text"}] * 4)
    result = subprocess.run(
        [sys.executable, "train.py", "stage=sft", "logger=none", "data=local", f"data.train_file={path}",
         f"data.eval_file={path}", f"output_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if "has no column" in line]
    assert len(error_lines) == 1 and "data.columns.text" in error_lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_debug_preset_runs_the_whole_chain_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "debug=ppo", f"output_dir={tmp_path}",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train/steps"] == 4 and "eval/after/oracle_score" in summary
    assert len(list((tmp_path / "cache").glob("sft-*"))) == 1 and len(list((tmp_path / "cache").glob("reward-*"))) == 1
