"""The text the judges, the oracle and the reward functions read is the text the tokenizer writes for prompt +
response decoded together (issue 26, bug 5).

A SentencePiece (Metaspace) tokenizer, as Llama 2, Mistral and Gemma ship, drops the leading space of a
response decoded alone: "the movie was" + "great . i loved it ." read as "the movie wasgreat . i loved it .",
a perfect review judged not well formed. The reference is the tokenizer's own decode of the whole sequence.
"""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer

from conftest import compose
from marl_exp.config import RewardSource, TinyArchConfig
from marl_exp.data import reviews
from marl_exp.data.task import Task
from marl_exp.modeling.tiny import train_tokenizer
from marl_exp.rl import rollout as rollout_module
from marl_exp.data.response_metrics import response_metrics
from marl_exp.rl.reward_sources import RewardSources
from marl_exp.rl.rollout import Rollout
from marl_exp.sample import sample_side_by_side
from marl_exp.stages.rl import rollout_samples

REVIEWS = ["the movie was great . i loved it .", "the plot felt dull and very weak . i hated it .",
           "this show is not bad . i liked it ."]
OPENING_WORDS = 3


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """Llama 2's convention, built offline: a SentencePiece-style BPE (Metaspace, byte fallback) trained on
    review text, in transformers' LlamaTokenizer with legacy=False; BOS on every encoding, pad = EOS."""
    generator = reviews.ReviewGenerator(seed=0)
    corpus = [generator.review().text for _ in range(500)]
    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    model = json.loads(trained.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], legacy=False,
                               add_bos_token=True)
    tokenizer.pad_token = tokenizer.eos_token  # as load_tokenizer sets it for Llama
    return tokenizer


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    """The built-in tiny model's tokenizer (byte-level BPE)."""
    return train_tokenizer(TinyArchConfig().vocab_size)


def review_rollout(tokenizer, texts: list[str], cut: tuple[bool, ...] = ()) -> Rollout:
    """Each review's first words as the prompt, the rest as the response the policy sampled: the tokens the
    tokenizer writes for the whole review after the prompt's, then EOS (none where ``cut``)."""
    cut = cut or (False,) * len(texts)
    prompts = [" ".join(t.split(" ")[:OPENING_WORDS]) for t in texts]
    query = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    rows = []
    for prompt, text, is_cut in zip(prompts, texts, cut):
        whole, head = tokenizer(text).input_ids, tokenizer(prompt).input_ids
        assert whole[:len(head)] == head  # the response continues the prompt's tokens
        rows.append(whole[len(head):] + ([] if is_cut else [tokenizer.eos_token_id]))
    width = max(map(len, rows))
    response = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return Rollout(query.input_ids, query.attention_mask, response, mask, has_eos=torch.tensor([not c for c in cut]),
                   prompts=prompts)


def decoded_together(tokenizer, rollout: Rollout) -> list[str]:
    """The reference: the tokenizer's decode of each prompt + response token sequence."""
    return [tokenizer.decode(q[qm.bool()].tolist() + r[rm.bool()].tolist(), skip_special_tokens=True)
            for q, qm, r, rm in zip(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)]


def reviews_task() -> Task:
    return Task("reviews", sft=None, pairs=None, prompts=None, oracle=reviews.oracle_score, judge=reviews.well_formed)


def function_scores(tokenizer, rollout: Rollout, function: str) -> list[float]:
    """A reward function's scores as the RL step computes them (``score_many``'s function sources)."""
    sources = RewardSources([RewardSource("gold", 1.0, function=f"marl_exp.rewards:{function}")])
    scores = rollout_module._function_scores(sources, {"policy": rollout}, rollout.response_ids, tokenizer)
    return scores["gold"].tolist()


def test_the_tokenizers_write_the_reviews_whole(metaspace_tokenizer, byte_level_tokenizer):
    # The premise: decoded together, both tokenizers give back the reviews, which the judge accepts.
    for tokenizer in (metaspace_tokenizer, byte_level_tokenizer):
        assert decoded_together(tokenizer, review_rollout(tokenizer, REVIEWS)) == REVIEWS
    assert all(reviews.well_formed(t) for t in REVIEWS)
    # Decoded alone, a Metaspace response loses its leading space; a byte-level one keeps it.
    alone = {name: tokenizer.batch_decode(review_rollout(tokenizer, REVIEWS[:1]).response_ids, skip_special_tokens=True)
             for name, tokenizer in (("metaspace", metaspace_tokenizer), ("byte_level", byte_level_tokenizer))}
    assert alone == {"metaspace": ["great . i loved it ."], "byte_level": [" great . i loved it ."]}


