"""Conversations (issue 17): TRL's conversational formats in every stage, the chat template, the reward read
on exactly RewardTrainer's rendering of prompt + reply, and the policy stopping at the end-of-turn token.

The "instruct model" here is the built-in tiny model with the ChatML template built in this repo
(``conf/chat_templates/chatml.jinja``) and its two special tokens added, as the SFT stage adds them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

from conftest import compose
from marl_exp.config import ConfigError, DataConfig, TinyArchConfig
from marl_exp.conformance.checks import Probe
from marl_exp.data import build_task, chat
from marl_exp.data.reviews import oracle_score, well_formed
from marl_exp.data.reviews_chat import as_chat_task, judged_text, opening_of
from marl_exp.data.task import _reviews_task
from marl_exp.modeling.tiny import builtin_model_dir
from marl_exp.rl.rollout import PerfOptions, Rollout, reward_inputs, sample, score
from marl_exp.stages.pipeline import run_stage

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"
CHAT = FIXTURES / "chat"
SYSTEM = {"role": "system", "content": "You write short reviews."}


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """The tiny base turned into a (random) chat model: ChatML template + its tokens, embeddings resized."""
    out = tmp_path_factory.mktemp("chat_model")
    source = builtin_model_dir(TinyArchConfig())
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = chat.resolve_template("chatml")
    model = AutoModelForCausalLM.from_pretrained(source)
    assert chat.add_template_tokens(model, tokenizer) == ["<|im_start|>", "<|im_end|>"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------- templates
def test_template_by_name_by_file_and_a_one_line_error_for_neither(tmp_path, chat_model):
    text = chat.resolve_template("chatml")
    copy = tmp_path / "mine.jinja"
    copy.write_text(text)
    assert chat.resolve_template(str(copy)) == text
    with pytest.raises(ConfigError, match=r"data.chat_template='nope' is neither a file nor a built-in template "
                                          r"\(chatml\)"):
        chat.resolve_template("nope")
    plain = AutoTokenizer.from_pretrained(builtin_model_dir(TinyArchConfig()))
    assert not plain.chat_template
    with pytest.raises(ConfigError, match=r"data=local is conversational but the tokenizer has no chat template; "
                                          r"set data.chat_template="):
        chat.apply_template(plain, data_cfg(name="local"), conversational=True)
    chat.apply_template(plain, data_cfg(name="local"), conversational=False)  # plain text needs none
    chat.apply_template(plain, data_cfg(name="local", chat_template="chatml"), conversational=True)
    assert plain.chat_template == text
    own = AutoTokenizer.from_pretrained(chat_model)  # a tokenizer with its own template needs no setting
    chat.apply_template(own, data_cfg(name="local"), conversational=True)
    assert own.chat_template == text


def test_a_conversational_run_without_any_template_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "stage=sft", "logger=none", "data=local",
                           f"data.train_file={CHAT / 'conversations.jsonl'}", f"output_dir={tmp_path}"],
                          cwd=REPO, env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("marl-exp: error:")]
    assert len(errors) == 1 and "is conversational but the tokenizer has no chat template; set data.chat_template=" \
        in errors[0], done.stderr[-2000:]
    assert not list(tmp_path.rglob("model.safetensors"))  # failed before any training


def test_end_of_turn_token_and_stop_ids(chat_model):
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat.end_of_turn_ids(tokenizer) == [im_end]
    assert chat.stop_at_end_of_turn(model.generation_config, tokenizer) == [tokenizer.eos_token_id, im_end]
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, im_end]


# --------------------------------------------------------------------------------------- formats
def test_local_files_pick_the_conversational_format_from_their_columns():
    def local(name, **values):
        return build_task(data_cfg(name="local", train_file=str(CHAT / name), eval_file=str(CHAT / name), **values))

    sft = local("conversations.jsonl").sft_train
    assert sft.column_names == ["messages"]
    assert sft[0]["messages"][1] == {"role": "assistant", "content": "Many people like Luna or Milo."}
    pc = local("prompt_completion.jsonl").sft_train
    assert pc.column_names == ["prompt", "completion"] and pc[0]["completion"][0]["role"] == "assistant"
    task = local("pairs.jsonl")
    assert task.pairs_train.column_names == ["prompt", "chosen", "rejected"]
    assert task.pairs_train[0]["prompt"][0]["role"] == "system"
    assert chat.is_conversational(task.prompts_train[0]) and task.prompts_train[0][-1]["role"] == "user"
    # Plain files keep their plain format.
    plain = build_task(data_cfg(name="local", train_file=str(FIXTURES / "local" / "sft.jsonl"),
                                eval_file=str(FIXTURES / "local" / "sft.jsonl"), columns={"text": "body"}))
    assert plain.sft_train.column_names == ["text"]


def test_conversational_prompts_are_measured_as_the_template_renders_them(chat_model):
    from marl_exp.data.checks import DataError, fit_prompts

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    prompts = [user("review: the movie was"), user("great " * 80)]
    rendered = chat.prompt_length(tokenizer, prompts[0])
    assert rendered == len(tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"]) > 10
    assert fit_prompts(prompts, ["a", "b"], tokenizer, 60, "skip", "prompts") == prompts[:1]
    with pytest.raises(DataError, match=r"b: prompt has \d+ tokens, more than the 60"):
        fit_prompts(prompts, ["a", "b"], tokenizer, 60, "error", "prompts")


def test_a_blank_turn_is_a_bad_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [{"messages": user("hi") + [{"role": "assistant", "content": "hello"}]},
            {"messages": user("hi") + [{"role": "assistant", "content": "  "}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2, column 'messages' is empty"):
        build_task(data_cfg(name="local", train_file=str(path), eval_file=str(path))).sft_train


def test_hh_rlhf_dialogues_as_conversations():
    task = build_task(data_cfg(name="hh_rlhf", path=str(FIXTURES / "hh_rlhf"), conversational=True,
                               system_prompt="Be kind."))
    egg = task.sft_train[1]["messages"]
    assert [m["role"] for m in egg] == ["system", "user", "assistant", "user", "assistant"]
    assert egg[1]["content"] == "How do I boil an egg?" and egg[-1]["content"] == "About nine minutes in boiling water."
    pair = task.pairs_train[1]
    assert pair["chosen"][:-1] == pair["rejected"][:-1] == egg[:-1]  # TRL's implicit shared prompt
    assert pair["rejected"][-1] == {"role": "assistant", "content": "Ask someone else."}
    assert task.prompts_train[1] == egg[:-1]


def test_reviews_chat_is_the_reviews_task_as_conversations():
    cfg = data_cfg(name="reviews_chat", num_sft_train=20, num_sft_eval=4, num_pairs_train=20, num_pairs_eval=4,
                   system_prompt=SYSTEM["content"])
    plain, task = _reviews_task(cfg), build_task(cfg)
    for text, row in zip(plain.sft_train["text"], task.sft_train["messages"]):
        system, asked, answer = row
        assert system == SYSTEM and answer == {"role": "assistant", "content": text}
        assert text.startswith(asked["content"].removeprefix("review: "))
    for side in ("chosen", "rejected"):
        assert [r[0]["content"] for r in task.pairs_train[side]] == plain.pairs_train[side]
    assert [p[-1]["content"] for p in task.prompts_eval] == [f"review: {o}" for o in plain.prompts_eval]
    assert task.oracle is oracle_score  # the same oracle, on the assistant turn
    assert as_chat_task(plain, cfg).name == "reviews_chat"



def test_reviews_chat_adds_pairs_that_contrast_a_reply_with_the_request():
    cfg = data_cfg(name="reviews_chat", num_sft_train=20, num_sft_eval=4, num_pairs_train=400, num_pairs_eval=40,
                   pair_request_contrast_prob=0.25)
    plain, task = _reviews_task(cfg), build_task(cfg)
    n = len(plain.pairs_train["chosen"])
    prompts = task.pairs_train["prompt"]
    chosen = [r[0]["content"] for r in task.pairs_train["chosen"]]
    rejected = [r[0]["content"] for r in task.pairs_train["rejected"]]
    assert chosen[:n] == plain.pairs_train["chosen"] and rejected[:n] == plain.pairs_train["rejected"]
    extra = list(zip(prompts[n:], chosen[n:], rejected[n:]))
    assert 70 <= len(extra) <= 130  # about a quarter of 400, each kept only where the strict gold orders it
    training_openings = {opening_of(c) for c in plain.pairs_train["chosen"]}
    swapped = {"subject": 0, "verb": 0}
    for prompt, good, bad in extra:
        opening = prompt[-1]["content"].removeprefix("review: ")
        assert good in plain.pairs_train["chosen"] and good.startswith(opening)
        # the same review with its opening damaged: read against the request it is not a review
        assert bad != good and bad.endswith(good[len(opening):])
        assert well_formed(judged_text(prompt, good)) and not well_formed(judged_text(prompt, bad))
        if well_formed(bad):  # another review: a near opening, from the training openings only
            assert opening_of(bad) in training_openings
            same_subject = opening_of(bad).rsplit(" ", 1)[0] == opening.rsplit(" ", 1)[0]
            swapped["verb" if same_subject else "subject"] += 1
    # a third each: subject swapped, verb swapped, one word of the opening edited
    assert all(0.2 < count / len(extra) < 0.47 for count in swapped.values()), swapped
    # held-out pairs stay the task's own: accuracy measures the task
    assert [r[0]["content"] for r in task.pairs_eval["rejected"]] == plain.pairs_eval["rejected"]
    # the schema's default adds none; data=reviews_chat (conf/data/reviews_chat.yaml) sets 1.0
    assert len(build_task(data_cfg(name="reviews_chat", num_pairs_train=400)).pairs_train) == n
    assert compose("data=reviews_chat").data.pair_request_contrast_prob == 1.0

# ----------------------------------------------------------------- reward read where it was trained
def reward_trainer_ids(model_dir, tokenizer, prompts, replies, work) -> list[list[int]]:
    """The independent reference input: what TRL's RewardTrainer tokenizes for these conversations."""
    dataset = Dataset.from_dict({"prompt": prompts, "chosen": [[{"role": "assistant", "content": r}] for r in replies],
                                 "rejected": [[{"role": "assistant", "content": r}] for r in replies]})
    classifier = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    trainer = RewardTrainer(model=classifier, processing_class=tokenizer, train_dataset=dataset,
                            args=RewardConfig(output_dir=str(work), report_to="none", use_cpu=True, max_length=None))
    return list(trainer.train_dataset["chosen_ids"])


