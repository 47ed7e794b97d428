"""ArchitectureConfig.from_hf: what it reads, and what it refuses rather than drop silently."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import transformers  # noqa: E402  a required dependency: a broken install fails here, never skips

from megatron_consa.architecture import ArchitectureConfig, hf_sliding_layers  # noqa: E402
from megatron_consa.config import ConsaConfigError  # noqa: E402
from megatron_consa.conversion.keymap import hf_to_mcore, mcore_to_hf  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def test_qwen3_fields():
    cfg = transformers.Qwen3Config(head_dim=16, rope_theta=5e5, tie_word_embeddings=True, **SMALL)
    arch = ArchitectureConfig.from_hf(cfg)
    assert (arch.qk_norm, arch.qkv_bias, arch.tie_word_embeddings, arch.head_dim) == (True, False, True, 16)
    assert arch.rope_theta == 5e5 and arch.num_kv_heads == 2 and arch.model_type == "qwen3"


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: transformers.LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 32}, **SMALL),
         "rope_scaling"),
        (lambda: transformers.LlamaConfig(attention_bias=True, **SMALL), "attention_bias"),
        (lambda: transformers.Qwen3Config(attention_bias=True, **SMALL), "o_proj bias"),
        (lambda: transformers.LlamaConfig(mlp_bias=True, **SMALL), "mlp_bias"),
        (lambda: transformers.MistralConfig(sliding_window=16, **SMALL), "sliding_window"),
        (lambda: transformers.Qwen3Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, **SMALL),
         r"sliding_window=8 on layers \[1"),
        (lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=8,
                                          layer_types=["sliding_attention"] + ["full_attention"] * (SMALL["num_hidden_layers"] - 1),
                                          **SMALL), r"on layers \[0\]"),
        (lambda: transformers.GPT2Config(), "model_type"),
    ],
)
def test_unsupported_hf_settings_are_refused(make, match):
    with pytest.raises(ConsaConfigError, match=match):
        ArchitectureConfig.from_hf(make())


def test_key_map_round_trip_and_leftover_tensors():
    cfg = transformers.Qwen2Config(**SMALL)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).state_dict()
    arch = ArchitectureConfig.from_hf(cfg)
    back = mcore_to_hf(hf_to_mcore(hf, arch), arch)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    with pytest.raises(ValueError, match="does not use"):
        hf_to_mcore({**hf, "model.layers.0.mlp.extra.weight": torch.zeros(1)}, arch)


def test_sliding_layers_follow_transformers():
    """layer_types wins; without it max_window_layers; use_sliding_window=False switches windows off."""
    n = SMALL["num_hidden_layers"]
    off = transformers.Qwen3Config(sliding_window=8, max_window_layers=0, **SMALL)  # use_sliding_window False
    assert hf_sliding_layers(off) == (None, [False] * n)
    top = transformers.Qwen3Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, **SMALL)
    assert hf_sliding_layers(top) == (8, [False] + [True] * (n - 1))
    mistral = transformers.MistralConfig(sliding_window=16, **SMALL)
    assert hf_sliding_layers(mistral) == (16, [True] * n)
    arch = ArchitectureConfig.from_hf(top, allow_sliding_window=True)
    assert arch.num_layers == n


@pytest.mark.parametrize("qk_norm,qkv_bias,family", [(True, False, "qwen3"), (False, True, "qwen2"), (False, False, "llama")])
def test_shape_built_models_export_as_their_family(qk_norm, qkv_bias, family, single_rank_mcore):
    """A model described by shapes (training's flags) names the Hugging Face family its
    features are, so the config.json written beside it loads its weights strictly and
    computes its logits (a Qwen3 config on a model without QK norm would not)."""
    from megatron_consa.config import ConsaConfig
    from megatron_consa.conversion.hf_files import hf_config_from_arch
    from megatron_consa.model import build_gpt_model, build_transformer_config

    arch = ArchitectureConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_attention_heads=4,
                              num_kv_heads=2, qk_norm=qk_norm, qkv_bias=qkv_bias)
    assert arch.model_type == family
    old_record = dataclasses.asdict(arch) | {"model_type": "qwen3"}  # what shape-built checkpoints used to record
    assert ArchitectureConfig(**old_record).model_type == family
    torch.manual_seed(0)
    ours = build_gpt_model(build_transformer_config(arch, ConsaConfig(allocation=[[1, 1]] * 2, backend="torch")), arch).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.normal_()  # norms and biases away from their initial values: a dropped one shows
    hf = transformers.AutoModelForCausalLM.from_config(hf_config_from_arch(arch)).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    hf.load_state_dict(mcore_to_hf(state, arch), strict=True)
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens, torch.arange(12)[None], attention_mask=None),
                                   rtol=1e-5, atol=1e-5)


def test_a_checkpoint_record_that_describes_no_model_is_named_not_a_traceback():
    """`ArchitectureConfig.from_record` (every reader of a checkpoint's consa_run.json): a record that is not an
    object, lacks a field, has one this version does not know, or holds a value no model has is a ConsaConfigError
    naming the checkpoint (the tools print it as an error line), never a TypeError or ZeroDivisionError."""
    good = dataclasses.asdict(ArchitectureConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                                 num_attention_heads=4, num_kv_heads=2))
    assert ArchitectureConfig.from_record(dict(good), "ckpt") == ArchitectureConfig(**good)
    for record, said in ((None, "is NoneType, not a JSON object"), ({**good, "extra": 1}, "'extra'.*newer version"),
                         ({k: v for k, v in good.items() if k != "num_layers"}, "lacks 'num_layers'"),
                         ({**good, "num_kv_heads": 0}, "describes no model"),
                         ({**good, "num_attention_heads": 0, "head_dim": None}, "describes no model"),
                         ({**good, "num_kv_heads": "2"}, "describes no model")):
        with pytest.raises(ConsaConfigError, match=f"^ckpt: .*{said}"):
            ArchitectureConfig.from_record(record, "ckpt")
