"""MultiAdapterModel against independent references: HF's sequence classifier + peft for the reward,
the plain base model for the reference, a plain PeftModel for the policy; role switches restore all
state in fp32, 8-bit and 4-bit; gradients reach only the active policy; generation under left padding.

Everything runs on the real SFT model and reward adapter of the ``trained_chain`` fixture.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import compose
from marl_exp.data import reviews
from marl_exp.modeling.loading import fingerprint, load_model, quantization_config, weights_dtype
from marl_exp.modeling.multi_adapter import VALUE_HEAD_FILE, MultiAdapterModel, position_ids_from_mask
from marl_exp.provenance import BASE_RECORD, BaseMismatchError
from marl_exp.stages.common import lora_config

QUANT_MODES = ["fp32", "8bit", "4bit"]
ATOL_REWARD = 1e-5


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def texts(tokenizer) -> list[str]:
    """Four reviews of four different token lengths (shortest, longest, two between, not sorted),
    with EOS appended as RewardTrainer trains them."""
    generator = reviews.ReviewGenerator(seed=99)
    by_length: dict[int, str] = {}
    for _ in range(40):
        text = generator.review().text + tokenizer.eos_token
        by_length.setdefault(len(tokenizer(text).input_ids), text)
    lengths = sorted(by_length)
    assert len(lengths) >= 4
    picked = [lengths[0], lengths[len(lengths) // 2], lengths[-1], lengths[len(lengths) // 4]]
    return [by_length[n] for n in picked]


def encode(tokenizer, texts, side: str):
    tokenizer.padding_side = side
    try:
        return tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"


@pytest.fixture(scope="module")
def left(tokenizer, texts):
    enc = encode(tokenizer, texts, "left")
    lengths = enc.attention_mask.sum(-1)
    assert lengths.unique().numel() == len(texts), "the batch must be ragged"
    assert (enc.attention_mask[:, 0] == 0).any() and (enc.attention_mask[:, -1] == 1).all()
    return enc


@pytest.fixture(scope="module")
def right(tokenizer, texts):
    enc = encode(tokenizer, texts, "right")
    assert (enc.attention_mask[:, -1] == 0).any() and (enc.attention_mask[:, 0] == 1).all()
    return enc


@functools.cache
def _default_adapter_cfg():
    return compose().adapter


def policy_lora() -> LoraConfig:
    """The policy adapter PPO trains: the project's default adapter config (r=16, all-linear). A fresh
    object each time: peft keeps and mutates the config it is given."""
    return lora_config(_default_adapter_cfg(), task_type="CAUSAL_LM")


def other_lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def perturb(model: MultiAdapterModel, adapter: str, seed: int, std: float = 0.05) -> None:
    """Give ``adapter`` non-zero lora_B weights, so that it really changes the outputs (B starts at 0), and
    lora_A weights drawn as peft draws them but from ``seed``: peft draws A from the global RNG, whose state
    depends on which tests ran before in this process."""
    generator = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if f".lora_A.{adapter}." in name:
                torch.nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)
            if f".lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
                touched += 1
    assert touched > 0


def build_fp32(sft, reward_dir, **kwargs) -> MultiAdapterModel:
    base = AutoModelForCausalLM.from_pretrained(sft)
    kwargs.setdefault("policy_config", policy_lora())
    return MultiAdapterModel.build(base, reward_adapter=reward_dir, base_path=sft, **kwargs)


@pytest.fixture(scope="module")
def model(sft, reward_dir) -> MultiAdapterModel:
    """fp32, one perturbed policy "policy" + the reward adapter. Tests leave it as they found it."""
    m = build_fp32(sft, reward_dir)
    perturb(m, "policy", seed=0)
    m.eval()
    return m


@pytest.fixture(scope="module")
def hf_reward(sft, reward_dir):
    """Independent reference: HF's sequence classifier with the same adapter through plain peft."""
    seq_cls = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    assert seq_cls.config.pad_token_id is not None
    return PeftModel.from_pretrained(seq_cls, reward_dir).eval()


@pytest.fixture(scope="module")
def hf_scores(hf_reward, right) -> torch.Tensor:
    with torch.no_grad():
        return hf_reward(input_ids=right.input_ids, attention_mask=right.attention_mask).logits[:, 0]


