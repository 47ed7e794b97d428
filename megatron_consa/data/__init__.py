"""Data for training: tokenizers, JSONL -> megatron-core indexed datasets, GPT sample sources."""
