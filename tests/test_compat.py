"""The TRL-0.11-style entry point: the seed's snippet runs unchanged in fp32, 8-bit and 4-bit, and its
scores agree with HF's sequence classifier + peft on the same reward adapter, loaded at the same
precision with the same bitsandbytes config (an independent reference that differs by kernel noise only)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

from marl_exp import AutoModelForCausalLMWithValueHead
from marl_exp.compat import DEFAULT_POLICY_NAME
from marl_exp.data import reviews
from marl_exp.modeling.multi_adapter import VALUE_HEAD_FILE, position_ids_from_mask

QUANT_KWARGS = {"fp32": {}, "8bit": {"load_in_8bit": True}, "4bit": {"load_in_4bit": True}}
# Max |score - same-precision HF reference| allowed. Kernel noise floor, measured as the reference against
# itself over the 48 texts below (left- vs right-padded batch vs each text alone; tiny model, default reward
# adapter, AMD EPYC): fp32 1.1e-6, 8-bit 0.010 (LLM.int8 picks its outlier columns over the whole batch),
# 4-bit 1.1e-6 (weights dequantized, then an fp32 matmul). Ours against it on the same batch: 0 in every
# mode. Tolerance ~3x the floor; 1e-5 in fp32 and 4-bit, the floor of float32 rounding of these matmuls.
SCORE_TOLERANCE = {"fp32": 1e-5, "8bit": 0.03, "4bit": 1e-5}


@pytest.fixture(scope="module")
def pairs(tokenizer) -> tuple[list[str], list[str]]:
    """24 held-out preference pairs like the reward stage's eval split, EOS appended as in training."""
    generator = reviews.ReviewGenerator(seed=4321)
    chosen, rejected = zip(*(generator.preference_pair(0.25) for _ in range(24)))
    eos = tokenizer.eos_token
    return [r.text + eos for r in chosen], [r.text + eos for r in rejected]


@pytest.fixture(scope="module")
def inputs(tokenizer, pairs):
    """What a PPO loop scores: chosen then rejected, left-padded."""
    tokenizer.padding_side = "left"
    try:
        return tokenizer(pairs[0] + pairs[1], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"


def hf_reward_model(sft: str, reward_dir: str, mode: str) -> PeftModel:
    """HF's AutoModelForSequenceClassification + PeftModel on the same adapter, loaded at the precision of
    ``mode`` with the bitsandbytes config the compat entry point builds from load_in_8bit / load_in_4bit."""
    load = {}
    if mode != "fp32":
        load = {"quantization_config": BitsAndBytesConfig(**QUANT_KWARGS[mode]), "device_map": {"": "cpu"}}
    seq_cls = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1, **load)
    # HF leaves the last module (the score head) unquantized: an fp32 head, like ours.
    assert type(seq_cls.score) is torch.nn.Linear
    # Our model keeps 4-bit weights in their trainable layout; bitsandbytes would otherwise repack them for
    # its CPU inference kernel on the first no-grad forward (absmax rounded to bf16: scores move by 0.015).
    for module in seq_cls.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(seq_cls, reward_dir).eval()


@pytest.fixture(scope="module")
def hf_reference(sft, reward_dir):
    """The same-precision HF reference per mode (cached)."""
    cache: dict[str, PeftModel] = {}

    def get(mode: str) -> PeftModel:
        if mode not in cache:
            cache[mode] = hf_reward_model(sft, reward_dir, mode)
        return cache[mode]

    return get


def hf_scores(model: PeftModel, enc) -> torch.Tensor:
    mask = enc["attention_mask"]
    with torch.no_grad():
        return model(**enc, position_ids=position_ids_from_mask(mask)).logits[:, 0].float()


@pytest.fixture(scope="module")
def reference_scores(hf_reference, inputs):
    """Scores of the same-precision HF reference on ``inputs``, per mode."""
    return lambda mode: hf_scores(hf_reference(mode), inputs)


