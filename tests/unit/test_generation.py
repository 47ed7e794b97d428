"""The hybrid KV cache and generation with it, against references that do not use it.

* the cache's attention, chunk by chunk, equals dense masked attention over the whole
  history (`tests/attention_reference.py`, written apart from the library) and its size is the
  kv_memory formula;
* our megatron-core model generates with the cache the same tokens (greedy and
  sampled) as recomputing the whole prefix every step with the training kernels;
* transformers' `generate` with `HybridCache` and the consa attention gives the same
  tokens as `generate(use_cache=False)` and as transformers' own DynamicCache, for
  Qwen3, Qwen2, Llama and Mistral configs;
* tools/generate.py prints the same text from our checkpoint and from its export.

Prompts are longer than the window (W=5) so the ring evicts, and the allocation
mixes an all-FA layer, two mixed layers and an all-SWA layer, with sinks and without.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

import transformers  # noqa: E402  a required dependency: a broken install fails here, never skips

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conversion_fixtures import G, L, VOCAB  # noqa: E402

from megatron_consa.allocation import Allocation  # noqa: E402
from attention_reference import reference_attention, visible_mask  # noqa: E402  written apart from the library
from megatron_consa.cli import run_tool  # noqa: E402
from megatron_consa.evaluation.kv_memory import KvCacheShape, allocation_bytes  # noqa: E402
from megatron_consa.inference.cache import HybridKVCache, LayerKVCache, hybrid_attention  # noqa: E402
from megatron_consa.inference.sampling import SamplingConfig, next_token  # noqa: E402

W = 5
MIXED = [[1, 1], [1, 0], [0, 0], [0, 1]]  # all-FA layer, two mixed layers, all-SWA layer
PROMPT_LEN, NEW = 12, 10
SAMPLED = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, seed=11)


def _allocation(sinks: int, fa=MIXED) -> Allocation:
    return Allocation(
        granularity="kv_head", num_layers=L, num_kv_heads=G, window=W, sink_tokens=sinks, target_sparsity=None, fa=fa,
    ).validate()


def _formula_bytes(fa_heads: int, swa_heads: int, n: int, sinks: int, *, batch: int, head_dim: int, nbytes: int) -> int:
    return 2 * batch * head_dim * nbytes * (fa_heads * n + swa_heads * min(n, W + sinks))


def _prompt(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(5))


# --------------------------------------------------------------------------- the cache itself


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize(
    "chunks",
    [[1] * 17, [9, 1, 1, 3, 1, 2], [2, 2, 2, 2, 2, 2, 2, 2], [6, 11]],
    ids=["token-by-token", "prefill-decode-chunk", "small-chunks", "chunk-longer-than-window"],
)
def test_cache_attention_equals_dense_masked_reference(sinks, chunks):
    b, rep, d, row = 2, 2, 8, [1, 0, 0]  # GQA 2, one FA and two SWA KV heads
    n = sum(chunks)
    gen = torch.Generator().manual_seed(sum(chunks) + sinks)
    q = torch.randn(b, len(row) * rep, n, d, generator=gen)
    k, v = (torch.randn(b, len(row), n, d, generator=gen) for _ in range(2))
    masks = {1: visible_mask(n, n, 0), 0: visible_mask(n, W, sinks)}  # FA: causal
    mask = torch.stack([masks[row[h // rep]] for h in range(q.size(1))])[None]
    reference = reference_attention(q, k, v, mask, 0.3).to(q.dtype)

    cache = LayerKVCache(row, window=W, sink_tokens=sinks)
    pos, outs = 0, []
    for m in chunks:
        view = cache.append(k[:, :, pos : pos + m], v[:, :, pos : pos + m])
        outs.append(hybrid_attention(q[:, :, pos : pos + m], view, row, window=W, sink_tokens=sinks, scale=0.3))
        pos += m
        assert cache.entries == 1 * pos + 2 * min(pos, W + sinks)
        assert cache.buffers["swa_k"].size(2) <= W + sinks  # the SWA heads never hold more than the window + sinks
    torch.testing.assert_close(torch.cat(outs, dim=2), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sinks", [0, 2])
def test_cache_bytes_equal_the_kv_memory_formula(sinks):
    allocation = _allocation(sinks)
    b, d, n = 3, 4, 23
    cache = HybridKVCache.from_allocation(allocation, max_length=n)
    gen = torch.Generator().manual_seed(0)
    fa_heads = sum(map(sum, MIXED))
    for step, m in enumerate([7, 1, 1, 6, 1, 1, 1, 5]):
        for layer in cache.layers:
            layer.append(*(torch.randn(b, G, m, d, generator=gen) for _ in range(2)))
        seen = cache.seq_length
        expected = _formula_bytes(fa_heads, L * G - fa_heads, seen, sinks, batch=b, head_dim=d, nbytes=4)
        shape = KvCacheShape(num_layers=L, num_kv_heads=G, head_dim=d, context_length=seen, batch_size=b, bytes_per_element=4)
        assert cache.held_bytes == expected == allocation_bytes(shape, allocation), step
    assert seen == n and cache.nbytes == cache.held_bytes  # allocated exactly: max_length was the final length


def test_cache_without_max_length_keeps_swa_heads_bounded():
    layer = LayerKVCache([0, 1], window=W, sink_tokens=1)
    for _ in range(40):
        layer.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert layer.buffers["swa_k"].shape == (1, 1, W + 1, 4) and layer.buffers["fa_k"].size(2) >= 40
    assert layer.entries == 40 + (W + 1)


def test_cache_refuses_keys_of_another_shape():
    layer = LayerKVCache([1, 0], window=W)
    with pytest.raises(ValueError, match=r"expected keys and values \[b, 2, m, d\]"):
        layer.append(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))


def test_sampling_config_refuses_bad_values():
    for kw, message in [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p")]:
        with pytest.raises(ValueError, match=message):
            SamplingConfig(**kw)
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    assert next_token(logits, SamplingConfig(), None).item() == 1
    picks = {next_token(logits, SamplingConfig(temperature=1.0, top_k=2, seed=s), SamplingConfig(seed=s, temperature=1.0).generator(torch.device("cpu"))).item() for s in range(30)}
    assert picks == {1, 3}  # top-k 2 keeps exactly the two best
    # a temperature far below float32's range samples the argmax (in float32 it gave inf / nan)
    wide = torch.tensor([[0.0, 5.0, 1.0, 4.9], [2.0, -1.0, 3.0, 2.9], [100.0, 90.0, 0.0, -float("inf")]])
    for t in (1e-20, 1e-40, 1e-300):
        sampled = next_token(wide, SamplingConfig(temperature=t), SamplingConfig(temperature=t).generator(torch.device("cpu")))
        assert sampled.tolist() == [1, 2, 0], t


# --------------------------------------------------------------------------- our megatron-core model


def _megatron_model(allocation: Allocation, weights=None):
    from megatron_consa.conversion.checkpoint_model import fixed_consa_config
    from megatron_consa.model import ArchitectureConfig, build_gpt_model, build_transformer_config

    arch = ArchitectureConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=L, num_attention_heads=4, num_kv_heads=G,
        head_dim=16, qk_norm=True, rope_theta=10000.0, max_position_embeddings=64,
    )
    model = build_gpt_model(build_transformer_config(arch, fixed_consa_config(arch, allocation)), arch).eval()
    if weights is None:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():  # larger than megatron's init, so attention matters
                scale = 1.0 if "embedding" in name else 0.15
                noise = torch.randn(p.shape, generator=gen) * scale
                p.copy_(1.0 + 0.1 * noise if name.endswith("layer_norm_weight") or "layernorm" in name else noise)
    else:
        model.load_state_dict(weights, strict=False)
    return model


def _recompute(model, prompt, sampling: SamplingConfig):
    """Reference: the whole prefix through the model every step (the training kernels, no cache)."""
    tokens, generator, logits = prompt, sampling.generator(prompt.device), []
    with torch.no_grad():
        for _ in range(NEW):
            positions = torch.arange(tokens.size(1)).expand_as(tokens)
            last = model(tokens, positions, attention_mask=None)[:, -1].float()
            logits.append(last)
            tokens = torch.cat([tokens, next_token(last, sampling, generator)[:, None]], dim=1)
    return tokens, torch.stack(logits, dim=1)


@pytest.mark.parametrize("sinks", [0, 2])
def test_megatron_generation_with_the_cache_equals_recomputing_the_prefix(single_rank_mcore, sinks):
    from megatron_consa.inference.generate import generate

    model = _megatron_model(_allocation(sinks))
    prompt = _prompt()
    for sampling in (SamplingConfig(), SAMPLED):
        ref_tokens, ref_logits = _recompute(model, prompt, sampling)
        for chunk in (None, 5):
            model.train(chunk is None)  # generating leaves the model in the mode it was in
            result = generate(model, prompt, max_new_tokens=NEW, sampling=sampling, prefill_chunk=chunk,
                              return_logits=True)
            assert model.training == (chunk is None)
            model.eval()
            assert torch.equal(result.tokens, ref_tokens), (sampling, chunk)
            torch.testing.assert_close(result.logits, ref_logits, rtol=1e-5, atol=1e-5)
        if sampling.greedy:
            greedy_logits = ref_logits
    fa_heads = sum(map(sum, MIXED))
    n = PROMPT_LEN + NEW - 1  # the last token is never fed back
    assert result.cache.held_bytes == _formula_bytes(fa_heads, L * G - fa_heads, n, sinks, batch=2, head_dim=16, nbytes=4)
    # the window matters at this length: the same weights with every head FA give other logits
    all_fa = _megatron_model(None, weights=model.state_dict())
    assert (_recompute(all_fa, prompt, SamplingConfig())[1] - greedy_logits).abs().max() > 1e-2


def test_megatron_generation_computes_the_last_positions_logits_only(single_rank_mcore):
    """The output layer sees one position per forward, the prefill's included (a long prompt's vocabulary-wide
    logits are never made), and the logits are kept only when asked for: the same tokens either way."""
    from megatron_consa.inference.generate import generate

    model = _megatron_model(_allocation(0))
    prompt = _prompt()
    positions_seen = []
    handle = model.output_layer.register_forward_hook(lambda m, args, out: positions_seen.append(args[0].size(0)))
    try:
        plain = generate(model, prompt, max_new_tokens=NEW, sampling=SAMPLED)
    finally:
        handle.remove()
    assert positions_seen == [1] * NEW  # the prefill, then one forward per new token but the last
    kept = generate(model, prompt, max_new_tokens=NEW, sampling=SAMPLED, return_logits=True)
    assert plain.logits is None and kept.logits.shape == (prompt.size(0), NEW, VOCAB)
    assert torch.equal(plain.tokens, kept.tokens) and torch.equal(plain.new_tokens, kept.tokens[:, PROMPT_LEN:])
    assert plain.new_tokens.shape == (prompt.size(0), NEW)
    assert model(prompt, torch.arange(PROMPT_LEN)[None], attention_mask=None).size(1) == PROMPT_LEN  # hook removed


def test_megatron_generation_stops_each_sequence_at_its_eos(single_rank_mcore):
    """A sequence that emits an EOS continues with the first EOS in the vocabulary while the others go on as
    without EOS; an id outside the vocabulary (a generation config's) is never emitted and never fed back."""
    from megatron_consa.inference.generate import generate

    model = _megatron_model(_allocation(0))
    prompt = _prompt()
    free = generate(model, prompt, max_new_tokens=NEW).new_tokens
    stop = int(free[0, 1])
    result = generate(model, prompt, max_new_tokens=NEW, eos_token_id=[VOCAB + 5, stop]).new_tokens
    for row in range(prompt.size(0)):
        hits = (free[row] == stop).nonzero()
        end = int(hits[0]) + 1 if len(hits) else NEW
        assert torch.equal(result[row, :end], free[row, :end]), row
        assert (result[row, end:] == stop).all(), row
    assert result.size(1) == max(int((r == stop).nonzero()[0]) + 1 if (r == stop).any() else NEW for r in free)


def test_megatron_generation_refuses_a_learning_mode_model(single_rank_mcore):
    from megatron_consa.config import ConsaConfig
    from megatron_consa.inference.generate import generate
    from megatron_consa.model import ArchitectureConfig, build_gpt_model, build_transformer_config

    arch = ArchitectureConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_layers=2, num_attention_heads=2, num_kv_heads=2)
    model = build_gpt_model(build_transformer_config(arch, ConsaConfig(window=W, backend="torch")), arch)
    with pytest.raises(ValueError, match="needs a fixed allocation"):
        generate(model, _prompt(1), max_new_tokens=2)


