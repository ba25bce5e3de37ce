"""Each bug of the review of the PPO loop against real-model conventions, pinned by a test that fails
before its fix (issue "Correct on every common causal LM"): the critic adapter's gradients, where the
reward is read when pad == EOS, what sampling obeys, dropout under gradient checkpointing, the early
stop's window, per-policy state, the separate baseline's multi-label heads, the tokenizer's padding
side, ``samples_every`` and adapters added with peft's own API.

The family x convention matrix of the same invariants is in tests/conformance/.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, OPTConfig, OPTForCausalLM

from conftest import compose
from marl_exp.modeling.loading import load_tokenizer, resolve_device
from marl_exp.rl import rollout as rollout_module
from marl_exp.rl.rollout import Rollout, sample, score
from marl_exp.rl.roles import critic_name
from marl_exp.rl.trainer import RLTrainer
from marl_exp.stages.pipeline import run_stage
from marl_exp.stages.rl_models import build_roles

SMALL = ("stage.steps=1", "stage.batch_size=8", "stage.optim.mini_batch_size=8", "stage.optim.ppo_epochs=1",
         "stage.eval.eval_samples=8", "stage.sampling.max_new_tokens=8", "stage.eval.eval_every=0", "stage.save_every=0")
PROMPTS = ["the movie was", "this show is", "the plot felt", "the cast seemed"]


def ppo_cfg(chain, out, *overrides, sft=None, reward=None):
    return compose("stage=ppo", "logger=none", f"output_dir={out}",
                   f"stage.sft_model={sft or chain['sft_model']}",
                   f"stage.reward_adapter={reward or chain['reward_adapter']}", *SMALL, *overrides)


def roles_for(cfg, tokenizer=None):
    stage = cfg.stage
    return build_roles(cfg, stage.sft_model, stage.reward_adapter, resolve_device("cpu"), tokenizer)


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def max_change(before, params) -> float:
    return max(float((p.detach() - b).abs().max()) for p, b in zip(params, before))


# ------------------------------------------------------------------------ 1. critic adapter trains
def test_critic_adapter_receives_gradients_and_changes(trained_chain, tmp_path):
    cfg = ppo_cfg(trained_chain, tmp_path, "stage.critic=adapter", "stage.optim.learning_rate=1e-2")
    roles = roles_for(cfg)
    model = roles.model
    policy, critic = model.trainable_parameters("policy"), model.trainable_parameters(critic_name("policy"))
    before_policy, before_critic = snapshot(policy), snapshot(critic)
    trainer = RLTrainer(roles, load_tokenizer(cfg.stage.sft_model), cfg.stage, PROMPTS, seed=0)
    trainer.step()
    # Before the fix the critic's LoRA and value head changed by exactly 0.0 (its gradients were dropped).
    assert max_change(before_critic, critic) > 0
    assert max_change(before_policy, policy) > 0
    head = model.value_heads[critic_name("policy")].summary.weight
    assert not torch.equal(head, before_critic[-2])  # the critic's own value head moved
    assert model.active_policy == "policy"


# ------------------------------------------------------------- 2. reward read where it was trained
@pytest.fixture(scope="module")
def pad_is_eos(trained_chain, tmp_path_factory):
    """The trained chain seen through a tokenizer without a pad token (pad = EOS, as loading sets it for
    GPT-2 or Llama): the reward adapter's saved tokenizer says so too, as RewardTrainer would have left it."""
    out = tmp_path_factory.mktemp("pad_is_eos")
    sft, reward = out / "sft", out / "reward"
    shutil.copytree(trained_chain["sft_model"], sft)
    shutil.copytree(trained_chain["reward_adapter"], reward)
    for directory in (sft, reward):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(directory)
    tokenizer = load_tokenizer(str(sft))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    cfg = ppo_cfg(trained_chain, out, sft=sft, reward=reward)
    classifier = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    classifier.config.pad_token_id = tokenizer.pad_token_id  # as RewardTrainer sets it
    reference = PeftModel.from_pretrained(classifier, reward).eval()
    return roles_for(cfg, tokenizer), tokenizer, cfg, reference


def rollout_from_texts(tokenizer, prompts, responses, with_eos):
    """A rollout whose responses are the given texts (token ids as the tokenizer writes them)."""
    query = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids = [tokenizer(r, add_special_tokens=False).input_ids + ([tokenizer.eos_token_id] if eos else [])
           for r, eos in zip(responses, with_eos)]
    width = max(map(len, ids))
    response = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    return Rollout(query.input_ids, query.attention_mask, response, mask, has_eos=torch.tensor(with_eos))


