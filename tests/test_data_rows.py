"""Local data errors name rows as the user counts them (a JSON Lines file's line, a CSV's 1-based data row),
before the seeded train/eval split; cells that are not text are refused as such; SFT examples are measured
against stage.max_length as TRL's SFTTrainer tokenizes them; a handful of held-out pairs is said to be noise."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from conftest import REPO, compose
from marl_exp.config import DataConfig
from marl_exp.data import build_task, loaders
from marl_exp.data.checks import DataError, fit_pairs, fit_sft_texts, sft_token_lengths, warn_if_few_held_out
from marl_exp.modeling.loading import resolve_model_path

FIXTURES = REPO / "tests" / "fixtures" / "data"


def local_cfg(train_file, **values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "local", "train_file": str(train_file), **values})


def write_jsonl(path: Path, rows: list) -> Path:
    """Each row a line; a row given as a string is written as is (a blank line, or a raw JSON object)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return resolve_model_path(compose().model)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def split_errors(cfg) -> dict[str, str]:
    """The error each split's prompts raise (none: not in the dict)."""
    errors = {}
    for split in ("train", "eval"):
        try:
            build_task(cfg).prompts(split)
        except DataError as err:
            errors[split] = str(err)
    return errors


# ------------------------------------------------------------------------------- rows as the user counts
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_missing_cell_on_file_row_50_is_named_there_wherever_the_split_puts_it(tmp_path, fmt):
    rows = [{"prompt": f"prompt {n}", "id": n} for n in range(1, 101)]
    rows[49] = {"id": 50}  # file row 50 has no prompt
    if fmt == "jsonl":
        path, where = write_jsonl(tmp_path / "prompts.jsonl", rows), "line 50"
    else:
        path, where = tmp_path / "prompts.csv", "data row 50"
        path.write_text("prompt,id\n" + "".join(f"{r.get('prompt', '')},{r['id']}\n" for r in rows))
    landed = set()
    for seed in range(6):
        errors = split_errors(local_cfg(path, eval_fraction=0.2, seed=seed))
        assert len(errors) == 1, errors  # one split holds row 50; the other loads
        (split, message), = errors.items()
        landed.add(split)
        assert message == (f"{path} {where}, column 'prompt' is missing (1 bad cell in all); fix the data or set "
                           "data.on_bad_row=skip")
    assert landed == {"train", "eval"}  # the seeds put it on both sides of the split


def test_jsonl_lines_count_blank_lines_as_the_file_has_them(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, "", {"prompt": "b"}, "  ", {"prompt": ""}])
    with pytest.raises(DataError, match=rf"^{path} line 5, column 'prompt' is empty \(1 bad cell in all\)"):
        build_task(local_cfg(path, eval_file=str(path))).prompts_train


@pytest.mark.parametrize("cell, problem", [
    ("42", "a number (42) where text belongs"),
    ("4.5", "a number (4.5) where text belongs"),
    ("true", "true/false (true) where text belongs"),
    ('{"text": "hi"}', "an object where text belongs"),
    ('["hi"]', "a list that is not messages ({role, content} with text) where text belongs"),
])
def test_a_value_that_is_not_text_is_named_for_what_it_is(tmp_path, cell, problem):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, {"prompt": "also fine"},
                                                    '{"prompt": ' + cell + "}", {"prompt": "fine again"}])
    with pytest.raises(DataError) as err:
        build_task(local_cfg(path, eval_file=str(path))).prompts_train
    assert str(err.value) == (f"{path} line 3, column 'prompt' is {problem} (1 bad cell in all); fix the data or "
                              "set data.on_bad_row=skip")


def test_a_json_array_names_its_1_based_data_row(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "fine"}, {"prompt": 42}, {"prompt": "fine"}], indent=2))
    with pytest.raises(DataError, match=rf"^{path} data row 2, column 'prompt' is a number \(42\)"):
        build_task(local_cfg(path, eval_file=str(path))).prompts_train


def test_a_column_of_numbers_is_not_a_text_column(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("chosen,rejected\ngood,1\nbetter,2\n")
    with pytest.raises(DataError, match=rf"^{path} data row 1, column 'rejected' is a number \(1\) where text "
                                        r"belongs \(2 bad cells in all\)"):
        build_task(local_cfg(path, eval_file=str(path))).pairs_train


def test_non_text_cells_are_skipped_and_counted(tmp_path, caplog):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, {"prompt": 42}, {"prompt": None},
                                                    {"prompt": "fine too"}])
    with caplog.at_level(logging.WARNING):
        prompts = build_task(local_cfg(path, eval_file=str(path), on_bad_row="skip")).prompts_train
    assert prompts == ["fine", "fine too"] and "skipped 2 rows" in caplog.text


