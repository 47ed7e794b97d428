"""Finalize a learning-phase checkpoint: allocation at the exact budget, heatmap, fixed-mode checkpoint.

`finalize_checkpoint` reads the learning run's record from its checkpoint
(the s_hat of every iteration and the gathered log_alpha, both in the
checkpoint's common state, so no model is needed to judge it), refuses a run
whose s_hat tail did not settle, and writes into one output directory:

* `allocation.json`: the K units with the largest log_alpha FA, the budget met exactly;
* `allocation_heatmap.png`: layers x KV heads, log_alpha with the FA units outlined;
* `checkpoint/`: the model weights in fixed mode (no gates), the allocation in its
  metadata: `--load DIR/checkpoint --consa-phase fixed` continues training from it.

Everything goes to a temporary sibling directory first, renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_consa.allocation import Allocation
from megatron_consa.architecture import ArchitectureConfig
from megatron_consa.config import ConsaConfig, ConsaConfigError
from megatron_consa.controller import judge_settling
from megatron_consa.conversion.hf_files import copy_tokenizer_files, staged_directory

logger = logging.getLogger(__name__)

ALLOCATION_FILE = "allocation.json"
HEATMAP_FILE = "allocation_heatmap.png"
CHECKPOINT_DIR = "checkpoint"
"""The fixed checkpoint inside finalize's output directory (`--load` of that directory finds it)."""


class FinalizeError(ValueError):
    """A checkpoint that cannot be finalized; the message names the reason and the fix."""


@dataclass(frozen=True)
class FinalizeRequest:
    load: str
    """A learning run's --save directory (its latest checkpoint) or one iter_* directory."""
    save: str
    """Output directory."""
    tolerance: Optional[float] = None
    """Allowed max |s_hat - target| over the judged tail (default: the run's settle_tolerance)."""
    margin: Optional[float] = None
    """log_alpha gap below which boundary units are reported undecided (default: the run's finalize_margin)."""
    overwrite: bool = False
    with_checkpoint: bool = True
    """Also write the fixed-mode model checkpoint (needs a model build; off: allocation and heatmap only)."""


def finalize_checkpoint(request: FinalizeRequest) -> Allocation:
    from megatron_consa.files import refuse_replacing_input, unwritable_reason
    from megatron_consa.training.checkpoint import read_checkpoint_meta, read_common_state, resolve_load_dir

    out = Path(request.save)  # (checked before the checkpoint is read and ranked)
    if out.exists() and not out.is_dir():
        raise FinalizeError(f"--save {out}: a file, not a directory; give the output directory (it is made)")
    refuse_replacing_input(out, {"--load": request.load}, error=FinalizeError)
    if out.is_dir() and any(out.iterdir()) and not request.overwrite:
        raise FinalizeError(f"--save {out}: exists and is not empty; choose another directory or pass --overwrite")
    problem = unwritable_reason(out.parent)  # (it is written beside, then renamed)
    if problem:
        raise FinalizeError(f"--save {out}: {problem}; choose another directory")
    path = resolve_load_dir(request.load)
    meta = read_checkpoint_meta(path) or {}
    if not meta.get("consa"):
        raise FinalizeError(f"--load {request.load}: {path} has no ConSA metadata")
    try:
        arch = ArchitectureConfig.from_record(meta.get("architecture"), f"--load {request.load}")
    except ConsaConfigError as err:
        raise FinalizeError(str(err)) from None
    consa = ConsaConfig.from_dict(meta["consa"])
    if not consa.learning:
        raise FinalizeError(f"--load {request.load}: a fixed-allocation checkpoint has no gates to finalize")
    common = read_common_state(path)
    log_alpha = common.get("consa_log_alpha")
    if log_alpha is None:
        raise FinalizeError(f"--load {request.load}: the checkpoint holds no gathered log_alpha (saved by an older version)")
    history = common["consa_controller"].get("s_hat_history", [])
    report = judge_settling(
        history, target_sparsity=consa.target_sparsity, warmup_iters=consa.target_warmup_iters,
        tail_fraction=consa.settle_tail_fraction,
        tolerance=consa.settle_tolerance if request.tolerance is None else request.tolerance,
    )
    allocation = Allocation.from_log_alpha(
        torch.tensor(log_alpha), target_sparsity=consa.target_sparsity, granularity=consa.granularity,
        num_kv_heads=arch.num_kv_heads, window=consa.window, sink_tokens=consa.sink_tokens,
        metadata={"checkpoint": str(path), "iterations": int(common["iteration"]),
                  "final_s_hat": history[-1][1] if history else None},
        settle=report, margin=consa.finalize_margin if request.margin is None else request.margin,
    )
    with staged_directory(out) as tmp:
        allocation.save(tmp / ALLOCATION_FILE)
        from megatron_consa.analysis.heatmap import save_heatmap

        save_heatmap(tmp / HEATMAP_FILE, allocation.fa, allocation.log_alpha,
                     title=f"learned allocation: sparsity {allocation.achieved_sparsity:.3f}, W={consa.window}")
        if request.with_checkpoint:
            # (a gates-only learn phase's weights train on in the fixed phase: that one has no gates)
            fixed = dataclasses.replace(consa, allocation=allocation.fa, gates_only=False)
            _write_fixed_checkpoint(path, tmp / CHECKPOINT_DIR, meta, arch, fixed)
    logger.info("settling: %s", report.describe())
    return allocation


def _write_fixed_checkpoint(src: Path, dst: Path, meta: dict, arch: ArchitectureConfig, consa: ConsaConfig) -> None:
    """The learn checkpoint's weights in a fixed-mode model (gates dropped), as a weights-only checkpoint."""
    from megatron.core import dist_checkpointing

    from megatron_consa.conversion.importer import HF_CONFIG_FILE
    from megatron_consa.conversion.world import conversion_world
    from megatron_consa.model import build_gpt_model, build_transformer_config
    from megatron_consa.training.checkpoint import load_model_weights, model_state_for_save, write_checkpoint_meta

    training = meta.get("training") or {}
    dtype = torch.bfloat16 if training.get("bf16") else torch.float16 if training.get("fp16") else torch.float32
    with conversion_world():
        fixed = dataclasses.replace(consa, backend="torch")
        model = build_gpt_model(build_transformer_config(arch, fixed, params_dtype=dtype), arch,
                                use_transformer_engine=False)
        load_model_weights([model], src)  # the fixed model asks for no gates
        dst.mkdir(parents=True)
        dist_checkpointing.save(model_state_for_save([model], controller_state={}, iteration=0), str(dst))
    copy_tokenizer_files(src, dst)
    if (src / HF_CONFIG_FILE).is_file():
        shutil.copyfile(src / HF_CONFIG_FILE, dst / HF_CONFIG_FILE)  # (the mode the umask gives, as every output)
    write_checkpoint_meta(dst, {
        "iteration": 0, "consa": consa.to_dict(), "architecture": dataclasses.asdict(arch), "training": training,
        "finalized_from": str(src), "resumable": False,
        # (the data record too: evaluation reads the run's --split and seed from it, so its valid split holds
        # no training document)
        **{key: meta[key] for key in ("tokenizer", "data") if key in meta},
    })
