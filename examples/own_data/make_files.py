"""Writes the three example files of the README's "Bring your own data and reward" (texts.jsonl, pairs.jsonl,
prompts.jsonl), as a user would export their own. They use the built-in tiny model's words only (it knows
movie-review words and spells any other word letter by letter); with your own model, write any text.

    python examples/own_data/make_files.py          # rewrites the committed files, identically (seeded)
    python examples/own_data/make_files.py <dir>    # writes them into <dir>
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from marl_exp.data.reviews import NEGATIVE_ADJECTIVES, NEGATIVE_VERBS, POSITIVE_ADJECTIVES, POSITIVE_VERBS, SUBJECTS

HERE = Path(__file__).resolve().parent
VERBS = ("was", "is", "felt", "seemed")


def review(rng: random.Random, subject: str, adjectives, verbs) -> str:
    first, second = rng.sample(adjectives, 2)
    return f"{subject} {rng.choice(VERBS)} {first} and {second} i {rng.choice(verbs)} it"


def write(name: str, rows: list[dict]) -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    rng = random.Random(7)
    texts = []
    for _ in range(3000):  # SFT texts: reviews of either sentiment, so the SFT model writes both
        positive = rng.random() < 0.5
        texts.append({"text": review(rng, rng.choice(SUBJECTS), *((POSITIVE_ADJECTIVES, POSITIVE_VERBS) if positive
                                                                 else (NEGATIVE_ADJECTIVES, NEGATIVE_VERBS)))})
    pairs = []
    for _ in range(1500):  # preferences: a positive review over a negative one on the same subject
        subject = rng.choice(SUBJECTS)
        pairs.append({"chosen": review(rng, subject, POSITIVE_ADJECTIVES, POSITIVE_VERBS),
                      "rejected": review(rng, subject, NEGATIVE_ADJECTIVES, NEGATIVE_VERBS)})
    prompts = [{"prompt": f"{subject} {verb}{how}"}  # 192 openings
               for subject in SUBJECTS for verb in VERBS for how in ("", " very", " really", " quite")]
    write("texts.jsonl", texts)
    write("pairs.jsonl", pairs)
    write("prompts.jsonl", prompts)


if __name__ == "__main__":
    main()
