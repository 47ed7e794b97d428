"""Evaluation helpers: KV-cache accounting (`kv_memory`)."""
