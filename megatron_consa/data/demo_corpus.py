"""An offline corpus for the CPU demo and tests: real text every machine has, plus a recall task.

* real text: the Python standard library's own sources (`sysconfig`'s stdlib
  directory), cut into documents of about `chars` characters, in sorted file order;
* a long-range recall task: a random sequence of `key_words` common words, then the
  same sequence again, and again. Predicting a repeat needs attention further back
  than the length of the key: with a sliding window shorter than that, only
  full-attention units can, so the learned allocation has a reason to keep some FA.

Deterministic in its seed. `recall_documents` is also what the recall evaluation
draws its held-out prompts from (another seed).
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path
from typing import Iterator

from megatron_consa.files import write_text_atomic

RECALL_WORDS = (
    "apple river stone cloud green metal paper light honey north tiger glass music ocean pilot candle "
    "forest silver bridge winter garden rocket yellow planet castle spring violet summer orange desert "
    "marble island copper anchor wizard falcon meadow thunder crystal harbor lemon valley"
).split()


def _stdlib_sources() -> Iterator[str]:
    """The text of each readable .py file of the standard library, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            yield path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def _chunks(text: str, chars: int) -> list[str]:
    return [text[start:start + chars] for start in range(0, len(text) - chars // 2, chars)]


def stdlib_documents(*, max_documents: int, chars: int = 1000) -> Iterator[str]:
    """Chunks of the standard library's .py sources (sorted paths, deterministic)."""
    produced = 0
    for text in _stdlib_sources():
        for chunk in _chunks(text, chars):
            yield chunk
            produced += 1
            if produced >= max_documents:
                return


def held_out_stdlib_documents(*, after_documents: int, max_documents: int, chars: int = 1000) -> list[str]:
    """Text from none of the files that `stdlib_documents(max_documents=after_documents, chars=chars)` cut:
    the first chunk of each later file, one file a document (so packed evaluation rows span many files).

    Taking the chunks that follow the first `after_documents` instead would start in the middle of the last file
    those drew from, whose beginning is in the training text."""
    documents: list[str] = []
    seen = 0
    for text in _stdlib_sources():
        chunks = _chunks(text, chars)
        if seen < after_documents:
            seen += len(chunks)
        elif chunks:
            documents.append(chunks[0])
            if len(documents) >= max_documents:
                break
    return documents


def recall_document(rng: random.Random, *, key_words: int, repeats: int) -> str:
    key = " ".join(rng.choice(RECALL_WORDS) for _ in range(key_words))
    return "recall: " + " | ".join([key] * repeats)


def recall_documents(n: int, *, key_words: int, repeats: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [recall_document(rng, key_words=key_words, repeats=repeats) for _ in range(n)]


def write_demo_corpus(path: str | os.PathLike, *, text_documents: int, recall: int, key_words: int,
                      repeats: int, seed: int = 0) -> dict:
    """JSONL of stdlib chunks and recall documents, interleaved deterministically (written atomically)."""
    docs = list(stdlib_documents(max_documents=text_documents))
    docs += recall_documents(recall, key_words=key_words, repeats=repeats, seed=seed)
    random.Random(seed + 1).shuffle(docs)
    write_text_atomic(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {"documents": len(docs), "recall": recall}
