"""Reward sources (``stage.rewards``): the reward as a weighted sum of reward adapters on the one base and
Python functions. Each source's score against an independent reference (HF's sequence classifier + plain
peft for an adapter, the function itself), the weighted sum by hand, the default left unchanged, a
gold-reward run (the oracle as the only source) end to end without a reward stage, and every error path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

import reward_functions
from conftest import REPO, compose
from marl_exp.config import ConfigError, RewardSource, check_reward_overrides, validate
from marl_exp.data import reviews
from marl_exp.modeling.loading import load_tokenizer, resolve_device
from marl_exp.rl.reward_sources import RewardFunctionError, RewardSources
from marl_exp.rl.rollout import PerfOptions, Rollout, score
from marl_exp.run import preflight
from marl_exp.stages.pipeline import run_stage
from marl_exp.stages.rl_models import build_roles
from test_first_hour import BATCH_DRIVER, fake_model, fake_reward_adapter

SMALL = ("stage.steps=2", "stage.batch_size=8", "stage.optim.mini_batch_size=4", "stage.eval.eval_samples=8",
         "stage.sampling.max_new_tokens=8", "stage.eval.eval_every=0", "stage.save_every=0")
PROMPTS = ["the movie was", "the plot felt", "this show is"]
RESPONSES = [" great . i loved it .", " dull and very weak . i hated it .", " not really boring . i liked it ."]


def rl_cfg(chain, out, *overrides, stage="ppo", reward=True):
    given = [f"stage.sft_model={chain['sft_model']}"] + ([f"stage.reward_adapter={chain['reward_adapter']}"]
                                                          if reward else [])
    return compose(f"stage={stage}", "logger=none", f"output_dir={out}", *given, *SMALL, *overrides)


def roles_for(cfg, chain):
    reward = str(chain["reward_adapter"]) if cfg.stage.reward_adapter else None
    roles = build_roles(cfg, str(chain["sft_model"]), reward, resolve_device("cpu"))
    roles.model.train(False)
    return roles


def fixed_rollout(tokenizer) -> Rollout:
    """Responses that are known texts ending in EOS, so the reward trainer's view is prompt + response."""
    query = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    ids = [tokenizer(r, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for r in RESPONSES]
    width = max(map(len, ids))
    response = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    return Rollout(query.input_ids, query.attention_mask, response, mask, has_eos=torch.ones(len(ids), dtype=torch.bool),
                   prompts=list(PROMPTS))


def hf_reward_scores(sft, adapter, num_labels: int, label: int, tokenizer) -> torch.Tensor:
    """Independent reference: HF's sequence classifier with the adapter through plain peft, on the texts
    as the reward trainer fed them (text + EOS)."""
    classifier = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=num_labels)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(classifier, str(adapter)).eval()
    texts = [p + r + tokenizer.eos_token for p, r in zip(PROMPTS, RESPONSES)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        return model(**enc).logits[:, label]


@pytest.fixture(scope="module")
def second_adapter(trained_chain, tmp_path_factory):
    """Another reward adapter on the same base: the trained one with other LoRA weights and a two-label
    score head (label 1 is read), so its scores differ from the first adapter's. (No bias: Llama's score
    layer has none, so the HF reference would drop it.)"""
    target = tmp_path_factory.mktemp("rewards") / "second"
    shutil.copytree(trained_chain["reward_adapter"], target)
    weights = load_file(target / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(7)
    for key, value in weights.items():
        if "lora_B" in key:
            weights[key] = value + 0.05 * torch.randn(value.shape, generator=generator)
    head = weights["base_model.model.score.weight"]
    weights["base_model.model.score.weight"] = torch.cat([head, -2 * head + 0.01])
    save_file(weights, target / "adapter_model.safetensors")
    return target


# ------------------------------------------------------------------------------------- the weighted sum
def test_weighted_sum_of_two_reward_adapters_and_a_function(trained_chain, second_adapter, tmp_path):
    first = trained_chain["reward_adapter"]
    cfg = rl_cfg(trained_chain, tmp_path, "++stage.rewards={helpful:{adapter:%s,weight:0.7},"
                 "harmless:{adapter:%s,weight:-0.3,label_index:1},"
                 "words:{function:'reward_functions:word_count',weight:2}}" % (first, second_adapter), reward=False)
    validate(cfg)
    roles = roles_for(cfg, trained_chain)
    tokenizer = load_tokenizer(str(trained_chain["sft_model"]))
    model = roles.model
    assert model.reward_adapter_names == ["reward", "reward_harmless"]
    # Only the policy trains; the second reward adapter is frozen and never a policy.
    assert all(".policy." in n or n.startswith("value_heads.policy.") for n, p in model.named_parameters()
               if p.requires_grad)
    with pytest.raises(ValueError, match="unknown policy adapter 'reward_harmless'"):
        model.activate_policy("reward_harmless")

    reward_functions.calls.clear()
    rollout = score(roles, fixed_rollout(tokenizer), "policy", "value_head", cfg.stage, tokenizer)
    helpful = hf_reward_scores(trained_chain["sft_model"], first, 1, 0, tokenizer)
    harmless = hf_reward_scores(trained_chain["sft_model"], second_adapter, 2, 1, tokenizer)
    words = torch.tensor([float(len(r.split())) for r in RESPONSES])
    assert (helpful - harmless).abs().min() > 0.1  # two objectives, two heads: different scores
    assert list(rollout.source_scores) == ["helpful", "harmless", "words"]
    torch.testing.assert_close(rollout.source_scores["helpful"], helpful, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.source_scores["harmless"], harmless, atol=1e-5, rtol=0)
    assert torch.equal(rollout.source_scores["words"], words)  # a function's values reach the reward exactly
    # The function read the prompts as given and the completions as the evaluation decodes them.
    assert reward_functions.calls == [(PROMPTS, tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True))]
    torch.testing.assert_close(rollout.raw_scores, 0.7 * helpful - 0.3 * harmless + 2 * words, atol=1e-5, rtol=0)
    # The adapters' scores through the model's own entry point, each with its own head, label and pad id.
    texts = [p + r + tokenizer.eos_token for p, r in zip(PROMPTS, RESPONSES)]
    left = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    torch.testing.assert_close(model.compute_reward_score(left.input_ids, left.attention_mask,
                                                          reward_adapter_name="reward_harmless"), harmless,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(model.compute_reward_score(left.input_ids, left.attention_mask), helpful,
                               atol=1e-5, rtol=0)

    # The fused pass (every role in one forward) scores the sources as the role-by-role passes do.
    fused = score(roles, fixed_rollout(tokenizer), "policy", "value_head", cfg.stage, tokenizer,
                  perf=PerfOptions(fused_scoring=True))
    for name in rollout.source_scores:
        torch.testing.assert_close(fused.source_scores[name], rollout.source_scores[name], atol=1e-5, rtol=0)
    # Mini-batches carry their rows' source scores.
    part = rollout.select(torch.tensor([2, 0]))
    assert torch.equal(part.source_scores["words"], words[[2, 0]])


def test_default_reward_is_unchanged_and_a_weight_zero_source_is_only_logged(trained_chain, tmp_path):
    """The default is one source, the upstream adapter with weight 1: its scores are the reward, bit for bit.
    The strict gold beside it at weight 0 (+rewards=monitor_gold) is scored and kept, the reward unchanged."""
    tokenizer = load_tokenizer(str(trained_chain["sft_model"]))
    default = score(roles_for(rl_cfg(trained_chain, tmp_path), trained_chain), fixed_rollout(tokenizer), "policy",
                    "value_head", rl_cfg(trained_chain, tmp_path).stage, tokenizer)
    cfg = rl_cfg(trained_chain, tmp_path, "+rewards=monitor_gold")
    monitored = score(roles_for(cfg, trained_chain), fixed_rollout(tokenizer), "policy", "value_head", cfg.stage,
                      tokenizer)
    assert list(default.source_scores) == ["reward"]
    assert torch.equal(default.raw_scores, default.source_scores["reward"])
    assert torch.equal(monitored.raw_scores, default.raw_scores)
    decoded = tokenizer.batch_decode(monitored.response_ids, skip_special_tokens=True)
    gold = torch.tensor([reviews.oracle_strict(p + r) for p, r in zip(PROMPTS, decoded)])
    assert torch.equal(monitored.source_scores["oracle_strict"], gold)
    assert gold.sum() > 0  # the fixed responses include well-formed reviews: the check is not of zeros


# --------------------------------------------------------------------------------- gold-reward runs
@pytest.mark.parametrize("stage, sharing", [("ppo", "shared"), ("ppo", "separate"), ("grpo", "shared")])
def test_gold_reward_run_trains_without_a_reward_stage(trained_chain, tmp_path, stage, sharing):
    """The oracle as the only reward: no reward adapter is given, none is built or loaded."""
    overrides = ("stage.sampling.num_generations=4",) if stage == "grpo" else ("stage.optim.ppo_epochs=1",)
    cfg = rl_cfg(trained_chain, tmp_path, "+rewards=oracle_strict", f"stage.sharing={sharing}", *overrides,
                 stage=stage, reward=False)
    validate(cfg)
    summary = run_stage(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()  # no upstream stage ran (the SFT model is given)
    record = json.loads((tmp_path / "run" / "run_record.json").read_text())
    assert list(record["inputs"]) == ["sft_model"]
    reward_key = "env/reward_mean" if stage == "ppo" else "reward"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if reward_key in row]
    assert len(steps) == 2
    for row in steps:  # TRL's per-reward-function names; one source of weight 1: the reward itself
        assert row["rewards/oracle_strict/mean"] == pytest.approx(row[reward_key], abs=1e-6)
        assert "rewards/oracle_strict/std" in row
    # The evaluation's own strict gold (response_metrics) on the same samples is what the source scored.
    for tag in ("before", "after"):
        assert summary[f"eval/{tag}/rewards/oracle_strict/mean"] == pytest.approx(summary[f"eval/{tag}/oracle_strict"],
                                                                                 abs=1e-6)
        assert summary[f"eval/{tag}/reward_score"] == pytest.approx(summary[f"eval/{tag}/oracle_strict"], abs=1e-6)
    assert (tmp_path / "run" / "policies" / "policy" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("option", sorted(p.stem for p in (REPO / "conf" / "rewards").glob("*.yaml")))
@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo", "reinforce_pp"])
def test_every_rewards_preset_composes_and_validates(option, stage):
    cfg = compose(f"stage={stage}", f"+rewards={option}")
    validate(cfg)
    declared = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "rewards" / f"{option}.yaml"))
    assert list(cfg.stage.rewards) == list(declared)
    for name, fields in declared.items():
        assert {key: cfg.stage.rewards[name][key] for key in fields} == fields


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("overrides, message", [
    (["++stage.rewards={g:{function:'no_such_module:f'}}"],
     r"stage\.rewards\.g\.function='no_such_module:f': module 'no_such_module' cannot be imported"),
    (["++stage.rewards={g:{function:'reward_functions:missing'}}"], r"'reward_functions' has no 'missing'"),
    (["++stage.rewards={g:{function:'reward_functions:NOT_CALLABLE'}}"], r"is a int, not callable"),
    (["++stage.rewards={g:{function:'reward_functions'}}"], r"is not module:function"),
    (["++stage.rewards={g:{function:'reward_functions:one_argument'}}"], r"cannot be called as f\(prompts, completions\)"),
    (["+rewards=oracle_strict", "stage.rewards.oracle_strict.weight=nan"],
     r"stage\.rewards\.oracle_strict\.weight=nan must be a finite number"),
    (["+rewards=oracle_strict", "stage.rewards.oracle_strict.weight=-inf"], r"weight=-inf must be a finite number"),
    (["+rewards=oracle_strict", "stage.rewards.oracle_strict.weight=0"], r"every weight in stage\.rewards is 0"),
    (["+rewards=oracle_strict", "stage.rewards.oracle_strict.label_index=1"], r"label_index=1 is for reward adapters"),
    (["++stage.rewards={g:{function:'reward_functions:word_count',adapter:/tmp}}"], r"has both adapter='/tmp' and"),
    (["++stage.rewards={g:{adapter:/no/such/adapter}}"], r"stage\.rewards\.g\.adapter='/no/such/adapter' does not exist"),
    (["++stage.rewards={g.h:{}}"], r"the name 'g\.h' may only hold letters"),
    (["+rewards=oracle_strict", "stage.reward_adapter=/tmp"], r"stage\.reward_adapter='/tmp' is not used"),
    (["+rewards=monitor_gold", "++stage.rewards={extra:{adapter:/tmp}}", "stage.sharing=separate"],
     r"stage\.sharing=separate scores with one reward adapter, but stage\.rewards has 2 \(reward, extra\)"),
    (["+rewards=monitor_gold", "++stage.rewards={x:{adapter:/tmp}}", "stage.policies=[policy,reward_x]"],
     r"reward_x is the name of a reward adapter"),
])
def test_config_errors_name_the_source(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(*overrides))


def test_adapter_sources_are_checked_like_stage_reward_adapter(tmp_path):
    """Each adapter source's path is checked by its kind and against the SFT model, naming its key."""
    sft, other = fake_model(tmp_path / "sft"), fake_model(tmp_path / "other", seed=1)
    adapter = fake_reward_adapter(tmp_path / "rm", base=sft)
    ok = compose(f"stage.sft_model={sft}", f"output_dir={tmp_path}", "++stage.rewards={a:{adapter:%s}}" % adapter)
    preflight.check(ok, overrides=[])
    with pytest.raises(ConfigError, match=r"stage\.rewards\.b\.adapter='.*other' is a model directory, not a reward "
                                          r"adapter"):
        preflight.check(compose(f"stage.sft_model={sft}", f"output_dir={tmp_path}",
                                "++stage.rewards={a:{adapter:%s},b:{adapter:%s}}" % (adapter, other)), overrides=[])
    with pytest.raises(ConfigError, match=r"stage\.rewards\.a\.adapter='.*rm' was trained on base"):
        preflight.check(compose(f"stage.sft_model={other}", f"output_dir={tmp_path}",
                                "++stage.rewards={a:{adapter:%s}}" % adapter), overrides=[])


def test_a_source_named_twice_on_the_command_line_is_refused():
    # Hydra's parser keeps the last of two equal keys ({a:..., a:...}) without a word: caught from the overrides.
    with pytest.raises(ConfigError, match=r"names the source 'a' twice"):
        check_reward_overrides(["++stage.rewards={a:{weight:1},b:{function:'m:f'},a:{weight:2}}"])
    check_reward_overrides(["++stage.rewards={a:{weight:1},b:{function:'m:a'}}", "stage.steps=3"])
    with pytest.raises(ValueError, match="at least one source"):  # an empty stage.rewards is the default source
        RewardSources([])


def test_cli_reward_mistakes_are_one_line_before_anything_heavy_loads(tmp_path):
    out = f"output_dir={tmp_path / 'out'}"
    rows = [["++stage.rewards={g:{function:'no_such_module:f'}}", out],
            ["++stage.rewards={a:{weight:1},a:{weight:2}}", out],
            ["+rewards=oracle_strict", "stage.rewards.oracle_strict.weight=inf", out],
            ["stage=sft", "+rewards=oracle_strict", out]]
    proc = subprocess.run([sys.executable, "-c", BATCH_DRIVER, json.dumps(rows)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy_imported"] == []
    expected = ["module 'no_such_module' cannot be imported", "names the source 'a' twice",
                "stage.rewards.oracle_strict.weight=inf must be a finite number",
                "rewards=oracle_strict: stage.rewards is a key of stage=ppo/grpo/rloo/reinforce_pp, not of stage=sft"]
    for row, text in zip(report["results"], expected):
        assert row["code"] == 2 and len(row["stderr"]) == 1 and text in row["stderr"][0], row
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("function, message", [
    ("raises", r"reward source 'bad' \(reward_functions:raises\) raised ZeroDivisionError: division by zero"),
    ("returns_nan", r"reward source 'bad' \(reward_functions:returns_nan\) returned nan for completion 2 "
                    r"\(1 of 3 values are not finite\)"),
    ("returns_inf", r"returned -inf for completion 0"),
    ("too_few", r"reward source 'bad' \(reward_functions:too_few\) returned 2 values for 3 completions"),
    ("not_numbers", r"returned list \(str 'good' for completion 0\)"),
    ("matrix", r"returned Tensor \(a tensor of shape \(3, 2\)\)"),
    ("nothing", r"returned NoneType"),
    ("returns_strings", r"returned list \(str '1\.0' for completion 0\)"),
])
def test_a_failing_reward_function_names_its_source(function, message):
    sources = RewardSources([RewardSource("bad", 1.0, function=f"reward_functions:{function}")])
    with pytest.raises(RewardFunctionError, match=message):
        sources.call("bad", PROMPTS, RESPONSES)


def test_reward_function_results_of_any_sequence_type():
    for function, expected in [("as_tensor", [0.0, 1.0, 2.0]), ("as_array", [0.0, 0.5, 1.0]),
                               ("word_count", [6.0, 9.0, 8.0])]:
        sources = RewardSources([RewardSource("f", 1.0, function=f"reward_functions:{function}")])
        scores = sources.call("f", PROMPTS, RESPONSES)
        assert scores.dtype == torch.float32 and scores.tolist() == expected


def test_builtin_oracle_functions_read_the_texts_as_the_evaluation_does():
    from marl_exp import rewards

    completions = [" great . i loved it .", " great great great", " not not boring . i liked it ."]
    assert rewards.oracle_strict(PROMPTS, completions) == [reviews.oracle_strict(p + c) for p, c in
                                                           zip(PROMPTS, completions)] == [1.0, 0.0, 0.0]
    assert rewards.oracle(PROMPTS, completions) == [reviews.oracle_score(p + c) for p, c in zip(PROMPTS, completions)]
    conversation = [[{"role": "user", "content": "review: the movie was"}]]  # the judges read the assistant turn
    assert rewards.oracle_strict(conversation, ["the movie was great . i loved it ."]) == [1.0]