# --------------------------------------------------------------------------- transformers


def _hf_model(family: str, allocation: Allocation | None):
    from megatron_consa.architecture import ArchitectureConfig
    from megatron_consa.conversion.windows import CONSA_ATTENTION, hf_window_fields, set_window_fields

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=G, head_dim=16, max_position_embeddings=64, rope_theta=10000.0,
    )
    config = transformers.AutoConfig.for_model(family, **common)
    set_window_fields(config, hf_window_fields(allocation, ArchitectureConfig.from_hf(config, allow_sliding_window=True)))
    config._attn_implementation = CONSA_ATTENTION
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # attention that depends on the keys it sees
    return model


def _hf_generate(model, prompt, sampling: SamplingConfig, **kw):
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=not sampling.greedy, pad_token_id=0)
    kwargs["attention_mask"] = kw.pop("attention_mask", torch.ones_like(prompt))  # token 0 is no padding here
    if not sampling.greedy:
        kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        torch.manual_seed(sampling.seed)
    with torch.no_grad():
        return model.generate(prompt, **kwargs, **kw)


@pytest.mark.parametrize("family,sinks", [("qwen3", 2), ("qwen3", 0), ("qwen2", 1), ("llama", 2), ("mistral", 0)])
def test_hf_generate_with_hybrid_cache_equals_recomputing_the_prefix(family, sinks):
    from megatron_consa.inference.hf import HybridCache

    model = _hf_model(family, _allocation(sinks))
    prompt = _prompt()
    for sampling in (SamplingConfig(), SAMPLED) if family == "qwen3" else (SamplingConfig(),):
        cache = HybridCache.for_model(model)
        hybrid = _hf_generate(model, prompt, sampling, past_key_values=cache)
        assert torch.equal(hybrid, _hf_generate(model, prompt, sampling, use_cache=False)), sampling
        assert torch.equal(hybrid, _hf_generate(model, prompt, sampling)), sampling  # transformers' DynamicCache
        n = PROMPT_LEN + NEW - 1
        fa_heads = sum(map(sum, MIXED))
        assert cache.held_bytes == _formula_bytes(fa_heads, L * G - fa_heads, n, sinks, batch=2, head_dim=16, nbytes=4)
    all_fa = _hf_model(family, None)
    all_fa.load_state_dict(model.state_dict())
    assert not torch.equal(_hf_generate(all_fa, prompt, SamplingConfig()), hybrid)  # the window changes the tokens


