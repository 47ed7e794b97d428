"""Import a Hugging Face checkpoint as a megatron-consa training checkpoint.

The output directory is a checkpoint in the format
`megatron_consa.training.checkpoint` writes (megatron-core dist_checkpointing:
model with ConSA gates at `init_log_alpha`, controller state, iteration 0,
`consa_run.json`), so training starts from it with `weights_only=True`, at any
TP/PP layout. Beside it: the source `config.json` (the `--hf-config` of a later
run), the tokenizer files, and `allocation.json` when the source already used
sliding windows (the equivalent fixed allocation; train with it to keep the
model as it was).

The checks before writing read the safetensors headers only. Each of the TP x PP
ranks builds its stage of the model at the requested layout, reads its shard of the
weights and nothing else (`read_rank_state`, `conversion.sharding`) and saves; one rank runs in this process,
more are spawned (gloo on a CPU). Everything is written into a temporary sibling
directory and renamed into place at the end: a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_consa.allocation import Allocation
from megatron_consa.architecture import ArchitectureConfig
from megatron_consa.config import ConsaConfig
from megatron_consa.conversion.hf_files import (
    TOKENIZER_FILES, copy_tokenizer_files, load_hf_config, read_safetensors, safetensors_meta, staged_directory,
)
from megatron_consa.conversion.keymap import check_hf_shapes, hf_to_mcore
from megatron_consa.conversion.sharding import RankLayout, check_layout, hf_tensor_part, rank_architecture, stage_state_dict
from megatron_consa.conversion.windows import allocation_from_hf
from megatron_consa.conversion.world import conversion_world
from megatron_consa.files import read_json, refuse_replacing_input

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALLOCATION_FILE = "allocation.json"
HF_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class ImportRequest:
    """What to convert, and how to shard it."""

    hf_path: str
    """Hugging Face checkpoint directory (config.json + safetensors)."""
    save: str
    """Output checkpoint directory."""
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    dtype: Optional[str] = None
    """fp32, bf16 or fp16; None keeps the checkpoint's own dtype."""
    granularity: str = "kv_head"
    """Granularity of the gates written into the checkpoint (for a learning phase)."""
    overwrite: bool = False
    """Replace an existing, different checkpoint at `save`."""


class OutputExistsError(FileExistsError):
    """The output directory holds something else; the message says how to proceed."""


def check_output_dir(save: Path, marker: dict, overwrite: bool) -> bool:
    """True when `save` already holds exactly this conversion (nothing to do).

    An empty or missing directory is fine; anything else is refused unless
    `overwrite`. `marker` is compared with the `conversion` entry of its metadata.
    """
    if not save.exists() or (save.is_dir() and not any(save.iterdir())):
        return False
    meta_file = save / "consa_run.json"
    record = read_json(meta_file, what="record of the checkpoint in --save", error=OutputExistsError,
                       hint=": --save holds a damaged checkpoint; choose another --save, or pass --overwrite to "
                            "replace it") if meta_file.is_file() else {}
    held = record.get("conversion") if isinstance(record, dict) else None
    if held == marker:
        return True
    if not overwrite:
        source_changed = isinstance(held, dict) and {k: v for k, v in held.items() if k != "source_files"} == {
            k: v for k, v in marker.items() if k != "source_files"}
        older = source_changed and any(len(e) == 2 and isinstance(e[1], int) for e in held.get("source_files", []))
        what = ("a conversion of this --hf-path recorded by an earlier version of the converter (which cannot tell "
                "whether the files changed since)" if older else
                "a conversion of this --hf-path as its files were before (they changed since)" if source_changed
                else "a different checkpoint or other files")
        raise OutputExistsError(
            f"{save} already exists and holds {what}: choose another --save directory, or pass --overwrite "
            "to replace it"
        )
    return False