@pytest.mark.parametrize("mode", ["shared-fused", "shared", "separate"])
def test_ppo_reads_the_reward_of_a_conversation_where_the_reward_model_learned_it(chat_model, tmp_path, mode):
    probe = Probe(str(chat_model), "fp32", tmp_path)
    tok = probe.tokenizer
    roles, cfg = probe.roles(sharing="separate" if mode == "separate" else "shared")
    chat.stop_at_end_of_turn(roles.model.generation_config, tok)  # as the PPO stage does for conversations
    prompts = [user("review: the movie was"), [SYSTEM, *user("review: the plot felt")], user("review: this show is")]
    replies = ["the movie was great . i loved it .", "the plot felt very dull . i hated it .", "this show is not"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stops = [im_end, tok.eos_token_id, None]  # ended by the template's end of turn, by EOS, cut at max_new_tokens
    rows = [tok(r, add_special_tokens=False).input_ids + ([s] if s is not None else []) for r, s in zip(replies, stops)]
    width = max(map(len, rows))
    query = chat.encode_prompts(tok, prompts)
    rollout = Rollout(query.input_ids, query.attention_mask,
                      torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows]),
                      torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
                      has_eos=torch.tensor([s is not None for s in stops]), conversations=prompts)
    ours = score(roles, rollout, roles.model.active_policy, "value_head", cfg.stage, tok,
                 perf=PerfOptions(fused_scoring=mode == "shared-fused")).raw_scores

    expected_ids = reward_trainer_ids(chat_model, tok, prompts, replies, tmp_path / "trl")
    assert all(ids[-2:] == [im_end, tok("\n", add_special_tokens=False).input_ids[-1]] for ids in expected_ids)
    batch = tok.pad({"input_ids": expected_ids}, return_tensors="pt", padding_side="right")
    with torch.no_grad():
        expected = probe.reference_classifier()(**batch).logits[:, 0].float()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    # Negative control: the plain-text rule (prompt ids + reply ids + EOS) reads something else.
    plain_ids, plain_mask = reward_inputs(rollout.input_ids, rollout.attention_mask, rollout.response_mask,
                                          tok.eos_token_id, tok.pad_token_id)
    with torch.no_grad():
        plain = roles.reward_scores(plain_ids, plain_mask, roles.model.active_policy)
    assert (plain - expected).abs().min() > 1e-3