def test_every_row_name_points_at_its_own_line_after_the_split(tmp_path):
    # The independent reference: the file's own lines, read by hand.
    rows = [{"prompt": f"prompt {n}", "chosen": f"good {n}", "rejected": f"bad {n}", "text": f"text {n}"}
            for n in range(40)]
    path = write_jsonl(tmp_path / "all.jsonl", [rows[0], "", *rows[1:]])  # a blank line 2
    lines = path.read_text().splitlines()

    def line_of(name: str) -> dict:
        assert name.startswith(f"{path} line ")
        return json.loads(lines[int(name.rsplit(" ", 1)[1]) - 1])

    cfg = local_cfg(path, eval_fraction=0.25, seed=3)
    for split in ("train", "eval"):
        task = build_task(cfg)
        prompts, origins = task.prompts(split), task.prompt_origins[split]
        assert [line_of(o)["prompt"] for o in origins] == prompts
        pairs, names = loaders.pair_rows(cfg, split)
        assert [line_of(n)["chosen"] for n in names] == pairs["chosen"]
        texts, names = loaders.sft_rows(cfg, split)
        assert [line_of(n)["text"] for n in names] == texts["text"]
        assert loaders.row_names(cfg, "sft", split) == names


def test_a_too_long_prompt_on_file_row_60_is_named_there(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"prompt {n}"} for n in range(100)]
    rows[59] = {"prompt": "word " * 200}
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    task = build_task(local_cfg(path, seed=1))
    with pytest.raises(DataError, match=rf"^{path} line 60: prompt has \d+ tokens, more than the 40"):
        task.fit_prompts(tiny_tokenizer, 40, "error")


def test_hub_rows_are_their_index_in_the_split_after_the_capping_shuffle():
    raw = [json.loads(line) for line in (FIXTURES / "imdb" / "train.jsonl").read_text().splitlines()]
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig),
                          {"name": "imdb", "path": str(FIXTURES / "imdb"), "prompt_words": 3, "max_train_samples": 5})
    task = build_task(cfg)
    prompts, origins = task.prompts_train, task.prompt_origins["train"]
    assert all(origin.startswith(f"{FIXTURES / 'imdb'} [train] row ") for origin in origins)
    rows = [int(origin.rsplit(" ", 1)[1]) for origin in origins]
    assert len(rows) == 5 and rows != sorted(rows)  # shuffled before the cap
    assert [raw[row]["text"].split()[:3] for row in rows] == [prompt.split() for prompt in prompts]


def test_over_long_pairs_name_the_longest_by_its_file_line(tmp_path, tiny_tokenizer):
    rows = [{"chosen": f"good {n}", "rejected": f"bad {n}"} for n in range(30)]
    rows[11] = {"chosen": "good " * 40, "rejected": "bad"}
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = local_cfg(path, eval_file=str(path))
    pairs = build_task(cfg).pairs_train
    with pytest.raises(DataError, match=rf"1 of 30 pairs .* \(the longest, {path} line 12, has \d+\)"):
        fit_pairs(pairs, tiny_tokenizer, 20, "error", "pairs", lambda: loaders.row_names(cfg, "pairs", "train"))


