"""Sampling several replies to one prompt computes the prompt once.

GRPO and RLOO sample ``num_generations`` replies per prompt, and the preference-pair sampler several
replies per request: the rows of a batch come in groups that repeat one prompt. ``generate`` would run
the prompt through the model once per row. Here each group's prompt, all but its last token, runs once;
its KV cache is repeated for every row of the group, and ``generate`` continues from it, computing only
the last prompt token of each row before decoding. The logits equal a full prefill's within fp32
rounding (a different batch shape), so the samples are the same (tests/test_shared_prefill.py).
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from marl_exp.modeling.multi_adapter import position_ids_from_mask


# The cache layers whose whole state is keys and values (transformers' DynamicLayer and its sliding-window form).
PLAIN_KV_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, group: int) -> bool:
    """Whether the rows come in runs of ``group`` identical (prompt, mask) rows."""
    rows = input_ids.shape[0]
    if group <= 1 or rows % group or input_ids.shape[1] < 2:
        return False
    return bool(torch.equal(input_ids, input_ids[::group].repeat_interleave(group, 0))
                and torch.equal(attention_mask, attention_mask[::group].repeat_interleave(group, 0)))


def cache_keyword(base) -> str:
    """The forward's and generate's name for the KV cache: ``cache`` in recent transformers 5, before that
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def plain_kv_cache(base) -> DynamicCache | None:
    """An empty cache for ``base`` when its whole state is keys and values that ``generate`` would keep in a
    ``DynamicCache`` too; None for anything else: a linear-attention or SSM layer (LFM2's convolutions, Qwen3-Next,
    Falcon-H1), whose state ``batch_repeat_interleave`` does not repeat, a model with its own cache class, or a
    generation config that fixes a cache implementation (``generate`` then refuses a cache passed in)."""
    supports_dynamic = getattr(base, "_supports_default_dynamic_cache", lambda: True)
    if not supports_dynamic() or getattr(base.generation_config, "cache_implementation", None):
        return None
    cache = DynamicCache(config=base.config)
    return cache if all(type(layer) in PLAIN_KV_LAYERS for layer in cache.layers) else None


def shared_prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, group: int) -> dict:
    """``generate`` keyword arguments holding each group's prompt cache, computed once and repeated per row;
    empty when the rows do not come in groups of ``group`` or the model's cache is not plain keys and values
    (``plain_kv_cache``): then ``generate`` runs as usual.

    ``model``: what ``generate`` is called on (a plain causal LM or a peft model, with its adapter active);
    it runs under the caller's no-grad / inference mode. The cached part is the prompt but its last token:
    ``generate`` needs one uncached token to produce the first logits.
    """
    if not prompt_groups(input_ids, attention_mask, group):
        return {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache = plain_kv_cache(base)
    if cache is None:
        return {}
    ids, mask = input_ids[::group, :-1], attention_mask[::group, :-1]
    key = cache_keyword(base)
    model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
          logits_to_keep=1, **{key: cache})
    cache.batch_repeat_interleave(group)
    return {key: cache}
