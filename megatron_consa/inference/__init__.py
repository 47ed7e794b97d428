"""Inference with a hybrid FA/SWA allocation: the hybrid KV cache, generation, and the
`consa` attention implementation for Hugging Face transformers.

* `cache`: the KV cache (FA heads keep every token, SWA heads the window plus the
  sinks) and the attention over it; pure torch.
* `sampling`: greedy / temperature / top-k / top-p choice of the next token.
* `generate`: token generation from our megatron-core model with the cache.
* `hf`: the attention implementation `megatron_consa` registers with transformers
  (`attn_implementation="consa"`) and the cache as a transformers `Cache`;
  `hf_hook` registers it (importing `hf` does too).

`import megatron_consa` imports only `hf_hook` from here: it registers the
consa attention once transformers' modeling code is imported.
"""
