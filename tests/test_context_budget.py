"""The reward model's input fits in the model's context (issue 26, bug 3).

Prompts are fitted to ``context − max_new_tokens``; the reward input is longer than the policy's: plain text
gets an EOS appended (``rollout.reward_inputs``), a conversation is re-rendered with the template's end-of-turn
tokens (``rollout.chat_reward_inputs``). A model with learned positions (GPT-2) then indexes past its position
table (IndexError); a RoPE model scores past its trained context. The RL setup reserves those tokens.

The fixtures: the GPT-2 family's tokenizer (``conformance.families``, GPT-2's convention: no pad, pad = EOS) on
a random GPT-2 with a short position table, and a fresh reward adapter for it.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import compose
from marl_exp.conformance.families import build_family_model
from marl_exp.data import build_task, chat
from marl_exp.data.checks import DataError, reward_end_tokens
from marl_exp.rl import rollout as rollout_module
from marl_exp.rl.rollout import Rollout, score
from marl_exp.stages.pipeline import run_stage
from marl_exp.stages.rl import RLRecipe

MAX_NEW_TOKENS = 5


def gpt2_tokenizer(chat_template: str | None = None):
    """The GPT-2 family's tokenizer; with ``chat_template``, that template and the tokens it writes."""
    tokenizer = AutoTokenizer.from_pretrained(build_family_model("gpt2", "pad_is_eos"))
    if chat_template:
        tokenizer.chat_template = chat.resolve_template(chat_template)
        tokenizer.add_special_tokens({"additional_special_tokens": chat.missing_template_tokens(tokenizer)},
                                     replace_extra_special_tokens=False)
    return tokenizer


def short_gpt2(out, positions: int, chat_template: str | None = None) -> tuple[str, str]:
    """A random GPT-2 with ``positions`` positions and a fresh reward adapter for it; returns (model dir,
    reward adapter dir)."""
    tokenizer = gpt2_tokenizer(chat_template)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model_dir, reward_dir = out / "model", out / "reward"
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # A reward adapter as peft saves a sequence-classification LoRA (its score head in modules_to_save).
    classifier = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    classifier.config.pad_token_id = tokenizer.eos_token_id  # as RewardTrainer sets it without a pad token
    get_peft_model(classifier, LoraConfig(r=4, task_type="SEQ_CLS")).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    return str(model_dir), str(reward_dir)


def rl_cfg(out, model_dir: str, reward_dir: str, *overrides: str):
    # min_new_tokens = max_new_tokens: every response is cut at max_new_tokens, so each reward input is as
    # long as the budget allows (plain text: EOS appended; a conversation: the template's end of turn).
    return compose("stage=ppo", "logger=none", f"output_dir={out}", f"stage.sft_model={model_dir}",
                   f"stage.reward_adapter={reward_dir}", "stage.steps=1", "stage.batch_size=4",
                   "stage.optim.mini_batch_size=4", "stage.optim.ppo_epochs=1", "stage.eval.eval_samples=16",
                   "stage.eval.eval_every=0", "stage.save_every=0", f"stage.sampling.max_new_tokens={MAX_NEW_TOKENS}",
                   f"stage.sampling.min_new_tokens={MAX_NEW_TOKENS}", *overrides)


@pytest.fixture
def reward_lengths(monkeypatch) -> list[int]:
    """The longest reward input (real tokens) of every scoring pass of the run."""
    lengths = []
    inputs = rollout_module._reward_adapter_inputs

    def recording(*args, **kwargs):
        ids, mask = inputs(*args, **kwargs)
        lengths.append(int(mask.sum(1).max()))
        return ids, mask

    monkeypatch.setattr(rollout_module, "_reward_adapter_inputs", recording)
    return lengths


def prompt_lengths(tokenizer, prompts) -> list[int]:
    return [chat.prompt_length(tokenizer, p) for p in prompts]


