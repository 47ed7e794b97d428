"""GPT sample sources on megatron-core's datasets (GPTDataset via BlendedMegatronDatasetBuilder).

`build_gpt_sources` turns a typed `DataConfig` into train / valid / test
sample sources for the trainer: blends of indexed datasets with weights,
Megatron's `--split`, its index caching, or megatron-core's mock dataset.
A source maps a global sample index to seq_length + 1 tokens
(`SampleSource.sample`), so the data position of a run is its iteration and
resuming it is exact by construction.
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
    """Where megatron-core caches its sample indices (default: beside the data)."""
    seed: int = 1234
    """Shuffling seed of the dataset indices."""


class GPTSampleSource:
    """A megatron-core GPT dataset seen as a `SampleSource` (index -> seq_length + 1 tokens)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int) -> torch.Tensor:
        item = self.dataset[index % len(self.dataset)]
        return torch.cat([item["tokens"], item["labels"][-1:]]).long()


def _parse_blend(paths: list[str]) -> tuple[list[str], Optional[list[float]]]:
    if not paths:
        raise DataError("--data-path is empty: give one or more dataset prefixes (or --mock-data)")
    if len(paths) == 1:
        return [paths[0]], None
    try:
        weights = [float(w) for w in paths[0::2]]
    except ValueError:
        return list(paths), None  # unweighted list of prefixes
    if len(paths) % 2:
        raise DataError(f"--data-path {' '.join(paths)}: weighted blends alternate WEIGHT PREFIX pairs")
    if any(w <= 0 for w in weights):
        raise DataError(f"--data-path weights {weights} must all be > 0")
    return list(paths[1::2]), weights


def check_data_paths(config: DataConfig) -> None:
    """Every prefix has a non-empty .bin and an .idx (clear error otherwise), before any work."""
    if config.mock:
        return
    prefixes, _ = _parse_blend(config.data_path)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            path = Path(prefix + suffix)
            if not path.is_file():
                raise DataError(f"--data-path {prefix}: {path} does not exist (make it with tools/preprocess_data.py)")
            if path.stat().st_size == 0:
                raise DataError(f"--data-path {prefix}: {path} is empty (re-run tools/preprocess_data.py)")


def build_gpt_sources(config: DataConfig, tokenizer, *, seq_length: int, train_samples: int,
                      valid_samples: int, test_samples: int = 0):
    """(train, valid, test) sample sources (None where a split is empty)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    common = dict(
        random_seed=config.seed, sequence_length=seq_length, tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        path_to_cache=config.cache_path, mmap_bin_files=True,
    )
    if config.mock:
        ds_config = GPTDatasetConfig(split="1,1,1", **common)
        cls = MockGPTDataset
    else:
        check_data_paths(config)
        ds_config = GPTDatasetConfig(blend=_parse_blend(config.data_path), split=config.split, **common)
        cls = GPTDataset
    sizes = [train_samples, valid_samples, test_samples]
    datasets = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, ds_config).build()
    return tuple(None if d is None else GPTSampleSource(d) for d in datasets)