@pytest.fixture(scope="module")
def plain_base(sft):
    return AutoModelForCausalLM.from_pretrained(sft).eval()


@pytest.fixture(scope="module")
def quant_models(sft, reward_dir):
    """Models loaded through ``load_model`` per quant mode, each with two perturbed policies."""
    cache: dict[str, MultiAdapterModel] = {}

    def get(mode: str) -> MultiAdapterModel:
        if mode not in cache:
            cfg = compose(f"quant={mode}")
            base = load_model(sft, cfg.model, cfg.quant, torch.device("cpu"))
            m = MultiAdapterModel.build(base, policy_config=policy_lora(), reward_adapter=reward_dir, base_path=sft)
            m.add_policy("other", other_lora())
            perturb(m, "policy", seed=0)
            perturb(m, "other", seed=1)
            cache[mode] = m
        return cache[mode]

    return get


# ------------------------------------------------------------------------------------------- helpers
def is_param_of(name: str, policy: str) -> bool:
    """Does parameter ``name`` (of the MultiAdapterModel) belong to policy ``policy``?"""
    return (f".lora_A.{policy}." in name or f".lora_B.{policy}." in name
            or name.startswith(f"value_heads.{policy}."))


def snapshot(m: MultiAdapterModel) -> dict:
    """Everything a role switch may touch and must put back."""
    lora_layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, LoraLayer)}
    assert lora_layers
    return {
        "requires_grad": {n: p.requires_grad for n, p in m.named_parameters()},
        "training": {n: mod.training for n, mod in m.named_modules()},
        "active_policy": m.active_policy,
        "peft_active": m.peft_model.active_adapter,
        "layer_active": {n: tuple(mod.active_adapters) for n, mod in lora_layers.items()},
        "layer_disabled": {n: mod.disable_adapters for n, mod in lora_layers.items()},
        "cpu_repacked_4bit": [n for n, mod in m.named_modules() if _repacked(mod)],
    }


def _repacked(module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def assert_canonical_trainable(m: MultiAdapterModel, active: str) -> None:
    wrong = [n for n, p in m.named_parameters() if p.requires_grad != is_param_of(n, active)]
    assert not wrong, f"requires_grad wrong for {wrong[:5]} (active policy {active})"


def masked_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


# --------------------------------------------------------------------------------------- 1. reward
@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_matches_hf_sequence_classifier(model, hf_reward, side, left, right):
    enc = left if side == "left" else right
    with torch.no_grad():
        # HF uses positions arange(T) unless told; ours count real tokens only, so give HF the same.
        theirs = hf_reward(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                           position_ids=position_ids_from_mask(enc.attention_mask)).logits[:, 0]
    ours = model.compute_reward_score(enc.input_ids, enc.attention_mask)
    assert ours.shape == (enc.input_ids.shape[0],)
    assert (ours - theirs).abs().max().item() <= ATOL_REWARD
    assert theirs.std() > 0.1  # a trained reward head, not a constant


def test_reward_is_padding_invariant(model, tokenizer, texts, left, right, hf_scores):
    batch_left = model.compute_reward_score(left.input_ids, left.attention_mask)
    batch_right = model.compute_reward_score(right.input_ids, right.attention_mask)
    for i, text in enumerate(texts):
        alone = tokenizer([text], return_tensors="pt")
        assert alone.attention_mask.all()
        score = model.compute_reward_score(alone.input_ids, alone.attention_mask)
        assert abs(score.item() - batch_left[i].item()) <= ATOL_REWARD
        assert abs(score.item() - batch_right[i].item()) <= ATOL_REWARD
    # Right padding needs no position ids: HF's own scores are the reference.
    assert (batch_right - hf_scores).abs().max().item() <= ATOL_REWARD


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_all_tokens(model, hf_reward, side, left, right):
    enc = left if side == "left" else right
    pooled = model.compute_reward_score(enc.input_ids, enc.attention_mask)
    per_token = model.compute_reward_score(enc.input_ids, enc.attention_mask, return_all_tokens=True)
    assert per_token.shape == enc.input_ids.shape
    last = torch.tensor([max(j for j in range(enc.input_ids.shape[1]) if enc.attention_mask[i, j])
                         for i in range(enc.input_ids.shape[0])])
    assert torch.equal(per_token[torch.arange(len(last)), last], pooled)
    # Every real token matches the per-token logits of HF's classifier (its score head on its backbone's
    # hidden states, the reward adapter applied; HF's forward only returns the pooled ones).
    base_seq_cls = hf_reward.base_model.model
    with torch.no_grad():
        hidden = base_seq_cls.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                    position_ids=position_ids_from_mask(enc.attention_mask)).last_hidden_state
        token_logits = base_seq_cls.score(hidden)[..., 0]
    assert masked_max_diff(per_token, token_logits, enc.attention_mask) <= ATOL_REWARD


