"""JSONL -> megatron-core indexed dataset (`.bin` / `.idx`), the format GPTDataset reads.

`write_indexed_dataset` encodes documents (one JSON object per line, text in
`json_key`) with worker processes and writes them with megatron-core's
`IndexedDatasetBuilder`, each document as Megatron-LM's preprocessing tokenizes
it (a Hugging Face tokenizer's special tokens included: a Llama or Mistral BOS
first) and followed by the tokenizer's EOD token (`document_ids`).
It writes `<prefix>.tmp.bin/.idx` first, syncs them, and at the end removes an
old `.idx` before renaming the new `.bin` and then the new `.idx` into place: a
run killed at any point leaves the old dataset, the new one, or a prefix without
its `.idx` (refused by name), never a new `.bin` read through an old `.idx`.
"""

from __future__ import annotations

import json
import os
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

_WORKER_TOKENIZER = None


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the fix."""


def iter_jsonl_records(paths: Iterable[str | os.PathLike], json_keys: Sequence[str] = ("text",), *,
                       key_flag: str = "--json-keys") -> Iterator[tuple[str, ...]]:
    """The `json_keys` fields of every line of every JSONL file, in order, one tuple per line (errors name
    file and line, and `key_flag`, the caller's flag that chooses the fields)."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"--input {path}: no such file")
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}:{n}: not UTF-8 ({err.reason} at byte {err.start}); "
                                    "JSONL input is read as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{n}: not a JSON object ({err.msg}); one JSON document per line") from err
                for json_key in json_keys:
                    if not isinstance(obj, dict) or not isinstance(obj.get(json_key), str):
                        raise DataError(f"{path}:{n}: no string field {json_key!r} (choose it with {key_flag})")
                    try:
                        obj[json_key].encode("utf-8")
                    except UnicodeEncodeError as err:  # a lone surrogate escape (\\ud800): valid JSON, not text
                        raise DataError(f"{path}:{n}: field {json_key!r} holds {err.object[err.start:err.end]!r}, "
                                        "a lone surrogate escape no tokenizer can encode: drop or replace it in that "
                                        "line") from None
                yield tuple(obj[json_key] for json_key in json_keys)


def iter_jsonl_texts(paths: Iterable[str | os.PathLike], json_key: str = "text", *,
                     key_flag: str = "--json-keys") -> Iterator[str]:
    """The `json_key` field of every line of every JSONL file, in order (see `iter_jsonl_records`)."""
    return (fields[0] for fields in iter_jsonl_records(paths, (json_key,), key_flag=key_flag))


def _init_worker(factory: Callable[[], object]) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = factory()


def _encode_document(tokenizer):
    """The tokenizer's `encode_document` (`encode` for one without it: megatron's, a test's)."""
    return getattr(tokenizer, "encode_document", tokenizer.encode)


def document_ids(tokenizer, text: str) -> list[int]:
    """`text` as a dataset document, its EOD included: `encode_document` and the EOD, unless
    the tokenizer's own special tokens already ended the document with it; none for a
    document without text (the preprocessing skips it)."""
    if not text.strip():
        return []
    ids = list(_encode_document(tokenizer)(text))
    eod = int(tokenizer.eod)
    return ids if ids and ids[-1] == eod else ids + [eod]


def document_prefix(tokenizer) -> list[int]:
    """The ids `document_ids` puts before a document's text (a Llama or Mistral BOS), or none:
    what a prompt assembled from `encode` pieces starts with to look like the training data."""
    text, full = list(tokenizer.encode("a")), list(_encode_document(tokenizer)("a"))
    for k in range(len(full) - len(text) + 1):
        if full[k:k + len(text)] == text:
            return full[:k]
    return []


def _encode(fields: tuple[str, ...]) -> list[list[int]]:
    return [document_ids(_WORKER_TOKENIZER, text) for text in fields]


def write_indexed_dataset(
    texts: Iterable[str],
    output_prefix: str | os.PathLike,
    *,
    tokenizer_factory: Callable[[], object],
    workers: int = 1,
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
    """Encode `texts` and write `<output_prefix>.bin/.idx`; returns {documents, tokens}
    (`write_indexed_datasets` with one field)."""
    return write_indexed_datasets(((text,) for text in texts), [output_prefix], tokenizer_factory=tokenizer_factory,
                                  workers=workers, progress=progress)[0]


def write_indexed_datasets(
    records: Iterable[Sequence[str]],
    output_prefixes: Sequence[str | os.PathLike],
    *,
    tokenizer_factory: Callable[[], object],
    workers: int = 1,
    progress: Optional[Callable[[int], None]] = None,
) -> list[dict]:
    """Encode field i of every record into `<output_prefixes[i]>.bin/.idx` (Megatron-LM's one pass over
    the input for all its --json-keys); returns {documents, tokens} per output. Every output is written to
    a temporary path and renamed only once all are complete: an error leaves the old outputs as they were.

    `tokenizer_factory` builds the tokenizer in each worker (tokenizers are not
    picklable); `progress(n)` is called after each record (e.g. tqdm.update).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    tokenizer = tokenizer_factory()
    int(tokenizer.eod)  # a tokenizer without an EOS to end documents fails here, before the workers start
    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    prefixes = [str(prefix) for prefix in output_prefixes]
    tmp_prefixes = [prefix + ".tmp" for prefix in prefixes]
    for prefix in prefixes:
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    builders = [IndexedDatasetBuilder(get_bin_path(tmp), dtype=dtype) for tmp in tmp_prefixes]
    stats = [{"documents": 0, "tokens": 0} for _ in prefixes]
    try:
        if workers > 1:
            pool = Pool(workers, initializer=_init_worker, initargs=(tokenizer_factory,))
            encoded = pool.imap(_encode, (tuple(r) for r in records), chunksize=16)
        else:
            pool = None
            encoded = ([document_ids(tokenizer, t) for t in record] for record in records)
        for fields in encoded:
            for builder, stat, ids in zip(builders, stats, fields):
                if not ids:
                    continue
                builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
                stat["documents"] += 1
                stat["tokens"] += len(ids)
            if progress is not None:
                progress(1)
        if pool is not None:
            pool.close()
            pool.join()
        for prefix, stat in zip(prefixes, stats):
            if stat["documents"] == 0:
                raise DataError("the input holds no non-empty document" + (f" for {prefix}" if len(prefixes) > 1
                                                                             else "") + ": nothing to write")
        for builder, tmp in zip(builders, tmp_prefixes):
            builder.finalize(get_idx_path(tmp))
        for tmp in tmp_prefixes:
            for path in (get_bin_path(tmp), get_idx_path(tmp)):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
    except BaseException:
        for tmp in tmp_prefixes:
            for path in (get_bin_path(tmp), get_idx_path(tmp)):
                if os.path.exists(path):
                    os.remove(path)
        raise
    for prefix, tmp in zip(prefixes, tmp_prefixes):
        if os.path.exists(get_idx_path(prefix)):
            os.remove(get_idx_path(prefix))  # the pair is never an old .idx over a new .bin
        os.replace(get_bin_path(tmp), get_bin_path(prefix))
        os.replace(get_idx_path(tmp), get_idx_path(prefix))
    return stats
