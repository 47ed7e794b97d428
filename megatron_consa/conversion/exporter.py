"""Export a megatron-consa checkpoint (any TP/PP layout) to a Hugging Face directory.

Loads the model weights into a one-rank TP1/PP1 model (megatron-core's
dist_checkpointing merges the TP/PP shards on load), maps them back with the key
map, and writes `model.safetensors`, `config.json` and the tokenizer. A
layer-wise allocation becomes the stock config fields (`conversion.windows`), so
stock transformers runs the hybrid model; without one the export is all-FA.
Written into a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_consa.allocation import Allocation
from megatron_consa.architecture import ArchitectureConfig
from megatron_consa.config import ConsaConfig
from megatron_consa.conversion.hf_files import (
    SAFETENSORS_FILE, copy_tokenizer_files, hf_config_from_arch, load_hf_config, staged_directory,
)
from megatron_consa.conversion.importer import ALLOCATION_FILE, DTYPES, HF_CONFIG_FILE, OutputExistsError
from megatron_consa.conversion.keymap import mcore_to_hf
from megatron_consa.conversion.windows import hf_window_fields
from megatron_consa.conversion.world import conversion_world, free_port

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


def _checkpoint_dtype(meta: dict) -> torch.dtype:
    conversion, training = meta.get("conversion") or {}, meta.get("training") or {}
    if conversion.get("dtype") in ("float32", "bfloat16", "float16"):
        return getattr(torch, conversion["dtype"])
    return torch.bfloat16 if training.get("bf16") else torch.float16 if training.get("fp16") else torch.float32


def export_to_hf(request: ExportRequest) -> Path:
    from megatron_consa.training.checkpoint import read_checkpoint_meta, resolve_load_dir

    load, save = resolve_load_dir(request.load), Path(request.save)
    meta = read_checkpoint_meta(load)
    if meta is None:
        raise FileNotFoundError(f"{load} is not a megatron-consa checkpoint (no consa_run.json)")
    arch = ArchitectureConfig(**meta["architecture"])
    allocation_path = request.allocation or (load / ALLOCATION_FILE if meta.get("allocation") else None)
    allocation = Allocation.load(allocation_path) if allocation_path else None
    if allocation is not None:
        allocation.check_compatible(arch.num_layers, arch.num_kv_heads)
    window_fields = hf_window_fields(allocation, arch)  # refuses what stock transformers cannot run
    hf_config = load_hf_config(load) if (load / HF_CONFIG_FILE).is_file() else hf_config_from_arch(arch)
    occupied = save.exists() and (not save.is_dir() or any(save.iterdir()))
    if occupied and not request.overwrite:
        raise OutputExistsError(f"{save} already exists and is not empty: choose another --save, or pass --overwrite")
    hf_state = _merged_hf_state(load, arch, _checkpoint_dtype(meta))
    with staged_directory(save) as tmp:
        from safetensors.torch import save_file

        save_file(hf_state, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        for key, value in window_fields.items():
            setattr(hf_config, key, value)
        hf_config.dtype = str(next(iter(hf_state.values())).dtype).replace("torch.", "")
        hf_config.save_pretrained(tmp)
        copy_tokenizer_files(load, tmp)
        if allocation is not None:
            allocation.save(tmp / ALLOCATION_FILE)
    logger.info("wrote %s (%d tensors, %s)", save, len(hf_state), "hybrid" if window_fields.get("sliding_window") else "all FA")
    return save


def _merged_hf_state(load: Path, arch: ArchitectureConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole model as HF tensors, loaded through a one-rank model (TP/PP shards merged)."""
    from megatron_consa.model import build_gpt_model, build_transformer_config
    from megatron_consa.training.checkpoint import load_model_weights

    with conversion_world(rank=0, world_size=1, port=free_port()):
        consa = ConsaConfig(allocation=[[1] * arch.num_kv_heads] * arch.num_layers, backend="torch")
        config = build_transformer_config(arch, consa, params_dtype=dtype, perform_initialization=False)  # all loaded
        model = build_gpt_model(config, arch, use_transformer_engine=False)
        load_model_weights([model], load)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf = mcore_to_hf(state, arch)
    if arch.tie_word_embeddings:
        hf.pop("lm_head.weight")  # the same tensor as the embedding; transformers re-ties it
    return {k: v.contiguous() for k, v in hf.items()}


__all__ = ["DTYPES", "ExportRequest", "export_to_hf"]
