"""Conformance of the RL loop to real model conventions: model fixtures (``families``), the invariants
(``checks``) and ``marl-exp check-model`` (``cli``)."""

# The checks' names, importable without torch (the CLI validates its arguments before any heavy import).
CHECKS = ("reference_logits", "reward_position", "kl_zero_ratio_one", "sampling_parity", "training")
SHARING_MODES = ("shared", "separate")  # stage.sharing: where the reference and reward roles come from
# The checks that read the reference or reward role: run once per sharing mode. sampling_parity reads only
# the policy, the same MultiAdapterModel in both modes: it runs once.
ROLE_CHECKS = ("reference_logits", "reward_position", "kl_zero_ratio_one", "training")