def test_plain_reward_input_fits_a_16_position_gpt2(tmp_path, reward_lengths):
    context = 16
    model_dir, reward_dir = short_gpt2(tmp_path, context)
    cfg = rl_cfg(tmp_path, model_dir, reward_dir, "data.on_bad_row=skip")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    unseen = build_task(cfg.data).prompts("unseen_subjects")
    # The premise: the longest held-out prompts (11 tokens) fill the policy's budget exactly.
    assert sorted(set(prompt_lengths(tokenizer, unseen))) == [7, context - MAX_NEW_TOKENS]
    run_stage(cfg, tmp_path / "run")  # before the fix: IndexError in GPT-2's position embedding (17 positions)
    # The 11-token prompts are skipped; the longest reward input: a 7-token prompt, a cut response and its EOS.
    assert max(reward_lengths) == 7 + MAX_NEW_TOKENS + 1 <= context


def test_plain_prompt_without_room_for_the_eos_is_one_line_at_setup(tmp_path):
    model_dir, reward_dir = short_gpt2(tmp_path, 16)
    with pytest.raises(DataError, match=r"prompt has 11 tokens, more than the 10 that fit in the context with the "
                                        r"response and the 1 token the reward model reads after it .*shorten them, "
                                        r"lower stage.sampling.max_new_tokens or set data.on_bad_row=skip"):
        run_stage(rl_cfg(tmp_path, model_dir, reward_dir), tmp_path / "run")


def test_reward_end_tokens_are_measured_from_the_template():
    # Plain text: the EOS reward_inputs appends. ChatML: "<|im_end|>\n" after the reply, counted by hand.
    tokenizer = gpt2_tokenizer("chatml")
    assert reward_end_tokens(tokenizer, conversational=False) == 1
    assert reward_end_tokens(tokenizer, conversational=True) == 2 == len(
        tokenizer("<|im_end|>\n", add_special_tokens=False).input_ids)


def test_chat_reward_input_fits_the_context(tmp_path, reward_lengths, monkeypatch):
    # ChatML re-renders the reply followed by "<|im_end|>\n": two tokens the policy's input does not hold.
    overrides = ("data=reviews_chat", "data.on_bad_row=skip")
    tokenizer = gpt2_tokenizer("chatml")
    task = build_task(compose(*overrides).data)
    lengths = {split: prompt_lengths(tokenizer, task.prompts(split)) for split in ("train", "eval", "unseen_subjects")}
    longest = max(max(n) for n in lengths.values())
    assert all(min(n) <= longest - 2 for n in lengths.values())  # every split keeps prompts after reserving two
    context = longest + MAX_NEW_TOKENS  # the longest prompts fill the policy's budget exactly
    model_dir, reward_dir = short_gpt2(tmp_path, context, chat_template="chatml")
    cfg = rl_cfg(tmp_path, model_dir, reward_dir, *overrides)
    # The RL setup (its prompt fitting and models), without the first evaluation: a random policy's replies
    # are token salad whose text does not round-trip (a lone byte decodes to U+FFFD, three tokens re-encoded).
    monkeypatch.setattr(RLRecipe, "_resume_or_evaluate", lambda self: None)
    recipe = RLRecipe(cfg, tmp_path / "run", None, model_dir, reward_dir, None)
    recipe.setup()
    tokenizer = recipe.tokenizer
    kept = recipe.task.prompts("unseen_subjects")
    prompt = max(kept, key=lambda p: chat.prompt_length(tokenizer, p))
    # A reply cut at max_new_tokens, whose text round-trips: the longest the reward input gets.
    reply = tokenizer("the movie was great . i loved it .", add_special_tokens=False).input_ids[:MAX_NEW_TOKENS]
    assert tokenizer(tokenizer.decode(reply), add_special_tokens=False).input_ids == reply
    query = chat.encode_prompts(tokenizer, [prompt])
    rollout = Rollout(query.input_ids, query.attention_mask, torch.tensor([reply]),
                      torch.ones(1, len(reply), dtype=torch.long), has_eos=torch.tensor([False]),
                      conversations=[prompt], prompts=[prompt])
    score(recipe.roles, rollout, "policy", "value_head", cfg.stage, tokenizer)  # before the fix: IndexError
    end_of_turn = len(tokenizer("<|im_end|>\n", add_special_tokens=False).input_ids)  # what ChatML writes after it
    assert reward_lengths == [chat.prompt_length(tokenizer, prompt) + MAX_NEW_TOKENS + end_of_turn]
    assert reward_lengths[0] <= context
