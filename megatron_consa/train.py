"""The training entry point: `python -m megatron_consa.train` (under torchrun for several ranks).

    torchrun --nproc-per-node 8 -m megatron_consa.train --hf-config Qwen3-0.6B/ \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
        --data-path corpus_text_document --tokenizer-type HuggingFaceTokenizer --tokenizer-model Qwen3-0.6B/ \
        --seq-length 4096 --micro-batch-size 1 --global-batch-size 64 --train-iters 2000 --lr 1e-5 \
        --consa-phase learn --consa-target-sparsity 0.75 --consa-window 1024 --save ckpt/learn --save-interval 200

Flags are parsed once here into the typed configs (`megatron_consa.training.arguments`);
`--help` lists them all. Bad input exits with status 2 and a message naming the
flag, before any training work.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


_FLAG_PREFIX = {"ConsaConfig": "--consa-", "TrainingConfig": "--", "ParallelConfig": "--"}
_FLAG_OF = {"ParallelConfig.virtual_pipeline_model_parallel_size": "--num-layers-per-virtual-pipeline-stage"}
"""Fields whose flag is not the field's name."""


DIVERGED_EXIT = 3
"""Exit status of a run stopped by a loss, gradient norm or s_hat that is not finite."""


def flag_names(message: str) -> str:
    """Name the command-line flag beside a config field in an error (`ConsaConfig.window` -> `--consa-window`)."""
    import re

    def repl(m: "re.Match") -> str:
        cls, field = m.group(1), m.group(2)
        flag = _FLAG_OF.get(f"{cls}.{field}", f"{_FLAG_PREFIX[cls]}{field.replace('_', '-')}")
        return f"{flag} ({cls}.{field})"

    return re.sub(r"\b(ConsaConfig|TrainingConfig|ParallelConfig)\.([a-z_]+)", repl, message)


def main(argv=None) -> int:
    from megatron_consa.cli import USER_ERROR_EXIT, report_user_error, setup_logging
    from megatron_consa.training.arguments import parse_run_config

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(level=logging.INFO if rank == 0 else logging.WARNING, fmt="%(asctime)s %(message)s",
                  datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore")
    try:
        run = parse_run_config(argv)
        from megatron_consa.training.run import prepare_run

        prepared = prepare_run(run, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except (ValueError, FileNotFoundError) as err:
        # Flag errors are the same on every rank, but a path (--data-path, --tokenizer-model, --load, --save,
        # ...) may be missing or unusable on one node's file system only, whose ranks would otherwise exit
        # unheard while the others wait at the rendezvous: each node's first rank reports, with its rank.
        if rank == 0:
            report_user_error(flag_names(str(err)))
        elif os.environ.get("LOCAL_RANK", "0") == "0":
            report_user_error(f"(rank {rank}) {flag_names(str(err))}")
        return USER_ERROR_EXIT
    if "WORLD_SIZE" not in os.environ:  # plain `python -m megatron_consa.train`: a one-rank world (in-memory store)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch

    from megatron_consa.training.loop import TrainingDivergedError
    from megatron_consa.training.run import run_training

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    try:
        run_training(prepared)
    except ValueError as err:
        report_user_error(f"(rank {rank}) {err}")
        return USER_ERROR_EXIT
    except TrainingDivergedError as err:  # every rank raises it at the same step
        if rank == 0:
            report_user_error(str(err))
        return DIVERGED_EXIT
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
