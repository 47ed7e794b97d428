"""Where a run's scalars and images go: TensorBoard (`--tensorboard-dir`) and Weights & Biases
(`--wandb-project`), on the last rank, as in Megatron-LM.

Both get the same tags at the same iterations. W&B runs in whatever mode its environment
says (`WANDB_MODE=offline` writes the run under `wandb_save_dir` for a later `wandb sync`;
online it needs `wandb login` or `WANDB_API_KEY`).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

WANDB_MISSING = "Weights & Biases is not installed: pip install wandb (or megatron-consa[wandb])"


def wandb_installed() -> bool:
    spec = importlib.util.find_spec("wandb")
    return spec is not None and spec.origin is not None  # (not a bare wandb/ folder on the path)


class MetricWriters:
    """The run's metric sinks: a TensorBoard SummaryWriter and/or a W&B run."""

    def __init__(self, tensorboard=None, wandb_run=None) -> None:
        self.tensorboard = tensorboard
        self.wandb_run = wandb_run

    @classmethod
    def open(cls, *, tensorboard_dir: Optional[str], wandb: Optional[dict], config: dict,
             tensorboard_queue_size: int = 1000) -> Optional["MetricWriters"]:
        """Open the sinks asked for (None when none is). `wandb`: `wandb.init`'s project, name,
        dir and entity; `config`: what the W&B run records as its configuration;
        `tensorboard_queue_size`: the events TensorBoard's writer holds before writing them out."""
        tensorboard = wandb_run = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            tensorboard = SummaryWriter(log_dir=tensorboard_dir, max_queue=tensorboard_queue_size)
        if wandb:
            try:
                wandb_run = cls._open_wandb(wandb, config)
            except BaseException:
                if tensorboard is not None:
                    tensorboard.close()
                raise
        if tensorboard is None and wandb_run is None:
            return None
        return cls(tensorboard, wandb_run)

    @staticmethod
    def _open_wandb(wandb: dict, config: dict):
        import os  # (TrainingConfig.validate has checked that wandb is installed, on every rank)

        import wandb as wandb_module

        os.makedirs(wandb["dir"], exist_ok=True)
        # (a run of its own: another trainer in the process must not log into, or finish, this one)
        return wandb_module.init(**{k: v for k, v in wandb.items() if v is not None}, config=config,
                                 reinit="create_new")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: value}, step=step)

    def add_image(self, tag: str, image: Any, step: int) -> None:
        """An HWC uint8 image (numpy)."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, image, step, dataformats="HWC")
        if self.wandb_run is not None:
            import wandb as wandb_module

            self.wandb_run.log({tag: wandb_module.Image(image)}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
