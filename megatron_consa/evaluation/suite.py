"""Evaluate one checkpoint under several allocations: perplexity, retrieval, KV-cache bytes.

What `tools/evaluate.py` runs. Every allocation gets a fresh one-rank model of
the checkpoint (`CheckpointModels`) and the same data: the perplexity
sequences, the retrieval prompts (made once, with one seed) and the KV-cache
shape. Each allocation runs at its own window and sinks; its "beyond the
window" positions are its own (rows with one window compare directly, which is
what rule-based baselines at the same budget and window are for).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch

from megatron_consa.allocation import Allocation, allocation_from_spec
from megatron_consa.evaluation.kv_memory import KvCacheShape, allocation_bytes, dtype_bytes, format_bytes
from megatron_consa.evaluation.models import CheckpointModels, model_logits_fn
from megatron_consa.evaluation.perplexity import PerplexityResult, evaluate_perplexity
from megatron_consa.evaluation.retrieval import TASKS, BucketResult, RetrievalSample, score_retrieval
from megatron_consa.unit_scores import UnitScores

CHECKPOINT_SPEC = "checkpoint"
"""The allocation spec that means "the checkpoint's own allocation"."""


class ProgressBar(Protocol):
    def update(self, n: int) -> object: ...

    def close(self) -> object: ...


class _NoProgress:
    def update(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


ProgressFactory = Callable[[int, str], ProgressBar]
"""(total, description) -> a bar with update(n) and close() (tqdm fits)."""


@dataclass(frozen=True)
class NamedAllocation:
    name: str
    """How the user named it: a preset, a file path, or `checkpoint`."""
    allocation: Allocation


def resolve_allocations(specs: Sequence[str], models: CheckpointModels, *, granularity: str,
                        target_sparsity: Optional[float], window: Optional[int] = None,
                        sink_tokens: Optional[int] = None,
                        calibration_scores: Optional[UnitScores] = None) -> list[NamedAllocation]:
    """Each spec as an allocation of the checkpoint's model.

    A spec is an `allocation.json` path, a preset name (made at `target_sparsity`
    and `granularity`), or ``checkpoint`` (the checkpoint's own). `window` /
    `sink_tokens`: the presets' (default the checkpoint's); when given they also
    replace a file's own (a what-if: same heads, another window).
    """
    arch = models.arch
    out = []
    for spec in specs:
        if spec == CHECKPOINT_SPEC:
            alloc = models.own_allocation()
            if alloc is None:
                raise ValueError(f"{models.path} has no allocation of its own (a dense or learning checkpoint): "
                                 "name an allocation file or a preset")
        else:
            alloc = allocation_from_spec(
                spec, num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, granularity=granularity,
                target_sparsity=target_sparsity, window=models.window if window is None else window,
                sink_tokens=models.sink_tokens if sink_tokens is None else sink_tokens,
                calibration_scores=calibration_scores,
            )
        if window is not None or sink_tokens is not None:
            alloc = dataclasses.replace(alloc, window=alloc.window if window is None else window,
                                        sink_tokens=alloc.sink_tokens if sink_tokens is None else sink_tokens)
        out.append(NamedAllocation(name=spec, allocation=alloc))
    return out


@dataclass(frozen=True)
class EvaluationRequest:
    """What to measure for every allocation."""

    allocations: tuple[NamedAllocation, ...]
    perplexity_sequences: Optional[torch.Tensor] = None
    """[N, seq_length + 1] tokens (`megatron_consa.evaluation.sequences`); None: no perplexity."""
    retrieval_samples: tuple[RetrievalSample, ...] = ()
    """Prompts with answers (`megatron_consa.evaluation.retrieval.make_samples`); empty: no retrieval."""
    kv_context_length: Optional[int] = None
    """Tokens per sequence for the KV-cache bytes (None: the longest context this evaluation runs)."""
    kv_batch_size: int = 1
    kv_dtype: str = "bf16"
    batch_size: int = 1
    """Sequences (or retrieval prompts of one length) per forward pass."""


@dataclass
class AllocationResult:
    """Everything measured for one allocation."""

    name: str
    allocation: Allocation
    perplexity: Optional[PerplexityResult] = None
    retrieval: list[BucketResult] = field(default_factory=list)
    kv_bytes: Optional[int] = None

    def to_dict(self) -> dict:
        a = self.allocation
        return {
            "name": self.name, "source": a.source, "granularity": a.granularity, "window": a.window,
            "sink_tokens": a.sink_tokens, "sparsity": a.achieved_sparsity, "fa": a.fa,
            "perplexity": None if self.perplexity is None else self.perplexity.to_dict(),
            "retrieval": [b.to_dict() for b in self.retrieval],
            "kv_bytes": self.kv_bytes,
        }


def kv_context_length(request: EvaluationRequest, samples: Sequence[RetrievalSample]) -> int:
    """The context the KV bytes are counted at: the request's, else the longest input the model read (a retrieval
    sample's prompt and answer but its last token, as a perplexity sequence's: teacher forcing feeds every token
    but the last)."""
    if request.kv_context_length is not None:
        return request.kv_context_length
    lengths = [len(s.tokens) - 1 for s in samples]
    if request.perplexity_sequences is not None:
        lengths.append(request.perplexity_sequences.shape[1] - 1)
    if not lengths:
        raise ValueError("nothing sets the KV-cache context length: give it (evaluate.py --kv-context-length)")
    return max(lengths)


@dataclass
class EvaluationReport:
    """The results of every allocation, with the settings they share."""

    checkpoint: str
    kv_context_length: int
    kv_batch_size: int
    kv_dtype: str
    results: list[AllocationResult]

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "kv_context_length": self.kv_context_length,
                "kv_batch_size": self.kv_batch_size, "kv_dtype": self.kv_dtype,
                "allocations": [r.to_dict() for r in self.results]}

    def table(self) -> str:
        """A Markdown table: one row per allocation, one column per measurement."""
        results = self.results
        buckets = sorted({(b.task, b.distance) for r in results for b in r.retrieval},
                         key=lambda td: (TASKS.index(td[0]), td[1]))
        has_ppl = any(r.perplexity is not None for r in results)
        head = ["allocation", "SWA share", "W"]
        if has_ppl:
            head += ["ppl", "ppl beyond W"]
        head += [f"{task} d={d}" for task, d in buckets] + [f"KV cache @{self.kv_context_length}"]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for r in results:
            cells = [r.name, f"{r.allocation.achieved_sparsity:.3f}", str(r.allocation.window)]
            if has_ppl:
                p = r.perplexity
                cells += [_fmt(p.perplexity if p else None), _fmt(p.perplexity_beyond_window if p else None)]
            got = {(b.task, b.distance): b for b in r.retrieval}
            cells += [_fmt(got[td].accuracy, ".2f") if td in got else "-" for td in buckets]
            cells.append(format_bytes(r.kv_bytes))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def evaluate_allocations(models: CheckpointModels, request: EvaluationRequest, *,
                         progress: Optional[ProgressFactory] = None) -> EvaluationReport:
    """Run `request` for every allocation; `models` must be open (``with models:``)."""
    samples = request.retrieval_samples
    context = kv_context_length(request, samples)
    arch = models.arch
    shape = KvCacheShape(num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                         context_length=context, batch_size=request.kv_batch_size,
                         bytes_per_element=dtype_bytes(request.kv_dtype))
    sequences = request.perplexity_sequences
    work = (0 if sequences is None else sequences.shape[0]) + len(samples)
    results = []
    for named in request.allocations:
        alloc = named.allocation
        result = AllocationResult(name=named.name, allocation=alloc, kv_bytes=allocation_bytes(shape, alloc))
        if work:
            bar = progress(work, named.name) if progress is not None else _NoProgress()
            logits = model_logits_fn(models.allocation_model(alloc))
            try:
                if sequences is not None:
                    result.perplexity = evaluate_perplexity(logits, sequences, window=alloc.window,
                                                            sink_tokens=alloc.sink_tokens,
                                                            batch_size=request.batch_size, progress=bar.update)
                if samples:
                    result.retrieval = score_retrieval(logits, samples, batch_size=request.batch_size,
                                                       progress=bar.update)
            finally:
                bar.close()
                del logits  # the next allocation's model is built without this one alive
        results.append(result)
    return EvaluationReport(checkpoint=str(models.path), kv_context_length=context,
                            kv_batch_size=request.kv_batch_size, kv_dtype=request.kv_dtype, results=results)


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


__all__ = [
    "CHECKPOINT_SPEC", "AllocationResult", "EvaluationReport", "EvaluationRequest", "NamedAllocation",
    "ProgressFactory", "evaluate_allocations", "kv_context_length", "resolve_allocations",
]