def test_hf_stock_layer_wise_config_generates_alike_with_every_cache():
    """A layer-wise allocation exports as stock fields; transformers' default cache then keeps
    only the window's keys for the sliding layers: the consa attention reads them as such."""
    from megatron_consa.inference.hf import HybridCache

    layer_wise = [[0, 0], [1, 1], [0, 0], [1, 1]]
    model = _hf_model("qwen3", _allocation(0, fa=layer_wise))
    assert model.config.layer_types[0] == "sliding_attention"  # the stock fields, no consa field
    prompt = _prompt()
    reference = _hf_generate(model, prompt, SamplingConfig(), use_cache=False)
    assert torch.equal(_hf_generate(model, prompt, SamplingConfig()), reference)  # DynamicCache, sliding layers
    assert torch.equal(_hf_generate(model, prompt, SamplingConfig(), past_key_values=HybridCache.for_model(model)),
                       reference)


def test_hf_beam_search_reorders_the_hybrid_cache():
    from megatron_consa.inference.hf import HybridCache

    model = _hf_model("qwen3", _allocation(2))
    prompt = _prompt()
    beams = _hf_generate(model, prompt, SamplingConfig(), num_beams=3, past_key_values=HybridCache.for_model(model))
    assert torch.equal(beams, _hf_generate(model, prompt, SamplingConfig(), num_beams=3, use_cache=False))


