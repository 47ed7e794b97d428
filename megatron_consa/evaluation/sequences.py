"""Token sequences to score: from a text / JSONL file or a split of an indexed dataset.

Every source gives one int64 tensor ``[N, seq_length + 1]``: a row's first
``seq_length`` tokens are the model input, its last ``seq_length`` the labels.

* `pack_documents`: documents are tokenized as the preprocessing tokenizes them
  (`data.indexed.document_ids`: a Llama or Mistral BOS first, the EOD last),
  concatenated, and cut at a stride of ``seq_length`` (row ``i`` is
  tokens ``i*s .. i*s + s``), so every token after the first is a label exactly
  once, as in megatron-core's GPTDataset. The incomplete tail is dropped.
* `indexed_split_sequences`: the samples megatron-core's GPTDataset draws from
  the train / valid / test split of an indexed dataset (`--data-path`,
  `--split`), the same ones a training run validates on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from megatron_consa.data.indexed import DataError, document_ids, iter_jsonl_texts

SPLITS = ("train", "valid", "test")
logger = logging.getLogger(__name__)


DEFAULT_SPLIT = "969,30,1"
"""Megatron-LM's default --split, where neither the flags nor the checkpoint give one."""
DEFAULT_DATA_SEED = 1234
"""Megatron-LM's default --seed."""


@dataclass(frozen=True)
class SequenceSource:
    """Where evaluation or calibration sequences come from: exactly one of `text`, `data_path`, `stdlib`."""

    seq_length: int
    """Tokens a sequence feeds the model (each row holds seq_length + 1)."""
    num_sequences: int
    """Rows to take (fewer when a text file runs out)."""
    text: Optional[str] = None
    """A plain-text file (one document) or a JSONL file (one document per line)."""
    json_key: str = "text"
    """The JSONL field holding the text."""
    data_path: tuple[str, ...] = ()
    """Indexed-dataset prefixes (Megatron-LM's --data-path, blends with weights too)."""
    split: Optional[str] = None
    """Megatron-LM's --split of the blend (None: `DEFAULT_SPLIT`)."""
    data_split: str = "valid"
    """Which split of `data_path` to draw from: train, valid or test."""
    stdlib: bool = False
    """The Python standard library's sources: real text every machine has (offline demos)."""
    seed: Optional[int] = None
    """megatron-core's shuffling seed for `data_path` (None: `DEFAULT_DATA_SEED`)."""

    def __post_init__(self) -> None:
        given = [name for name, on in (("text", self.text), ("data_path", self.data_path), ("stdlib", self.stdlib))
                 if on]
        if len(given) != 1:
            raise DataError(f"give exactly one source of sequences (a text/JSONL file, an indexed dataset or the "
                            f"stdlib text); got {given or 'none'}")
        if self.seq_length < 1 or self.num_sequences < 1:
            raise DataError(f"seq_length={self.seq_length}, num_sequences={self.num_sequences}: both must be >= 1")


def load_sequences(source: SequenceSource, tokenizer) -> torch.Tensor:
    """The [N, seq_length + 1] tokens `source` names, tokenized with `tokenizer`."""
    if source.data_path:
        return indexed_split_sequences(list(source.data_path), tokenizer, split=source.split or DEFAULT_SPLIT,
                                       which=source.data_split, seq_length=source.seq_length,
                                       num_sequences=source.num_sequences,
                                       seed=DEFAULT_DATA_SEED if source.seed is None else source.seed)
    if source.stdlib:
        from megatron_consa.data.demo_corpus import stdlib_documents

        documents: Iterable[str] = stdlib_documents(max_documents=1_000_000)
    else:
        documents = text_file_documents(source.text, json_key=source.json_key)
    return pack_documents(documents, tokenizer, seq_length=source.seq_length, max_sequences=source.num_sequences)


