"""Export a megatron-consa checkpoint (any TP/PP layout) to a Hugging Face directory.

Loads the model weights into a one-rank TP1/PP1 model (megatron-core's
dist_checkpointing merges the TP/PP shards on load), maps them back with the key
map, and writes `model.safetensors`, `config.json` and the tokenizer: a sentencepiece
model also as Hugging Face tokenizer files (`AutoTokenizer` loads it, not the
`model_type`'s default), config.json with the tokenizer's BOS/EOS ids. The
allocation goes into config.json (`conversion.windows`): a layer-wise one that
stock attention runs as the stock sliding-window fields; any other (head-wise,
sinks, a per-layer mix Llama/Mistral configs cannot express) for the `consa`
attention that `import megatron_consa` registers with transformers. Without an
allocation the export is all-FA. The weights go into safetensors files of at most
`max_shard_size` each with their index, as `save_pretrained` writes them, one file's
tensors copied at a time (the peak is the model and one file). Written into a
temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_consa.architecture import CONSA_HF_CONFIG_KEY, ArchitectureConfig
from megatron_consa.conversion.checkpoint_model import CheckpointInfo, fixed_consa_config, one_rank_model, read_checkpoint_info
from megatron_consa.conversion.hf_files import (
    SAFETENSORS_INDEX, copy_tokenizer_files, hf_config_from_arch, load_hf_config, save_safetensors, staged_directory,
)
from megatron_consa.conversion.importer import ALLOCATION_FILE, DTYPES, HF_CONFIG_FILE, OutputExistsError
from megatron_consa.conversion.keymap import mcore_to_hf
from megatron_consa.conversion.windows import hf_window_fields, set_window_fields
from megatron_consa.data.tokenizer import SentencePieceTokenizer, tokenizer_from_path
from megatron_consa.files import refuse_replacing_input

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportRequest:
    load: str
    """megatron-consa checkpoint directory."""
    save: str
    """Output Hugging Face directory."""
    allocation: Optional[str] = None
    """allocation.json to export with (default: the checkpoint's own, if any; else all-FA)."""
    overwrite: bool = False
    max_shard_size: int | str = "50GB"
    """Largest safetensors file (bytes, or "5GB", "500MB"...), as in `save_pretrained`; the
    default is transformers' and the Hugging Face Hub's per-file limit."""


def export_to_hf(request: ExportRequest) -> Path:
    max_shard_size = shard_size_bytes(request.max_shard_size)
    refuse_replacing_input(request.save, {"--load": request.load, "--allocation": request.allocation},
                           error=OutputExistsError)
    info = read_checkpoint_info(request.load, request.allocation)
    load, save, arch, allocation = info.path, Path(request.save), info.arch, info.allocation
    info.warn_if_unfinalized(logger, "the export")
    window_fields = hf_window_fields(allocation, arch)
    hf_config = load_hf_config(load) if (load / HF_CONFIG_FILE).is_file() else hf_config_from_arch(arch)
    _check_config_describes(hf_config, arch, load)
    occupied = save.exists() and (not save.is_dir() or any(save.iterdir()))
    if occupied and not request.overwrite:
        raise OutputExistsError(f"{save} already exists and is not empty: choose another --save, or pass --overwrite")
    tokenizer = tokenizer_from_path(load, flag="--load")
    _set_special_ids(hf_config, tokenizer, own_config=(load / HF_CONFIG_FILE).is_file())
    if isinstance(tokenizer, SentencePieceTokenizer):
        tokenizer.hf_tokenizer  # noqa: B018  converted (or refused) before the weights are read
    hf_state = _merged_hf_state(info)
    with staged_directory(save) as tmp:
        # in the checkpoint's dtype throughout: megatron-core keeps some weights (the norms) in fp32
        files = write_safetensors(hf_state, tmp, max_shard_size, dtype=info.dtype)
        set_window_fields(hf_config, window_fields)
        hf_config.dtype = str(info.dtype).replace("torch.", "")
        hf_config.save_pretrained(tmp)
        copy_tokenizer_files(load, tmp)
        if isinstance(tokenizer, SentencePieceTokenizer):  # beside tokenizer.model: what AutoTokenizer loads
            tokenizer.save_hf(tmp)
        if allocation is not None:
            allocation.save(tmp / ALLOCATION_FILE)
    kind = (
        "hybrid, consa attention" if CONSA_HF_CONFIG_KEY in window_fields
        else "hybrid, stock fields" if window_fields.get("sliding_window") else "all FA"
    )
    logger.info("wrote %s (%d tensors in %d file(s), %s)", save, len(hf_state), files, kind)
    return save


def _set_special_ids(hf_config: Any, tokenizer: Any, *, own_config: bool) -> None:
    """config.json's bos/eos ids (where `generate` stops) are the checkpoint's tokenizer's: always for a
    sentencepiece model or a config written from the architecture (a family's defaults, Llama's 1 and 2,
    are not the tokenizer's), else only where the config has none (a Hugging Face source's own ids,
    an EOS list included, are kept). A tokenizer without a BOS or EOS gives none."""
    if tokenizer is None:
        return
    exact = isinstance(tokenizer, SentencePieceTokenizer) or not own_config
    for field, value in (("bos_token_id", tokenizer.bos), ("eos_token_id", tokenizer.eos)):
        if exact or getattr(hf_config, field, None) is None:
            setattr(hf_config, field, value)


def _check_config_describes(hf_config: Any, arch: ArchitectureConfig, load: Path) -> None:
    """The config.json exported must build the model the weights are, shapes and function: a Qwen3 config on a
    model without QK norm would load with q_norm / k_norm at their initial values, another vocabulary or MLP width
    fails in `from_pretrained`, another RoPE base or norm epsilon loads and computes another function.
    max_position_embeddings may differ (it shapes no weight; a run may extend the context)."""
    described = ArchitectureConfig.from_hf(hf_config, allow_sliding_window=True)
    for name in ("qk_norm", "qkv_bias", "num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim",
                 "vocab_size", "intermediate_size", "tie_word_embeddings", "rope_theta", "rope_scaling_factor",
                 "rms_norm_eps"):
        if getattr(described, name) != getattr(arch, name):
            raise ValueError(
                f"{load / HF_CONFIG_FILE} describes a {hf_config.model_type} model with {name}="
                f"{getattr(described, name)}, but the checkpoint's model has {name}={getattr(arch, name)}: "
                f"remove that config.json (the export then writes one from the checkpoint's architecture)"
            )


def _merged_hf_state(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The whole model as HF tensors (views of a one-rank model's weights: TP/PP shards merged)."""
    with one_rank_model(info, fixed_consa_config(info.arch, None)) as model:
        state = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf = mcore_to_hf(state, info.arch)
    if info.arch.tie_word_embeddings:
        hf.pop("lm_head.weight")  # the same tensor as the embedding; transformers re-ties it
    return hf


def shard_size_bytes(max_shard_size: int | str) -> int:
    """`max_shard_size` in bytes: a count, or a size with a decimal (5GB, 500MB: save_pretrained's
    units) or binary unit (5GiB, 500MiB)."""
    from megatron_consa.evaluation.kv_memory import parse_bytes

    try:
        size = parse_bytes(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    except ValueError:
        size = None
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"--max-shard-size {max_shard_size}: not a positive size; write e.g. 5GB, 500MiB, or a "
                         "byte count")
    return size


def write_safetensors(hf_state: dict[str, torch.Tensor], out: Path, max_shard_size: int | str,
                      dtype: Optional[torch.dtype] = None) -> int:
    """Write `hf_state` as `save_pretrained` lays it out: `model.safetensors`, or files
    `model-0000i-of-0000n.safetensors` of at most `max_shard_size` each (a larger tensor
    alone in its file) with `model.safetensors.index.json`. One file's tensors are made
    contiguous copies at a time (the entries may be views sharing storage), in `dtype`
    when given. Returns the number of files."""
    from huggingface_hub import split_torch_state_dict_into_shards

    def written(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    sizes = {k: torch.empty(v.shape, dtype=written(v), device="meta") for k, v in hf_state.items()}
    split = split_torch_state_dict_into_shards(sizes, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        tensors = {n: hf_state[n].to(device="cpu", dtype=written(hf_state[n]), memory_format=torch.contiguous_format,
                                     copy=True) for n in names}
        save_safetensors(tensors, out / filename)
        del tensors
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return len(split.filename_to_tensors)


__all__ = ["DTYPES", "ExportRequest", "export_to_hf"]