def test_hf_cache_and_attention_refuse_what_they_cannot_run():
    from megatron_consa.inference.hf import HybridCache

    model = _hf_model("qwen3", _allocation(0))
    prompt = _prompt()
    padded = torch.ones_like(prompt)
    padded[0, :3] = 0
    with pytest.raises(NotImplementedError, match="padded batches"):
        _hf_generate(model, prompt, SamplingConfig(), attention_mask=padded)
    with pytest.raises(NotImplementedError, match="a static cache"):  # a zero-filled buffer
        _hf_generate(model, prompt, SamplingConfig(), cache_implementation="static")
    stock = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16), attn_implementation="sdpa")
    with pytest.raises(ValueError, match='attn_implementation="consa"'):
        HybridCache.for_model(stock)


# --------------------------------------------------------------------------- tools/generate.py


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save_word_tokenizer(directory: Path, eos: str | None = None, bos: str | None = None) -> None:
    """A word-level tokenizer over the tiny vocabulary: 'w0' .. 'w95', split on spaces (with
    `bos`: one that puts it first, as Llama's does, when special tokens are added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token=eos,
                                         bos_token=bos).save_pretrained(directory)


@pytest.fixture(scope="module")
def generation_dirs(tmp_path_factory):
    """A Qwen3 HF checkpoint with a tokenizer, imported, and exported again with a head-wise allocation."""
    from conversion_fixtures import save_hf

    root = tmp_path_factory.mktemp("generate-cli")
    hf_dir = save_hf("qwen3", root / "hf")
    _save_word_tokenizer(hf_dir)
    ckpt, export, allocation = root / "ckpt", root / "export", root / "allocation.json"
    assert run_tool(_tool("convert_hf_to_megatron").main, ["--hf-path", str(hf_dir), "--save", str(ckpt), "--dtype", "fp32"]) == 0
    _allocation(2).save(allocation)
    argv = ["--load", str(ckpt), "--save", str(export), "--allocation", str(allocation)]
    assert run_tool(_tool("convert_megatron_to_hf").main, argv) == 0
    return ckpt, export, allocation


def test_generate_cli_prints_the_same_text_from_the_checkpoint_and_its_export(generation_dirs, capsys):
    ckpt, export, allocation = generation_dirs
    tool = _tool("generate")
    prompt = " ".join(f"w{i}" for i in _prompt(1)[0].tolist())
    texts = []
    for source in (["--load", str(ckpt), "--allocation", str(allocation)], ["--hf-path", str(export)]):
        assert run_tool(tool.main, [*source, "--prompt", prompt, "--max-new-tokens", str(NEW), "--kv-report"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        texts.append(out[0])
        assert out[1].startswith(f"KV cache after {PROMPT_LEN + NEW - 1} tokens")
    assert texts[0] == texts[1] and len(texts[0].split()) == NEW, texts


def test_a_temperature_below_float32s_range_decodes_greedily_on_both_back_ends(generation_dirs, capsys):
    """--temperature 1e-40 (transformers' float32 division would give inf, then NaN probabilities) prints the
    greedy text from the export as from the checkpoint; sampling leaves the caller's global generator as it was."""
    ckpt, export, allocation = generation_dirs
    tool = _tool("generate")
    prompt = " ".join(f"w{i}" for i in _prompt(1)[0].tolist())
    texts = []
    for source, temperature in ((["--hf-path", str(export)], []), (["--hf-path", str(export)], ["--temperature", "1e-40"]),
                                (["--load", str(ckpt), "--allocation", str(allocation)], ["--temperature", "1e-40"])):
        state = torch.random.get_rng_state()
        assert run_tool(tool.main, [*source, "--prompt", prompt, "--max-new-tokens", str(NEW), *temperature]) == 0
        assert torch.equal(torch.random.get_rng_state(), state), source
        texts.append(capsys.readouterr().out.strip().splitlines()[0])
    assert texts[0] == texts[1] == texts[2], texts
    state = torch.random.get_rng_state()  # sampled through transformers, seeded by --seed
    assert run_tool(tool.main, ["--hf-path", str(export), "--prompt", prompt, "--max-new-tokens", str(NEW),
                                "--temperature", "0.9", "--seed", "5"]) == 0
    assert torch.equal(torch.random.get_rng_state(), state)


def test_an_export_with_rope_scaling_megatron_core_lacks_still_serves(generation_dirs, tmp_path, capsys):
    """YaRN added to an export's config.json (as Qwen3's model card says, for long contexts): transformers computes
    the RoPE, so the consa attention, HybridCache, generate --hf-path and kv_budget run it with its allocation; the
    import into megatron-core, which has no YaRN, still refuses it by name."""
    import json
    import shutil

    import transformers

    from megatron_consa.inference.hf import HybridCache, config_allocation

    _, export, allocation = generation_dirs
    yarn = tmp_path / "yarn"
    shutil.copytree(export, yarn)
    config = json.loads((yarn / "config.json").read_text())
    config["rope_parameters"] = {**(config.get("rope_parameters") or {}), "rope_type": "yarn", "factor": 2.0,
                                 "original_max_position_embeddings": 32}
    (yarn / "config.json").write_text(json.dumps(config))
    model = transformers.AutoModelForCausalLM.from_pretrained(yarn, dtype=torch.float32)
    assert config_allocation(model.config).fa == Allocation.load(allocation).fa
    with torch.no_grad():
        out = model.generate(_prompt(1), past_key_values=HybridCache.for_model(model, max_length=PROMPT_LEN + 3),
                             max_new_tokens=3, do_sample=False)
    assert out.shape == (1, PROMPT_LEN + 3)
    assert run_tool(_tool("generate").main, ["--hf-path", str(yarn), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]) == 0
    assert run_tool(_tool("kv_budget").main, ["--hf-config", str(yarn), "--context-length", "64"]) == 0
    capsys.readouterr()
    assert run_tool(_tool("convert_hf_to_megatron").main, ["--hf-path", str(yarn), "--save", str(tmp_path / "m")]) == 2
    assert "rope_scaling type 'yarn' is not supported" in capsys.readouterr().err


def test_generate_cli_leaves_a_generation_configs_sampling_and_penalties_out(generation_dirs, tmp_path, capsys):
    """A chat model's generation_config.json also sets sampling and penalties (Qwen2.5-Instruct:
    repetition_penalty 1.05, do_sample, temperature, top_k, top_p). transformers' generate would apply
    them; the CLI's decoding is its flags' on both back ends (greedy here), so the export prints what
    the checkpoint does, as without them."""
    import json
    import shutil

    ckpt, export, allocation = generation_dirs
    tool = _tool("generate")
    prompt = " ".join(f"w{i}" for i in _prompt(1)[0].tolist())
    chat = tmp_path / "export_chat"
    shutil.copytree(export, chat)
    config = json.loads((chat / "generation_config.json").read_text()) if (chat / "generation_config.json").is_file() else {}
    config.update(repetition_penalty=1.3, no_repeat_ngram_size=2, do_sample=True, temperature=0.7, top_k=20, top_p=0.8)
    (chat / "generation_config.json").write_text(json.dumps(config))
    texts = []
    for source in (["--load", str(ckpt), "--allocation", str(allocation)], ["--hf-path", str(chat)]):
        assert run_tool(tool.main, [*source, "--prompt", prompt, "--max-new-tokens", str(NEW)]) == 0
        texts.append(capsys.readouterr().out.strip())
    assert texts[0] == texts[1] and len(texts[0].split()) == NEW, texts
    words = texts[0].split()
    assert any(words[i:i + 2] == words[j:j + 2] for i in range(len(words)) for j in range(i + 1, len(words) - 1)), (
        "the greedy text repeats no pair of words: no_repeat_ngram_size would not have changed it", words)


def test_generate_cli_stops_at_the_tokenizers_eos_on_both_back_ends(generation_dirs, tmp_path, capsys):
    """With a tokenizer whose EOS is a token greedy decoding emits after the first, both back
    ends print the same tokens up to it and stop there."""
    ckpt, export, allocation = generation_dirs
    tool = _tool("generate")
    prompt = " ".join(f"w{i}" for i in _prompt(1)[0].tolist())
    load = ["--load", str(ckpt), "--allocation", str(allocation)]
    assert run_tool(tool.main, [*load, "--prompt", prompt, "--max-new-tokens", str(NEW)]) == 0
    words = capsys.readouterr().out.split()
    stop = next(i for i in range(1, len(words)) if words[i] not in words[:i])  # its first appearance
    _save_word_tokenizer(tmp_path / "tok", eos=words[stop])
    for source in (load, ["--hf-path", str(export)]):
        argv = [*source, "--prompt", prompt, "--max-new-tokens", str(NEW), "--tokenizer", str(tmp_path / "tok")]
        assert run_tool(tool.main, argv) == 0
        assert capsys.readouterr().out.split() == words[:stop + 1], source


def test_generate_cli_stops_at_every_eos_of_the_generation_config(generation_dirs, tmp_path, capsys):
    """A chat model's generation_config.json lists several EOS ids (Llama 3 Instruct's end of turn
    beside its end of text) and transformers stops at each: so do both back ends, from an import
    (which carries the file) and its export; a training run from the import carries the file into
    its checkpoints."""
    import json
    import shutil

    from megatron_consa.conversion.hf_files import generation_eos_ids

    ckpt, _, allocation = generation_dirs
    tool = _tool("generate")
    prompt = " ".join(f"w{i}" for i in _prompt(1)[0].tolist())
    common = ["--prompt", prompt, "--max-new-tokens", str(NEW)]
    assert run_tool(tool.main, ["--load", str(ckpt), "--allocation", str(allocation), *common]) == 0
    words = capsys.readouterr().out.split()
    stop = next(i for i in range(1, len(words)) if words[i] not in words[:i])
    never = next(i for i in range(VOCAB) if f"w{i}" not in words)
    hf_dir = tmp_path / "hf"
    shutil.copytree(ckpt.parent / "hf", hf_dir)
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [never, int(words[stop][1:])]}))
    imported, export = tmp_path / "ckpt", tmp_path / "export"
    assert run_tool(_tool("convert_hf_to_megatron").main, ["--hf-path", str(hf_dir), "--save", str(imported),
                                                          "--dtype", "fp32"]) == 0
    assert generation_eos_ids(imported) == [never, int(words[stop][1:])]
    from types import SimpleNamespace

    from megatron_consa.data.gpt import DataConfig
    from megatron_consa.training.arguments import _arch_from_args
    from megatron_consa.training.run import _checkpoint_extras

    trained = tmp_path / "trained"  # what a run with --hf-config <the import> writes beside each checkpoint's shards
    trained.mkdir()
    run = SimpleNamespace(hf_config=str(imported), arch=_arch_from_args(SimpleNamespace(hf_config=str(imported))),
                          data=DataConfig(data_path=["d"]))
    _checkpoint_extras(run, SimpleNamespace(save_to=lambda d: None))(trained)
    assert generation_eos_ids(trained) == generation_eos_ids(imported)
    argv = ["--load", str(imported), "--save", str(export), "--allocation", str(allocation)]
    assert run_tool(_tool("convert_megatron_to_hf").main, argv) == 0
    for source in (["--load", str(imported), "--allocation", str(allocation)], ["--hf-path", str(export)],
                   ["--hf-path", str(hf_dir)]):
        assert run_tool(tool.main, [*source, *common]) == 0
        assert capsys.readouterr().out.split() == words[:stop + 1], source

    (hf_dir / "generation_config.json").write_text('{"eos_token_id": "w3"}')
    assert run_tool(tool.main, ["--load", str(hf_dir.parent / "ckpt"), "--allocation", str(allocation), *common]) == 0
    capsys.readouterr()  # the import's own copy is untouched
    shutil.copyfile(hf_dir / "generation_config.json", imported / "generation_config.json")
    assert run_tool(tool.main, ["--load", str(imported), "--allocation", str(allocation), *common]) == 2
    err = capsys.readouterr().err
    assert "generation_config.json: expected a JSON object whose eos_token_id is an id or a list of ids" in err