def test_judges_read_a_sentencepiece_review_as_the_tokenizer_writes_it(metaspace_tokenizer):
    tokenizer = metaspace_tokenizer
    rollout = review_rollout(tokenizer, REVIEWS)
    expected = decoded_together(tokenizer, rollout)
    # Training samples (rollout_samples): the judge's verdict and the oracle on the text as decoded together.
    samples = rollout_samples(rollout, tokenizer, reviews_task())
    assert [s["well_formed"] for s in samples] == [True] * len(REVIEWS)
    assert [s["oracle"] for s in samples] == [reviews.oracle_score(t) for t in expected]
    # The reward functions (score_many): the strict gold is the oracle's value, each review being well formed.
    assert function_scores(tokenizer, rollout, "oracle_strict") == pytest.approx(
        [reviews.oracle_score(t) for t in expected])
    # Every response text continues its prompt into exactly the tokenizer's decode of the whole.
    texts = rollout_module.response_texts(tokenizer, rollout)
    judged = [reviews_task().judged_text(p, r) for p, r in zip(rollout.prompts, texts)]
    assert judged == expected
    metrics = response_metrics(judged, texts, [True] * len(texts), oracle=reviews.oracle_score,
                               judge=reviews.well_formed)
    assert metrics["well_formed"] == 1.0
    assert metrics["oracle_strict"] == metrics["oracle_score"] == pytest.approx(2 / 3)  # two positive reviews of three


class ScriptedPolicy:
    """Stands in for the model ``marl-exp sample`` loads: writes the given response tokens after each prompt."""

    score_head = None  # no reward adapter
    device = torch.device("cpu")
    active_policy = "policy"
    peft_model = SimpleNamespace(disable_adapter=contextlib.nullcontext)

    def __init__(self, response_ids: torch.Tensor):
        self.response_ids = response_ids

    def activate_policy(self, name: str) -> None:
        self.active_policy = name

    def generate(self, input_ids, attention_mask, adapter=None, generation_config=None):
        return torch.cat([input_ids, self.response_ids], dim=1)


def test_marl_exp_sample_scores_a_sentencepiece_review_as_the_tokenizer_writes_it(metaspace_tokenizer):
    tokenizer = metaspace_tokenizer
    rollout = review_rollout(tokenizer, REVIEWS)
    rows = sample_side_by_side(ScriptedPolicy(rollout.response_ids), tokenizer, rollout.prompts, "policy",
                               compose("stage=ppo").stage, seed=0, oracle=reviews.oracle_score)
    expected = decoded_together(tokenizer, rollout)
    assert [r["prompt"] + r["response"] for r in rows] == expected * 2  # the reference's rows, then the policy's
    assert [r["oracle"] for r in rows] == [reviews.oracle_score(t) for t in expected] * 2


def test_byte_level_texts_are_read_as_before(byte_level_tokenizer):
    # The built-in tokenizer writes a response's leading space in its first token: decoding the response
    # alone (the earlier rule) and decoding it after its prompt give the same texts and the same verdicts.
    tokenizer = byte_level_tokenizer
    texts = REVIEWS + ["the acting was great great . i", "the movie was not . bad ."]
    rollout = review_rollout(tokenizer, texts, cut=(False, False, False, True, False))
    alone = tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
    assert rollout_module.response_texts(tokenizer, rollout) == alone
    task = reviews_task()
    before = [task.judged_text(p, r) for p, r in zip(rollout.prompts, alone)]
    samples = rollout_samples(rollout, tokenizer, task)
    assert [s["response"] for s in samples] == alone
    assert [s["well_formed"] for s in samples] == [reviews.well_formed(t) for t in before] == [True] * 3 + [False] * 2
    assert [s["oracle"] for s in samples] == [reviews.oracle_score(t) for t in before]
    assert function_scores(tokenizer, rollout, "oracle_strict") == pytest.approx(
        [reviews.oracle_strict(t) for t in before])


def test_a_conversations_reply_is_read_alone(byte_level_tokenizer):
    # A chat reply is the assistant message (TRL decodes completions alone): not a continuation of the
    # rendered prompt.
    tokenizer = byte_level_tokenizer
    rollout = review_rollout(tokenizer, REVIEWS)
    rollout.conversations = [[{"role": "user", "content": "review: " + p}] for p in rollout.prompts]
    assert rollout_module.response_texts(tokenizer, rollout) == tokenizer.batch_decode(rollout.response_ids,
                                                                                     skip_special_tokens=True)