def text_file_documents(path: str | Path, *, json_key: str = "text") -> Iterator[str]:
    """The documents of a file: one per line of a `.jsonl` (field `json_key`), else the whole file as one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix in (".jsonl", ".json"):
        yield from iter_jsonl_texts([path], json_key, key_flag="--json-key")
    else:
        yield path.read_text(encoding="utf-8")


def pack_documents(documents: Iterable[str], tokenizer, *, seq_length: int, max_sequences: int) -> torch.Tensor:
    """At most `max_sequences` rows of ``seq_length + 1`` tokens (see the module docstring)."""
    if seq_length < 1 or max_sequences < 1:
        raise ValueError(f"seq_length={seq_length}, max_sequences={max_sequences}: both must be >= 1")
    need = seq_length * max_sequences + 1
    stream: list[int] = []
    for doc in documents:
        stream.extend(document_ids(tokenizer, doc))  # (none for a document without text, as the preprocessing)
        if len(stream) >= need:
            break
    rows = min(max_sequences, (len(stream) - 1) // seq_length)
    if rows < 1:
        raise DataError(f"the text holds {len(stream)} tokens: fewer than one sequence of {seq_length + 1}; "
                        "give more text or a shorter sequence length")
    data = torch.tensor(stream[: rows * seq_length + 1], dtype=torch.int64)
    return data.unfold(0, seq_length + 1, seq_length).contiguous()


def _epochs(dataset, drawn: int) -> list[tuple[int, int]]:
    """(samples drawn, samples in one epoch) of each megatron-core GPTDataset behind ``dataset`` (itself, or
    a BlendedDataset's parts) when its first ``drawn`` samples are read."""
    import numpy

    parts = list(getattr(dataset, "datasets", None) or [dataset])
    if len(parts) == 1:
        counts = [drawn]
    else:
        index = numpy.asarray(dataset.dataset_index[:drawn])
        counts = [int((index == i).sum()) for i in range(len(parts))]
    # (an epoch's tokens: its documents' lengths, as GPTDataset._get_num_tokens_per_epoch counts them)
    return [(n, (int(numpy.sum(part.dataset.sequence_lengths[part.indices])) - part.config.add_extra_token_to_sequence)
             // part.config.sequence_length) for n, part in zip(counts, parts)]


def indexed_split_sequences(data_path: list[str], tokenizer, *, split: str, which: str, seq_length: int,
                            num_sequences: int, seed: int = 1234, cache_path: Optional[str] = None) -> torch.Tensor:
    """`num_sequences` GPTDataset samples of the `which` split (`train`, `valid` or `test`).

    megatron-core draws them as in training (shuffled with `seed`). A split holding fewer samples than asked
    would repeat its text (megatron-core's next epoch, shuffled in with the first), and the standard error
    over sequences would understate the noise: one dataset gives its one epoch instead, with a warning; a
    blend whose part runs out is warned about.
    """
    from megatron_consa.data.gpt import DataConfig, build_gpt_sources

    if which not in SPLITS:
        raise DataError(f"split {which!r}: use one of {', '.join(SPLITS)}")

    def draw(count: int):
        sizes = {name: (count if name == which else 0) for name in SPLITS}
        sources = build_gpt_sources(DataConfig(data_path=list(data_path), split=split, seed=seed,
                                               cache_path=cache_path), tokenizer, seq_length=seq_length,
                                    train_samples=sizes["train"], valid_samples=sizes["valid"],
                                    test_samples=sizes["test"])
        source = sources[SPLITS.index(which)]
        if source is None:
            raise DataError(f"--split {split}: the {which} split is empty; give it a share of the data")
        return source

    source = draw(num_sequences)
    epochs = _epochs(source.dataset, num_sequences)
    if len(epochs) == 1 and epochs[0][0] > epochs[0][1] >= 1:
        logger.warning(
            "--num-sequences %d: the %s split of --data-path holds %d sequences of %d tokens; scoring those "
            "(more would repeat its text and understate the standard error)", num_sequences, which,
            epochs[0][1], seq_length)
        num_sequences = epochs[0][1]
        source = draw(num_sequences)
    elif any(n > per_epoch for n, per_epoch in epochs):
        logger.warning(
            "--num-sequences %d: parts of the --data-path blend run out in the %s split (samples drawn / held: "
            "%s); their text repeats, which understates the standard error: ask for fewer sequences",
            num_sequences, which, ", ".join(f"{n} / {per_epoch}" for n, per_epoch in epochs))
    return torch.stack([source.sample(i) for i in range(num_sequences)])


__all__ = ["DEFAULT_DATA_SEED", "DEFAULT_SPLIT", "SPLITS", "SequenceSource", "indexed_split_sequences", "load_sequences", "pack_documents",
           "text_file_documents"]
