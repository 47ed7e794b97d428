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

from megatron_consa.data.indexed import document_prefix


@dataclasses.dataclass
class RecallResult:
    accuracy: float
    scored_positions: int
    documents: int


@torch.no_grad()
def recall_accuracy(logits_fn, tokenizer, documents: Sequence[str], *, window: int, seq_length: int) -> RecallResult:
    """`logits_fn(tokens [1, s]) -> logits [1, s, V]`; scores positions copied from > window tokens back."""
    correct = scored = 0
    lead = document_prefix(tokenizer)  # as the training documents start (a Llama or Mistral BOS)
    for doc in documents:
        ids = (lead + tokenizer.encode(doc))[: seq_length + 1]
        first = doc.split(" | ")[0]  # "recall: <key>"
        period = len(tokenizer.encode(first + " | ")) - len(tokenizer.encode("recall: ")) + 0
        start = len(lead) + len(tokenizer.encode(first + " | ")) + 1  # inside the second copy, after its first token
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
    from megatron_consa.evaluation.models import CheckpointModels, model_logits_fn

    models = CheckpointModels(checkpoint).__enter__()
    try:
        logits_fn = model_logits_fn(models.model(fa, window=window))
    except BaseException:
        models.__exit__(None, None, None)
        raise
    return logits_fn, lambda: models.__exit__(None, None, None)
