"""The built-in reviews task: the oracle, the seeded generator, preference pairs and the task splits."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from marl_exp.config import ConfigError, DataConfig
from marl_exp.data import build_task
from marl_exp.data.reviews import (
    INTENSIFIERS,
    NEGATIVE_ADJECTIVES,
    POSITIVE_ADJECTIVES,
    ReviewGenerator,
    openings,
    oracle_score,
)


# ------------------------------------------------------------------------------------------ oracle
@pytest.mark.parametrize("text,expected", [
    ("the movie was great . i loved it .", 1.0),
    ("the movie was great and wonderful . i adored it .", 1.0),  # all positive
    ("the movie was boring . i hated it .", 0.0),
    ("the movie was great but boring . i hated it .", 1 / 3),
    ("the movie was not boring . i loved it .", 1.0),  # negation flips a negative word
    ("the movie was not great . i loved it .", 0.5),  # ... and a positive one
    ("the movie was not very boring . i loved it .", 1.0),  # intensifier between not and adjective
    ("the plot was not really truly great . i hated it .", 0.0),  # several intensifiers
    ("the cast was very dull . i liked it .", 0.5),  # an intensifier alone changes nothing
    ("the movie was . i saw it .", 0.5),  # no polar word: neutral
    ("", 0.5),
    ("not", 0.5),
    ("the movie was not the great one", 1.0),  # another word ends the negation's scope
    ("the movie was not . great", 1.0),  # so does punctuation
    ("THE MOVIE WAS NOT BORING", 1.0),  # case-insensitive
    ("the acting was great, clever and charming", 1.0),
])
def test_oracle_on_hand_written_texts(text, expected):
    assert oracle_score(text) == pytest.approx(expected)


def test_oracle_negation_applies_to_every_adjective_and_intensifier():
    for adjective in POSITIVE_ADJECTIVES:
        assert oracle_score(f"it was not {adjective}") == 0.0
    for adjective in NEGATIVE_ADJECTIVES:
        for intensifier in INTENSIFIERS:
            assert oracle_score(f"it was not {intensifier} {adjective}") == 1.0


def test_oracle_is_in_unit_interval_on_generated_reviews():
    generator = ReviewGenerator(seed=7)
    scores = [oracle_score(generator.review().text) for _ in range(500)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    # Graded sentiment: clearly negative, clearly positive and mixed reviews all occur.
    assert min(scores) == 0.0 and max(scores) == 1.0 and any(0.0 < s < 1.0 for s in scores)


def test_generated_reviews_follow_their_sampled_sentiment():
    generator = ReviewGenerator(seed=3)
    positive = [oracle_score(generator.review(sentiment=1.0).text) for _ in range(100)]
    negative = [oracle_score(generator.review(sentiment=0.0).text) for _ in range(100)]
    assert positive == [1.0] * 100 and negative == [0.0] * 100


# --------------------------------------------------------------------------------------- generator
def test_generator_is_deterministic_per_seed():
    def sample(seed):
        generator = ReviewGenerator(seed)
        return [generator.review().text for _ in range(50)] + [
            c.text + "|" + r.text for c, r in (generator.preference_pair(0.25) for _ in range(10))]

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_review_structure():
    generator = ReviewGenerator(seed=0)
    for _ in range(200):
        review = generator.review()
        assert review.opening in openings()
        assert review.text.startswith(review.opening + " ")
        assert review.text.endswith(" it .")
        assert 0.0 <= review.sentiment <= 1.0
    assert generator.review(opening="the plot was").opening == "the plot was"


@pytest.mark.parametrize("min_gap", [0.0, 0.25, 0.6])
def test_preference_pairs_share_the_opening_and_respect_the_gap(min_gap):
    generator = ReviewGenerator(seed=5)
    for _ in range(200):
        chosen, rejected = generator.preference_pair(min_gap)
        assert chosen.opening == rejected.opening
        gap = oracle_score(chosen.text) - oracle_score(rejected.text)
        assert gap > 0 and gap >= min_gap - 1e-12


# -------------------------------------------------------------------------------------------- task
def small_data(**overrides):
    values = dict(num_sft_train=40, num_sft_eval=12, num_pairs_train=30, num_pairs_eval=9, **overrides)
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def test_build_task_sizes_follow_the_data_config():
    task = build_task(small_data())
    assert task.name == "reviews"
    assert len(task.sft_train) == 40 and len(task.sft_eval) == 12
    assert len(task.pairs_train) == 30 and len(task.pairs_eval) == 9
    assert task.sft_train.column_names == ["text"]
    assert set(task.pairs_train.column_names) == {"chosen", "rejected"}
    assert task.oracle is oracle_score


def test_build_task_is_deterministic_and_seeded_by_data_seed():
    a, b = build_task(small_data()), build_task(small_data())
    assert a.sft_train["text"] == b.sft_train["text"] and a.pairs_eval["chosen"] == b.pairs_eval["chosen"]
    c = build_task(small_data(seed=99))
    assert c.sft_train["text"] != a.sft_train["text"]


def test_task_splits_come_from_different_streams():
    task = build_task(small_data())
    assert task.sft_train["text"][:12] != task.sft_eval["text"]
    assert task.pairs_train["chosen"][:9] != task.pairs_eval["chosen"]


def opening_of(text: str) -> str:
    (opening,) = [o for o in openings() if text.startswith(o + " ")]
    return opening


def test_task_pairs_have_the_same_opening_and_a_gap():
    data = small_data(pair_min_gap=0.3)
    task = build_task(data)
    for split in (task.pairs_train, task.pairs_eval):
        for chosen, rejected in zip(split["chosen"], split["rejected"]):
            assert opening_of(chosen) == opening_of(rejected)
            assert oracle_score(chosen) - oracle_score(rejected) >= 0.3 - 1e-12


def test_prompts_train_and_eval_are_disjoint_openings():
    task = build_task(small_data())
    train, evaluation = set(task.prompts_train), set(task.prompts_eval)
    assert train.isdisjoint(evaluation)
    assert train | evaluation == set(openings())
    assert len(evaluation) == len(openings()) // 4
    # The held-out prompts are not one narrow slice: every verb occurs on both sides.
    for verb in ("was", "is", "felt", "seemed"):
        assert any(p.endswith(" " + verb) for p in evaluation)
        assert any(p.endswith(" " + verb) for p in train)


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="data.name='squad' is not a known task"):
        build_task(small_data(name="squad"))


def test_preference_pairs_include_unfinished_reviews_ranked_by_the_oracle():
    generator = ReviewGenerator(seed=11)
    pairs = [generator.preference_pair(min_gap=0.25, truncate_prob=0.5) for _ in range(200)]
    sides = [r for pair in pairs for r in pair]
    unfinished = [r for r in sides if not r.text.endswith(" .")]
    assert 0.3 < len(unfinished) / len(sides) < 0.7  # about half of the sides, as asked
    assert any(r.text == r.opening for r in unfinished)  # cut before the first body word
    for chosen, rejected in pairs:
        assert chosen.opening == rejected.opening
        assert oracle_score(chosen.text) - oracle_score(rejected.text) >= 0.25


def test_spliced_pairs_go_off_grammar_but_keep_the_oracle_order():
    generator = ReviewGenerator(seed=12)
    pairs = [generator.preference_pair(min_gap=0.25, splice_prob=1.0) for _ in range(100)]
    # Every side got a stretch of another review: longer than any grammatical body of one closing.
    assert sum(r.text.count(" i ") > 1 or r.text.count(" .") > 2 for pair in pairs for r in pair) > 50
    for chosen, rejected in pairs:
        assert oracle_score(chosen.text) - oracle_score(rejected.text) >= 0.25
