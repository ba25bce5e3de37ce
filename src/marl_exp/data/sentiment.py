"""The built-in ``movie_sentiment`` task: sentiment-steered movie reviews for instruct models, offline.

A user asks for a review of an invented film; the policy should write a positive one::

    {"role": "user", "content": "Write a short review of the mystery film \"The Copper Harbor\"."}

- Requests come from word lists written here (titles, genres, phrasings). The held-out requests (the
  judge's) use titles and phrasings no training request uses.
- Preference pairs are the base model's own replies (k per request), labelled by VADER's compound score:
  the best against the worst reply, where they differ by at least ``data.pair_min_gap``. The replies are
  cached under the model cache, keyed by the model's weights and the generation settings.
- The judge is another lexicon, AFINN: a reply is positive when its AFINN score is > 0. The lexicon-gold
  reward (``+rewards=vader_gold``) is VADER itself: the ceiling for a reward adapter trained on its labels.
- A lexicon cannot tell a review from any cheerful text, and the reward adapter (trained on VADER's labels)
  cannot either: a policy may drift to upbeat text that is no review ("I'd be happy to assist you…"). So
  beside the judge an on-task check (``on_task``) asks whether the reply talks about the film and does not
  speak as a service; ``eval/*/well_formed_on_task`` is the share that is both positive and on task.

Every word the task writes into a request scores 0 in both lexicons (tests/test_sentiment_task.py), so the
sentiment the judges read is the reply's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from functools import lru_cache
from itertools import product
from pathlib import Path
from typing import Sequence

from datasets import Dataset

from marl_exp.provenance import fingerprint, model_cache_root

log = logging.getLogger(__name__)

# Titles are "The <word> <word>"; train and held-out titles share no word.
TITLE_WORDS = {
    "train": (["Copper", "Silent", "Northern", "Hidden", "Paper", "Iron", "Distant", "Glass"],
              ["Harbor", "Orchard", "Signal", "Tower", "Valley", "Engine", "Letter", "Island"]),
    "eval": (["Velvet", "Amber", "Eastern", "Marble"],
             ["Bridge", "Lantern", "Canyon", "Station"]),
}
GENRES = ["mystery", "drama", "science fiction", "western", "documentary", "musical", "fantasy", "heist"]
PHRASINGS = {
    "train": ["Write a short review of the {genre} film \"{title}\".",
              "Review the movie \"{title}\", a {genre} film.",
              "Briefly review \"{title}\" ({genre}).",
              "You just watched the {genre} movie \"{title}\". Write a review of it.",
              "Give your review of \"{title}\", the new {genre} release."],
    "eval": ["Write a review of \"{title}\", a {genre} movie.",
             "Describe what you thought of the {genre} film \"{title}\" in a review."],
}
SPLITS = ("train", "eval")
PAIRS_CACHE_VERSION = 1  # bump when the cached replies' format or sampling changes


# ------------------------------------------------------------------------------------------- requests
def titles(split: str) -> list[str]:
    first, second = TITLE_WORDS[split]
    return [f"The {a} {b}" for a, b in product(first, second)]


def requests(split: str, seed: int) -> list[list[dict]]:
    """Every request of ``split`` (title x genre x phrasing) as a one-turn message list, in a seeded order."""
    texts = [phrasing.format(title=title, genre=genre)
             for title, genre, phrasing in product(titles(split), GENRES, PHRASINGS[split])]
    random.Random(f"{seed}-{split}").shuffle(texts)
    return [[{"role": "user", "content": text}] for text in texts]


# --------------------------------------------------------------------------------------------- lexicons
@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=1)
def _afinn():
    from afinn import Afinn

    return Afinn()


def vader_score(text: str) -> float:
    """VADER's compound score in [-1, 1] (the pairs' label and the gold reward)."""
    return _vader().polarity_scores(text)["compound"]


def afinn_score(text: str) -> float:
    """AFINN's summed word valences (the judge's lexicon)."""
    return _afinn().score(text)


def afinn_positive(text: str) -> bool:
    """The judge: the reply reads positive to AFINN."""
    return afinn_score(text) > 0


# ---------------------------------------------------------------------------------------- on-task check
# A reply is about the film when it names a word of its title or uses a word of film talk (the genres included).
FILM_WORDS = frozenset("""
film films movie movies cinema cinematic cinematography story stories storyline storytelling plot plots plotline
character characters characterization cast casting actor actors actress actresses acting performance performances
director directed directing direction screenplay script scene scenes soundtrack visuals ending narrative dialogue
pacing premise sequel protagonist protagonists villain villains hero heroine twist twists climax viewers audience
audiences screen footage filmmaker filmmakers genre documentary musical western mystery drama fantasy heist sci-fi
""".split())
# Phrases of an assistant offering a service instead of writing the review it was asked for.
SERVICE_TALK = re.compile(r"\b(?:(?:happy|glad|delighted|here) to (?:help|assist|offer|provide)|assist you|"
                          r"help you|how (?:can|may) i (?:help|assist)|let me know|feel free|as an ai|"
                          r"our (?:service|team|customers?)|(?:my|our) services|contact us)\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def requested_title(request) -> str | None:
    """The quoted film title of a request (a message list or its text), or None."""
    text = request[-1]["content"] if isinstance(request, list) else str(request)
    found = re.search(r'"([^"]+)"', text)
    return found.group(1) if found else None


def on_task(request, reply: str) -> bool:
    """Whether ``reply`` reads as a review of the requested film: it names a word of the title (not "The")
    or talks film (``FILM_WORDS``), and it does not speak as a service (``SERVICE_TALK``)."""
    lowered = reply.lower()
    words = set(_WORD.findall(lowered))
    title = requested_title(request) or ""
    title_words = {w.lower() for w in title.split()} - {"the", "a", "an"}
    about_the_film = bool(words & (title_words | FILM_WORDS)) or "science fiction" in lowered
    return about_the_film and not SERVICE_TALK.search(reply)


# ------------------------------------------------------------------------------------ preference pairs
def best_vs_worst(prompt: list[dict], replies: Sequence[str], margin: float) -> dict | None:
    """The reply VADER likes most against the one it likes least, when they differ by ``margin`` or more."""
    scores = [vader_score(r) for r in replies]
    best = max(range(len(replies)), key=scores.__getitem__)
    worst = min(range(len(replies)), key=scores.__getitem__)
    if scores[best] - scores[worst] < margin:
        return None
    return {"prompt": prompt, "chosen": [_assistant(replies[best])], "rejected": [_assistant(replies[worst])]}


def pairs_from_replies(rows: list[dict], margin: float) -> Dataset:
    pairs = [p for p in (best_vs_worst(r["prompt"], r["replies"], margin) for r in rows) if p is not None]
    return Dataset.from_list(pairs) if pairs else Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})


def own_replies(model_dir: str | Path, prompts: list[list[dict]], replies_per_prompt: int, max_new_tokens: int,
                seed: int, chat_template: str | None = None, temperature: float = 1.0,
                batch_size: int = 8) -> list[dict]:
    """``replies_per_prompt`` sampled replies of the model in ``model_dir`` to each prompt, as rows
    ``{"prompt", "replies"}``: read from the cache, else sampled and cached (a JSONL file, written atomically)."""
    settings = {"version": PAIRS_CACHE_VERSION, "model": _model_key(model_dir), "prompts": prompts,
                "replies_per_prompt": replies_per_prompt, "max_new_tokens": max_new_tokens, "seed": seed,
                "chat_template": chat_template, "temperature": temperature}
    path = replies_cache_path(settings)
    if path.is_file():
        log.info("reusing the cached replies %s", path)
        return [json.loads(line) for line in path.read_text().splitlines()]
    rows = sample_replies(model_dir, prompts, replies_per_prompt, max_new_tokens, seed, chat_template, temperature,
                          batch_size)
    from marl_exp.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def replies_cache_path(settings: dict) -> Path:

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return model_cache_root() / "sentiment-replies" / f"{key}.jsonl"


def _model_key(model_dir: str | Path) -> str:

    return fingerprint(model_dir)


def sample_replies(model_dir: str | Path, prompts: list[list[dict]], replies_per_prompt: int, max_new_tokens: int,
                   seed: int, chat_template: str | None, temperature: float, batch_size: int) -> list[dict]:
    """Plain sampling (no top-k/top-p) from the model, in fp32, seeded; replies end at the end-of-turn token."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from marl_exp.data import chat
    from marl_exp.modeling.shared_prefill import shared_prompt_cache

    # The reward stage's base, already resolved to a local dir: loaded as the stages load it (pad = EOS if none).
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = chat.resolve_template(chat_template)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    stop_ids = chat.stop_at_end_of_turn(model.generation_config, tokenizer)
    rows = []
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(prompts), batch_size), desc="sampling replies for preference pairs",
                          unit="batch"):
            batch = prompts[start:start + batch_size]
            enc = chat.encode_prompts(tokenizer, batch)
            # Each request's replies in a row, as num_return_sequences orders them; its prompt computed once.
            ids = enc["input_ids"].repeat_interleave(replies_per_prompt, 0)
            mask = enc["attention_mask"].repeat_interleave(replies_per_prompt, 0)
            cache = shared_prompt_cache(model, ids, mask, replies_per_prompt)
            out = model.generate(input_ids=ids, attention_mask=mask, **cache, do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            for i, prompt in enumerate(batch):
                replies = texts[i * replies_per_prompt:(i + 1) * replies_per_prompt]
                rows.append({"prompt": prompt, "replies": [r.strip() for r in replies]})
    return rows


# ------------------------------------------------------------------------------------------------ task
# How the pairs' replies are sampled (not data.* settings yet: see the preset's comments for their cost).
REPLIES_PER_REQUEST = 4
REPLY_TOKENS = 40  # as the RL stage's sampling.max_new_tokens in experiment=smollm2_sentiment


def sentiment_task(data_cfg, model_dir: str | None = None, replies_per_request: int = REPLIES_PER_REQUEST,
                   reply_tokens: int = REPLY_TOKENS):
    """The task. Pairs need ``model_dir`` (the reward stage's base): ``num_pairs_train`` training requests and
    ``num_pairs_eval`` held-out ones each give at most one pair. PPO prompts: every training request
    (capped by ``max_train_samples``); the evaluation's: the held-out requests (capped by ``max_eval_samples``)."""
    from marl_exp.config import ConfigError
    from marl_exp.data.task_types import Task

    counts = {"train": data_cfg.num_pairs_train, "eval": data_cfg.num_pairs_eval}
    caps = {"train": data_cfg.max_train_samples, "eval": data_cfg.max_eval_samples}

    def pairs(split: str) -> Dataset:
        if model_dir is None:
            raise ConfigError("data=movie_sentiment pairs are the base model's own replies: build the task with the "
                              "reward stage's sft_model (build_task(data_cfg, model_dir=...))")
        prompts = requests(split, data_cfg.seed)[:counts[split]]
        seed = data_cfg.seed + SPLITS.index(split)
        rows = own_replies(model_dir, prompts, replies_per_request, reply_tokens, seed, data_cfg.chat_template)
        found = pairs_from_replies(rows, data_cfg.pair_min_gap)
        log.info("movie_sentiment %s: %d pairs from %d requests (|dVADER| >= %.2f)", split, len(found), len(rows),
                 data_cfg.pair_min_gap)
        if len(found) == 0:
            raise ConfigError(f"data=movie_sentiment {split}: no two replies of {len(rows)} requests differ by "
                              f"data.pair_min_gap={data_cfg.pair_min_gap} in VADER score; lower it or raise "
                              f"data.num_pairs_{split}")
        return found

    def prompts(split: str) -> tuple[list, list[str]]:
        chosen = requests(split, data_cfg.seed)[:caps[split] or None]
        return chosen, [f"movie_sentiment {split} request {i} ({p[-1]['content']!r})" for i, p in enumerate(chosen)]

    def no_sft(split: str) -> Dataset:
        raise ConfigError("data=movie_sentiment has no SFT texts: the instruct model is the policy's start; set "
                          "stage.sft_model=${model.path} (experiment=smollm2_sentiment does)")

    return Task("movie_sentiment", sft=no_sft, pairs=pairs, prompts=prompts, judge=afinn_positive, on_task=on_task)


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}