# ------------------------------------------------------------------------------------ 2. reference
def test_reference_logits_are_the_base_model(model, plain_base, left, right):
    for enc in (left, right):
        ids, mask = enc.input_ids, enc.attention_mask
        with torch.no_grad():
            base_logits = plain_base(input_ids=ids, attention_mask=mask,
                                     position_ids=position_ids_from_mask(mask)).logits
            policy_logits = model.policy_forward(ids, mask).logits
        # The policy adapter is loaded and really changes the outputs ...
        assert masked_max_diff(policy_logits, base_logits, mask) > 0.05
        # ... and the reference ignores it (and the reward adapter) completely.
        ref = model.reference_logits(ids, mask)
        assert masked_max_diff(ref, base_logits, mask) <= 1e-6
        assert model.active_policy == "policy"


# --------------------------------------------------------------------------------------- 3. policy
def test_saved_policy_matches_plain_peft(model, sft, reward_dir, left, tmp_path):
    ids, mask = left.input_ids, left.attention_mask
    with torch.no_grad():
        model.value_heads["policy"].summary.bias.fill_(0.3)  # a non-trivial head to save
    out_dir = model.save_policy(tmp_path / "policy")
    assert (out_dir / "adapter_config.json").exists() and (out_dir / "adapter_model.safetensors").exists()
    assert (out_dir / VALUE_HEAD_FILE).exists()

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft), str(out_dir)).eval()
    with torch.no_grad():
        ref_out = reference(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                            output_hidden_states=True)
        ours = model.policy_forward(ids, mask)
    assert masked_max_diff(ours.logits, ref_out.logits, mask) <= 1e-5
    # Value head: read the file by hand and apply it to peft's last (post-norm) hidden state.
    head = load_file(out_dir / VALUE_HEAD_FILE)
    ref_values = torch.nn.functional.linear(ref_out.hidden_states[-1], head["summary.weight"],
                                            head["summary.bias"])[..., 0]
    assert masked_max_diff(ours.values, ref_values, mask) <= 1e-5
    assert ours.values.dtype == torch.float32

    # Loaded back as the policy of a new model, and as an added policy: same logits and values.
    reloaded = build_fp32(sft, reward_dir, policy_config=None, policy_adapter=str(out_dir)).eval()
    reloaded.add_policy("again", adapter_dir=str(out_dir))
    for name in ("policy", "again"):
        with torch.no_grad():
            again = reloaded.policy_forward(ids, mask, adapter=name)
        assert masked_max_diff(again.logits, ref_out.logits, mask) <= 1e-5
        assert masked_max_diff(again.values, ref_values, mask) <= 1e-5
    assert_canonical_trainable(reloaded, "again")


def test_add_policy_keeps_active_and_rejects_taken_names(sft, reward_dir, left):
    m = build_fp32(sft, reward_dir)
    m.eval()
    before = snapshot(m)
    m.add_policy("policy_1", other_lora())
    after = snapshot(m)
    assert m.active_policy == "policy" and m.peft_model.active_adapter == "policy"
    assert m.policy_names == ["policy", "policy_1"]
    # existing parameters keep their flags and modes; the new ones are frozen and follow the model's mode
    assert {n: f for n, f in after["requires_grad"].items() if n in before["requires_grad"]} == before["requires_grad"]
    assert_canonical_trainable(m, "policy")
    assert not any(after["training"].values())
    assert m.peft_model.peft_config["policy_1"].base_model_name_or_path == sft
    for taken in ("policy", "policy_1", "reward"):
        with pytest.raises(ValueError, match="already taken"):
            m.add_policy(taken, other_lora())
    assert m.policy_names == ["policy", "policy_1"]