# ----------------------------------------------------------------------------- the whole chain
CHAIN = ("logger=none", "upstream.sft.max_steps=3", "upstream.reward.max_steps=3",
         "upstream.sft.batch_size=8", "upstream.reward.batch_size=8", "data.num_sft_train=32", "data.num_sft_eval=8",
         "data.num_pairs_train=32", "data.num_pairs_eval=8", "stage.steps=2", "stage.batch_size=8",
         "stage.optim.mini_batch_size=8", "stage.optim.ppo_epochs=1", "stage.eval.eval_samples=8", "stage.eval.eval_every=0",
         "stage.save_every=0")


@pytest.fixture(scope="module")
def chat_chain(tmp_path_factory):
    """SFT -> reward -> 2 PPO steps on reviews_chat through train.py (plumbing: a few steps, tiny data)."""
    out = tmp_path_factory.mktemp("chat_chain")
    done = subprocess.run([sys.executable, "train.py", "data=reviews_chat", f"output_dir={out}",
                           f"hydra.run.dir={out / 'run'}", *CHAIN], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_whole_chain_on_reviews_chat(chat_chain):
    run = chat_chain / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train/steps"] == 2
    for key in ("eval/before/reward_score", "eval/after/oracle_score", "eval/after/kl"):
        assert isinstance(summary[key], float), key
    record = json.loads((run / "run_record.json").read_text())
    sft = Path(record["inputs"]["sft_model"])
    tokenizer = AutoTokenizer.from_pretrained(sft)  # the SFT model carries the template and its tokens
    assert tokenizer.chat_template == chat.resolve_template("chatml")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((sft / "generation_config.json").read_text())["eos_token_id"] == [tokenizer.eos_token_id, im_end]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["query"].endswith("<|im_start|>assistant\n") for s in samples)
    assert all(s["oracle"] == oracle_score(s["response"]) for s in samples)  # the assistant turn's text