def noise_floor(model: PeftModel, tokenizer, texts: list[str], left_padded: torch.Tensor) -> float:
    """Max change of the reference's own scores when the same texts come right-padded or one at a time."""
    right_padded = hf_scores(model, tokenizer(texts, return_tensors="pt", padding=True))
    alone = torch.cat([hf_scores(model, tokenizer([text], return_tensors="pt")) for text in texts])
    return max((right_padded - left_padded).abs().max().item(), (alone - left_padded).abs().max().item())


def lora_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")


def perturb(peft_model, adapter: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if f".lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def check_scores(scores: torch.Tensor, reference: torch.Tensor, mode: str) -> float:
    assert scores.shape == reference.shape and scores.dtype == torch.float32
    diff = (scores - reference).abs().max().item()
    assert diff <= SCORE_TOLERANCE[mode], f"{mode}: max |score - same-precision HF reference| = {diff}"
    return diff


def order_disagreements(scores: torch.Tensor, reference: torch.Tensor, margin: float) -> tuple[int, int]:
    """(pairs compared, pairs ordered unlike the reference) over all pairs the reference sets more than
    ``margin`` apart: closer pairs may swap within kernel noise, these may not."""
    gap = reference[:, None] - reference[None, :]
    compared = gap > margin
    swapped = (scores[:, None] - scores[None, :] <= 0) & compared
    return int(compared.sum()), int(swapped.sum())


# ------------------------------------------------------------------------------------ the snippet
@pytest.mark.parametrize("mode", list(QUANT_KWARGS))
def test_seed_snippet(sft, reward_dir, tokenizer, pairs, inputs, hf_reference, reference_scores, mode):
    lora = lora_config()
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        sft, peft_config=lora, reward_adapter=reward_dir, **QUANT_KWARGS[mode])
    rewards = model.compute_reward_score(**inputs)
    reference = reference_scores(mode)
    floor = noise_floor(hf_reference(mode), tokenizer, pairs[0] + pairs[1], reference)
    diff = check_scores(rewards, reference, mode)
    print(f"compat {mode}: HF noise floor {floor:.3g}, max |score - same-precision HF reference| = {diff:.3g}")
    assert floor <= SCORE_TOLERANCE[mode]  # the tolerance still stands above the reference's own noise
    assert model.active_policy == DEFAULT_POLICY_NAME

    model.add_policy("policy_1", lora)  # the same config object again, as the TRL docs do
    assert model.active_policy == DEFAULT_POLICY_NAME
    rewards_1 = model.compute_reward_score(**inputs, ppo_adapter_name="policy_1")
    assert model.active_policy == "policy_1" and model.pretrained_model.active_adapter == "policy_1"
    assert torch.equal(rewards_1, rewards)  # same reward adapter, same batch
    assert model.peft_model.peft_config["policy_1"] is not model.peft_model.peft_config[DEFAULT_POLICY_NAME]

    # Ranking, in whole pairs: the reward model is trained (chosen first on >= 18 of 24 held-out pairs), and
    # ours orders every two texts that the reference sets more than twice the tolerance apart as it does.
    n = reference.shape[0] // 2
    assert int((reference[:n] > reference[n:]).sum()) >= 18
    compared, swapped = order_disagreements(rewards, reference, 2 * SCORE_TOLERANCE[mode])
    assert compared >= n * (2 * n - 1) // 2, f"only {compared} pairs of texts are clearly apart"  # half of them
    assert swapped == 0, f"{mode}: {swapped} of {compared} clearly ordered pairs swapped"

    # The TRL surface: forward gives (lm_logits, loss, values); v_head and pretrained_model exist.
    lm_logits, loss, values = model(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert loss is None and lm_logits.shape[:2] == values.shape == inputs["input_ids"].shape
    assert model.v_head is model.value_heads["policy_1"]
    assert isinstance(model.pretrained_model, PeftModel)
    if mode != "fp32":
        assert getattr(model.pretrained_model.get_base_model(), f"is_loaded_in_{mode}")


def test_reward_adapter_name(sft, reward_dir, inputs, reference_scores):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        sft, peft_config=lora_config(), reward_adapter=reward_dir, reward_adapter_name="rm")
    assert set(model.pretrained_model.peft_config) == {DEFAULT_POLICY_NAME, "rm"}
    assert model.reward_adapter_name == "rm"
    check_scores(model.compute_reward_score(**inputs), reference_scores("fp32"), "fp32")
    with pytest.raises(ValueError, match="already taken"):
        AutoModelForCausalLMWithValueHead.from_pretrained(
            sft, peft_config=lora_config(), reward_adapter=reward_dir, reward_adapter_name=DEFAULT_POLICY_NAME)


