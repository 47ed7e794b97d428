"""GPT sample sources on megatron-core's datasets (GPTDataset via BlendedMegatronDatasetBuilder).

`build_gpt_sources` turns a typed `DataConfig` into train / valid / test
sample sources for the trainer: blends of indexed datasets with weights,
Megatron's `--split` of one blend or a blend per split (`--train-data-path`,
`--valid-data-path`, `--test-data-path`), its index caching, or megatron-core's
mock dataset.
A source maps a global sample index to seq_length + 1 tokens
(`SampleSource.sample`), so the data position of a run is its iteration: a
resume with the same data, split, seed, batch and length reads on exactly where
the run stopped (`training.run` refuses a resume that changes them). A resume
that extends `--train-iters` asks megatron-core for more samples; where that
needs more epochs of a dataset, megatron-core shuffles the documents of all its
epochs anew, so the samples after the resume point come from a new order (as in
Megatron-LM).

Checked before megatron-core builds anything (it would loop forever on a split
asked for samples that holds no document, and assert on a bad split string): the
split string, and that every split the run reads holds documents of every prefix.
An unweighted blend of several prefixes is weighted by their token counts, so
megatron-core draws every epoch it needs from each (with no weights it builds
one epoch of the concatenation, which a longer run would replay in the same order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_consa.data.indexed import DataError


@dataclass
class DataConfig:
    """Where the training text comes from."""

    data_path: list[str] = field(default_factory=list)
    """Megatron-LM's `--data-path`: prefixes of .bin/.idx pairs, optionally weighted
    (`0.3 a 0.7 b`)."""
    split: str = "969,30,1"
    """Train/valid/test split of the blend (Megatron-LM's `--split`)."""
    mock: bool = False
    """megatron-core's mock GPT dataset instead of files (`--mock-data`)."""
    cache_path: Optional[str] = None
    """Where megatron-core caches its sample indices (default: `cache/` beside the first
    prefix). The indices go into a subdirectory named by the datasets' fingerprint
    (each .bin/.idx's size and time), so a dataset re-written under the same prefix
    never reads the indices of the old one."""
    seed: int = 1234
    """Shuffling seed of the dataset indices."""
    train_data_path: list[str] = field(default_factory=list)
    """Megatron-LM's `--train-data-path`: the training blend, whole (with `valid_data_path` and
    `test_data_path` instead of `data_path` and `split`, for data that comes split)."""
    valid_data_path: list[str] = field(default_factory=list)
    """Megatron-LM's `--valid-data-path`: the validation blend, whole."""
    test_data_path: list[str] = field(default_factory=list)
    """Megatron-LM's `--test-data-path`: the test blend, whole."""
    eod_mask_loss: bool = False
    """Megatron-LM's `--eod-mask-loss`: no loss where the input token is the EOD, i.e. the
    first token of a document is not predicted from the end of the previous one."""
    num_dataset_builder_threads: int = 1
    """Threads building the blend's datasets and their sample indices at start (Megatron-LM's
    `--num-dataset-builder-threads`; megatron-core's builder): for blends of many prefixes."""
    mmap_bin_files: bool = True
    """Read the `.bin` files through mmap (Megatron-LM's `--no-mmap-bin-files` turns it off:
    plain reads, for file systems where mmap is slow)."""

    @property
    def per_split(self) -> bool:
        """Whether each split has its own blend (`--train-data-path` ...) instead of `--split` of one."""
        return bool(self.train_data_path or self.valid_data_path or self.test_data_path)

    def split_paths(self) -> list[tuple[str, list[str]]]:
        """(flag, paths) of each split's blend, train / valid / test (per-split data only)."""
        return [("--train-data-path", self.train_data_path), ("--valid-data-path", self.valid_data_path),
                ("--test-data-path", self.test_data_path)]


class GPTSampleSource:
    """A megatron-core GPT dataset seen as a `SampleSource` (index -> seq_length + 1 tokens)."""

    def __init__(self, dataset, vocab_size: int, eod_mask_id: Optional[int] = None, null_tokenizer: bool = False):
        self.dataset = dataset
        self.null_tokenizer = null_tokenizer
        self.vocab_size = vocab_size
        self.eod_mask_id = eod_mask_id
        """The token whose positions carry no loss (`DataConfig.eod_mask_loss`), or None."""

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int) -> torch.Tensor:
        item = self.dataset[index % len(self.dataset)]
        tokens = torch.cat([item["tokens"], item["labels"][-1:]]).long()
        top = int(tokens.max())
        if top >= self.vocab_size:  # on a GPU the embedding would fail with a device-side assert
            if self.null_tokenizer:
                raise DataError(
                    f"sample {index} holds token id {top}, beyond the NullTokenizer's {self.vocab_size} ids "
                    f"(--vocab-size {self.vocab_size}; its EOD is the last id, {self.vocab_size - 1}): data "
                    "pre-tokenized under Megatron-LM's NullTokenizer with --vocab-size V holds ids 0..V with the EOD V, "
                    "which --vocab-size V+1 reads here"
                )
            raise DataError(
                f"sample {index} holds token id {top}, beyond the tokenizer's {self.vocab_size} ids: the data was "
                "tokenized with another tokenizer; give --data-path and --tokenizer-model that belong together"
            )
        return tokens


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _parse_blend(paths: list[str], flag: str = "--data-path") -> tuple[list[str], Optional[list[float]]]:
    if not paths:
        raise DataError(f"{flag} is empty: give one or more dataset prefixes (or --mock-data)")
    if len(paths) == 1:
        return [paths[0]], None
    if not _is_number(paths[0]):
        return list(paths), None  # unweighted list of prefixes
    # weighted (the first entry is a weight): WEIGHT PREFIX pairs
    unpaired = [w for w in paths[0::2] if not _is_number(w)]
    if len(paths) % 2 or unpaired:
        where = f" ({unpaired[0]!r} stands where a weight should)" if unpaired else ""
        raise DataError(f"{flag} {' '.join(paths)}: a weighted blend alternates WEIGHT PREFIX pairs{where}; give a "
                        "weight before every prefix, or none at all")
    weights = [float(w) for w in paths[0::2]]
    if not all(0 < w < float("inf") for w in weights):  # (NaN fails too)
        raise DataError(f"{flag} weights {weights} must all be finite numbers > 0")
    return list(paths[1::2]), weights