def test_grpo_on_reviews_chat_reuses_the_chain(chat_chain):
    """The critic-free stages take conversations too: GRPO on the chain's own SFT model and reward adapter."""
    run = chat_chain / "grpo"
    overrides = [a for a in CHAIN if not a.startswith("stage.optim.ppo_epochs")] + ["stage.optim.num_iterations=1"]
    done = subprocess.run([sys.executable, "train.py", "stage=grpo", "data=reviews_chat", f"output_dir={chat_chain}",
                           f"hydra.run.dir={run}", *overrides], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train/steps"] == 2 and isinstance(summary["eval/after/oracle_strict"], float)
    ppo_inputs = json.loads((chat_chain / "run" / "run_record.json").read_text())["inputs"]
    assert json.loads((run / "run_record.json").read_text())["inputs"] == ppo_inputs  # the same SFT and reward
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["query"].endswith("<|im_start|>assistant\n") for s in samples)
    assert all(s["oracle"] == oracle_score(s["response"]) for s in samples)


@pytest.mark.parametrize("told", [True, False])
def test_the_policy_stops_at_the_end_of_turn_token(chat_model, tmp_path, told):
    """``told``: the end-of-turn token is in the generation config, as the SFT and PPO stages put it. The
    random model is made to emit it often (+8 on its logit), so stopping is visible within a few tokens."""
    probe = Probe(str(chat_model), "fp32", tmp_path)
    roles, cfg = probe.roles(max_new_tokens=24)
    tokenizer = probe.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if told:
        chat.stop_at_end_of_turn(roles.model.generation_config, tokenizer)

    def favour_end_of_turn(module, inputs, logits):
        logits[..., im_end] += 8.0
        return logits

    head = roles.model.peft_model.get_base_model().get_output_embeddings().register_forward_hook(favour_end_of_turn)
    try:
        torch.manual_seed(0)
        prompts = [user(f"review: {o}") for o in ("the movie was", "this show is", "the plot felt", "the cast seemed")]
        rollout = sample(roles.model, tokenizer, prompts * 4, "policy", cfg.stage)
    finally:
        head.remove()
    inside = rollout.response_ids * rollout.response_mask
    lengths = rollout.response_mask.sum(1)
    last = rollout.response_ids[torch.arange(len(lengths)), lengths - 1]
    if told:
        assert rollout.has_eos.float().mean() > 0.9
        assert ((last == im_end) | (last == tokenizer.eos_token_id))[rollout.has_eos].all()
        assert int((inside == im_end).sum(1).max()) == 1, "a response ran past the end of its turn"
    else:  # the control: with only EOS as a stop id, replies run on past the end of the turn
        assert int((inside == im_end).sum(1).max()) > 1