def test_reward_with_pad_equal_to_eos_is_read_where_the_reward_model_learned_it(pad_is_eos):
    roles, tokenizer, cfg, reference = pad_is_eos
    prompts = ["the movie was", "this show is", "the plot felt"]
    responses = [" great . i loved it .", " dull and very weak . i hated it .", " not"]
    with_eos = [True, True, False]  # the last one was cut at max_new_tokens
    rollout = score(roles, rollout_from_texts(tokenizer, prompts, responses, with_eos), "policy", "value_head",
                    cfg.stage, tokenizer)
    # The reference: the text as the reward trainer fed it (text + EOS) through HF's classifier + peft.
    texts = [p + r + tokenizer.eos_token for p, r in zip(prompts, responses)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        expected = reference(**enc).logits[:, 0]
    torch.testing.assert_close(rollout.raw_scores, expected, atol=1e-5, rtol=0)
    # The same through the TRL-style entry point, left padding, the input as given.
    left = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    torch.testing.assert_close(roles.model.compute_reward_score(left.input_ids, left.attention_mask), expected,
                               atol=1e-5, rtol=0)


def test_separate_roles_read_the_reward_where_the_shared_model_does(trained_chain, pad_is_eos, tmp_path):
    shared, tokenizer, cfg, _ = pad_is_eos
    separate = roles_for(ppo_cfg(trained_chain, tmp_path, "stage.sharing=separate", sft=cfg.stage.sft_model,
                                 reward=cfg.stage.reward_adapter), tokenizer)
    fixed = rollout_from_texts(tokenizer, ["the movie was", "the cast seemed"], [" fun . i liked it .", " very"],
                               [True, False])
    scores = [score(roles, Rollout(fixed.query_ids, fixed.query_mask, fixed.response_ids, fixed.response_mask,
                                   has_eos=fixed.has_eos), "policy", "value_head", cfg.stage, tokenizer).raw_scores
              for roles in (shared, separate)]
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ 3. what sampling obeys
@pytest.fixture(scope="module")
def shared(trained_chain, tmp_path_factory):
    cfg = ppo_cfg(trained_chain, tmp_path_factory.mktemp("sampling"), "stage.sampling.max_new_tokens=16")
    tokenizer = load_tokenizer(cfg.stage.sft_model)
    return roles_for(cfg, tokenizer), tokenizer, cfg


def test_sampling_ignores_the_models_generation_config(shared):
    roles, tokenizer, cfg = shared
    base = roles.model.peft_model.get_base_model()
    saved = base.generation_config
    # A hub-style config: no token may repeat. Every finished review repeats " ." (". i loved it .").
    base.generation_config = type(saved)(**{**saved.to_dict(), "no_repeat_ngram_size": 1,
                                            "repetition_penalty": 5.0, "temperature": 0.1})
    try:
        torch.manual_seed(0)
        rollout = sample(roles.model, tokenizer, PROMPTS * 8, "policy", cfg.stage)
    finally:
        base.generation_config = saved
    dot = tokenizer(" .", add_special_tokens=False).input_ids[-1]
    repeats = ((rollout.response_ids == dot) & rollout.response_mask.bool()).sum(1) >= 2
    assert repeats.float().mean() > 0.5, "the model's no_repeat_ngram_size=1 was applied to PPO's sampling"


def test_every_eos_id_of_the_model_stops_a_response(shared):
    roles, tokenizer, cfg = shared
    base = roles.model.peft_model.get_base_model()
    dot = tokenizer(" .", add_special_tokens=False).input_ids[-1]  # frequent: stands in for <|eot_id|>
    saved = base.generation_config.eos_token_id
    base.generation_config.eos_token_id = [tokenizer.eos_token_id, dot]
    try:
        torch.manual_seed(1)
        rollout = sample(roles.model, tokenizer, PROMPTS * 8, "policy", cfg.stage)
    finally:
        base.generation_config.eos_token_id = saved
    lengths = rollout.response_mask.sum(1)
    last = rollout.response_ids[torch.arange(len(lengths)), lengths - 1]
    assert rollout.has_eos.float().mean() > 0.9
    assert torch.isin(last[rollout.has_eos], torch.tensor([tokenizer.eos_token_id, dot])).all()
    inside = rollout.response_ids * rollout.response_mask
    assert int(((inside == dot).sum(1) > 1).sum()) == 0, "a response ran past a stop id"


def test_filters_that_change_the_sampled_distribution_warn_once(shared, caplog):
    roles, tokenizer, cfg = shared
    stage = cfg.stage.copy()
    stage.sampling.top_k, stage.sampling.min_new_tokens = 5, 2
    rollout_module._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="marl_exp.rl.rollout"):
        for _ in range(2):
            sample(roles.model, tokenizer, PROMPTS, "policy", stage)
    warnings = [r for r in caplog.records if "sampling differs from the softmax" in r.getMessage()]
    assert len(warnings) == 1 and "top_k=5" in warnings[0].getMessage() and "min_new_tokens=2" in warnings[0].getMessage()
    caplog.clear()
    sample(roles.model, tokenizer, PROMPTS, "policy", cfg.stage)  # the defaults sample the plain softmax
    assert not [r for r in caplog.records if "sampling differs" in r.getMessage()]


