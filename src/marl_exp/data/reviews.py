"""The built-in ``reviews`` task: an IMDB-like positive-sentiment task that needs no network.

A review is an *opening* (subject + verb, e.g. ``"the acting was"``) followed by a body of
sentiment *units* and an EOS::

    review  := opening body
    opening := SUBJECT VERB                        e.g. "the acting was"
    body    := phrase (CONNECT phrase){0,2} " ." closing " ."
    phrase  := [ "not" ] [INTENSIFIER] ADJECTIVE    e.g. "very dull", "not really boring"
    closing := "i" VERB_OF_TASTE "it"                e.g. "i loved it", "i hated it"

Words are separated by exactly one space and written in lower case. Every ADJECTIVE and VERB_OF_TASTE
has a polarity (+1 or -1); ``not`` flips the polarity of the next polar word (intensifiers in between
do not stop it). A review with sentiment level ``s`` in [0, 1] makes each unit positive with
probability ``s``, so the corpus holds graded sentiment from clearly negative to clearly positive.

Two judges read a text, never a learned model, so they cannot be gamed the way a reward model can:

- the **oracle** (``oracle_score``): ``positive units / polar units`` over the whole text (0.5 when
  there is none), whatever the text's shape;
- the **grammar judge** (``well_formed``): a parser of the grammar above, true exactly for the texts
  ``ReviewGenerator.review()`` writes. Stubs (``the movie was great``), repeated words, two closings,
  a phrase after the closing, a missing final `` .`` or anything after it are not reviews.

The **strict gold** (``oracle_strict``) is the oracle on a well-formed review and 0 on anything else:
the score every evaluation reports first, and the order the preference pairs are labelled by
(``strict_preference``), so the reward model is taught the task the evaluation measures.

Subjects come in two sets: ``SUBJECTS`` make up every training text; ``UNSEEN_SUBJECTS`` never occur in
any training data (SFT, preference pairs, PPO prompts) and only open the ``unseen_subjects`` evaluation
prompts, a check of how far what PPO taught generalises.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

SUBJECTS = (
    "the movie", "this film", "the story", "the acting", "the music", "the ending",
    "the cast", "the script", "the plot", "the camera work", "the dialogue", "this show",
)
# Never in any training text; the built-in tokenizer knows their words (as a pretrained one would).
UNSEEN_SUBJECTS = ("the pacing", "the soundtrack", "the editing", "this sequel")
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
MAX_PHRASES = 3  # phrases before the closing

# Every word a review can contain, for one-word edits (``ReviewGenerator.edited``).
_VOCABULARY = tuple(sorted({w for phrase in (*POSITIVE_ADJECTIVES, *NEGATIVE_ADJECTIVES, *POSITIVE_VERBS,
                                             *NEGATIVE_VERBS, *INTENSIFIERS, *CONNECTORS, "not", "i", "it", ".")
                            for w in phrase.split()}))

POLARITY = {
    **{w: 1 for w in POSITIVE_ADJECTIVES + POSITIVE_VERBS},
    **{w: -1 for w in NEGATIVE_ADJECTIVES + NEGATIVE_VERBS},
}
NEGATION = "not"


def openings(subjects: Sequence[str] = SUBJECTS) -> list[str]:
    """Review openings of ``subjects``, in a fixed order (the training subjects by default)."""
    return [f"{subject} {verb}" for subject in subjects for verb in VERBS]


# ------------------------------------------------------------------------------------------ oracle
def oracle_score(text: str) -> float:
    """Ground-truth sentiment of ``text`` in [0, 1]: the share of polar units that are positive.

    Each ``not`` flips the polarity of the next polar word, so ``not not boring`` is as negative as
    ``boring``: stacking negations can never score better than zero or one ``not``. Intensifiers
    between a ``not`` and its word keep the negation; any other word or punctuation ends it. Text
    without any polar word scores 0.5 (neutral). The shape of the text is not checked (see
    ``oracle_strict``).
    """
    positive = negative = 0
    negate = False
    # Punctuation is a token too: it ends a negation's scope ("not . great" is not "not great").
    for word in re.findall(r"[a-z']+|[^\sa-z']", text.lower()):
        if word == NEGATION:
            negate = not negate
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


# ----------------------------------------------------------------------------------- grammar judge
# A parser of the grammar in the module docstring, built from four combinators. A parser maps the set
# of word positions it may start at to the set of positions it may end at, so alternatives that are
# prefixes of one another ("and" / "and also") need no lookahead: every reading is kept.
_Parser = Callable[[list, frozenset], frozenset]


def _words(*alternatives: str) -> _Parser:
    """Any one of ``alternatives``, each a phrase of one or more words."""
    phrases = [tuple(a.split(" ")) for a in alternatives]
    return lambda words, starts: frozenset(
        s + len(p) for s in starts for p in phrases if tuple(words[s:s + len(p)]) == p)


def _sequence(*parts: _Parser) -> _Parser:
    def parse(words, starts):
        for part in parts:
            starts = part(words, starts)
        return starts
    return parse


def _optional(part: _Parser) -> _Parser:
    return lambda words, starts: starts | part(words, starts)


def _repeat(part: _Parser, most: int) -> _Parser:
    """``part`` zero to ``most`` times."""
    def parse(words, starts):
        ends = reached = starts
        for _ in range(most):
            reached = part(words, reached)
            ends |= reached
        return ends
    return parse


_PHRASE = _sequence(_optional(_words(NEGATION)), _optional(_words(*INTENSIFIERS)),
                    _words(*POSITIVE_ADJECTIVES, *NEGATIVE_ADJECTIVES))
_CLOSING = _sequence(_words("i"), _words(*POSITIVE_VERBS, *NEGATIVE_VERBS), _words("it"))
_BODY = _sequence(_PHRASE, _repeat(_sequence(_words(*CONNECTORS), _PHRASE), MAX_PHRASES - 1),
                  _words("."), _CLOSING, _words("."))
_REVIEW = _sequence(_words(*SUBJECTS, *UNSEEN_SUBJECTS), _words(*VERBS), _BODY)


def well_formed(text: str) -> bool:
    """Whether ``text`` (opening + response, as decoded) is a whole review of the task's grammar.

    Exactly the texts ``ReviewGenerator.review()`` writes (with any subject, seen or unseen): words
    separated by single spaces, lower case, nothing before the opening or after the final ``" ."``.
    """
    words = text.split(" ")  # a double, leading or trailing space leaves an empty word no rule accepts
    return len(words) in _REVIEW(words, frozenset({0}))


def oracle_strict(text: str) -> float:
    """The strict gold: the oracle score of a well-formed review, 0 for any other text."""
    return oracle_score(text) if well_formed(text) else 0.0


def plain_preference(a: str, b: str, min_gap: float) -> int:
    """Which text the plain oracle prefers (its score higher by at least ``min_gap``, not a tie), whatever
    the texts' shape: the labelling before the strict gold, kept as ``data.pair_gold=plain``."""
    gap = oracle_score(a) - oracle_score(b)
    if gap == 0 or abs(gap) < min_gap:
        return 0
    return 1 if gap > 0 else -1


