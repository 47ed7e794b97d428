"""What Transformer Engine's layer spec does unlike the local one, checked on the CPU with stand-ins.

TE's modules need CUDA, but two of their differences reach our code, and local
modules that mimic them stand in for them here:

* a TE linear built without a bias keeps an empty plain tensor in `bias`
  (megatron's local linears: None). KV-group reordering skips it, and the
  sharded state dict (checkpoints) names no bias;
* TE's norms (TENorm: the TE spec's QK norms, and the final norm wherever TE is
  installed) keep an `_extra_state`, the local spec's norms none. A checkpoint
  written with the local spec (an import, finalize) loads into the TE spec.

The TE spec itself runs in tests/gpu (against megatron-core's stock TE-spec model).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import megatron_consa  # noqa: F401  (makes megatron.core importable without triton)
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, model_parallel_cuda_manual_seed

from megatron_consa.config import ConsaConfig
from megatron_consa.model import build_transformer_config
from megatron_consa.self_attention import ConsaSelfAttention
from megatron_consa.specs import get_consa_layer_local_spec

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_group_layout import ALLOCATION, SEQ, WINDOW, _assert_same, _logits_and_grads, _tokens  # noqa: E402
from test_group_layout import ARCH as REORDERED_ARCH  # noqa: E402

ARCH = dataclasses.replace(REORDERED_ARCH, qkv_bias=False)  # as TE's bias-less linears


class RMSNormWithExtraState(torch.nn.RMSNorm):
    """megatron's local RMSNorm (torch's) holding an `_extra_state`, as TE's RMSNorm does."""

    def __init__(self, config, hidden_size, eps=1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps)

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        pass


def _model(*, permute: bool = True, seed: int = 7, linear_qkv=None, qk_norm=None) -> GPTModel:
    spec = get_consa_layer_local_spec(qk_layernorm=True)
    attn = spec.submodules.self_attention.submodules
    if linear_qkv is not None:
        attn.linear_qkv = linear_qkv
    if qk_norm is not None:
        attn.q_layernorm = attn.k_layernorm = qk_norm
    config = build_transformer_config(
        ARCH, ConsaConfig(window=WINDOW, allocation=ALLOCATION, permute_kv_groups=permute, backend="torch"))
    model_parallel_cuda_manual_seed(seed)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=ARCH.vocab_size,
                    max_sequence_length=ARCH.max_position_embeddings, position_embedding_type="rope",
                    rotary_base=int(ARCH.rope_theta), share_embeddings_and_output_weights=False)


@pytest.mark.usefixtures("single_rank_mcore")
def test_a_linear_without_bias_holding_an_empty_tensor_is_reordered_and_checkpointed():
    """Transformer Engine's linears built without a bias keep an empty plain tensor in
    `bias` (megatron's local ones register None). A reordered layer moves the weight
    alone, and its sharded state dict (checkpoints) names no bias."""

    class EmptyBiasColumnParallelLinear(ColumnParallelLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            del self._parameters["bias"]
            self.bias = torch.Tensor()  # as transformer_engine.pytorch.LayerNormLinear(bias=False)
            self.skip_bias_add = True  # returned to SelfAttention, which drops it

    def build(permute):
        return _model(permute=permute, linear_qkv=EmptyBiasColumnParallelLinear)

    reordered, megatron_order = build(True), build(False)
    assert any(m.kv_group_order not in (None, tuple(range(4)))
               for m in reordered.modules() if isinstance(m, ConsaSelfAttention))
    assert all(m.self_attention.linear_qkv.bias.numel() == 0 for m in reordered.decoder.layers)
    sharded = reordered.sharded_state_dict()
    assert isinstance(sharded["decoder.layers.0.self_attention.linear_qkv.weight"], ShardedTensorFactory)
    assert not any(k.endswith("linear_qkv.bias") for k in sharded)
    _assert_same(_logits_and_grads(reordered), _logits_and_grads(megatron_order), "empty-bias reordered vs megatron's order")


@pytest.mark.usefixtures("single_rank_mcore")
def test_a_local_spec_checkpoint_loads_into_modules_with_extra_state(tmp_path):
    from scenarios import save_weights

    from megatron_consa.training.checkpoint import load_model_weights

    local = _model().eval()
    save_weights(local, tmp_path / "ckpt", ARCH)
    te_like = _model(seed=8, qk_norm=RMSNormWithExtraState).eval()
    assert any(k.endswith("q_layernorm._extra_state") for k in te_like.sharded_state_dict())
    with torch.no_grad():
        before = te_like(_tokens(), torch.arange(SEQ).unsqueeze(0).expand(2, SEQ), attention_mask=None)
    load_model_weights([te_like], tmp_path / "ckpt")
    _assert_same(_logits_and_grads(te_like), _logits_and_grads(local), "loaded vs saved")
    assert (before - _logits_and_grads(local)[0]).abs().max() > 1e-3  # the load did change the weights
