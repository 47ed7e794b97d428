"""Hugging Face <-> megatron-core weight conversion (pure functions, no I/O)."""
