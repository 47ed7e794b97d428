"""Long-range recall accuracy of a checkpoint under any allocation (single process, any saved layout).

The prompts are `data.demo_corpus` recall documents (a key of random words,
repeated): positions inside the repeats can only be predicted by looking one
key length back. `recall_accuracy` is the share of those positions whose
greedy next-token prediction is right, counting only positions whose source is
further back than the window (where FA and SWA differ).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch


@dataclasses.dataclass
class RecallResult:
    accuracy: float
    scored_positions: int
    documents: int


@torch.no_grad()
def recall_accuracy(logits_fn, tokenizer, documents: Sequence[str], *, window: int, seq_length: int) -> RecallResult:
    """`logits_fn(tokens [1, s]) -> logits [1, s, V]`; scores positions copied from > window tokens back."""
    correct = scored = 0
    for doc in documents:
        ids = tokenizer.encode(doc)[: seq_length + 1]
        first = doc.split(" | ")[0]  # "recall: <key>"
        period = len(tokenizer.encode(first + " | ")) - len(tokenizer.encode("recall: ")) + 0
        start = len(tokenizer.encode(first + " | ")) + 1  # inside the second copy, after its first token
        if period <= window or start >= len(ids) - 1:
            continue
        tokens = torch.tensor(ids[:-1]).unsqueeze(0)
        pred = logits_fn(tokens).argmax(-1)[0]
        target = torch.tensor(ids[1:])
        correct += int((pred[start:] == target[start:]).sum())
        scored += len(ids) - 1 - start
    return RecallResult(accuracy=correct / max(1, scored), scored_positions=scored, documents=len(documents))


def checkpoint_logits_fn(checkpoint, fa: Optional[list[list[int]]] = None, *, window: Optional[int] = None):
    """A one-rank fixed-mode model of `checkpoint` (any saved TP/PP) under allocation `fa`
    (default: the checkpoint's own, else all-FA); returns (logits_fn, close)."""
    from megatron_consa.architecture import ArchitectureConfig
    from megatron_consa.config import ConsaConfig
    from megatron_consa.conversion.world import conversion_world, free_port
    from megatron_consa.model import build_gpt_model, build_transformer_config
    from megatron_consa.training.checkpoint import load_model_weights, read_checkpoint_meta, resolve_load_dir

    path = resolve_load_dir(checkpoint)
    meta = read_checkpoint_meta(path) or {}
    arch = ArchitectureConfig(**meta["architecture"])
    saved = meta.get("consa") or {}
    fa = fa or saved.get("allocation") or [[1] * arch.num_kv_heads for _ in range(arch.num_layers)]
    consa = ConsaConfig(window=window or saved.get("window", 512), sink_tokens=saved.get("sink_tokens", 0),
                        allocation=fa, backend="torch")
    world = conversion_world(rank=0, world_size=1, port=free_port())
    world.__enter__()
    model = build_gpt_model(build_transformer_config(arch, consa, params_dtype=torch.float32), arch,
                            use_transformer_engine=False)
    load_model_weights([model], path)
    model.eval()

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1]).unsqueeze(0)
        return model(tokens, pos, attention_mask=None).float()

    def close() -> None:
        world.__exit__(None, None, None)

    return logits_fn, close
