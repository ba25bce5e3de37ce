"""Conformance of the RL loop to real model conventions: model fixtures (``families``), the invariants
(``checks``) and ``marl-exp check-model`` (``cli``)."""

# The checks' names, importable without torch (the CLI validates its arguments before any heavy import).
CHECKS = ("reference_logits", "reward_position", "kl_zero_ratio_one", "sampling_parity", "training")
