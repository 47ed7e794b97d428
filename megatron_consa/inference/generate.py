"""Token generation from our megatron-core model (ConSA fixed mode) with the hybrid KV cache.

`generate` runs megatron-core's own `GPTModel.forward` on the new tokens only.
While it runs, `kv_cache_attached` puts a cache-reading core attention in each
layer's `core_attention` slot (the layer's `ConsaCoreAttention` gives the
allocation row, window, sinks and softmax scale) and offsets the model's RoPE
by the number of cached tokens, so positions stay absolute. Nothing else of
the model changes, and both are restored afterwards.

One rank (TP1, PP1): load a checkpoint of any layout with
`megatron_consa.conversion.checkpoint_model.one_rank_model`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from megatron_consa.attention import ConsaCoreAttention
from megatron_consa.data.tokenizer import id_list
from megatron_consa.inference.cache import HybridKVCache, LayerKVCache, hybrid_attention
from megatron_consa.inference.sampling import SamplingConfig, next_token


@dataclass
class GenerationResult:
    tokens: Tensor
    """Prompt and generated tokens, ``[b, n + new]``."""
    cache: HybridKVCache
    """The cache after the last step (it holds every token but the last generated one)."""
    prompt_length: int
    """n: the prompt's tokens at the start of `tokens`."""
    logits: Optional[Tensor] = None
    """With `generate(..., return_logits=True)`: the logits each generated token was chosen from,
    ``[b, new, vocab]`` (float32); None otherwise (they would outgrow the all-FA KV cache: 4 bytes per
    vocabulary entry per token)."""

    @property
    def new_tokens(self) -> Tensor:
        return self.tokens[:, self.prompt_length :]


class CachedCoreAttention(torch.nn.Module):
    """Stands in a layer's `core_attention` slot while generating: stores the new tokens'
    keys and values in the layer's cache and attends over it."""

    def __init__(self, core: ConsaCoreAttention, cache: LayerKVCache):
        super().__init__()
        self.core, self.cache = core, cache

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("generation with the hybrid KV cache supports no attention bias or packed sequences")
        sq, b = query.size(0), query.size(1)
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        view = self.cache.append(k, v)
        out = hybrid_attention(
            q, view, self.cache.fa_row, window=self.cache.window, sink_tokens=self.cache.sink_tokens,
            scale=self.core.softmax_scale,
        )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def _fixed_cores(model: torch.nn.Module) -> list[ConsaCoreAttention]:
    config = model.config
    if config.tensor_model_parallel_size != 1 or config.pipeline_model_parallel_size != 1:
        raise ValueError(
            "generation runs on one rank: build the model at TP1/PP1 (one_rank_model loads a checkpoint of any layout)"
        )
    cores = sorted((m for m in model.modules() if isinstance(m, ConsaCoreAttention)), key=lambda m: m.layer_index)
    if not cores:
        raise ValueError("the model has no ConsaCoreAttention layers (build it with megatron_consa.model.build_gpt_model)")
    if any(core.log_alpha is not None for core in cores):
        raise ValueError(
            "generation needs a fixed allocation: the model is in learning mode (gates); build it with "
            "ConsaConfig(allocation=...) (finalize the gates first, tools/finalize_allocation.py)"
        )
    return cores


def cache_for_model(model: torch.nn.Module, *, max_length: Optional[int] = None) -> HybridKVCache:
    """An empty hybrid cache for a fixed-mode model: each layer's allocation row, window and sinks."""
    return HybridKVCache(
        LayerKVCache(core.fa_local, window=core.consa.window, sink_tokens=core.consa.sink_tokens, max_length=max_length)
        for core in _fixed_cores(model)
    )


@contextlib.contextmanager
def kv_cache_attached(model: torch.nn.Module, cache: HybridKVCache) -> Iterator[HybridKVCache]:
    """Run `model`'s forward over `cache`: feed it the next tokens only (see the module docstring)."""
    cores = _fixed_cores(model)
    if len(cores) != len(cache.layers) or any(
        tuple(int(f) for f in core.fa_local) != layer.fa_row
        or (core.consa.window, core.consa.sink_tokens) != (layer.window, layer.sink_tokens)
        for core, layer in zip(cores, cache.layers)
    ):
        raise ValueError("the cache was made for another allocation; build it with cache_for_model(model)")
    slots = [(layer.self_attention, layer.self_attention.core_attention) for layer in model.decoder.layers]
    rotary = model.rotary_pos_emb
    try:
        for (attention, core), layer_cache in zip(slots, cache.layers):
            attention.core_attention = CachedCoreAttention(core, layer_cache)
        # GPTModel asks for the RoPE of `seq_len` positions from 0; from the cache's length instead.
        rotary.forward = functools.partial(_offset_rope, rotary, cache)
        yield cache
    finally:
        for attention, core in slots:
            attention.core_attention = core
        rotary.__dict__.pop("forward", None)


