"""Evaluation: checkpoints under any allocation (`models`), token sequences (`sequences`), perplexity,
retrieval, calibration and ablation scores, KV-cache accounting (`kv_memory`), and the suite
`tools/evaluate.py` runs."""
