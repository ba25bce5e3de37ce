"""A group's prompt is computed once (``modeling.shared_prefill``) and sampling is unchanged: the same logits
as a full prefill within fp32 rounding, the same samples, the adapter applied in the shared pass too."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from conftest import compose
from marl_exp.modeling.shared_prefill import prompt_groups, shared_prompt_cache
from marl_exp.rl.rollout import PerfOptions, sample
from test_perf_equivalence import build

GROUP = 4
PROMPTS = ["the movie was", "this show is really", "a"]  # different lengths: left padding differs per group
ATOL = 1e-5  # the perf-equivalence tolerance; fp32 noise between batch shapes is about 1e-6 here
GREEDY = GenerationConfig(do_sample=False, max_new_tokens=6, output_logits=True, return_dict_in_generate=True)


def grouped(tokenizer, prompts=PROMPTS, group=GROUP):
    tokenizer.padding_side = "left"
    enc = tokenizer([p for p in prompts for _ in range(group)], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


@contextlib.contextmanager
def embedded_tokens(model):
    """Tokens each forward embeds, by a hook on the input embeddings (removed on exit)."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, args, _o: seen.append(args[0].numel()))
    try:
        yield seen
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def plain(sft, tokenizer):
    return AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32).eval(), tokenizer


def test_a_groups_prompt_runs_once_and_generation_is_unchanged(plain):
    model, tokenizer = plain
    ids, mask = grouped(tokenizer)
    rows, width = ids.shape
    kwargs = dict(attention_mask=mask, generation_config=GREEDY, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode(), embedded_tokens(model) as embedded:
        full = model.generate(ids, **kwargs)
        embedded.clear()
        cache = shared_prompt_cache(model, ids, mask, GROUP)
        shared = model.generate(ids, **cache, **kwargs)
    # The shared pass embeds each distinct prompt but its last token once; generate then starts at the last token.
    assert embedded[:2] == [(rows // GROUP) * (width - 1), rows]
    assert torch.equal(full.sequences, shared.sequences)
    for a, b in zip(full.logits, shared.logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["group of one", "rows differ", "rows not a multiple", "one-token prompts"])
def test_rows_that_are_not_groups_generate_as_usual(plain, case):
    model, tokenizer = plain
    ids, mask = grouped(tokenizer)
    group = GROUP
    if case == "group of one":
        group = 1
    elif case == "rows differ":
        ids = ids.clone()
        ids[1, -1] = (ids[1, -1] + 1) % model.config.vocab_size
    elif case == "rows not a multiple":
        ids, mask = ids[:-1], mask[:-1]
    else:
        ids, mask = ids[:, -1:], mask[:, -1:]
    assert not prompt_groups(ids, mask, group)
    assert shared_prompt_cache(model, ids, mask, group) == {}


def test_a_cache_that_is_not_plain_keys_and_values_is_not_shared(plain):
    """A convolution layer's state (LFM2) would not be repeated per row; a fixed cache implementation makes
    generate refuse a cache passed in: both generate as usual."""
    from transformers import AutoModelForCausalLM, Lfm2Config

    model, tokenizer = plain
    ids, mask = grouped(tokenizer)
    hybrid = AutoModelForCausalLM.from_config(Lfm2Config(
        vocab_size=model.config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, layer_types=["conv", "full_attention"])).eval()
    assert shared_prompt_cache(hybrid, ids, mask, GROUP) == {}
    saved = model.generation_config.cache_implementation
    model.generation_config.cache_implementation = "static"
    try:
        assert shared_prompt_cache(model, ids, mask, GROUP) == {}
    finally:
        model.generation_config.cache_implementation = saved
    assert shared_prompt_cache(model, ids, mask, GROUP)  # the plain model itself shares


@pytest.fixture(scope="module")
def grpo_roles(trained_chain, tmp_path_factory):
    roles, tokenizer, _ = build(trained_chain, tmp_path_factory.mktemp("shared-prefill"))
    cfg = compose("stage=grpo", f"stage.sampling.num_generations={GROUP}", "stage.sampling.max_new_tokens=8")
    return roles, tokenizer, cfg


def test_the_policy_adapter_is_active_in_the_shared_pass(grpo_roles):
    """Logits equal the full prefill's and differ from the base's: the cached prompt saw the LoRA too."""
    roles, tokenizer, _ = grpo_roles
    model = roles.model
    ids, mask = grouped(tokenizer)
    rows, width = ids.shape
    with torch.inference_mode():
        full = model.generate(ids, mask, adapter="policy", generation_config=GREEDY)
        with embedded_tokens(model.peft_model) as embedded:
            shared = model.generate(ids, mask, adapter="policy", prompt_group=GROUP, generation_config=GREEDY)
        with model.peft_model.disable_adapter():
            base = model.generate(ids, mask, adapter="policy", generation_config=GREEDY)
    assert embedded[:2] == [(rows // GROUP) * (width - 1), rows]  # the multi-adapter path shares the prompt too
    torch.testing.assert_close(full.logits[0], shared.logits[0], atol=ATOL, rtol=0)
    assert (shared.logits[0] - base.logits[0]).abs().max() > 100 * ATOL


def test_a_grpo_rollout_samples_the_same_with_the_shared_prefill_on_and_off(grpo_roles):
    roles, tokenizer, cfg = grpo_roles
    prompts = [p for p in PROMPTS for _ in range(GROUP)]
    rollouts = []
    for shared in (True, False):
        torch.manual_seed(11)
        rollouts.append(sample(roles.model, tokenizer, prompts, "policy", cfg.stage, group=GROUP,
                               perf=PerfOptions(shared_prefill=shared)))
    on, off = rollouts
    assert torch.equal(on.response_ids, off.response_ids) and torch.equal(on.response_mask, off.response_mask)
    assert len({tuple(r) for r in on.response_ids[:GROUP].tolist()}) > 1  # a group's replies are sampled apart


def test_pair_replies_are_those_num_return_sequences_samples(sft, tmp_path):
    """The pair sampler shares each request's prompt; its replies are what plain ``num_return_sequences`` gives."""
    from marl_exp.data import chat, sentiment
    from marl_exp.modeling.loading import load_tokenizer

    # Requests of different lengths: a row given another request's cache would also get another padding.
    prompts = [[{"role": "user", "content": text}] for text in
               ("Review it.", "Write a long review of the movie 'Blue River', a drama, in two sentences.", "Go.")]
    rows = sentiment.sample_replies(sft, prompts, replies_per_prompt=GROUP, max_new_tokens=8, seed=5,
                                    chat_template="chatml", temperature=1.0, batch_size=2)
    tokenizer = load_tokenizer(sft)
    tokenizer.chat_template = chat.resolve_template("chatml")
    model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32).eval()
    stop_ids = chat.stop_at_end_of_turn(model.generation_config, tokenizer)
    expected = []
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(5)
        for start in range(0, len(prompts), 2):
            enc = chat.encode_prompts(tokenizer, prompts[start:start + 2])
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8,
                                 num_return_sequences=GROUP, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
            expected += [t.strip() for t in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                                    skip_special_tokens=True)]
    assert [reply for row in rows for reply in row["replies"]] == expected
