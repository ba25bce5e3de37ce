"""The grammar judge of the built-in task (``well_formed``), the strict gold and the double negation.

The judge is checked against the generator (every review it writes is accepted), a hand-written list
of near misses (all rejected), and an independent reference: a regular expression of the same grammar,
which must agree with the parser on thousands of randomly damaged reviews.
"""

from __future__ import annotations

import random
import re

import pytest

from marl_exp.data import reviews
from marl_exp.data.reviews import (
    INTENSIFIERS,
    NEGATIVE_ADJECTIVES,
    POSITIVE_ADJECTIVES,
    SUBJECTS,
    UNSEEN_SUBJECTS,
    ReviewGenerator,
    openings,
    oracle_score,
    oracle_strict,
    strict_preference,
    well_formed,
)

ALL_OPENINGS = openings(SUBJECTS + UNSEEN_SUBJECTS)


def reference_grammar() -> re.Pattern:
    """The grammar written out as one regular expression, independently of the parser."""
    def alt(words):
        return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"

    phrase = f"(?:not )?(?:{alt(INTENSIFIERS)} )?{alt(POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES)}"
    closing = f"i {alt(reviews.POSITIVE_VERBS + reviews.NEGATIVE_VERBS)} it"
    return re.compile(f"{alt(ALL_OPENINGS)} {phrase}(?: {alt(reviews.CONNECTORS)} {phrase}){{0,2}} \\. {closing} \\.")


def generated(n: int, seed: int, **kwargs) -> list[str]:
    generator = ReviewGenerator(seed, opening_pool=ALL_OPENINGS, **kwargs)
    return [generator.review().text for _ in range(n)]


# ----------------------------------------------------------------------------------- judge: accepts
@pytest.mark.parametrize("kwargs", [{}, {"negation_prob": 1.0, "intensifier_prob": 1.0},
                                    {"negation_prob": 0.0, "intensifier_prob": 0.0}])
def test_judge_accepts_every_generated_review(kwargs):
    texts = [t for seed in range(4) for t in generated(1000, seed, **kwargs)]
    rejected = [t for t in texts if not well_formed(t)]
    assert not rejected, rejected[:5]
    # The sample covers the grammar: one to three phrases, every connector and subject.
    assert {t.count(" . ") for t in texts} == {1}
    assert all(any(f" {c} " in t for t in texts) for c in reviews.CONNECTORS)
    assert all(any(t.startswith(o + " ") for t in texts) for o in ALL_OPENINGS)


def test_judge_accepts_reviews_of_every_sentiment_and_the_pair_augmentations_that_stay_reviews():
    generator = ReviewGenerator(seed=9)
    assert all(well_formed(generator.review(sentiment=s).text) for s in (0.0, 0.5, 1.0) for _ in range(200))
    assert well_formed("the camera work was great and also not very dull . i adored it .")
    assert well_formed("this sequel seemed rather clumsy but touching yet bad . i resented it .")


