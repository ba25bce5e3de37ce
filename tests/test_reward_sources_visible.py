"""Every reward source is visible wherever the reward is (issue 23, item 5): the console's evaluation lines and
final table, ``samples.jsonl``, the W&B samples table and ``marl-exp sample`` show each source beside the
weighted total. References: the function's value computed by hand from the printed text, the weighted sum by
hand, the reward adapter through HF's sequence classifier + plain peft, the KL through HF's causal LM + plain
peft (with and without the adapter).

Two real runs of the tiny model (``debug=rl``, GRPO, a few seconds each): a mixed reward
``1 × reward (the upstream adapter) + 0.5 × words`` and a function-only reward ``1 × words``
(``reward_functions:word_count``, the number of words of a completion).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

GRPO = ("debug=rl", "stage=grpo", "stage.sampling.num_generations=4", "stage.eval.samples_every=2")
MIXED = "+stage.rewards={reward:{},words:{function:'reward_functions:word_count',weight:0.5}}"
WORDS_ONLY = "+stage.rewards={words:{function:'reward_functions:word_count'}}"
NUMBER = r"(-?\d+\.\d+)"


def train(out: Path, rewards: str) -> tuple[Path, str]:
    """A GRPO run through ``train.py`` as a user starts it; its run dir and console output (stdout)."""
    earlier = set((out / "runs").glob("*/*_grpo"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "train.py", *GRPO, rewards, f"output_dir={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = set((out / "runs").glob("*/*_grpo")) - earlier
    return run_dir, proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    out = tmp_path_factory.mktemp("sources")  # one output dir: the second run reuses the cached SFT model
    return {"mixed": train(out, MIXED), "words": train(out, WORDS_ONLY)}


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def shown(value: float) -> str:
    """A number as the console prints it: 3 decimals below 10, 1 above."""
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def words(text: str) -> float:
    return float(len(text.split()))


# ------------------------------------------------------------------------------------------- console
def test_eval_lines_show_each_source_and_the_weighted_total(runs):
    run_dir, stdout = runs["mixed"]
    summary = summary_of(run_dir)
    lines = [line for line in stdout.splitlines() if line.startswith("eval ")]
    assert [line.split()[1] for line in lines] == ["before", "during", "after"]
    pattern = re.compile(rf"^eval (\w+) step \d+/\d+: reward {NUMBER} = 1 × reward {NUMBER} "
                         rf"\+ 0\.5 × words {NUMBER} \| ")
    for line in lines:
        match = pattern.match(line)
        assert match, line
        tag, numbers = match.group(1), match.groups()[1:]
        if tag in ("before", "after"):  # the numbers are the logged ones
            assert numbers == tuple(shown(summary[f"eval/{tag}/{key}"]) for key in (
                "reward_score", "rewards/reward/mean", "rewards/words/mean"))
    for tag in ("before", "after"):  # the total is the weighted sum of the sources shown beside it
        assert summary[f"eval/{tag}/reward_score"] == pytest.approx(
            summary[f"eval/{tag}/rewards/reward/mean"] + 0.5 * summary[f"eval/{tag}/rewards/words/mean"], abs=1e-5)


def test_the_final_table_shows_each_source_before_and_after(runs):
    run_dir, stdout = runs["mixed"]
    summary = summary_of(run_dir)
    lines = stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("marl-exp: result of the grpo stage")):]
    rows = {line[:29].strip(): line[29:].split() for line in table[2:] if "->" in line}

    def before_after(key: str) -> list[str]:
        return [shown(summary[f"eval/before/{key}"]), "->", shown(summary[f"eval/after/{key}"])]

    assert rows["reward"] == before_after("reward_score")
    assert rows["1 × reward"] == before_after("rewards/reward/mean")
    assert rows["0.5 × words"] == before_after("rewards/words/mean")
    names = [line[:29].strip() for line in table[2:5]]
    assert names == ["reward", "1 × reward", "0.5 × words"]  # the sources right under the total


def test_a_function_only_run_names_its_source(runs):
    run_dir, stdout = runs["words"]
    summary = summary_of(run_dir)
    after = next(line for line in stdout.splitlines() if line.startswith("eval after"))
    value = shown(summary["eval/after/reward_score"])
    assert f": reward {value} = 1 × words {value} | " in after
    assert "  reward     1 × words (stage.rewards)" in stdout  # the plan says the same


# -------------------------------------------------------------------------------------- samples.jsonl
def test_samples_jsonl_has_a_column_per_source(runs):
    run_dir, _ = runs["mixed"]
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {row["split"] for row in rows} >= {"train", "eval"} and {row["eval"] for row in rows} >= {"before", "after"}
    for row in rows:
        assert row["rewards/words"] == words(row["response"])  # the function, by hand, on the text shown
        assert row["reward"] == pytest.approx(row["rewards/reward"] + 0.5 * row["rewards/words"], abs=1e-5)


def test_the_wandb_samples_table_has_a_column_per_source(tmp_path):
    import wandb

    from marl_exp.stages.rl import RLRecipe

    logged = []

    class Run:
        def log(self, data, step):
            logged.append((data, step))

    recipe = RLRecipe.__new__(RLRecipe)
    recipe.run_dir, recipe.tracker = tmp_path, type("Tracker", (), {"wandb_run": Run()})()
    samples = [{"query": "q", "response": " a b", "reward": 1.5, "rewards/reward": 0.5, "rewards/words": 2.0,
                "oracle": None, "well_formed": None}]
    recipe._log_samples(3, "after", "policy", samples)
    ((data, step),) = logged
    table = data["samples/policy"]
    assert step == 3 and isinstance(table, wandb.Table)
    assert table.columns == ["query", "response", "reward", "rewards/reward", "rewards/words", "oracle", "well_formed"]
    assert table.data == [["q", " a b", 1.5, 0.5, 2.0, None, None]]


# ------------------------------------------------------------------------------------ marl-exp sample
def sample_rows(*args) -> tuple[list[dict], str]:
    from marl_exp import sample

    rows, table = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(rows):
        assert sample.main([*args, "--json"]) == 0
    with contextlib.redirect_stdout(table):
        assert sample.main(list(args)) == 0
    return [json.loads(line) for line in rows.getvalue().splitlines() if line.startswith("{")], table.getvalue()


SAME_PROMPT = ("--prompts", "the movie was", "the movie was", "--max-new-tokens", "8")  # one length: no padding


def hf_kl(base: str, policy_dir: Path, prompt_ids: list[int], response_ids: list[int], temperature: float,
          dtype: torch.dtype) -> float:
    """Independent reference: Σ over the response of log π(token) − log π_ref(token), through HF's causal LM
    with the policy adapter through plain peft (π) and the same model with the adapter disabled (π_ref), all in
    ``dtype``: at fp32 its difference from fp64 is the noise of the whole fp32 computation, log-softmax included."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), str(policy_dir)).eval()
    ids = torch.tensor([prompt_ids + response_ids])
    targets = torch.tensor(response_ids)
    window = slice(len(prompt_ids) - 1, ids.shape[1] - 1)  # the logits that predict the response tokens

    def logprobs(logits):  # in the model's precision, as the trainer's (fp32 log-softmax of fp32 logits)
        return torch.log_softmax(logits[0, window] / temperature, -1).gather(-1, targets[:, None]).sum()

    with torch.no_grad():
        policy = logprobs(model(input_ids=ids).logits)
        with model.disable_adapter():
            reference = logprobs(model(input_ids=ids).logits)
    return (policy - reference).item()


