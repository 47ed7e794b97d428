"""ConSA GPTModel vs independent references, fp32 on the CPU.

* all units FA  == megatron-core's stock local-spec GPTModel (same weights)
* all units SWA == the stock model with `window_size=(W-1, 0)`
* both          == Hugging Face transformers' own Qwen3 forward (tiny random
  config, weights copied over; `sliding_window=W` on every layer for SWA),
  which pins the window convention.
"""

from __future__ import annotations

import pytest
import torch

import megatron_consa  # noqa: F401  (makes megatron.core importable without triton)

import transformers  # noqa: E402  a required dependency: a broken install fails here, never skips

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_consa.config import ConsaConfig  # noqa: E402
from megatron_consa.conversion.keymap import hf_to_mcore  # noqa: E402
from megatron_consa.model import ArchitectureConfig, build_gpt_model, build_transformer_config  # noqa: E402

WINDOW = 5
SEQ = 24
L, G = 2, 2


def _hf_config(sliding: bool):
    kw = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=G,
        head_dim=16,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    if sliding:
        kw.update(sliding_window=WINDOW, use_sliding_window=True, max_window_layers=0)
    cfg = transformers.Qwen3Config(**kw)
    if sliding:
        cfg.layer_types = ["sliding_attention"] * L
    cfg._attn_implementation = "eager"
    return cfg


@pytest.fixture(scope="module")
def hf_pair():
    torch.manual_seed(0)
    full = transformers.Qwen3ForCausalLM(_hf_config(False)).eval()
    # Non-trivial norm weights so QK-norm and RMSNorm are exercised.
    with torch.no_grad():
        for name, p in full.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    swa = transformers.Qwen3ForCausalLM(_hf_config(True)).eval()
    swa.load_state_dict(full.state_dict())
    arch = ArchitectureConfig.from_hf(full.config)
    return full, swa, arch


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (2, SEQ), generator=g)


def _stock_model(arch: ArchitectureConfig, window_size=None) -> GPTModel:
    cfg = TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        window_size=window_size,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        share_embeddings_and_output_weights=False,
    )


def _consa_model(arch: ArchitectureConfig, consa: ConsaConfig) -> GPTModel:
    cfg = build_transformer_config(arch, consa)
    return build_gpt_model(cfg, arch, use_transformer_engine=False)


def _load(model: GPTModel, hf_model) -> GPTModel:
    sd = hf_to_mcore(hf_model.state_dict(), ArchitectureConfig.from_hf(hf_model.config))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # only ConSA gates and megatron's extra-state entries may be absent from HF
    assert not unexpected, unexpected
    assert all(k.endswith("log_alpha") or "_extra_state" in k or k == "output_layer.weight" for k in missing), missing
    return model.eval()


def _logits(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, attention_mask=None)  # [b, s, v]


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(tokens).logits


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _all(value: int) -> list[list[int]]:
    return [[value] * G for _ in range(L)]