def _source_fingerprint(hf_path: Path) -> list:
    """What says a rerun's source is the one already converted: each config and tokenizer file's
    content hash, and each weight file's size and modification time (as make judges a
    target; hashing gigabytes would cost a fair share of the import). A source re-saved in
    place (fine-tuned weights of the same shapes, an edited config.json) differs, so the
    rerun is refused without --overwrite instead of keeping the old checkpoint."""
    entries = []
    for path in hf_path.iterdir():
        if path.suffix == ".json" or path.name in TOKENIZER_FILES:  # (tokenizer.model, merges.txt, ...: copied too)
            entries.append([path.name, hashlib.sha256(path.read_bytes()).hexdigest()])
        elif path.suffix == ".safetensors":
            stat = path.stat()
            entries.append([path.name, stat.st_size, stat.st_mtime_ns])
    return sorted(entries)


def _check_tied_head(hf_path: Path, hf_state: dict, arch: ArchitectureConfig) -> None:
    """A tied model's files may hold `lm_head.weight` too: a copy of the embedding is fine
    (the tie reproduces it); a different matrix is what transformers computes with (it
    loads the head from the file), so tying would change the model: refused."""
    head, embedding = "lm_head.weight", "model.embed_tokens.weight"
    if not arch.tie_word_embeddings or head not in hf_state:
        return
    pair = read_safetensors(hf_path, part=lambda name, shape: () if name in (head, embedding) else None)
    if not torch.equal(pair[head], pair[embedding]):
        raise ValueError(
            f"{hf_path / 'config.json'} sets tie_word_embeddings=true, but the weights hold an {head} that differs "
            f"from {embedding} (transformers computes with the file's {head}): set \"tie_word_embeddings\": false "
            "in config.json to import the model as transformers runs it"
        )


@dataclass
class _Prepared:
    arch: ArchitectureConfig
    consa: ConsaConfig
    allocation: Optional[Allocation]
    dtype: torch.dtype
    marker: dict


def prepare_import(request: ImportRequest) -> _Prepared:
    """Validate everything that can be checked before writing (config, layout, tensors)."""
    hf_path = Path(request.hf_path)
    hf_config = load_hf_config(hf_path)
    arch = ArchitectureConfig.from_hf(hf_config, allow_sliding_window=True)
    check_layout(arch, request.tensor_model_parallel_size, request.pipeline_model_parallel_size)
    allocation = allocation_from_hf(hf_config, arch)
    hf_state = safetensors_meta(hf_path)  # shapes and dtypes only: the ranks read their parts
    check_hf_shapes(hf_state, arch)
    hf_to_mcore(hf_state, arch)  # refuses tensors the model would drop
    _check_tied_head(hf_path, hf_state, arch)
    if request.dtype is None:
        dtype = hf_state["model.embed_tokens.weight"].dtype
    elif request.dtype in DTYPES:
        dtype = DTYPES[request.dtype]
    else:
        raise ValueError(f"--dtype {request.dtype!r}: choose one of {sorted(DTYPES)}")
    window = allocation.window if allocation else ConsaConfig().window
    consa = ConsaConfig(window=window, granularity=request.granularity, backend="torch")
    consa.check_model_shape(
        num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, tp_size=request.tensor_model_parallel_size
    )
    marker = {
        "from": "huggingface",
        "hf_path": str(hf_path.resolve()),
        "source_files": _source_fingerprint(hf_path),
        "tensor_model_parallel_size": request.tensor_model_parallel_size,
        "pipeline_model_parallel_size": request.pipeline_model_parallel_size,
        "dtype": str(dtype).replace("torch.", ""),
        "granularity": request.granularity,
    }
    return _Prepared(arch, consa, allocation, dtype, marker)


