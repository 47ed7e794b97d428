"""Build a megatron-core GPTModel with ConSA attention for a Qwen3/Llama-style architecture.

`ArchitectureConfig` is the Hugging Face-shaped description of the network
(RMSNorm, SwiGLU, RoPE with theta, GQA, optional QK-norm, tied or untied
embeddings, optional QKV bias for Qwen2). `ConsaTransformerConfig` is
megatron-core's `TransformerConfig` plus a `consa: ConsaConfig` field, which
is what `ConsaCoreAttention` reads. `build_gpt_model` puts the two together
with the local or the Transformer Engine ConSA layer spec.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_consa.architecture import SUPPORTED_HF_MODEL_TYPES, ArchitectureConfig  # noqa: F401 (re-export)
from megatron_consa.attention import ConsaCoreAttention
from megatron_consa.compat import apply_cpu_shims, distributed_backend, has_cuda
from megatron_consa.config import ConsaConfig, ConsaConfigError
from megatron_consa.specs import get_consa_layer_spec, get_stock_layer_spec

logger = logging.getLogger(__name__)

SINGLE_PROCESS_SEED = 1234
"""Weight-initialisation seed of the one-process world `build_gpt_model` starts
when nothing set up torch.distributed (the weights are usually loaded anyway)."""

@dataclass
class ConsaTransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus the ConSA settings."""

    consa: ConsaConfig = field(default_factory=ConsaConfig)
    """Window, sinks, granularity, gates, controller; read by ConsaCoreAttention."""


def build_transformer_config(
    arch: ArchitectureConfig, consa: ConsaConfig, **megatron_overrides: Any
) -> ConsaTransformerConfig:
    """The megatron-core config for `arch` with ConSA attention.

    `megatron_overrides` are TransformerConfig fields (parallel sizes, dtypes,
    recomputation, ...). Fusions that need CUDA kernels are off without CUDA.
    """
    cuda = has_cuda()
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not cuda,
        # gloo pairs the sends/receives of one batch_isend_irecv in posting order; with
        # PP=2 and virtual stages both directions go to the same peer and activations
        # and gradients get swapped silently. Separate p2p ops are correct (and tested).
        batch_p2p_comm=cuda,
        consa=consa,
    )
    known = {f.name for f in fields(ConsaTransformerConfig)}
    unknown = set(megatron_overrides) - known
    if unknown:
        raise ConsaConfigError(f"unknown TransformerConfig field(s): {sorted(unknown)}")
    kwargs.update(megatron_overrides)
    config = ConsaTransformerConfig(**kwargs)
    tp = config.tensor_model_parallel_size
    consa.check_model_shape(num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, tp_size=tp)
    return config


def build_gpt_model(
    config: ConsaTransformerConfig,
    arch: ArchitectureConfig,
    *,
    use_transformer_engine: Optional[bool] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    stock_attention: bool = False,
) -> GPTModel:
    """A GPTModel (one pipeline stage / virtual chunk) with ConSA attention.

    Works as is in a plain Python process: see `ensure_model_parallel`.

    `stock_attention=True` builds megatron-core's own layer spec instead
    (`get_stock_layer_spec`: its TEDotProductAttention or DotProductAttention,
    full causal attention, or megatron-core's own SWA when `config.window_size`
    is set; no ConSA): the baseline benchmarks and tests compare against, with
    the same parameter names.

    `use_transformer_engine=None` follows the ConSA backend (`config.consa.backend`;
    for the stock model, `auto`): the TE layer spec when it resolves to `te`, the
    local spec otherwise. `True` needs Transformer Engine on a CUDA machine.
    """
    from megatron_consa.backends.select import resolve_backend_name, transformer_engine_available

    ensure_model_parallel(config)
    if use_transformer_engine is None:
        consa = ConsaConfig() if stock_attention else config.consa
        use_transformer_engine = resolve_backend_name(consa.backend, sink_tokens=consa.sink_tokens) == "te"
    elif use_transformer_engine and not transformer_engine_available():
        raise ConsaConfigError(
            "use_transformer_engine=True needs CUDA and an importable transformer_engine: install Transformer "
            "Engine on a GPU machine, or build with use_transformer_engine=False (the local layer spec)"
        )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    spec_of = get_stock_layer_spec if stock_attention else get_consa_layer_spec
    spec = spec_of(use_transformer_engine=use_transformer_engine, qk_layernorm=arch.qk_norm)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rotary_percent=1.0,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )


def ensure_model_parallel(config: TransformerConfig) -> None:
    """Make megatron-core's parallel state usable for building `config`'s model.

    Applies the CPU shims (`megatron_consa.compat.apply_cpu_shims`, a no-op with
    CUDA). Under torchrun, initialise the layout first (for example
    `megatron_consa.training.parallel.initialize_distributed`); then this only
    checks it. In a plain single process with nothing initialised and a
    TP=1, PP=1 config, it starts a one-process world (gloo on a CPU, NCCL on a
    GPU) and seeds megatron's RNG with `SINGLE_PROCESS_SEED`.
    """
    apply_cpu_shims()
    if parallel_state.model_parallel_is_initialized():
        return
    tp = config.tensor_model_parallel_size
    pp = config.pipeline_model_parallel_size
    if tp * pp != 1 or (dist.is_initialized() and dist.get_world_size() != 1):
        raise ConsaConfigError(
            f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp} needs a launched world: "
            "start the processes with torchrun and call "
            "megatron_consa.training.parallel.initialize_distributed(...) before build_gpt_model"
        )
    if not dist.is_initialized():
        if has_cuda():
            torch.cuda.set_device(0)
        dist.init_process_group(distributed_backend(), store=dist.HashStore(), rank=0, world_size=1)
        logger.info("started a one-process %s world for megatron-core", distributed_backend())
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_consa.training.parallel import initialize_model_parallel

    initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    model_parallel_cuda_manual_seed(SINGLE_PROCESS_SEED)


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron-core wrappers (DDP, Float16Module)."""
    while not isinstance(chunk, GPTModel) and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def consa_attention_modules(model_chunks: Iterable[torch.nn.Module]) -> list[ConsaCoreAttention]:
    """Every ConsaCoreAttention in these model chunks, in layer order."""
    mods = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, ConsaCoreAttention)]
    return sorted(mods, key=lambda m: m.layer_index)


def gate_parameters(model_chunks: Iterable[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The log_alpha parameters (for the gates' own optimizer group)."""
    return [m.log_alpha for m in consa_attention_modules(model_chunks) if m.log_alpha is not None]