@pytest.mark.usefixtures("single_rank_mcore")
class TestAgainstReferences:
    def test_all_fa_matches_stock_and_hf(self, hf_pair, tokens):
        full, _, arch = hf_pair
        stock = _load(_stock_model(arch), full)
        ref = _logits(stock, tokens)
        fixed = _load(_consa_model(arch, ConsaConfig(window=WINDOW, allocation=_all(1))), full)
        learning = _load(_consa_model(arch, ConsaConfig(window=WINDOW, init_log_alpha=3.0)), full)
        assert _rel(_logits(fixed, tokens), ref) < 1e-6
        assert _rel(_logits(learning, tokens), ref) < 1e-6  # eval z = 1 at log_alpha = 3
        assert _rel(_logits(fixed, tokens), _hf_logits(full, tokens)) < 1e-5

    def test_all_swa_matches_stock_window_and_hf(self, hf_pair, tokens):
        full, swa, arch = hf_pair
        stock = _load(_stock_model(arch, window_size=(WINDOW - 1, 0)), full)
        ref = _logits(stock, tokens)
        fixed = _load(_consa_model(arch, ConsaConfig(window=WINDOW, allocation=_all(0))), full)
        learning = _load(_consa_model(arch, ConsaConfig(window=WINDOW, init_log_alpha=-3.0)), full)
        assert _rel(_logits(fixed, tokens), ref) < 1e-6
        assert _rel(_logits(learning, tokens), ref) < 1e-6  # eval z = 0 at log_alpha = -3
        hf = _hf_logits(swa, tokens)
        assert _rel(_logits(fixed, tokens), hf) < 1e-5
        # the window really matters at this length: SWA differs from FA
        assert _rel(hf, _hf_logits(full, tokens)) > 1e-3

    @pytest.mark.parametrize("window_size", [None, (WINDOW - 1, 0)])
    def test_library_stock_builder_is_megatron_core_own_model(self, hf_pair, tokens, window_size):
        """`build_gpt_model(stock_attention=True)` (the benchmarks' and GPU tests' baseline) is
        megatron-core's local-spec model with its own attention: no ConSA module, and the
        logits of this file's stock model, full and windowed."""
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        from megatron_consa.attention import ConsaCoreAttention

        full, _, arch = hf_pair
        cfg = build_transformer_config(arch, ConsaConfig(), window_size=window_size)
        built = _load(build_gpt_model(cfg, arch, stock_attention=True), full)
        kinds = {type(layer.self_attention.core_attention) for layer in built.decoder.layers}
        assert kinds == {DotProductAttention} and not any(isinstance(m, ConsaCoreAttention) for m in built.modules())
        assert _rel(_logits(built, tokens), _logits(_load(_stock_model(arch, window_size=window_size), full), tokens)) < 1e-6


@pytest.mark.usefixtures("single_rank_mcore")
@pytest.mark.parametrize("stock", [False, True])
def test_transformer_engine_spec_without_transformer_engine_is_a_config_error(hf_pair, stock):
    from megatron_consa.backends.select import transformer_engine_available
    from megatron_consa.config import ConsaConfigError

    if transformer_engine_available():
        pytest.skip("Transformer Engine is installed here: the TE spec builds")
    arch = hf_pair[2]
    with pytest.raises(ConsaConfigError, match="use_transformer_engine=True needs CUDA"):
        build_gpt_model(build_transformer_config(arch, ConsaConfig()), arch, use_transformer_engine=True,
                        stock_attention=stock)


def _hf_family(kind: str):
    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=G, rms_norm_eps=1e-6, max_position_embeddings=64, attention_dropout=0.0,
    )
    if kind == "llama_tied":
        cfg = transformers.LlamaConfig(rope_theta=50000.0, tie_word_embeddings=True, **common)
        model_cls = transformers.LlamaForCausalLM
    elif kind == "qwen2_bias":
        cfg = transformers.Qwen2Config(rope_theta=20000.0, tie_word_embeddings=False, **common)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.MistralConfig(rope_theta=10000.0, tie_word_embeddings=False, sliding_window=None, **common)
        model_cls = transformers.MistralForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(2)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))  # make biases and norms non-trivial
    return model


@pytest.mark.usefixtures("single_rank_mcore")
@pytest.mark.parametrize("kind", ["llama_tied", "qwen2_bias", "mistral"])
def test_other_families_match_hf(kind, tokens):
    """RoPE theta, tied embeddings, QKV bias and no QK-norm, against transformers' own forward."""
    hf = _hf_family(kind)
    arch = ArchitectureConfig.from_hf(hf.config)
    assert arch.qk_norm is False
    assert arch.tie_word_embeddings == (kind == "llama_tied") and arch.qkv_bias == (kind == "qwen2_bias")
    model = _load(_consa_model(arch, ConsaConfig(window=WINDOW, allocation=[[1, 0]] * L)), hf)
    ours = _logits(model, tokens)
    # reference: HF with per-head masks is not expressible, so compare the all-FA model to HF
    full = _load(_consa_model(arch, ConsaConfig(window=WINDOW, allocation=_all(1))), hf)
    assert _rel(_logits(full, tokens), _hf_logits(hf, tokens)) < 1e-5
    assert _rel(ours, _logits(full, tokens)) > 1e-4  # the SWA head changes the result