def _offset_rope(rotary: torch.nn.Module, cache: HybridKVCache, max_seq_len: int, offset: int = 0, **kwargs) -> Tensor:
    return type(rotary).forward(rotary, max_seq_len, offset + cache.seq_length, **kwargs)


@contextlib.contextmanager
def _last_position_logits(model: torch.nn.Module) -> Iterator[None]:
    """While inside, the model computes the logits of each sequence's last position only (``[b, 1, vocab]``):
    its output layer gets the last hidden state (megatron-core's ``[s, b, h]``), not a prompt's worth of
    vocabulary-wide rows (a 32k-token prompt at a 152k vocabulary: 19.9 GB of float32 logits)."""

    def last_only(module, args, kwargs):
        return (args[0][-1:], *args[1:]), kwargs

    handle = model.output_layer.register_forward_pre_hook(last_only, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _forward(model: torch.nn.Module, tokens: Tensor, start: int) -> Tensor:
    """Logits ``[b, m, vocab]`` of tokens at positions ``start ..`` (the model reads the rest from the cache);
    under `_last_position_logits`, ``[b, 1, vocab]``: the last position's."""
    positions = torch.arange(start, start + tokens.size(1), device=tokens.device).expand_as(tokens)
    return model(tokens, positions, attention_mask=None)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: Tensor,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    prefill_chunk: Optional[int] = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
    return_logits: bool = False,
) -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt` (``[b, n]`` token ids) with the hybrid KV cache.

    The prompt is prefilled in chunks of `prefill_chunk` tokens (all at once when
    None); each new token is one forward of one token. Sampling draws from a
    generator seeded with `sampling.seed`. A sequence that emits an `eos_token_id` (one id, or
    several as in a generation config) continues with the first in the vocabulary; generation stops when every
    sequence has. With `return_logits`, the result keeps the logits each new token was chosen from.
    """
    if prompt.dim() != 2 or prompt.size(1) < 1:
        raise ValueError(f"prompt must be [batch, tokens] with at least one token, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 1 (or None: the whole prompt at once)")
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompt, max_new_tokens, sampling, prefill_chunk, eos_token_id, return_logits)
    finally:
        model.train(was_training)  # a generation mid-training (samples at an eval step) leaves it as it was


def _generate(model, prompt, max_new_tokens, sampling, prefill_chunk, eos_token_id, return_logits) -> GenerationResult:
    n = prompt.size(1)
    cache = cache_for_model(model, max_length=n + max_new_tokens)
    generator = sampling.generator(prompt.device)
    tokens, step_logits = prompt, []
    done = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
    # (an id outside the vocabulary is never emitted, and would break a finished row's next input)
    eos_ids = [i for i in id_list(eos_token_id) if 0 <= i < model.vocab_size]
    eos = torch.tensor(eos_ids, dtype=prompt.dtype, device=prompt.device)
    with kv_cache_attached(model, cache), _last_position_logits(model):
        chunk = prefill_chunk or n
        for start in range(0, n, chunk):
            logits = _forward(model, prompt[:, start : start + chunk], start)
        for step in range(max_new_tokens):
            last = logits[:, -1].float()
            token = next_token(last, sampling, generator)
            if eos.numel():
                token = torch.where(done, eos[0], token)
                done |= torch.isin(token, eos)
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            if return_logits:
                step_logits.append(last)
            if step + 1 == max_new_tokens or bool(done.all()):
                break
            logits = _forward(model, token[:, None], tokens.size(1) - 1)
    return GenerationResult(tokens=tokens, cache=cache, prompt_length=n,
                            logits=torch.stack(step_logits, dim=1) if return_logits else None)


__all__ = ["CachedCoreAttention", "GenerationResult", "cache_for_model", "generate", "kv_cache_attached"]
