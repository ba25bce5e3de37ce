"""Conformance fixtures and checks: marl-exp on every common causal-LM family and tokenizer convention."""