def test_generate_cli_prompts_get_the_bos_a_tokenizer_adds(generation_dirs, tmp_path, capsys):
    """A Llama-style tokenizer puts its BOS first: --prompt is encoded as transformers encodes
    it (BOS included, unlike a dataset's documents), the same as --prompt-ids with the BOS."""
    from megatron_consa.data.tokenizer import HuggingFaceTokenizer

    ckpt, _, allocation = generation_dirs
    _save_word_tokenizer(tmp_path / "tok", bos="w7")
    tok = HuggingFaceTokenizer(tmp_path / "tok")
    assert tok.bos == 7 and tok.encode("w3 w4") == [3, 4] and tok.encode_prompt("w3 w4") == [7, 3, 4]
    tool = _tool("generate")
    load = ["--load", str(ckpt), "--allocation", str(allocation), "--max-new-tokens", "4"]
    assert run_tool(tool.main, [*load, "--prompt", "w3 w4", "--tokenizer", str(tmp_path / "tok")]) == 0
    with_bos = capsys.readouterr().out.split()
    assert run_tool(tool.main, [*load, "--prompt-ids", "7,3,4", "--tokenizer", str(tmp_path / "tok")]) == 0
    assert capsys.readouterr().out.split() == with_bos


def _exit_status(tool, argv) -> int:
    try:
        return run_tool(tool.main, argv)
    except SystemExit as exit:  # argparse's own refusals
        return exit.code