# ------------------------------------------------------------------------------ 4. role switching
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", QUANT_MODES)
def test_role_switches_restore_state(quant_models, left, mode, training):
    m = quant_models(mode)
    m.activate_policy("policy")
    m.train(training)
    ids, mask = left.input_ids, left.attention_mask

    def every_switch():
        yield "compute_reward_score", lambda: m.compute_reward_score(ids, mask)
        yield "compute_reward_score(ppo_adapter_name=active)", \
            lambda: m.compute_reward_score(ids, mask, ppo_adapter_name=m.active_policy)
        yield "compute_reward_score(return_all_tokens)", lambda: m.compute_reward_score(ids, mask, return_all_tokens=True)
        yield "reference_logits", lambda: m.reference_logits(ids, mask)
        yield "generate", lambda: m.generate(ids, mask, max_new_tokens=2, do_sample=False)
        yield "generate(adapter=other)", lambda: m.generate(ids, mask, adapter="other", max_new_tokens=2, do_sample=False)
        yield "policy_forward", lambda: m.policy_forward(ids, mask)

    before = snapshot(m)
    assert_canonical_trainable(m, "policy")
    assert all(flag == training for flag in before["training"].values())
    for what, call in every_switch():
        call()
        assert snapshot(m) == before, f"{what} did not restore the model state ({mode}, training={training})"

    # Not only the canonical state: whatever flags and modes were set by hand come back exactly.
    m.value_heads["policy"].requires_grad_(False)
    m.value_heads["other"].train(not training)
    m.peft_model.get_base_model().lm_head.train(not training)
    odd = snapshot(m)
    try:
        for what, call in every_switch():
            call()
            assert snapshot(m) == odd, f"{what} did not restore hand-set state ({mode}, training={training})"
    finally:
        m.value_heads["policy"].requires_grad_(True)
        m.train(training)
    assert snapshot(m) == before

    # policy_forward on another adapter is a deliberate, documented switch: it stays active.
    m.policy_forward(ids, mask, adapter="other")
    switched = snapshot(m)
    assert m.active_policy == "other" and switched["peft_active"] == "other"
    assert set(switched["layer_active"].values()) == {("other",)}
    assert switched["training"] == before["training"]
    assert_canonical_trainable(m, "other")
    m.activate_policy("policy")
    assert snapshot(m) == before


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_gradients_reach_only_the_active_policy(quant_models, left, mode):
    m = quant_models(mode)
    m.activate_policy("policy")
    m.train()
    ids, mask = left.input_ids, left.attention_mask
    names = [n for n, _ in m.named_parameters()]

    def gradients(adapter: str) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        out = m.policy_forward(ids, mask, adapter=adapter)
        loss = (out.logits.float().logsumexp(-1) * mask).sum() + (out.values * mask).sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    try:
        for active in ("policy", "other"):
            first = gradients(active)
            # a rollout's worth of eval-mode, no-grad passes in between
            scores = m.compute_reward_score(ids, mask)
            ref = m.reference_logits(ids, mask)
            m.generate(ids, mask, max_new_tokens=2, do_sample=False)
            m.generate(ids, mask, adapter="policy" if active == "other" else "other", max_new_tokens=2,
                       do_sample=False)
            assert not scores.requires_grad and not ref.requires_grad
            # bitsandbytes must not have repacked 4-bit weights into its grad-less CPU inference layout
            assert not any(_repacked(mod) for mod in m.modules())
            grads = gradients(active)
            assert grads.keys() == first.keys()
            for n, g in grads.items():  # the rollout changed nothing: same gradients as before it
                assert torch.allclose(g, first[n], rtol=1e-5, atol=1e-6), n
            params = dict(m.named_parameters())
            got = {n for n in names if params[n].grad is not None}
            nonzero = {n for n in got if params[n].grad.abs().sum() > 0}
            expected = {n for n in names if is_param_of(n, active)}
            assert got <= expected, f"gradients leaked into {sorted(got - expected)[:5]}"
            # every LoRA weight of the active policy (lora_B is non-zero, so lora_A learns too) and its head
            assert nonzero == expected, f"no gradient for {sorted(expected - nonzero)[:5]}"
            assert any(n.startswith("value_heads.") for n in nonzero) and any("lora_A" in n for n in nonzero)
            assert not any(".reward." in n or n.startswith("score_head.") for n in got)
    finally:
        m.zero_grad(set_to_none=True)
        m.activate_policy("policy")
        m.eval()