def hf_kl_batch(base: str, policy_dir: Path, prompt_ids: list[list[int]], response_ids: list[list[int]],
                pad_id: int) -> list[float]:
    """``hf_kl`` of the rows as one right-padded fp32 batch: the same sums, other matmul shapes (a batch is how
    ``marl-exp sample`` scores them), so its difference from the row-by-row reference is fp32 batching noise."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      str(policy_dir)).eval()
    rows = [p + r for p, r in zip(prompt_ids, response_ids)]
    width = max(map(len, rows))
    ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])

    def logprobs(logits):
        return [torch.log_softmax(logits[i, len(p) - 1:len(p) + len(r) - 1], -1)
                .gather(-1, torch.tensor(r)[:, None]).sum() for i, (p, r) in enumerate(zip(prompt_ids, response_ids))]

    with torch.no_grad():
        policy = logprobs(model(input_ids=ids, attention_mask=mask).logits)
        with model.disable_adapter():
            reference = logprobs(model(input_ids=ids, attention_mask=mask).logits)
    return [(a - b).item() for a, b in zip(policy, reference)]


def kl_references(run_dir: Path, rows: list[dict]) -> tuple[list[float], float]:
    """HF + peft KLs of the policy rows in fp32, and the fp32 reference's own noise floor: its largest
    difference from the same computation in fp64, or from the same rows computed as one padded batch
    (kernels pick other blockings for other shapes, differently on different CPUs)."""
    from transformers import AutoTokenizer

    record = json.loads((run_dir / "run_record.json").read_text())
    base = record["inputs"]["sft_model"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    policy_dir = run_dir / "policies" / "policy"
    fp32, fp64 = [], []
    for row in rows:
        prompt_ids = tokenizer(row["prompt"]).input_ids
        fp32.append(hf_kl(base, policy_dir, prompt_ids, row["response_ids"], 1.0, torch.float32))
        fp64.append(hf_kl(base, policy_dir, prompt_ids, row["response_ids"], 1.0, torch.float64))
    batched = hf_kl_batch(base, policy_dir, [tokenizer(row["prompt"]).input_ids for row in rows],
                          [row["response_ids"] for row in rows], tokenizer.pad_token_id or 0)
    return fp32, max(abs(a - b) for other in (fp64, batched) for a, b in zip(fp32, other))


def reward_references(run_dir: Path, rows: list[dict]) -> tuple[list[float], float]:
    """Independent reference of the reward adapter's scores: HF's sequence classifier with the adapter through
    plain peft, on the text as its trainer read it (the sampled tokens after the prompt's, then EOS), in fp32;
    and the fp32 reference's own noise floor (its largest difference from the same in fp64)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    record = json.loads((run_dir / "run_record.json").read_text())
    base, adapter = record["inputs"]["sft_model"], record["inputs"]["reward_adapter"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    scores = {}
    for dtype in (torch.float32, torch.float64):
        classifier = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
        classifier.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(classifier, adapter).eval()
        scores[dtype] = []
        for row in rows:
            eos = [] if row["response_ids"][-1:] == [tokenizer.eos_token_id] else [tokenizer.eos_token_id]
            ids = torch.tensor([tokenizer(row["prompt"]).input_ids + row["response_ids"] + eos])
            with torch.no_grad():
                scores[dtype].append(model(input_ids=ids).logits[0, 0].item())
    fp32, fp64 = scores[torch.float32], scores[torch.float64]
    return fp32, max(abs(a - b) for a, b in zip(fp32, fp64))


def test_sample_scores_with_the_runs_own_sources_and_shows_kl(runs):
    run_dir, _ = runs["mixed"]
    rows, table = sample_rows(str(run_dir), *SAME_PROMPT)
    assert len(rows) == 4 and [r["role"] for r in rows] == ["reference"] * 2 + ["policy"] * 2
    adapter_scores, noise = reward_references(run_dir, rows)
    for row, adapter_score in zip(rows, adapter_scores):
        assert row["rewards/words"] == words(row["response"])
        assert row["rewards/reward"] == pytest.approx(adapter_score, abs=2 * noise)  # two fp32 results, each ± noise
        assert row["reward"] == pytest.approx(row["rewards/reward"] + 0.5 * row["rewards/words"], abs=1e-5)
        assert (row["kl"] is None) == (row["role"] == "reference")
    policy = [row for row in rows if row["role"] == "policy"]
    expected, noise = kl_references(run_dir, policy)
    assert [row["kl"] for row in policy] == pytest.approx(expected, abs=2 * noise), noise  # two fp32 results, each ± noise
    assert "reward = 1 × reward + 0.5 × words" in table.splitlines()[0]
    first_policy = next(line for line in table.splitlines() if line.startswith("    policy "))
    row = policy[0]
    assert f"  reward {row['reward']:+.2f} [reward {row['rewards/reward']:+.2f}, words {row['rewards/words']:+.2f}]  " \
        in first_policy and first_policy.endswith(f"  KL {row['kl']:.2f}")


def test_sample_of_a_function_only_run_shows_its_reward_and_kl(runs):
    run_dir, _ = runs["words"]
    rows, table = sample_rows(str(run_dir), *SAME_PROMPT)
    for row in rows:
        assert row["reward"] == row["rewards/words"] == words(row["response"])
    policy = [row for row in rows if row["role"] == "policy"]
    assert all(isinstance(row["kl"], float) for row in policy)
    expected, noise = kl_references(run_dir, policy)
    assert [row["kl"] for row in policy] == pytest.approx(expected, abs=2 * noise), noise  # two fp32 results, each ± noise
    assert "reward = 1 × words" in table.splitlines()[0]
    assert "KL" in table.splitlines()[-1].split("| policy:")[1]  # the means line has the policy's KL


def test_sample_without_any_reward_still_shows_kl(runs, tmp_path):
    """A policy adapter alone (no run, no reward adapter): no reward, and the KL the run dir's sample gives
    for the same samples (same seed and settings)."""
    import shutil

    run_dir, _ = runs["words"]
    record = json.loads((run_dir / "run_record.json").read_text())
    adapter = shutil.copytree(run_dir / "policies" / "policy", tmp_path / "adapter")
    alone, table = sample_rows(str(adapter), "--base", record["inputs"]["sft_model"], *SAME_PROMPT)
    in_run, _ = sample_rows(str(run_dir), *SAME_PROMPT)
    assert [row["response"] for row in alone] == [row["response"] for row in in_run]
    assert all(row["reward"] is None and not any(key.startswith("rewards/") for key in row) for row in alone)
    assert [row["kl"] for row in alone] == [row["kl"] for row in in_run]
    assert all(isinstance(row["kl"], float) for row in alone if row["role"] == "policy")
    assert "no reward (KL only)" in table.splitlines()[0]