def import_hf_checkpoint(request: ImportRequest) -> Path:
    """Convert `request.hf_path` into `request.save` (see the module docstring)."""
    refuse_replacing_input(request.save, {"--hf-path": request.hf_path}, error=OutputExistsError)
    prepared = prepare_import(request)
    save = Path(request.save)
    if check_output_dir(save, prepared.marker, request.overwrite):
        logger.info("%s already holds this conversion; nothing to do", save)
        return save
    with staged_directory(save) as tmp:
        world = request.tensor_model_parallel_size * request.pipeline_model_parallel_size
        if world == 1:
            _rank_entry(0, 1, None, request, prepared, str(tmp))
        else:
            import torch.multiprocessing as mp

            with tempfile.TemporaryDirectory(prefix="consa-import-") as meet:
                args = (world, str(Path(meet) / "rendezvous"), request, prepared, str(tmp))
                mp.start_processes(_rank_entry, args=args, nprocs=world, join=True, start_method="spawn")
        _write_side_files(request, prepared, tmp)
    logger.info("wrote %s (TP=%d, PP=%d)", save, request.tensor_model_parallel_size, request.pipeline_model_parallel_size)
    return save


def _write_side_files(request: ImportRequest, prepared: _Prepared, out: Path) -> None:
    from megatron_consa.training.checkpoint import write_checkpoint_meta

    shutil.copyfile(Path(request.hf_path) / HF_CONFIG_FILE, out / HF_CONFIG_FILE)  # the umask's mode, not the source's
    copy_tokenizer_files(request.hf_path, out)
    if prepared.allocation is not None:
        prepared.allocation.save(out / ALLOCATION_FILE)
        logger.info("the source uses sliding windows: wrote the equivalent %s\n%s", ALLOCATION_FILE, prepared.allocation.summary())
    write_checkpoint_meta(
        out,
        {
            "iteration": 0,
            "consa": prepared.consa.to_dict(),
            "architecture": asdict(prepared.arch),
            "training": None,
            "allocation": ALLOCATION_FILE if prepared.allocation is not None else None,
            "conversion": prepared.marker,
        },
    )


def read_rank_state(hf_path: str | Path, arch: ArchitectureConfig, layout: RankLayout) -> dict:
    """One rank's megatron-core state dict, read from the HF checkpoint: only its pipeline
    stage's tensors, and of those only its tensor-parallel slices (`sharding.hf_tensor_part`),
    so a rank's memory is its shard, not its stage or the model. `prepare_import` checked
    the whole set of tensors before."""
    part = read_safetensors(hf_path, part=lambda name, shape: hf_tensor_part(name, shape, arch, layout))
    return stage_state_dict(hf_to_mcore(part, rank_architecture(arch, layout), partial=True), arch, layout)


def _rank_entry(rank: int, world: int, rendezvous: Optional[str], request: ImportRequest, prepared: _Prepared, out: str) -> None:
    """One rank: build its stage, load its shard, save (all ranks together)."""
    if world > 1:  # a spawned process: quiet like the tool's own, before megatron-core's imports warn
        from megatron_consa.cli import quiet_libraries

        quiet_libraries()
        torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_consa.controller import ConsaController
    from megatron_consa.model import build_gpt_model, build_transformer_config
    from megatron_consa.training.checkpoint import model_state_for_save

    tp, pp = request.tensor_model_parallel_size, request.pipeline_model_parallel_size
    with conversion_world(rank=rank, world_size=world, rendezvous=rendezvous, tp=tp, pp=pp):
        arch = prepared.arch
        config = build_transformer_config(
            arch, prepared.consa, params_dtype=prepared.dtype, pipeline_dtype=prepared.dtype,
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            perform_initialization=False,  # every weight is loaded below (checked): skip drawing a random model
        )
        model = build_gpt_model(config, arch, use_transformer_engine=False)
        layout = RankLayout(
            tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=tp,
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(), pp_size=pp,
        )
        local = {k: v.to(prepared.dtype) for k, v in read_rank_state(request.hf_path, arch, layout).items()}
        result = model.load_state_dict(local, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(("_extra_state", "log_alpha"))]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"rank {rank}: shard does not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
        controller = ConsaController(prepared.consa, total_cost=arch.num_layers * arch.num_kv_heads)
        state = model_state_for_save([model], controller_state=controller.state_dict(), iteration=0)
        dist_checkpointing.save(state, out)
        dist.barrier()