def test_4bit_base_repacked_before_build_is_unpacked(sft, reward_dir, left, caplog):
    """A base that already ran CPU inference under bitsandbytes (weights repacked, grad-less) still trains."""
    cfg = compose("quant=4bit")
    base = load_model(sft, cfg.model, cfg.quant, torch.device("cpu"))
    base.eval()
    with torch.no_grad():
        base(input_ids=left.input_ids, attention_mask=left.attention_mask)
    repacked = sum(_repacked(mod) for mod in base.modules())
    if repacked == 0:
        pytest.skip("this CPU/bitsandbytes does not repack 4-bit weights for inference")
    with caplog.at_level(logging.WARNING, logger="marl_exp.modeling.multi_adapter"):
        m = MultiAdapterModel.build(base, policy_config=other_lora(), base_path=sft)
    assert "repacked" in caplog.text
    assert not any(_repacked(mod) for mod in m.modules())
    m.train()
    perturb(m, "policy", seed=3)
    out = m.policy_forward(left.input_ids, left.attention_mask)
    (out.logits.logsumexp(-1) * left.attention_mask).sum().backward()
    # q/v LoRA of layer 0 only get a gradient through the base (4-bit) o_proj/MLP weights above them
    lora = {n: p for n, p in m.named_parameters() if ".lora_" in n}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())


@pytest.fixture(scope="module")
def hf_reward_quant(sft, reward_dir):
    """HF's sequence classifier + plain peft on the same adapter, loaded at each quant mode's precision with
    the bitsandbytes config load_model builds from that mode's config (cached per mode)."""
    cache: dict[str, PeftModel] = {}

    def get(mode: str) -> PeftModel:
        if mode not in cache:
            quant = compose(f"quant={mode}").quant
            bnb = quantization_config(quant)
            load = {} if bnb is None else {"quantization_config": bnb, "device_map": {"": "cpu"}}
            seq_cls = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1, dtype=weights_dtype(quant),
                                                                         **load)
            assert type(seq_cls.score) is torch.nn.Linear  # HF keeps the head unquantized, as ours
            # The 4-bit kernel ours uses: no repacking for bitsandbytes' CPU inference kernel, which rounds
            # absmax to bf16 (scores move by 0.015).
            for module in seq_cls.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
            cache[mode] = PeftModel.from_pretrained(seq_cls, reward_dir).eval()
        return cache[mode]

    return get


# Max |score - same-precision HF reference| allowed. Kernel noise floor, measured as that reference against
# itself on these 4 texts (left- vs right-padded batch vs each text alone; tiny model, default reward
# adapter, AMD EPYC): fp32 1.0e-6, 8-bit 0.0042 (LLM.int8 picks its outlier columns over the whole batch),
# 4-bit 4.2e-7 (nf4 weights dequantized, then an fp32 matmul). Ours against it on the same batch: <= 5e-7
# in every mode. Tolerance ~3x the floor; 1e-5 in fp32 and 4-bit, the floor of float32 rounding here.
QUANT_SCORE_TOLERANCE = {"fp32": ATOL_REWARD, "8bit": 0.015, "4bit": ATOL_REWARD}


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_quantized_reward_scores_match_hf_at_same_precision(quant_models, hf_reward_quant, tokenizer, texts, left,
                                                            right, mode):
    m, reference_model = quant_models(mode), hf_reward_quant(mode)
    tolerance = QUANT_SCORE_TOLERANCE[mode]

    def reference_scores(enc) -> torch.Tensor:
        with torch.no_grad():
            return reference_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                   position_ids=position_ids_from_mask(enc.attention_mask)).logits[:, 0]

    references = {"left": reference_scores(left), "right": reference_scores(right)}
    alone = torch.cat([reference_scores(tokenizer([text], return_tensors="pt")) for text in texts])
    floor = max((references["right"] - references["left"]).abs().max().item(),
                (alone - references["left"]).abs().max().item())
    assert floor <= tolerance  # the tolerance still stands above the reference's own noise
    for enc, reference in ((left, references["left"]), (right, references["right"])):
        scores = m.compute_reward_score(enc.input_ids, enc.attention_mask)
        diff = (scores - reference).abs().max().item()
        print(f"load_model {mode}: HF noise floor {floor:.3g}, max |score - same-precision HF reference| = {diff:.3g}")
        assert diff <= tolerance, f"{mode}: max |score - same-precision HF reference| = {diff}"
        # Every two texts the reference sets more than twice the tolerance apart keep their order.
        separated = (reference[:, None] - reference[None, :]) > 2 * tolerance
        assert separated.any(), "no two texts are clearly apart: the order check would check nothing"
        swapped = int(((scores[:, None] - scores[None, :]) <= 0)[separated].sum())
        assert swapped == 0, f"{mode}: {swapped} of {int(separated.sum())} clearly ordered pairs swapped"