# ------------------------------------------------------------------------------------ SFT token budgets
def sft_examples(kind: str) -> Dataset:
    short, long = "the movie was great .", "the movie was great . " * 12
    if kind == "text":
        return Dataset.from_dict({"text": [short, long, short + " i liked it", long + " really"]})
    if kind == "messages":
        return Dataset.from_dict({"messages": [[{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]
                                               for t in (short, long, short)]})
    return Dataset.from_dict({"prompt": [short, long, short, long + " and more"],
                              "completion": [" yes", " no", short, " fine"]})


def trl_sft(tiny_dir, tokenizer, texts: Dataset, work, max_length):
    """The independent reference: the dataset TRL's SFTTrainer prepares (tokens, truncation, drops)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    args = SFTConfig(output_dir=str(work), report_to="none", use_cpu=True, max_length=max_length, packing=False)
    return SFTTrainer(model=model, args=args, train_dataset=texts, processing_class=tokenizer).train_dataset


def chat_tokenizer(tiny_dir):
    from marl_exp.data import chat

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    chat.apply_template(tokenizer, compose("data=reviews_chat").data, True)
    return tokenizer


@pytest.mark.parametrize("kind", ["text", "messages", "prompt_completion"])
def test_sft_lengths_are_the_sft_trainers(tiny_dir, tmp_path, kind):
    tokenizer = chat_tokenizer(tiny_dir) if kind == "messages" else AutoTokenizer.from_pretrained(tiny_dir)
    texts = sft_examples(kind)
    lengths, prompts = sft_token_lengths(texts, tokenizer)
    prepared = trl_sft(tiny_dir, tokenizer, texts, tmp_path, None)
    assert lengths == [len(ids) for ids in prepared["input_ids"]]
    # TRL's labels: -100 on the prompt's tokens, which train nothing
    trl_prompts = [next(i for i, label in enumerate(labels) if label != -100) for labels in prepared["labels"]]
    assert prompts == trl_prompts and max(lengths) > 30


def test_long_sft_texts_train_cut_and_are_counted_once(tiny_dir, tiny_tokenizer, tmp_path, caplog):
    texts = sft_examples("text")
    lengths, _ = sft_token_lengths(texts, tiny_tokenizer)
    limit = 20
    cut = trl_sft(tiny_dir, tiny_tokenizer, texts, tmp_path, limit)
    assert len(cut) == len(texts) and max(len(ids) for ids in cut["input_ids"]) == limit  # TRL cuts, keeps them
    with caplog.at_level(logging.WARNING):
        assert fit_sft_texts(texts, tiny_tokenizer, limit, "error", "my SFT examples") is texts
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    n_cut = sum(n > limit for n in lengths)
    assert len(warnings) == 1 and warnings[0].startswith(
        f"my SFT examples: {n_cut} of 4 examples are longer than stage.max_length=20 tokens and train on their first "
        f"20 only (the longest, row 3, has {max(lengths)}); raise stage.max_length")


def test_prompts_that_fill_the_window_are_an_error_or_skipped_as_sft_trainer_would_drop_them(
        tiny_dir, tiny_tokenizer, tmp_path, caplog):
    texts = sft_examples("prompt_completion")
    limit = 20
    kept_by_trl = trl_sft(tiny_dir, tiny_tokenizer, texts, tmp_path, limit)
    assert len(kept_by_trl) == 2  # the two long prompts leave no completion: TRL drops them without a word
    _, prompts = sft_token_lengths(texts, tiny_tokenizer)
    with pytest.raises(DataError) as err:
        fit_sft_texts(texts, tiny_tokenizer, limit, "error", "my SFT examples", lambda: [f"f.jsonl line {n}"
                                                                                         for n in (3, 5, 8, 13)])
    assert str(err.value) == (
        f"my SFT examples: 2 of 4 prompts fill stage.max_length=20 tokens, leaving no completion to train on (the "
        f"longest, f.jsonl line 13, has {prompts[3]}); raise stage.max_length (upstream.sft.max_length when a reward "
        f"or RL run trains the SFT model) to more than {prompts[3]}, or set data.on_bad_row=skip to drop them")
    with caplog.at_level(logging.WARNING):
        kept = fit_sft_texts(texts, tiny_tokenizer, limit, "skip", "my SFT examples")
    assert kept.to_list() == [texts[0], texts[2]] and "skipped 2 of 4 examples" in caplog.text
    assert [min(n, limit) for n in sft_token_lengths(kept, tiny_tokenizer)[0]] == \
        [len(ids) for ids in kept_by_trl["input_ids"]]  # the examples TRL keeps, as TRL cuts them


def test_sft_stage_refuses_prompts_that_fill_the_window_before_training(tmp_path):
    rows = [{"prompt": f"question {n} ?", "completion": f" answer {n}"} for n in range(20)]
    rows[6] = {"prompt": "a long question " * 20, "completion": " short"}
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    proc = subprocess.run([sys.executable, "train.py", "stage=sft", "logger=none", "data=local", f"data.train_file={path}",
                           "stage.max_length=24", f"output_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("marl-exp: error:")]
    assert len(error_lines) == 1 and "1 of " in error_lines[0] and f"{path} line 7" in error_lines[0], \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------- a handful held out
def test_a_handful_of_held_out_pairs_is_called_noise(caplog):
    with caplog.at_level(logging.WARNING):
        warn_if_few_held_out(1, "pair", "pairwise accuracy", "local eval preference pairs")
        warn_if_few_held_out(10, "pair", "pairwise accuracy", "local eval preference pairs")
    assert [r.getMessage() for r in caplog.records] == [
        "local eval preference pairs: held-out pairwise accuracy from 1 pair is noise (each moves it by 1.00); hold "
        "out at least 10 (a local file: data.eval_file or a larger data.eval_fraction)"]


def test_a_three_row_pairs_file_trains_and_says_its_held_out_accuracy_is_noise(tmp_path):
    rows = [{"text": f"the movie was {w} .", "chosen": f"the movie was {w} .", "rejected": "the movie was bad ."}
            for w in ("great", "fine", "lovely")]
    path = write_jsonl(tmp_path / "three.jsonl", rows)
    proc = subprocess.run([sys.executable, "train.py", "debug=reward", "data=local", f"data.train_file={path}",
                           "upstream.sft.max_steps=2", "stage.max_steps=2", f"output_dir={tmp_path}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if "is noise" in line]
    assert len(noise) == 1, proc.stdout[-3000:]
    assert "held-out pairwise accuracy from 1 pair is noise (each moves it by 1.00)" in noise[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval/pairwise_accuracy"] in (0.0, 1.0)  # one pair: all or nothing