# ----------------------------------------------------------------------------------- judge: rejects
NEAR_MISSES = [
    "the movie was great",  # a stub (the issue: the oracle gives it 1.0)
    "the movie was",  # the opening alone
    "the movie was great .",
    "the movie was great . i loved it",  # missing final " ."
    "the movie was great . i loved",
    "the movie was great great great great",  # repetition
    "the movie was great great . i loved it .",
    "the movie was loved loved loved",
    "the movie was not not boring . i loved it .",  # double negation
    "the movie was not very not boring . i loved it .",
    "the movie was very very great . i loved it .",
    "the movie was very not great . i loved it .",  # intensifier before "not"
    "the movie was not . i loved it .",
    "the movie was . i loved it .",  # no phrase
    "the movie was weak very moving . i enjoyed it .",  # PPO's splice (the issue)
    "the movie was great . i disliked . i enjoyed it .",  # splice of two closings
    "the movie was great . i loved it . i loved it .",  # double closing
    "the movie was great . i loved it . great",  # text after the closing
    "the movie was great . i loved it . .",
    "the movie was great . i loved it . the movie was great . i loved it .",  # two reviews
    "the movie was great and fun and clever and superb . i loved it .",  # four phrases: never generated
    "the movie was great and . i loved it .",  # dangling connector
    "the movie was and great . i loved it .",
    "the movie was great but . i loved it .",
    "the movie was great and also also fun . i loved it .",
    "the movie was great also fun . i loved it .",
    "the movie was great i loved it .",  # missing first " ."
    "the movie was great . . i loved it .",
    "the movie was great . i great it .",  # adjective as the verb of taste
    "the movie was great . loved it .",
    "the movie was great . i loved .",
    "the movie was great . i loved it it .",
    "the movie was great . it loved i .",
    "the movie great . i loved it .",  # no verb in the opening
    "movie was great . i loved it .",
    "the film was great . i loved it .",  # not a subject of the task
    "the movie was was great . i loved it .",
    "the movie seemed was great . i loved it .",
    "the movie was great . i loved it.",  # punctuation glued to a word
    "the movie was great. i loved it .",
    "the movie was  great . i loved it .",  # double space
    " the movie was great . i loved it .",  # leading space
    "the movie was great . i loved it . ",  # trailing space
    "the movie was great . i loved it .\n",
    "the movie was great\t. i loved it .",
    "the movie was great . i loved it\u00a0.",
    "The movie was great . I loved it .",  # upper case
    "the movie was great . i loved it . </s>",  # a special token written out as text
    "the movie was great , i loved it .",
    "",
    " ",
    ".",
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_judge_rejects_near_misses(text):
    assert not well_formed(text)
    assert oracle_strict(text) == 0.0


def test_judge_agrees_with_an_independent_regex_on_damaged_reviews():
    reference, rng = reference_grammar(), random.Random(0)
    vocabulary = sorted({w for t in generated(300, 1) for w in t.split(" ")} | {"not", "also", "", "the"})
    texts = generated(3000, 2)

    def damage(text: str) -> str:
        words = text.split(" ")
        i = rng.randrange(len(words))
        kind = rng.randrange(6)
        if kind == 0:
            del words[i]
        elif kind == 1:
            words.insert(i, words[i])  # repeat a word
        elif kind == 2 and i + 1 < len(words):
            words[i], words[i + 1] = words[i + 1], words[i]
        elif kind == 3:
            words.insert(i, rng.choice(vocabulary))
        elif kind == 4:
            words[i] = rng.choice(vocabulary)
        else:  # splice: a stretch of another review
            other = rng.choice(texts).split(" ")
            start = rng.randrange(len(other))
            words[i:i] = other[start:start + rng.randint(1, 6)]
        return " ".join(words)

    damaged = [damage(t) for t in texts for _ in range(2)]
    verdicts = [(well_formed(t), bool(reference.fullmatch(t))) for t in damaged]
    disagreements = [t for t, (ours, ref) in zip(damaged, verdicts) if ours != ref]
    assert not disagreements, disagreements[:5]
    accepted = sum(ours for ours, _ in verdicts)
    assert 100 < accepted < 0.5 * len(damaged)  # both verdicts well represented (about 3% stay reviews)


# --------------------------------------------------------------------------- oracle: double negation
def test_each_not_flips_so_stacking_never_beats_zero_or_one_not():
    for adjective in POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES:
        for count in range(5):
            stacked = oracle_score(f"it was {'not ' * count}{adjective}")
            assert stacked == oracle_score(f"it was {'not ' * (count % 2)}{adjective}")


@pytest.mark.parametrize("text,expected", [
    ("the movie was not not boring . i loved it .", 0.5),  # the issue: was 1.0
    ("the movie was not not boring", 0.0),
    ("the movie was not not great", 1.0),
    ("the movie was not not not boring", 1.0),
    ("the movie was not very not boring", 0.0),  # intensifiers do not end the scope of either not
    ("the movie was not not . boring", 0.0),  # punctuation ends it
])
def test_double_negation_by_hand(text, expected):
    assert oracle_score(text) == pytest.approx(expected)


# ------------------------------------------------------------------------------------- strict gold
@pytest.mark.parametrize("text,plain,strict", [
    ("the movie was great . i loved it .", 1.0, 1.0),
    ("the movie was great but dull . i liked it .", 2 / 3, 2 / 3),
    ("the movie was boring . i hated it .", 0.0, 0.0),
    ("the movie was great", 1.0, 0.0),
    ("the movie was great great great great", 1.0, 0.0),
    ("the movie was weak very moving . i enjoyed it .", 2 / 3, 0.0),
])
def test_oracle_strict_is_the_oracle_on_reviews_and_zero_elsewhere(text, plain, strict):
    assert oracle_score(text) == pytest.approx(plain)
    assert oracle_strict(text) == pytest.approx(strict)


def test_strict_preference_ranks_any_review_above_any_ill_formed_text():
    stub, negative = "the movie was great", "the movie was boring . i hated it ."
    mixed = "the movie was great but dull . i liked it ."
    assert strict_preference(stub, mixed, 0.25) == -1 and strict_preference(mixed, stub, 0.25) == 1
    assert strict_preference(negative, stub, 0.9) == 1  # whatever the oracle gap, whatever min_gap
    # Two reviews: by oracle score, when the gap reaches min_gap and is not a tie.
    positive = "the movie was great . i loved it ."
    assert strict_preference(positive, mixed, 0.25) == 1 and strict_preference(mixed, positive, 0.25) == -1
    assert strict_preference(positive, mixed, 0.5) == 0
    assert strict_preference(positive, positive, 0.0) == 0
    # Two ill-formed texts: no order, even with a large oracle gap.
    assert strict_preference(stub, "the movie was boring", 0.0) == 0