def test_generate_cli_refuses_bad_input(generation_dirs, tmp_path, capsys):
    ckpt, export, _ = generation_dirs
    tool = _tool("generate")
    readme = tmp_path / "README.md"
    readme.write_text("not a tokenizer")
    other = tmp_path / "other.json"  # an allocation of another model (one layer fewer)
    Allocation(granularity="kv_head", num_layers=L - 1, num_kv_heads=G, window=W, sink_tokens=0, target_sparsity=None,
               fa=MIXED[:-1]).validate().save(other)
    from safetensors.torch import load_file, save_file

    damaged_tokenizer = shutil.copytree(export, tmp_path / "damaged")
    (damaged_tokenizer / "tokenizer.json").write_text("{not json")
    short, misshaped = shutil.copytree(export, tmp_path / "short"), shutil.copytree(export, tmp_path / "misshaped")
    key = "model.layers.1.self_attn.k_proj.weight"
    for copy in (short, misshaped):  # (transformers would start the tensor at random, or raise its own error)
        weights = load_file(copy / "model.safetensors")
        if copy == short:
            del weights[key]
        else:
            weights[key] = weights[key][:-1].clone()
        save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    cases = [
        (["--hf-path", str(damaged_tokenizer), "--prompt-ids", "1"],
         f"--hf-path {damaged_tokenizer}: transformers cannot read the tokenizer there (JSONDecodeError"),
        *((["--hf-path", str(copy), "--prompt-ids", "1"], f"--hf-path {copy}: the weights lack or misshape 1 of the "
           f"model's tensors ({key}): export the checkpoint again") for copy in (short, misshaped)),
        (["--load", str(ckpt), "--prompt-ids", "1,2", "--allocation", str(other)],
         f"--allocation {other}: allocation field 'num_layers' is {L - 1}"),
        (["--load", str(ckpt), "--prompt-ids", "1,2", "--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1"),
        (["--load", str(ckpt), "--prompt-ids", "1,2", "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
        (["--load", str(ckpt), "--prompt-ids", "1,2", "--temperature", "-0.5"], "--temperature: must be a finite number >= 0"),
        (["--load", str(ckpt), "--prompt-ids", "1,2", "--seed", str(2**64)], "--seed: must be an integer in 0 .. 2**63 - 1"),
        (["--load", str(ckpt)], "one of the arguments --prompt --prompt-ids is required"),
        (["--load", str(ckpt), "--prompt-ids", "1,x"], "--prompt-ids '1,x': write comma-separated integers"),
        (["--load", str(ckpt), "--prompt-ids", f"1,{VOCAB}"], f"--prompt-ids: token ids [{VOCAB}] are outside the model's vocabulary"),
        (["--hf-path", str(ckpt), "--prompt-ids", "1"], "a megatron-consa checkpoint, not a Hugging Face export: use --load"),
        (["--hf-path", str(tmp_path), "--prompt-ids", "1"], "no model.safetensors"),
        (["--hf-path", str(export), "--prompt-ids", "1", "--allocation", "a.json"], "--allocation and --prefill-chunk go with --load"),
        (["--load", str(tmp_path / "missing"), "--prompt-ids", "1"], "no such directory"),
        (["--load", str(ckpt), "--prompt", "w1", "--tokenizer", str(tmp_path)], f"--tokenizer {tmp_path}: no sentencepiece"),
        (["--load", str(ckpt), "--prompt", "w1", "--tokenizer", str(readme)], f"--tokenizer {readme}: not a sentencepiece model"),
        (["--load", str(ckpt), "--prompt-ids", "1,2", "--top-k", "5"], "--top-k 5 is for sampling: give --temperature > 0"),
        (["--hf-path", str(export), "--prompt-ids", "1", "--top-p", "0.9"], "--top-p 0.9 is for sampling: give --temperature"),
        (["--load", str(ckpt), "--prompt-ids", "1,2", "--seed", "3"], "--seed 3 is for sampling: give --temperature > 0"),
    ]
    for argv, message in cases:
        assert _exit_status(tool, argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