def test_peft_model_or_pretrained_model_passed_in(sft, reward_dir, inputs, reference_scores):
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(sft), lora_config(), adapter_name="mine")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model, reward_adapter=reward_dir)
    assert model.pretrained_model is peft_model and model.policy_names == ["mine"]
    check_scores(model.compute_reward_score(**inputs), reference_scores("fp32"), "fp32")

    base = AutoModelForCausalLM.from_pretrained(sft)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora_config(),
                                                              reward_adapter=reward_dir)
    assert model.policy_names == [DEFAULT_POLICY_NAME]
    check_scores(model.compute_reward_score(**inputs), reference_scores("fp32"), "fp32")
    with pytest.raises(ValueError, match="peft_config"):
        AutoModelForCausalLMWithValueHead.from_pretrained(AutoModelForCausalLM.from_pretrained(sft))


@pytest.mark.parametrize("mode", ["fp32", "8bit"])
def test_path_holding_a_policy_adapter(sft, reward_dir, inputs, reference_scores, tmp_path, mode):
    trained = AutoModelForCausalLMWithValueHead.from_pretrained(sft, peft_config=lora_config())
    perturb(trained.pretrained_model, DEFAULT_POLICY_NAME, seed=5)
    with torch.no_grad():
        trained.v_head.summary.bias.fill_(-0.7)
    policy_dir = trained.save_policy(tmp_path / "policy")

    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(policy_dir), reward_adapter=reward_dir,
                                                              **QUANT_KWARGS[mode])
    check_scores(model.compute_reward_score(**inputs), reference_scores(mode), mode)
    head = load_file(policy_dir / VALUE_HEAD_FILE)
    assert torch.equal(model.v_head.summary.bias, head["summary.bias"])
    assert torch.equal(model.v_head.summary.weight, head["summary.weight"])
    if mode == "fp32":  # the policy is the saved one: same logits as plain peft on that directory
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft), str(policy_dir)).eval()
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        with torch.no_grad():
            theirs = reference(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
            ours = model.policy_forward(ids, mask).logits
        keep = mask.bool()
        assert (ours[keep] - theirs[keep]).abs().max().item() <= 1e-5


def test_clear_errors(sft, reward_dir, tmp_path):
    nameless = AutoModelForCausalLMWithValueHead.from_pretrained(sft, peft_config=lora_config())
    policy_dir = nameless.save_policy(tmp_path / "nameless")
    config = json.loads((policy_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == sft
    config["base_model_name_or_path"] = None
    (policy_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not name its base model"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(policy_dir))
    with pytest.raises(ValueError, match="peft_config"):
        AutoModelForCausalLMWithValueHead.from_pretrained(sft, reward_adapter=reward_dir)
    with pytest.raises(ValueError, match="choose one"):
        AutoModelForCausalLMWithValueHead.from_pretrained(sft, peft_config=lora_config(), load_in_8bit=True,
                                                          load_in_4bit=True)
    with pytest.raises(ValueError, match="not both"):
        AutoModelForCausalLMWithValueHead.from_pretrained(sft, peft_config=lora_config(), load_in_8bit=True,
                                                          quantization_config=object())
