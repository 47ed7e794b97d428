"""A torch_dist checkpoint's contents, read without megatron-core, to compare two checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch


def checkpoint_contents(directory: str | Path) -> dict:
    """Every tensor and object of the checkpoint in `directory`, by its flattened key (tensors cloned).

    Through torch.distributed.checkpoint's own reader (`dcp_to_torch_save`, into a `.pt` file
    beside the directory): the model's and optimizer's sharded tensors and the common state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    directory = Path(directory)
    file = directory.parent / f"{directory.name}.pt"
    dcp_to_torch_save(directory, file)
    state = torch.load(file, weights_only=False)

    def flat(x, prefix=""):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from flat(v, f"{prefix}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                yield from flat(v, f"{prefix}/{i}")
        else:
            yield prefix, x.clone() if isinstance(x, torch.Tensor) else x

    return dict(flat(state))


def differing_keys(a: dict, b: dict) -> list[str]:
    """The keys of `a` whose values in `b` are not bit-for-bit the same (a missing key differs)."""
    return [k for k, v in a.items() if k not in b or not (
        torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k])] + [k for k in b if k not in a]