def _blends(config: DataConfig) -> list[tuple[str, list[str], Optional[list[float]]]]:
    """(flag, prefixes, weights) of every blend the config names: `--data-path`'s, or each
    per-split one given."""
    if config.per_split:
        if config.data_path:
            raise DataError("--data-path with --train-data-path / --valid-data-path / --test-data-path: give the "
                            "whole data with --data-path and --split, or each split's own, not both")
        return [(flag, *_parse_blend(paths, flag)) for flag, paths in config.split_paths() if paths]
    return [("--data-path", *_parse_blend(config.data_path))]


def check_split(split: str) -> None:
    """Megatron-LM's `--split` ("969,30,1", "95,5", "1"): up to three non-negative train/valid/test
    weights with a positive sum; a clear error for anything else (megatron-core would assert, or
    read "-1" as 1)."""
    parts = [p.strip() for p in str(split).replace("/", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(not 0 <= v < float("inf") for v in values) or sum(values) <= 0:
        raise DataError(f"--split {split!r}: give up to three finite non-negative train,valid,test weights with a "
                        "positive sum, e.g. 969,30,1")


def documents_per_split(num_documents: int, split: str) -> list[int]:
    """How many documents of a dataset of `num_documents` each split holds, by megatron-core's
    rule (`BlendedMegatronDatasetBuilder`: bounds at round(cumulative share x documents))."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split,
    )

    check_split(split)  # megatron-core's parser asserts (or misreads) what this refuses
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [0 if ends is None else int(round(ends[1] * float(num_documents))) - int(round(ends[0] * float(num_documents)))
            for ends in matrix]


def has_test_split(config: DataConfig) -> bool:
    """Whether the data has a test split to evaluate: a --test-data-path blend holding documents, or a
    --split test share (of mock data; of a blend, holding documents of every dataset: the default
    969,30,1 gives a small corpus none)."""
    if config.per_split:
        prefixes = _parse_blend(config.test_data_path, "--test-data-path")[0] if config.test_data_path else []
        return bool(prefixes) and all(_index_counts(prefix)[0] > 0 for prefix in prefixes)
    if config.mock:  # (its dataset has every split; the run reads the ones --split gives a share)
        return documents_per_split(1000, config.split)[2] > 0
    prefixes, _ = _parse_blend(config.data_path)
    return all(documents_per_split(_index_counts(prefix)[0], config.split)[2] > 0 for prefix in prefixes)


def _index_counts(prefix: str) -> tuple[int, int]:
    """(documents, tokens) of an indexed dataset, from its .idx alone."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(prefix, mmap=True)
    return len(index.document_indices) - 1, int(index.sequence_lengths.sum())


def _cache_dir(config: DataConfig, prefixes: list[str]) -> str:
    """`cache_path` (default `cache/` beside the first prefix) / the datasets' fingerprint."""
    import hashlib

    digest = hashlib.sha256()
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            stat = os.stat(prefix + suffix)
            digest.update(f"{os.path.abspath(prefix + suffix)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return os.path.join(_cache_root(config, prefixes), f"GPTDataset_indices-{digest.hexdigest()[:16]}")


def _cache_root(config: DataConfig, prefixes: list[str]) -> str:
    return config.cache_path or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache")


def _check_cache_writable(config: DataConfig, prefixes: list[str]) -> None:
    import tempfile

    root = _cache_root(config, prefixes)
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as err:
        where = f"--data-cache-path {root}" if config.cache_path else f"the index cache beside the data, {root},"
        raise DataError(f"{where} is not writable ({err.strerror or err}): pass --data-cache-path a directory you "
                        "can write") from None


def check_data_paths(config: DataConfig) -> None:
    """The split string is one, every prefix has a non-empty .bin and an .idx, and the index
    cache is writable (clear errors otherwise), before any work."""
    if config.mock:
        return
    blends = _blends(config)
    if not config.per_split:
        check_split(config.split)
    for flag, prefixes, _ in blends:
        for prefix in prefixes:
            for suffix in (".bin", ".idx"):
                path = Path(prefix + suffix)
                if not path.is_file():
                    raise DataError(f"{flag} {prefix}: {path} does not exist (make it with tools/preprocess_data.py)")
                if path.stat().st_size == 0:
                    raise DataError(f"{flag} {prefix}: {path} is empty (re-run tools/preprocess_data.py)")
    _check_cache_writable(config, _all_prefixes(blends))


def _all_prefixes(blends) -> list[str]:
    return list(dict.fromkeys(prefix for _, prefixes, _ in blends for prefix in prefixes))


def _blend_weights(prefixes: list[str], weights: Optional[list[float]], counts: dict) -> Optional[list[float]]:
    """The given weights, or for several unweighted prefixes their token counts (see the module
    docstring: megatron-core would otherwise replay one epoch of their concatenation)."""
    if weights is None and len(prefixes) > 1:
        return [float(counts[prefix][1]) for prefix in prefixes]
    return weights


def build_gpt_sources(config: DataConfig, tokenizer, *, seq_length: int, train_samples: int,
                      valid_samples: int, test_samples: int = 0):
    """(train, valid, test) sample sources (None where a split is empty or asked for no samples)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    common = dict(
        random_seed=config.seed, sequence_length=seq_length, tokenizer=tokenizer, reset_position_ids=False,
        # (its own loss_mask is not read: the batches make theirs from `eod_mask_id`, the same rule)
        reset_attention_mask=False, eod_mask_loss=config.eod_mask_loss, create_attention_mask=False,
        path_to_cache=config.cache_path, mmap_bin_files=config.mmap_bin_files,
        num_dataset_builder_threads=config.num_dataset_builder_threads,
    )
    wanted = (train_samples, valid_samples, test_samples)
    if config.mock:
        ds_config = GPTDatasetConfig(split="1,1,1", **common)
        cls = MockGPTDataset
    elif config.per_split:
        check_data_paths(config)
        per_split = []
        for (flag, paths), n, name in zip(config.split_paths(), wanted, ("train", "valid", "test")):
            if n > 0 and not paths:  # (megatron-core would fall back to its mock dataset with no blend at all)
                raise DataError(f"the run reads {n} {name} samples and per-split data has no {name} blend: give {flag}")
            if n == 0:  # not read, not built
                per_split.append(None)
                continue
            prefixes, weights = _parse_blend(paths, flag)
            counts = {prefix: _index_counts(prefix) for prefix in prefixes}
            for prefix, (documents, _) in counts.items():
                if documents == 0:
                    raise DataError(f"{flag} {prefix}: holds no document, and the run reads {n} samples of it")
            per_split.append((prefixes, _blend_weights(prefixes, weights, counts)))
        common["path_to_cache"] = _cache_dir(config, _all_prefixes(_blends(config)))
        ds_config = GPTDatasetConfig(blend_per_split=per_split, **common)
        cls = GPTDataset
    else:
        check_data_paths(config)
        prefixes, weights = _parse_blend(config.data_path)
        counts = {prefix: _index_counts(prefix) for prefix in prefixes}
        for prefix, (documents, _) in counts.items():
            held = documents_per_split(documents, config.split)
            for name, n, docs in zip(("train", "valid", "test"), wanted, held):
                if n > 0 and docs == 0:
                    raise DataError(
                        f"--split {config.split}: the {name} split of --data-path {prefix} ({documents} documents) "
                        f"holds no document, and the run reads {n} {name} samples: give the {name} split a larger "
                        "share, or the dataset more documents"
                    )
        common["path_to_cache"] = _cache_dir(config, prefixes)
        ds_config = GPTDatasetConfig(blend=(prefixes, _blend_weights(prefixes, weights, counts)), split=config.split,
                                     **common)
        # a split the run does not read is not built (the others keep their bounds): asked for
        # 0 samples, an empty one would make megatron-core loop forever
        ds_config.split_matrix = [None if n == 0 else ends for n, ends in zip(wanted, ds_config.split_matrix)]
        cls = GPTDataset
    datasets = BlendedMegatronDatasetBuilder(cls, list(wanted), lambda: True, ds_config).build()
    eod_mask_id = int(tokenizer.eod) if config.eod_mask_loss else None
    # (a split asked for no samples is not the run's, even where megatron-core built one: mock data has every split)
    from megatron_consa.data.tokenizer import NullTokenizer

    null = isinstance(tokenizer, NullTokenizer)
    return tuple(None if d is None or n == 0 else GPTSampleSource(d, int(tokenizer.vocab_size), eod_mask_id, null)
                 for d, n in zip(datasets, wanted))
