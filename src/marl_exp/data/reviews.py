"""The built-in ``reviews`` task: an IMDB-like positive-sentiment task that needs no network.

A review is an *opening* (subject + verb, e.g. ``"the acting was"``) followed by a body of
sentiment *units* and an EOS::

    review  := opening body
    opening := SUBJECT VERB                        e.g. "the acting was"
    body    := phrase (CONNECT phrase)* " ." closing " ."
    phrase  := [ "not" ] [INTENSIFIER] ADJECTIVE    e.g. "very dull", "not really boring"
    closing := "i" VERB_OF_TASTE "it"                e.g. "i loved it", "i hated it"

Every ADJECTIVE and VERB_OF_TASTE has a polarity (+1 or -1); ``not`` flips the polarity of the
next polar word (intensifiers in between do not stop it). A review with sentiment level ``s`` in [0, 1] makes each unit positive with
probability ``s``, so the corpus holds graded sentiment from clearly negative to clearly positive.

The **oracle** is the ground truth: ``positive units / polar units`` over the whole text (0.5 when
there is none). It reads words, never a learned model, so it can judge what PPO teaches the policy
without being gamed the way a reward model can. It is for evaluation only, never for training.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SUBJECTS = (
    "the movie", "this film", "the story", "the acting", "the music", "the ending",
    "the cast", "the script", "the plot", "the camera work", "the dialogue", "this show",
)
VERBS = ("was", "is", "felt", "seemed")
POSITIVE_ADJECTIVES = (
    "great", "wonderful", "brilliant", "superb", "fun", "moving",
    "beautiful", "excellent", "charming", "amazing", "clever", "touching",
)
NEGATIVE_ADJECTIVES = (
    "boring", "awful", "dull", "terrible", "weak", "bad",
    "poor", "messy", "painful", "forgettable", "silly", "clumsy",
)
POSITIVE_VERBS = ("loved", "enjoyed", "liked", "adored")
NEGATIVE_VERBS = ("hated", "disliked", "regretted", "resented")
INTENSIFIERS = ("very", "quite", "really", "truly", "rather")
CONNECTORS = ("and", "but", "yet", "and also")

POLARITY = {
    **{w: 1 for w in POSITIVE_ADJECTIVES + POSITIVE_VERBS},
    **{w: -1 for w in NEGATIVE_ADJECTIVES + NEGATIVE_VERBS},
}
NEGATION = "not"


def openings() -> list[str]:
    """All review openings, in a fixed order (these are the PPO prompts)."""
    return [f"{subject} {verb}" for subject in SUBJECTS for verb in VERBS]


def oracle_score(text: str) -> float:
    """Ground-truth sentiment of ``text`` in [0, 1]: the share of polar units that are positive.

    ``not`` flips the polarity of the next polar word; intensifiers between them keep the negation,
    any other word or punctuation ends it. Text without any polar word scores 0.5 (neutral).
    """
    positive = negative = 0
    negate = False
    # Punctuation is a token too: it ends a negation's scope ("not . great" is not "not great").
    for word in re.findall(r"[a-z']+|[^\sa-z']", text.lower()):
        if word == NEGATION:
            negate = True
            continue
        if word in INTENSIFIERS:
            continue
        polarity = POLARITY.get(word, 0)
        if polarity:
            if negate:
                polarity = -polarity
            positive += polarity > 0
            negative += polarity < 0
        negate = False
    if positive + negative == 0:
        return 0.5
    return positive / (positive + negative)


@dataclass(frozen=True)
class Review:
    opening: str
    body: str
    sentiment: float  # the level it was sampled with; the oracle score is the ground truth

    @property
    def text(self) -> str:
        return f"{self.opening} {self.body}".rstrip()


class ReviewGenerator:
    """Deterministic (seeded) sampler of reviews from the grammar in the module docstring."""

    def __init__(self, seed: int, negation_prob: float = 0.15, intensifier_prob: float = 0.3):
        self.rng = random.Random(seed)
        self.negation_prob = negation_prob
        self.intensifier_prob = intensifier_prob

    def _phrase(self, positive: bool) -> str:
        negate = self.rng.random() < self.negation_prob
        # "not <negative word>" is a positive unit and vice versa.
        pool = POSITIVE_ADJECTIVES if positive != negate else NEGATIVE_ADJECTIVES
        words = [self.rng.choice(pool)]
        if self.rng.random() < self.intensifier_prob:
            words.insert(0, self.rng.choice(INTENSIFIERS))
        if negate:
            words.insert(0, NEGATION)
        return " ".join(words)

    def _closing(self, positive: bool) -> str:
        return f"i {self.rng.choice(POSITIVE_VERBS if positive else NEGATIVE_VERBS)} it"

    def review(self, opening: str | None = None, sentiment: float | None = None) -> Review:
        opening = opening or self.rng.choice(openings())
        sentiment = self.rng.random() if sentiment is None else sentiment
        n_phrases = self.rng.randint(1, 3)
        units = [self.rng.random() < sentiment for _ in range(n_phrases + 1)]
        body = self._phrase(units[0])
        for positive in units[1:-1]:
            body += f" {self.rng.choice(CONNECTORS)} {self._phrase(positive)}"
        body += f" . {self._closing(units[-1])} ."
        return Review(opening, body, sentiment)

    def truncated(self, review: Review) -> Review:
        """The review cut after a random number of body words (possibly none): an unfinished review."""
        words = review.body.split()
        return Review(review.opening, " ".join(words[:self.rng.randrange(len(words))]), review.sentiment)

    def spliced(self, review: Review) -> Review:
        """The review with a stretch of another review's body inserted at a random word: text off
        the grammar (two closings, a phrase after the closing) whose polar units still count."""
        words, other = review.body.split(), self.review(review.opening).body.split()
        start = self.rng.randrange(len(other))
        piece = other[start:start + self.rng.randint(1, len(other) - start)]
        cut = self.rng.randint(0, len(words))
        return Review(review.opening, " ".join(words[:cut] + piece + words[cut:]), review.sentiment)

    def preference_pair(self, min_gap: float, truncate_prob: float = 0.0,
                        splice_prob: float = 0.0) -> tuple[Review, Review]:
        """(chosen, rejected) with the same opening; chosen's oracle score exceeds rejected's by ``min_gap``.

        With ``truncate_prob`` each side is an unfinished review instead, judged by the oracle like any
        text (no polar word = 0.5). A reward model that never saw unfinished reviews scores them
        arbitrarily, and PPO finds that out: it learns to stop early ("the movie was truly") when such
        a stub happens to score high. These pairs teach it where stubs rank. ``splice_prob`` does the
        same for spliced reviews (PPO otherwise learns "i disliked . i enjoyed it .").
        """
        opening = self.rng.choice(openings())
        while True:
            a, b = self.review(opening), self.review(opening)
            if self.rng.random() < truncate_prob:
                a = self.truncated(a)
            if self.rng.random() < truncate_prob:
                b = self.truncated(b)
            if self.rng.random() < splice_prob:
                a = self.spliced(a)
            if self.rng.random() < splice_prob:
                b = self.spliced(b)
            gap = oracle_score(a.text) - oracle_score(b.text)
            if gap != 0 and abs(gap) >= min_gap:  # a tie has no chosen side, even with min_gap=0
                return (a, b) if gap > 0 else (b, a)