# ------------------------------------------------------------------ 5. several policies, one base
def test_ppo_adapter_name_leaves_named_policy_active(sft, reward_dir, left, hf_scores, right):
    m = build_fp32(sft, reward_dir)
    m.add_policy("policy_1", other_lora())
    ids, mask = left.input_ids, left.attention_mask
    assert m.active_policy == "policy"
    plain = m.compute_reward_score(ids, mask)
    assert m.active_policy == "policy" and m.peft_model.active_adapter == "policy"
    named = m.compute_reward_score(ids, mask, ppo_adapter_name="policy_1")
    assert m.active_policy == "policy_1" and m.peft_model.active_adapter == "policy_1"
    assert_canonical_trainable(m, "policy_1")
    assert torch.equal(plain, named)
    again = m.compute_reward_score(right.input_ids, right.attention_mask)  # no name: policy_1 stays
    assert m.active_policy == "policy_1"
    assert (again - hf_scores).abs().max().item() <= ATOL_REWARD
    with pytest.raises(ValueError, match="unknown policy adapter 'reward'"):
        m.compute_reward_score(ids, mask, ppo_adapter_name="reward")
    with pytest.raises(ValueError, match="unknown policy adapter"):
        m.compute_reward_score(ids, mask, ppo_adapter_name="nope")
    assert m.active_policy == "policy_1"
    assert_canonical_trainable(m, "policy_1")


