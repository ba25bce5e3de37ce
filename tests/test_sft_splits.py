"""The built-in reviews task's SFT splits: no held-out review is also a training review."""

from __future__ import annotations

from itertools import islice

import pytest

from conftest import compose
from marl_exp.data import build_task, reviews


@pytest.mark.parametrize("data", ["reviews", "reviews_chat"])
def test_sft_eval_texts_are_not_in_sft_train_for_the_default_config(data):
    task = build_task(compose(f"data={data}").data)
    column = "text" if data == "reviews" else "messages"
    train = {repr(row) for row in task.sft_train[column]}
    held_out = [repr(row) for row in task.sft_eval[column]]
    assert len(held_out) == 400
    shared = [row for row in held_out if row in train]
    assert not shared, f"{len(shared)} of {len(held_out)} SFT eval rows are also in SFT train"


def test_review_texts_skip_excluded_texts_and_keep_the_stream_order():
    def stream(seed):
        generator = reviews.ReviewGenerator(seed)
        while True:
            yield generator.review().text

    exclude = set(islice(stream(7), 0, 200, 3))  # every third of the first 200 draws of the same stream
    texts = reviews.ReviewGenerator(7).review_texts(150, exclude)
    assert texts == list(islice((t for t in stream(7) if t not in exclude), 150))
    assert len(texts) == 150 and not exclude & set(texts)
