"""Long-range retrieval at chosen distances: passkey in a haystack of real text, and key-value recall.

Prompts are assembled from token lists (each piece of text encoded on its own
and concatenated), so the generators work with any tokenizer that has
`encode(text) -> list[int]` and place the needle at an exact token position.

Distance
--------
A sample's *distance* ``d`` is ``q - v``: ``q`` the last prompt position (the
query that predicts the first answer token), ``v`` the position of the last
token of the needle's value. An SWA query at ``q`` sees the keys
``q - W + 1 .. q`` (plus sinks), so the value is out of its window exactly when
``d >= W``; the later answer tokens are predicted from even further away. The
smallest possible distance is the text between the value and the answer (the
needle's end and the question).

Tasks
-----
* ``passkey`` (Mohtashami & Jaggi 2023, with real text as the haystack): an
  intro, haystack, the needle ``The pass key is 48213. Remember it.``, more
  haystack, and ``What is the pass key? The pass key is``; the answer is the
  value's tokens. Every prompt of a run has the same length
  (`context_length`), the haystack before the needle shrinking as the
  distance grows; the distance is exact.
* ``kv`` (key-value recall): a list of ``<key> = <value>;`` pairs (keys of
  three common words, values of `value_digits` digits) and ``The value of
  <key> =``, asking for one key. Pairs are whole, so the queried pair's value
  ends ``d`` to ``d + (one pair's tokens) - 1`` tokens before the question ends
  (the sample records the actual distance); the pairs before it fill the
  prompt up to `context_length`.

Scoring
-------
One forward pass over prompt + answer (teacher forcing): a sample is correct
when the argmax at every answer position is the answer token, which is exactly
when greedy decoding would produce the whole answer. The mean answer NLL
(summed over its tokens) is reported beside the accuracy, per task and
requested distance (the bucket).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_consa.data.demo_corpus import RECALL_WORDS, stdlib_documents
from megatron_consa.data.indexed import document_prefix
from megatron_consa.evaluation.models import LogitsFn

TASKS = ("passkey", "kv")

PASSKEY_INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the pass key.\n")
PASSKEY_NEEDLE_PREFIX = "\nThe pass key is"
PASSKEY_NEEDLE_SUFFIX = ". Remember it.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

KV_INTRO = "Below is a list of keys and their values. Remember them: you will be asked for the value of one key.\n"
KV_SEPARATOR = ";"
KV_QUESTION = "\nThe value of"
KV_KEY_WORDS = 3
"""Words per key (from the demo corpus's common words): 85,184 distinct keys."""

DEFAULT_LEAD_TOKENS = 64
"""Default context: the longest distance's prompt plus this much haystack (or pairs) before the needle."""
HAYSTACK_CONTEXTS = 4
"""The passkey haystack holds this many contexts of text (each prompt cuts a random slice of it)."""


@dataclass(frozen=True)
class RetrievalConfig:
    """What the retrieval evaluation asks for."""

    distances: tuple[int, ...]
    """Requested distances in tokens (see the module docstring); one accuracy bucket each."""
    samples_per_distance: int = 8
    """Prompts per task and distance."""
    context_length: Optional[int] = None
    """Prompt tokens (None: the longest distance's prompt plus DEFAULT_LEAD_TOKENS)."""
    value_digits: int = 5
    """Digits of a pass key / value (the first one is not 0)."""
    seed: int = 0
    """Values, keys and haystack offsets are drawn from random.Random(seed)."""

    def __post_init__(self) -> None:
        if not self.distances or any(d < 1 for d in self.distances):
            raise ValueError(f"distances {list(self.distances)}: give one or more distances >= 1 (tokens)")
        for name in ("samples_per_distance", "value_digits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.context_length is not None and self.context_length < 1:
            raise ValueError(f"context_length={self.context_length}: must be >= 1")


@dataclass(frozen=True)
class RetrievalSample:
    """One prompt with its answer (token ids)."""

    task: str
    tokens: list[int]
    """Prompt followed by the answer."""
    prompt_length: int
    """The answer starts at this index of `tokens`."""
    answer: list[int]
    value_span: tuple[int, int]
    """[start, end) of the needle's value in the prompt (the same ids as `answer`)."""
    requested_distance: int

    @property
    def distance(self) -> int:
        """(last prompt position) - (last value position) = prompt_length - value_span[1]."""
        return self.prompt_length - self.value_span[1]


def haystack_tokens(tokenizer, num_tokens: int, documents: Optional[Iterable[str]] = None) -> list[int]:
    """Up to `num_tokens` tokens of real text: `documents`, or the Python standard library's sources."""
    docs = documents if documents is not None else stdlib_documents(max_documents=1_000_000)
    out: list[int] = []
    for doc in docs:
        out.extend(tokenizer.encode(doc))
        if len(out) >= num_tokens:
            break
    return out[:num_tokens]


def _value(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def passkey_samples(tokenizer, config: RetrievalConfig, *, haystack_documents: Optional[Iterable[str]] = None
                    ) -> list[RetrievalSample]:
    """Passkey prompts, `samples_per_distance` per distance (see the module docstring).

    The haystack is `haystack_documents` (default: the standard library's sources),
    tokenized up to HAYSTACK_CONTEXTS prompt lengths; each prompt takes a random
    contiguous slice of it.
    """
    enc = tokenizer.encode
    intro, prefix, suffix, question = (enc(t) for t in (PASSKEY_INTRO, PASSKEY_NEEDLE_PREFIX, PASSKEY_NEEDLE_SUFFIX,
                                                        PASSKEY_QUESTION))
    intro = document_prefix(tokenizer) + intro  # a prompt starts as a training document does
    rng = random.Random(config.seed)
    draws = [(d, enc(" " + _value(rng, config.value_digits)))
             for d in config.distances for _ in range(config.samples_per_distance)]
    fixed = len(intro) + len(prefix)
    shortest = len(suffix) + len(question)
    for d, _ in draws:
        if d < shortest:
            raise ValueError(f"passkey distance {d} is shorter than the needle's end and the question "
                             f"({shortest} tokens with this tokenizer): choose distances >= {shortest}")
    longest = max(fixed + len(value) + d for d, value in draws)
    context = config.context_length or longest + DEFAULT_LEAD_TOKENS
    if context < longest:
        raise ValueError(f"context_length {context} is too short: the largest distance needs a prompt of {longest} "
                         "tokens; raise the context length or lower the distance")
    haystack = haystack_tokens(tokenizer, HAYSTACK_CONTEXTS * context, haystack_documents)
    samples = []
    for d, value in draws:
        tail = d - shortest  # haystack between the needle and the question
        lead = context - fixed - len(value) - d  # haystack before the needle
        if len(haystack) < lead + tail:
            raise ValueError(f"the haystack text holds {len(haystack)} tokens; a prompt needs {lead + tail}: "
                             "give more text")
        offset = rng.randrange(len(haystack) - (lead + tail) + 1)
        hay = haystack[offset:offset + lead + tail]
        start = len(intro) + lead + len(prefix)
        prompt = intro + hay[:lead] + prefix + value + suffix + hay[lead:] + question
        samples.append(RetrievalSample(task="passkey", tokens=prompt + value, prompt_length=len(prompt),
                                       answer=list(value), value_span=(start, start + len(value)),
                                       requested_distance=d))
    return samples


def kv_recall_samples(tokenizer, config: RetrievalConfig) -> list[RetrievalSample]:
    """Key-value recall prompts, `samples_per_distance` per distance (see the module docstring)."""
    enc = tokenizer.encode
    intro, sep, question = document_prefix(tokenizer) + enc(KV_INTRO), enc(KV_SEPARATOR), enc(KV_QUESTION)
    rng = random.Random(config.seed)

    def pair(used: set) -> tuple[list[int], list[int]]:
        if len(used) >= len(RECALL_WORDS) ** KV_KEY_WORDS // 2:
            raise ValueError("the kv prompt needs more distinct keys than there are: lower the context length")
        while True:
            key = "-".join(rng.choice(RECALL_WORDS) for _ in range(KV_KEY_WORDS))
            if key not in used:
                used.add(key)
                return enc(f" {key} ="), enc(f" {_value(rng, config.value_digits)}")

    plans = []
    for d in config.distances:
        for _ in range(config.samples_per_distance):
            used: set = set()
            key, value = pair(used)
            shortest = len(sep) + len(question) + len(key)
            if d < shortest:
                raise ValueError(f"kv distance {d} is shorter than the pair's end and the question ({shortest} "
                                 f"tokens for this key): choose longer distances")
            after: list[int] = []
            while shortest + len(after) < d:
                k, v = pair(used)
                after += k + v + sep
            plans.append((d, used, key, value, after))
    longest = max(len(intro) + len(key) + len(value) + len(sep) + len(after) + len(question) + len(key)
                  for _, _, key, value, after in plans)
    context = config.context_length or longest + DEFAULT_LEAD_TOKENS
    if context < longest:
        raise ValueError(f"context_length {context} is too short: the largest distance needs a prompt of {longest} "
                         "tokens; raise the context length or lower the distance")
    samples = []
    for d, used, key, value, after in plans:
        needle = key + value + sep
        tail = after + question + key
        before: list[int] = []
        while True:
            k, v = pair(used)
            if len(intro) + len(before) + len(k + v + sep) + len(needle) + len(tail) > context:
                break
            before += k + v + sep
        start = len(intro) + len(before) + len(key)
        prompt = intro + before + needle + tail
        samples.append(RetrievalSample(task="kv", tokens=prompt + value, prompt_length=len(prompt),
                                       answer=list(value), value_span=(start, start + len(value)),
                                       requested_distance=d))
    return samples


def make_samples(task: str, tokenizer, config: RetrievalConfig, *,
                 haystack_documents: Optional[Iterable[str]] = None) -> list[RetrievalSample]:
    """The prompts of one task (`passkey` or `kv`; the haystack text is passkey's)."""
    if task == "passkey":
        return passkey_samples(tokenizer, config, haystack_documents=haystack_documents)
    if task == "kv":
        return kv_recall_samples(tokenizer, config)
    raise ValueError(f"retrieval task {task!r}: use one of {', '.join(TASKS)}")


@dataclass(frozen=True)
class BucketResult:
    """Accuracy of one task at one requested distance."""

    task: str
    distance: int
    """The requested distance (the bucket)."""
    samples: int
    correct: int
    mean_answer_nll: float
    """Answer NLL summed over its tokens, averaged over the samples."""
    min_distance: int
    max_distance: int
    """The actual distances of the bucket's samples (equal to `distance` for passkey)."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples

    def to_dict(self) -> dict:
        return dict(asdict(self), accuracy=self.accuracy)


@torch.no_grad()
def score_retrieval(logits_fn: LogitsFn, samples: Sequence[RetrievalSample], *, batch_size: int = 1,
                    progress: Optional[Callable[[int], None]] = None) -> list[BucketResult]:
    """Accuracy and answer NLL per (task, requested distance); `progress(n)` after each batch of n samples."""
    outcome: dict[int, tuple[bool, float]] = {}
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_length[len(s.tokens)].append(i)
    for length, indices in by_length.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            tokens = torch.tensor([samples[i].tokens for i in chunk], dtype=torch.int64)
            logits = logits_fn(tokens[:, :-1])  # [b, length - 1, V]
            for row, i in enumerate(chunk):
                s = samples[i]
                at = slice(s.prompt_length - 1, s.prompt_length - 1 + len(s.answer))
                answer = torch.tensor(s.answer, device=logits.device)
                nll = F.cross_entropy(logits[row, at], answer, reduction="sum")
                outcome[i] = (bool((logits[row, at].argmax(-1) == answer).all()), float(nll))
            if progress is not None:
                progress(len(chunk))
    buckets: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        buckets[(s.task, s.requested_distance)].append(i)
    results = []
    for (task, distance), indices in sorted(buckets.items(), key=lambda kv: (TASKS.index(kv[0][0]), kv[0][1])):
        results.append(BucketResult(
            task=task, distance=distance, samples=len(indices), correct=sum(outcome[i][0] for i in indices),
            mean_answer_nll=sum(outcome[i][1] for i in indices) / len(indices),
            min_distance=min(samples[i].distance for i in indices), max_distance=max(samples[i].distance for i in indices),
        ))
    return results


__all__ = [
    "TASKS", "BucketResult", "RetrievalConfig", "RetrievalSample", "haystack_tokens", "kv_recall_samples",
    "make_samples", "passkey_samples", "score_retrieval",
]