def strict_preference(a: str, b: str, min_gap: float) -> int:
    """Which text the strict gold prefers: 1 for ``a``, -1 for ``b``, 0 for no clear preference.

    A well-formed review beats any ill-formed text, whatever their oracle scores (an unfinished
    ``the movie was great`` ranks below a finished negative review). Two well-formed reviews are
    ordered by oracle score when it differs by at least ``min_gap`` (and is not a tie). Two ill-formed
    texts have no order: the strict gold scores both 0, so ranking them by their plain oracle would
    teach the reward model to value positive words in texts that are not reviews, the hack the strict
    gold exists to stop.
    """
    a_ok, b_ok = well_formed(a), well_formed(b)
    if a_ok != b_ok:
        return 1 if a_ok else -1
    if not a_ok:
        return 0
    gap = oracle_score(a) - oracle_score(b)
    if gap == 0 or abs(gap) < min_gap:
        return 0
    return 1 if gap > 0 else -1


# --------------------------------------------------------------------------------------- generator
@dataclass(frozen=True)
class Review:
    opening: str
    body: str
    sentiment: float  # the level it was sampled with; the oracle score is the ground truth

    @property
    def text(self) -> str:
        return f"{self.opening} {self.body}".rstrip()


class ReviewGenerator:
    """Deterministic (seeded) sampler of reviews from the grammar in the module docstring.

    ``opening_pool``: the openings a review without a given opening starts with (default: every
    opening of the training subjects).
    """

    def __init__(self, seed: int, negation_prob: float = 0.15, intensifier_prob: float = 0.3,
                 opening_pool: Sequence[str] | None = None):
        self.rng = random.Random(seed)
        self.negation_prob = negation_prob
        self.intensifier_prob = intensifier_prob
        self.opening_pool = list(opening_pool) if opening_pool is not None else openings()
        if not self.opening_pool:
            raise ValueError("ReviewGenerator needs at least one opening in opening_pool")

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
        opening = opening or self.rng.choice(self.opening_pool)
        sentiment = self.rng.random() if sentiment is None else sentiment
        n_phrases = self.rng.randint(1, MAX_PHRASES)
        units = [self.rng.random() < sentiment for _ in range(n_phrases + 1)]
        body = self._phrase(units[0])
        for positive in units[1:-1]:
            body += f" {self.rng.choice(CONNECTORS)} {self._phrase(positive)}"
        body += f" . {self._closing(units[-1])} ."
        return Review(opening, body, sentiment)

    def review_texts(self, n: int, exclude: Collection[str] = ()) -> list[str]:
        """The texts of the next ``n`` reviews not in ``exclude``. A held-out split passes the training
        split's texts: the grammar is small enough that independent draws repeat (8 of 400 SFT eval reviews
        were in the 4000 training ones)."""
        texts = []
        while len(texts) < n:
            text = self.review().text
            if text not in exclude:
                texts.append(text)
        return texts

    def truncated(self, review: Review) -> Review:
        """The review cut after a random number of body words (possibly none): an unfinished review."""
        words = review.body.split()
        return Review(review.opening, " ".join(words[:self.rng.randrange(len(words))]), review.sentiment)

    def spliced(self, review: Review) -> Review:
        """The review with a stretch of another review's body inserted at a random word: mostly text
        off the grammar (two closings, a phrase after the closing), sometimes a review again."""
        words, other = review.body.split(), self.review(review.opening).body.split()
        start = self.rng.randrange(len(other))
        piece = other[start:start + self.rng.randint(1, len(other) - start)]
        cut = self.rng.randint(0, len(words))
        return Review(review.opening, " ".join(words[:cut] + piece + words[cut:]), review.sentiment)

    def edited(self, review: Review) -> Review:
        """The review with one local edit of its body: a word of the task's vocabulary inserted, a word
        deleted, repeated or swapped with the next one. Mostly off the grammar (``great great``, ``i loved
        it it``, ``great . wonderful``), sometimes a review again (an adjective inserted after another's
        intensifier). Truncations and splices change a review in large pieces; these one-word damages are
        what a policy drifting from the reviews it was taught writes first, so the reward model must rank
        them below any review too."""
        words = review.body.split()
        if not words:  # a review truncated to its opening: the only edit is an insertion
            return Review(review.opening, self.rng.choice(_VOCABULARY), review.sentiment)
        at = self.rng.randrange(len(words))
        edit = self.rng.choice(("insert", "delete", "repeat", "swap"))
        if edit == "insert":
            words.insert(at, self.rng.choice(_VOCABULARY))
        elif edit == "delete":
            del words[at]
        elif edit == "repeat":
            words.insert(at, words[at])
        elif at + 1 < len(words):
            words[at], words[at + 1] = words[at + 1], words[at]
        else:  # a swap past the end repeats the final word instead
            words.append(words[at])
        return Review(review.opening, " ".join(words), review.sentiment)

    def preference_pair(self, min_gap: float, truncate_prob: float = 0.0,
                        splice_prob: float = 0.0, gold: str = "strict",
                        edit_prob: float = 0.0) -> tuple[Review, Review]:
        """(chosen, rejected) with the same opening, ordered by the strict gold (``strict_preference``):
        a well-formed review over an ill-formed text, else the higher oracle score by at least ``min_gap``.

        With ``truncate_prob`` each side is an unfinished review instead, and with ``splice_prob`` it has a
        stretch of another review spliced in; with ``edit_prob`` it has one word inserted, deleted, repeated or
        swapped (``edited``). A reward model that never saw such texts scores them
        arbitrarily, and PPO finds that out (it learned to stop early, "the movie was truly", or to
        splice, "i disliked . i enjoyed it ."); these pairs teach it that they rank below any review.
        Draws where both sides are ill-formed have no order and are drawn again. ``gold="plain"`` orders
        every pair by the plain oracle instead (``plain_preference``).
        """
        opening = self.rng.choice(self.opening_pool)
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
            # Drawn last and only when asked, so pairs without edits are the ones earlier versions drew.
            if edit_prob and self.rng.random() < edit_prob:
                a = self.edited(a)
            if edit_prob and self.rng.random() < edit_prob:
                b = self.edited(b)
            order = (strict_preference if gold == "strict" else plain_preference)(a.text, b.text, min_gap)
            if order:
                return (a, b) if order > 0 else (b, a)
