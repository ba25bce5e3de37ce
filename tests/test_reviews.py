"""The built-in reviews task: the oracle, the seeded generator, preference pairs and the task splits
(the grammar judge and the strict gold: tests/test_judge.py)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from marl_exp.config import ConfigError, DataConfig
from marl_exp.data import build_task
from marl_exp.data.checks import DataError
from marl_exp.data.reviews import (
    INTENSIFIERS,
    NEGATIVE_ADJECTIVES,
    POSITIVE_ADJECTIVES,
    SUBJECTS,
    UNSEEN_SUBJECTS,
    Review,
    ReviewGenerator,
    openings,
    oracle_score,
    strict_preference,
    well_formed,
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
    values = {"num_sft_train": 40, "num_sft_eval": 12, "num_pairs_train": 30, "num_pairs_eval": 9, **overrides}
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def test_build_task_sizes_follow_the_data_config():
    task = build_task(small_data())
    assert task.name == "reviews"
    assert len(task.sft_train) == 40 and len(task.sft_eval) == 12
    assert len(task.pairs_train) == 30 and len(task.pairs_eval) == 9
    assert task.sft_train.column_names == ["text"]
    assert set(task.pairs_train.column_names) == {"chosen", "rejected"}
    assert task.oracle is oracle_score and task.judge is well_formed
    assert task.extra_eval_splits == ("unseen_subjects",)


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
    (opening,) = [o for o in openings() if text == o or text.startswith(o + " ")]
    return opening


def test_task_pairs_have_the_same_opening_and_follow_the_strict_gold():
    task = build_task(small_data(pair_min_gap=0.3, num_pairs_train=300, pair_gold="strict"))
    for split in (task.pairs_train, task.pairs_eval):
        for chosen, rejected in zip(split["chosen"], split["rejected"]):
            assert opening_of(chosen) == opening_of(rejected)
            assert strict_preference(chosen, rejected, 0.3) == 1
    # Held-out pairs are the task's own reviews (accuracy measures the task, not the augmentation).
    assert all(well_formed(t) for t in list(task.pairs_eval["chosen"]) + list(task.pairs_eval["rejected"]))
    assert not all(well_formed(t) for t in task.pairs_train["rejected"])
    assert all(well_formed(t) for t in task.pairs_train["chosen"])


def test_prompts_train_and_eval_are_disjoint_openings():
    task = build_task(small_data())
    train, evaluation = set(task.prompts_train), set(task.prompts_eval)
    assert train.isdisjoint(evaluation)
    assert train | evaluation == set(openings())
    assert len(evaluation) == len(openings()) // 4
    # The held-out prompts are not one narrow slice: every verb and every subject occurs among them.
    for verb in ("was", "is", "felt", "seemed"):
        assert any(p.endswith(" " + verb) for p in evaluation)
        assert any(p.endswith(" " + verb) for p in train)
    assert {opening.rsplit(" ", 1)[0] for opening in evaluation} == set(SUBJECTS)


def test_evaluation_openings_are_in_no_training_pair():
    task = build_task(small_data(num_pairs_train=2000))
    evaluation = set(task.prompts_eval)
    pair_openings = {opening_of(t) for t in list(task.pairs_train["chosen"]) + list(task.pairs_train["rejected"])}
    assert pair_openings == set(task.prompts_train)  # every training opening, and nothing else
    assert pair_openings.isdisjoint(evaluation)


def test_unseen_subjects_are_in_no_training_text():
    task = build_task(small_data(num_sft_train=2000, num_pairs_train=1000))
    unseen = task.prompts("unseen_subjects")
    assert unseen == openings(UNSEEN_SUBJECTS) and len(unseen) == 4 * len(UNSEEN_SUBJECTS)
    assert set(UNSEEN_SUBJECTS).isdisjoint(SUBJECTS)
    texts = [t for data, column in [(task.sft_train, "text"), (task.sft_eval, "text"), (task.pairs_train, "chosen"),
                                    (task.pairs_train, "rejected"), (task.pairs_eval, "chosen"),
                                    (task.pairs_eval, "rejected")] for t in data[column]]
    texts += task.prompts_train + task.prompts_eval
    assert not [t for t in texts for subject in UNSEEN_SUBJECTS if subject.split()[1] in t.split()]
    # ... yet the judge reads their reviews like any other, and the tokenizer has one token per word.
    generator = ReviewGenerator(seed=0, opening_pool=unseen)
    assert all(well_formed(generator.review().text) for _ in range(100))


def test_builtin_tokenizer_knows_every_word_of_the_unseen_subjects():
    from marl_exp.modeling.tiny import train_tokenizer

    tokenizer = train_tokenizer(512)
    for opening in openings(SUBJECTS + UNSEEN_SUBJECTS):
        assert len(tokenizer(opening, add_special_tokens=False).input_ids) == len(opening.split()), opening


def test_fit_prompts_checks_the_unseen_subjects_split_too():
    class Tokenizer:  # one token per word, but "sequel" is long
        def __call__(self, prompts):
            return SimpleNamespace(input_ids=[p.split() + ["x"] * 10 * ("sequel" in p) for p in prompts])

    with pytest.raises(DataError, match=r"reviews unseen_subjects opening 12 \('this sequel was'\): prompt has 13 tokens"):
        build_task(small_data()).fit_prompts(Tokenizer(), max_prompt_tokens=4, on_bad_row="error")
    task = build_task(small_data())
    task.fit_prompts(Tokenizer(), max_prompt_tokens=4, on_bad_row="skip")
    assert task.prompts("unseen_subjects") == openings(UNSEEN_SUBJECTS[:3])
    assert task.prompts_train + task.prompts_eval != [] and len(task.prompts_eval) == 12


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="data.name='squad' is not a known task"):
        build_task(small_data(name="squad"))


def test_preference_pairs_rank_unfinished_reviews_below_every_review():
    generator = ReviewGenerator(seed=11)
    pairs = [generator.preference_pair(min_gap=0.25, truncate_prob=0.5) for _ in range(300)]
    unfinished = [r for pair in pairs for r in pair if not r.text.endswith(" .")]
    assert 0.25 < len(unfinished) / len(pairs) < 0.9  # a side of most pairs (both unfinished: no pair)
    assert any(r.text == r.opening for r in unfinished)  # cut before the first body word
    for chosen, rejected in pairs:
        assert chosen.opening == rejected.opening
        assert well_formed(chosen.text)  # never an unfinished review, however positive
        if well_formed(rejected.text):
            assert oracle_score(chosen.text) - oracle_score(rejected.text) >= 0.25
    # The case: a stub the plain oracle prefers is rejected in favour of a finished review.
    assert any(oracle_score(rejected.text) > oracle_score(chosen.text) for chosen, rejected in pairs)


def test_spliced_pairs_go_off_grammar_and_lose_to_every_review():
    generator = ReviewGenerator(seed=12)
    pairs = [generator.preference_pair(min_gap=0.25, splice_prob=0.5) for _ in range(200)]
    rejected_off_grammar = [r.text for _, r in pairs if not well_formed(r.text)]
    # Most spliced sides are off the grammar: two closings, a phrase after the closing, ...
    assert len(rejected_off_grammar) > 0.5 * len(pairs)
    assert sum(t.count(" i ") > 1 or t.count(" .") > 2 for t in rejected_off_grammar) > 0.3 * len(pairs)
    for chosen, rejected in pairs:
        assert well_formed(chosen.text) and strict_preference(chosen.text, rejected.text, 0.25) == 1


def test_preference_pairs_draw_from_the_opening_pool():
    pool = ["the plot was", "this show is"]
    generator = ReviewGenerator(seed=13, opening_pool=pool)
    assert {generator.preference_pair(0.25, 0.2, 0.2)[0].opening for _ in range(50)} == set(pool)
    assert {generator.review().opening for _ in range(50)} == set(pool)
    with pytest.raises(ValueError, match="opening_pool"):
        ReviewGenerator(seed=0, opening_pool=[])


def test_plain_gold_orders_pairs_by_the_oracle_whatever_their_shape():
    task = build_task(small_data(pair_min_gap=0.3, num_pairs_train=300, pair_gold="plain"))
    pairs = list(zip(task.pairs_train["chosen"], task.pairs_train["rejected"]))
    assert all(oracle_score(c) - oracle_score(r) >= 0.3 for c, r in pairs)
    # Unlike the strict gold, an ill-formed text can be chosen over a review (a stub with only positive words).
    assert any(not well_formed(c) and well_formed(r) for c, r in pairs)


def test_one_word_edits_damage_reviews_the_way_a_drifting_policy_does():
    generator = ReviewGenerator(seed=14)
    reviews = [generator.review() for _ in range(400)]
    edited = [generator.edited(r) for r in reviews]
    for review, damaged in zip(reviews, edited):
        assert damaged.opening == review.opening
        assert abs(len(damaged.body.split()) - len(review.body.split())) == 1 or \
            sorted(damaged.body.split()) == sorted(review.body.split())  # a swap keeps the words
    off_grammar = [d.text for d in edited if not well_formed(d.text)]
    assert len(off_grammar) > 0.8 * len(edited)  # mostly damaged, sometimes a review again
    # The damages the issue saw PPO write: a repeated word, two adjectives in a row, a missing final " .".
    assert any(" it it ." in t for t in off_grammar)
    assert any(re.search(r" (great|wonderful|brilliant|superb|fun|moving) (great|wonderful|brilliant|superb|fun|moving)\b",
                         t) for t in off_grammar)
    assert any(t.endswith(" it") for t in off_grammar)
    # An opening with no body can only gain a word.
    assert len(generator.edited(Review("the plot was", "", 0.5)).body.split()) == 1


def test_edited_pairs_rank_every_damaged_review_below_every_review():
    generator = ReviewGenerator(seed=15)
    pairs = [generator.preference_pair(min_gap=0.25, edit_prob=0.5) for _ in range(300)]
    damaged = [r for _, r in pairs if not well_formed(r.text)]
    assert len(damaged) > 0.4 * len(pairs)
    assert any(oracle_score(r.text) > oracle_score(c.text) for c, r in pairs if not well_formed(r.text))
    for chosen, rejected in pairs:
        assert well_formed(chosen.text) and strict_preference(chosen.text, rejected.text, 0.25) == 1


def test_edit_prob_zero_draws_the_pairs_earlier_versions_drew():
    a, b = ReviewGenerator(seed=16), ReviewGenerator(seed=16)
    assert [a.preference_pair(0.25, 0.1, 0.1) for _ in range(50)] == \
        [b.preference_pair(0.25, 0.1, 0.1, edit_prob=0.0) for _ in range(50)]