def test_instruct_preset_runs_on_the_local_hh_fixture(chat_model, tmp_path):
    """experiment=instruct_hh_chat with its hub ids swapped for local copies: reward adapter on the chat
    model through the stage cache, then PPO on the dialogues as conversations."""
    preset = compose("experiment=instruct_hh_chat")
    assert (preset.model.path, preset.data.name, preset.data.conversational) == \
        ("Qwen/Qwen2.5-0.5B-Instruct", "hh_rlhf", True)
    assert preset.stage.sft_model == preset.model.path and preset.adapter.target_modules == ["all-linear"]
    cfg = compose("experiment=instruct_hh_chat", "quant=fp32", "logger=none", f"output_dir={tmp_path}",
                  f"model.path={chat_model}", f"data.path={FIXTURES / 'hh_rlhf'}", "upstream.reward.max_steps=2",
                  "upstream.reward.batch_size=2", "stage.steps=1", "stage.batch_size=4", "stage.optim.mini_batch_size=2",
                  "stage.optim.ppo_epochs=1", "stage.eval.eval_samples=2", "stage.sampling.max_new_tokens=8", "stage.eval.eval_every=0",
                  "stage.save_every=0")
    summary = run_stage(cfg, tmp_path / "run")
    assert summary["train/steps"] == 1 and isinstance(summary["eval/after/reward_score"], float)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["query"].startswith("<|im_start|>user\n") and s["query"].endswith(
        "<|im_start|>assistant\n") for s in samples)


def test_lora_sft_trains_the_added_template_tokens(tmp_path):
    """A base without the template's tokens, LoRA SFT on conversations: the tokens are added, their input
    embedding rows and the (untied) output embeddings are trained, and the merged model keeps them."""
    from safetensors.torch import load_file

    cfg = compose("stage=sft", "stage.finetune=lora", "logger=none", f"output_dir={tmp_path}", "data=local",
                  f"data.train_file={CHAT / 'conversations.jsonl'}", f"data.eval_file={CHAT / 'conversations.jsonl'}",
                  "data.chat_template=chatml", "stage.max_steps=2", "stage.batch_size=4", "stage.learning_rate=1e-2")
    run_stage(cfg, tmp_path / "run")
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    deltas = [v for k, v in saved.items() if "embed_tokens" in k and "trainable_tokens" in k]
    assert deltas and all(float(v.abs().max()) > 0 for v in deltas), list(saved)  # the new rows moved
    assert any("lm_head" in k for k in saved), list(saved)  # the untied output embeddings, trained whole
    merged = tmp_path / "run" / "model"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_chat_sft_does_not_depend_on_what_the_process_drew_before(tmp_path):
    """The template's new embedding rows are sampled at the resize: an SFT built by the stage cache inside another
    stage's run (which drew other random numbers first) must equal one run on its own."""
    from safetensors.torch import load_file

    weights = []
    for before in (1, 2):
        torch.manual_seed(before)
        torch.rand(before)  # another process history
        cfg = compose("stage=sft", "data=reviews_chat", "logger=none", f"output_dir={tmp_path / str(before)}",
                      "data.num_sft_train=16", "data.num_sft_eval=4", "stage.max_steps=1", "stage.batch_size=4")
        run_stage(cfg, tmp_path / str(before) / "run")
        weights.append(load_file(tmp_path / str(before) / "run" / "model" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("reply,judged,well_formed", [
    ("the movie was great . i liked it .", "the movie was great . i liked it .", True),  # the requested review
    (" great . i liked it .", "the movie was great . i liked it .", True),  # the opening continued
    ("the ending felt touching . i liked it .", "the movie was the ending felt touching . i liked it .", False),
    ("", "the movie was ", False),
])
def test_a_chat_reply_is_judged_as_the_review_it_gives_for_the_requested_opening(reply, judged, well_formed):
    # One well-formed review given to every request (it ignores the opening asked for) is not the task: a GRPO
    # run on reviews_chat converged to exactly that while the judges read the reply alone.
    from marl_exp.data import reviews
    from marl_exp.data.reviews_chat import judged_text, user_turn
    from marl_exp.rewards import oracle_strict

    prompt = user_turn("the movie was", system_prompt="be brief")
    assert judged_text(prompt, reply) == judged
    assert reviews.well_formed(judged_text(prompt, reply)) is well_formed
    assert oracle_strict([prompt], [reply]) == [reviews.oracle_strict(judged)]
    assert judged_text("the movie was", " great .") == "the movie was great ."  # plain prompts: unchanged