def test_sampling_leaves_the_tokenizers_padding_side_alone(shared):
    roles, tokenizer, cfg = shared
    tokenizer.padding_side = "right"
    rollout = sample(roles.model, tokenizer, PROMPTS, "policy", cfg.stage)
    assert tokenizer.padding_side == "right"
    assert (rollout.query_mask[:, -1] == 1).all()  # the prompts themselves were left-padded


# ------------------------------------------------- 4. dropout stays off under gradient checkpointing
@pytest.fixture(scope="module")
def opt_model_dir(trained_chain, tmp_path_factory):
    """A tiny OPT (dropout 0.1 applied inside its decoder layers) with the tiny model's tokenizer."""
    out = tmp_path_factory.mktemp("opt")
    tokenizer = AutoTokenizer.from_pretrained(trained_chain["sft_model"])
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64, dropout=0.1,
                       attention_dropout=0.1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    # A reward adapter for it as peft saves a sequence-classification LoRA (score head in modules_to_save).
    classifier = AutoModelForSequenceClassification.from_pretrained(out / "model", num_labels=1)
    get_peft_model(classifier, LoraConfig(r=4, task_type="SEQ_CLS")).save_pretrained(out / "reward")
    return out


def test_first_epoch_ratio_is_one_with_gradient_checkpointing_on_a_model_with_in_layer_dropout(
        trained_chain, opt_model_dir, tmp_path):
    model_dir, reward_dir = opt_model_dir / "model", opt_model_dir / "reward"
    cfg = ppo_cfg(trained_chain, tmp_path, "stage.runtime.gradient_checkpointing=true", sft=model_dir, reward=reward_dir)
    roles = build_roles(cfg, str(model_dir), str(reward_dir), resolve_device("cpu"))
    model = roles.model
    model.train(False)
    trainer = RLTrainer(roles, load_tokenizer(str(model_dir)), cfg.stage, PROMPTS, seed=0)
    torch.manual_seed(0)
    stats = trainer.step()  # one epoch, one mini-batch: the ratio is measured before any update
    assert stats["ppo/policy/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert stats["ppo/policy/approxkl"] == pytest.approx(0.0, abs=1e-10)


# --------------------------------------------------------------- 5. early stop decided per epoch
def test_early_stop_reads_the_approx_kl_of_the_epoch_just_run(shared, monkeypatch):
    roles, tokenizer, cfg = shared
    stage = cfg.stage.copy()
    stage.optim.ppo_epochs, stage.optim.early_stop_kl = 4, 0.6
    trainer = RLTrainer(roles, tokenizer, stage, PROMPTS, seed=0)
    calls = []

    def fake_loss(forward, mb, tokens=None):
        calls.append(len(mb.response_ids))  # one mini-batch per epoch: epoch 1 has approx-KL 0, every later one 1.0
        return forward.logprobs.sum() * 0.0, {"ppo/policy/approxkl": 0.0 if len(calls) == 1 else 1.0}

    monkeypatch.setattr(trainer.algorithm, "loss", fake_loss)
    torch.manual_seed(0)
    rollout = score(roles, sample(roles.model, tokenizer, PROMPTS * 2, "policy", stage), "policy", "value_head",
                    stage, tokenizer)
    rollout.scores = rollout.raw_scores
    stats = trainer._update(trainer.policies["policy"], rollout)
    # Epoch 2 alone is over the limit (1.0 > 0.6): stop after it. Averaged with epoch 1 it would be 0.5.
    assert len(calls) == 2 and stats["ppo/early_stop"] == 1.0


# ----------------------------------------------------------- 6. each policy its own KL and scores
def test_each_policy_has_its_own_kl_coefficient_and_score_statistics(trained_chain, tmp_path):
    cfg = ppo_cfg(trained_chain, tmp_path, "stage.policies=[calm,wild]", "stage.scores.whiten_scores=true",
                  "stage.kl.target_kl=1.0", "stage.kl.kl_horizon=100")
    roles = roles_for(cfg)
    with torch.no_grad():  # "wild" starts far from the reference, "calm" is a fresh adapter (KL 0)
        for name, param in roles.model.peft_model.named_parameters():
            if ".lora_B.wild." in name:
                param.normal_(0, 0.5)
    trainer = RLTrainer(roles, load_tokenizer(cfg.stage.sft_model), cfg.stage, PROMPTS, seed=0)
    init = cfg.stage.kl.init_kl_coef
    stats = trainer.step()
    assert stats["wild/objective/kl"] > 1.0 and abs(stats["calm/objective/kl"]) < 1e-4
    # Adaptive control: KL above the target raises β, below lowers it; each by its own policy's KL.
    assert stats["wild/objective/kl_coef"] > init > stats["calm/objective/kl_coef"]
    assert trainer.algorithm.kl_ctls["wild"].value == stats["wild/objective/kl_coef"]
    # Running score statistics: each saw its own policy's batch only.
    assert trainer.algorithm.score_moments["calm"].count == trainer.algorithm.score_moments["wild"].count == cfg.stage.batch_size
    calm = trainer.last_rollouts["calm"].raw_scores
    assert trainer.algorithm.score_moments["calm"].mean == pytest.approx(calm.mean().item(), abs=1e-5)
    # And both survive a checkpoint round trip, policy by policy.
    fresh = RLTrainer(roles, load_tokenizer(cfg.stage.sft_model), cfg.stage, PROMPTS, seed=1)
    fresh.load_state_dict(trainer.state_dict())
    assert {n: c.value for n, c in fresh.algorithm.kl_ctls.items()} == {n: c.value for n, c in trainer.algorithm.kl_ctls.items()}


# ------------------------------------------------- 7. separate baseline, padding side, samples_every
def test_separate_mode_reads_a_two_label_reward_adapter(trained_chain, tmp_path):
    two = tmp_path / "two_labels"
    shutil.copytree(trained_chain["reward_adapter"], two)
    weights = load_file(two / "adapter_model.safetensors")
    w = weights["base_model.model.score.weight"]
    weights["base_model.model.score.weight"] = torch.cat([-w, w])  # label 1 = the reward (Llama's head: no bias)
    save_file(weights, two / "adapter_model.safetensors")
    tokenizer = load_tokenizer(str(trained_chain["sft_model"]))
    fixed = rollout_from_texts(tokenizer, ["the movie was", "the story felt"], [" superb . i adored it .", " bad"],
                               [True, False])
    scores = []
    for sharing in ("shared", "separate"):
        cfg = ppo_cfg(trained_chain, tmp_path, f"stage.sharing={sharing}", "stage.reward_label_index=1", reward=two)
        rollout = Rollout(fixed.query_ids, fixed.query_mask, fixed.response_ids, fixed.response_mask,
                          has_eos=fixed.has_eos)
        scores.append(score(roles_for(cfg, tokenizer), rollout, "policy", "value_head", cfg.stage, tokenizer).raw_scores)
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=0)