def test_two_policies_train_independently(sft, reward_dir, left):
    torch.manual_seed(0)
    m = build_fp32(sft, reward_dir)
    m.add_policy("policy_1", other_lora())
    m.train()
    ids, mask = left.input_ids, left.attention_mask
    reward_before = m.compute_reward_score(ids, mask)
    reference_before = m.reference_logits(ids, mask)

    def state() -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in m.state_dict().items()}

    def train_steps(policy: str, steps: int = 3) -> None:
        m.activate_policy(policy)
        trainable = [p for p in m.parameters() if p.requires_grad]
        assert {id(p) for p in trainable} == {id(p) for p in m.trainable_parameters(policy)}
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        for _ in range(steps):
            out = m.policy_forward(ids, mask)
            logprobs = torch.log_softmax(out.logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            loss = -(logprobs * mask[:, 1:]).sum() / mask.sum() + (out.values * mask).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            m.compute_reward_score(ids, mask)  # a reward pass between steps, as in PPO
            assert m.active_policy == policy and m.peft_model.active_adapter == policy

    s0 = state()
    train_steps("policy")
    s1 = state()
    train_steps("policy_1")
    s2 = state()
    for (old, new), policy in (((s0, s1), "policy"), ((s1, s2), "policy_1")):
        changed = {n for n in old if not torch.equal(old[n], new[n])}
        expected = {n for n in old if is_param_of(n, policy)}
        assert changed == expected, f"training {policy} changed {sorted(changed ^ expected)[:5]}"
    assert torch.equal(m.compute_reward_score(ids, mask), reward_before)
    assert torch.equal(m.reference_logits(ids, mask), reference_before)
    assert m.active_policy == "policy_1"
    m.compute_reward_score(ids, mask, ppo_adapter_name="policy")
    assert m.active_policy == "policy"
    assert_canonical_trainable(m, "policy")


# ----------------------------------------------------------------------------------- 7. reward files
def copy_adapter(reward_dir: str, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(reward_dir, target)
    return target


def test_same_base_guard(sft, reward_dir, tmp_path, caplog, right, hf_scores):
    bad = copy_adapter(reward_dir, tmp_path, "other_base")
    record = json.loads((bad / BASE_RECORD).read_text())
    assert record["fingerprint"] == fingerprint(sft)  # the real adapter passes the guard
    record["fingerprint"] = "0123456789abcdef"
    record["base_model"] = "/somewhere/else/model"
    (bad / BASE_RECORD).write_text(json.dumps(record))
    with pytest.raises(BaseMismatchError) as err:
        build_fp32(sft, str(bad))
    message = str(err.value)
    for part in ("0123456789abcdef", fingerprint(sft), "/somewhere/else/model", sft, "allow_base_mismatch"):
        assert part in message

    with caplog.at_level(logging.WARNING, logger="marl_exp.provenance"):
        m = build_fp32(sft, str(bad), allow_base_mismatch=True)
    assert any("allow_base_mismatch" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    scores = m.compute_reward_score(right.input_ids, right.attention_mask)
    assert (scores - hf_scores).abs().max().item() <= ATOL_REWARD


def test_old_format_bin_adapter(sft, reward_dir, tmp_path, right, hf_scores):
    old = copy_adapter(reward_dir, tmp_path, "old_format")
    weights = load_file(old / "adapter_model.safetensors")
    weights["base_model.model.model.score.weight"] = weights.pop("base_model.model.score.weight")
    torch.save(weights, old / "adapter_model.bin")
    (old / "adapter_model.safetensors").unlink()
    m = build_fp32(sft, str(old))
    scores = m.compute_reward_score(right.input_ids, right.attention_mask)
    assert (scores - hf_scores).abs().max().item() <= ATOL_REWARD


def test_two_label_score_head_with_bias(sft, reward_dir, tmp_path, right, left, hf_scores):
    two = copy_adapter(reward_dir, tmp_path, "two_labels")
    weights = load_file(two / "adapter_model.safetensors")
    w = weights["base_model.model.score.weight"]  # [1, H]
    weights["base_model.model.score.weight"] = torch.cat([-w, w])  # label 0 = -reward, label 1 = reward
    weights["base_model.model.score.bias"] = torch.tensor([0.5, -0.25])
    save_file(weights, two / "adapter_model.safetensors")

    m = build_fp32(sft, str(two), reward_label_index=1)
    assert m.score_head.out_features == 2 and m.score_head.bias is not None
    label1 = m.compute_reward_score(right.input_ids, right.attention_mask)
    assert (label1 - (hf_scores - 0.25)).abs().max().item() <= ATOL_REWARD
    label0 = m.compute_reward_score(right.input_ids, right.attention_mask, reward_label_index=0)
    assert (label0 - (-hf_scores + 0.5)).abs().max().item() <= ATOL_REWARD
    left1 = m.compute_reward_score(left.input_ids, left.attention_mask)
    assert (left1 - label1).abs().max().item() <= ATOL_REWARD
    default = build_fp32(sft, str(two))  # label 0 unless told
    assert (default.compute_reward_score(right.input_ids, right.attention_mask) - label0).abs().max() <= ATOL_REWARD

    with pytest.raises(ValueError, match=r"reward_label_index=2 is out of range .* 2 labels"):
        build_fp32(sft, str(two), reward_label_index=2)
    with pytest.raises(ValueError, match=r"reward_label_index=-1 is out of range"):
        build_fp32(sft, str(two), reward_label_index=-1)
    with pytest.raises(ValueError, match=r"reward_label_index=5 is out of range"):
        m.compute_reward_score(right.input_ids, right.attention_mask, reward_label_index=5)
    with pytest.raises(ValueError, match=r"reward_label_index=1 is out of range .* 1 label\b"):
        build_fp32(sft, reward_dir, reward_label_index=1)


def test_missing_score_head(sft, reward_dir, tmp_path):
    headless = copy_adapter(reward_dir, tmp_path, "headless")
    weights = load_file(headless / "adapter_model.safetensors")
    del weights["base_model.model.score.weight"]
    save_file(weights, headless / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="no score head"):
        build_fp32(sft, str(headless))
    plain = build_fp32(sft, None)
    with pytest.raises(ValueError, match="no reward adapter"):
        plain.compute_reward_score(torch.tensor([[1, 5, 6]]))


# ---------------------------------------------------------------------------------- 8. footprint
def test_memory_footprint(sft, reward_dir, quant_models, record_property):
    measured = {}
    for mode in QUANT_MODES:
        cfg = compose(f"quant={mode}")
        base = load_model(sft, cfg.model, cfg.quant, torch.device("cpu"))
        plain_footprint = base.get_memory_footprint()  # HF's own count: parameters + buffers, before LoRA
        m = MultiAdapterModel.build(base, policy_config=policy_lora(), reward_adapter=reward_dir, base_path=sft)
        sizes = m.memory_footprint()
        assert set(sizes) == {"base_weights", "adapters", "heads", "total"}
        assert sizes["total"] == sizes["base_weights"] + sizes["adapters"] + sizes["heads"]
        lora_bytes = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if ".lora_" in n)
        assert sizes["adapters"] == lora_bytes  # LoRA weights stay fp32 in every mode
        hidden = m.config.hidden_size
        assert sizes["heads"] == 4 * ((hidden + 1) + hidden)  # value head (w + b) + 1-label score head, fp32
        if mode == "fp32":
            assert sizes["base_weights"] == plain_footprint
        else:  # plus bitsandbytes' scales / quant states, which HF does not count: a few percent
            assert plain_footprint < sizes["base_weights"] < 1.1 * plain_footprint
        measured[mode] = dict(sizes, hf_get_memory_footprint=plain_footprint)
    assert measured["8bit"]["base_weights"] < 0.5 * measured["fp32"]["base_weights"]
    assert measured["4bit"]["base_weights"] < measured["8bit"]["base_weights"]
    assert measured["8bit"]["adapters"] == measured["4bit"]["adapters"] == measured["fp32"]["adapters"]
    for mode, sizes in measured.items():
        print(f"memory_footprint[{mode}]: {sizes}")
        record_property(f"memory_footprint_{mode}", sizes)


# ---------------------------------------------------------------------------------- 9. generation
def test_generate_left_padding(model, tokenizer):
    prompts = ["the movie was", "honestly , the new film from that director was", "this film"]
    enc = encode(tokenizer, prompts, "left")
    assert enc.attention_mask.sum(-1).unique().numel() == 3
    prompt_len = enc.input_ids.shape[1]
    before = snapshot(model)
    out = model.generate(enc.input_ids, enc.attention_mask, max_new_tokens=8, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    assert snapshot(model) == before
    responses = out.sequences[:, prompt_len:]
    assert responses.shape[1] == 8 and len(out.scores) == 8

    with torch.no_grad():  # the policy's first-token logits differ from the base's: the adapter is used
        with model.peft_model.disable_adapter():
            base = model.peft_model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                             max_new_tokens=1, do_sample=False, output_scores=True,
                                             return_dict_in_generate=True)
        model.activate_policy("policy")  # disable_adapter rewrote requires_grad; put it back
    assert (base.scores[0] - out.scores[0]).abs().max() > 1e-4  # fp32 noise on these logits: ~1e-6

    for i, prompt in enumerate(prompts):
        alone = tokenizer([prompt], return_tensors="pt")
        single = model.generate(alone.input_ids, alone.attention_mask, max_new_tokens=8, do_sample=False)
        response = single[0, alone.input_ids.shape[1]:]
        assert torch.equal(responses[i, :len(response)], response), f"prompt {i} differs under left padding"
        assert (responses[i, len(response):] == tokenizer.pad_token_id).all()  # finished early: padded

    # log-probs recomputed by policy_forward equal the ones generate sampled from
    full_mask = torch.cat([enc.attention_mask, torch.ones_like(responses)], dim=1)
    with torch.no_grad():
        logits = model.policy_forward(out.sequences, full_mask).logits
    recomputed = torch.log_softmax(logits[:, prompt_len - 1:-1].float(), -1)
    generated = torch.log_softmax(torch.stack(out.scores, dim=1).float(), -1)
    assert recomputed.shape == generated.shape
    diff = (recomputed - generated).abs().max().item()
    assert diff <= 1e-4, f"policy_forward log-probs differ from generate's by {diff}"
    taken = generated.gather(-1, responses[..., None])[..., 0]
    assert torch.isfinite(taken).all()

    # only policies generate / run policy_forward; the reward adapter is not one
    for call in (lambda: model.generate(enc.input_ids, enc.attention_mask, adapter="reward", max_new_tokens=1),
                 lambda: model.policy_forward(enc.input_ids, enc.attention_mask, adapter="reward")):
        with pytest.raises(ValueError, match="unknown policy adapter 'reward'"):
            call()
    assert snapshot(model) == before