def test_samples_every_logs_training_responses(trained_chain, tmp_path):
    cfg = ppo_cfg(trained_chain, tmp_path, "stage.steps=2", "stage.eval.samples_every=1")
    run_stage(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["eval"] == "train"]
    assert sorted({r["step"] for r in train}) == [1, 2]
    assert all(r["query"] and isinstance(r["reward"], float) and 0 <= r["oracle"] <= 1 for r in train)


# ------------------------------------------------- 9. adapters added with peft's own API are policies
def test_ppo_adapter_name_accepts_an_adapter_added_with_peft(shared):
    roles, tokenizer, cfg = shared
    model = roles.model
    model.peft_model.add_adapter("policy_1", LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        task_type="CAUSAL_LM"))
    model.activate_policy("policy")
    enc = tokenizer(["the movie was great . i loved it ." + tokenizer.eos_token], return_tensors="pt")
    before = model.compute_reward_score(enc.input_ids, enc.attention_mask)
    scored = model.compute_reward_score(enc.input_ids, enc.attention_mask, ppo_adapter_name="policy_1")
    assert torch.equal(before, scored)
    assert model.active_policy == "policy_1" and model.peft_model.active_adapter == "policy_1"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".policy_1." in n or n.startswith("value_heads.policy_1.") for n in trainable)
    with pytest.raises(ValueError, match="unknown policy adapter 'reward'"):
        model.compute_reward_score(enc.input_ids, ppo_adapter_name="reward")
    model.activate_policy("policy")
    model.peft_model.delete_adapter("policy_1")
    model.policy_names.remove("policy_1")
    del model.value_heads["policy_1"]
