"""A GGUF file (llama.cpp's format) as a Hugging Face checkpoint directory.

transformers reads GGUF itself: it maps llama.cpp's tensor names back to its
own, undoes llama.cpp's RoPE reordering of the q/k rows and dequantizes every
tensor to the dtype asked for; but it refuses to `save_pretrained` a model
loaded that way. `gguf_to_hf` writes what it loaded as an ordinary checkpoint
directory (`model.safetensors`, `config.json`, `generation_config.json`, the
tokenizer), which `tools/convert_hf_to_megatron.py` imports and transformers
loads like any other. The weights are the dequantized ones: a Q4 file gives the
4-bit-rounded model, in fp32 exactly as transformers computes it from the file.

Needs the `gguf` package (`pip install gguf`). Written into a temporary sibling
directory and renamed into place, like the importer's and exporter's outputs.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from megatron_consa.conversion.hf_files import SAFETENSORS_FILE, save_safetensors, staged_directory
from megatron_consa.conversion.importer import DTYPES, OutputExistsError
from megatron_consa.files import refuse_replacing_input

logger = logging.getLogger(__name__)


def gguf_to_hf(gguf_file: str | Path, save: str | Path, *, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Dequantize `gguf_file` into the Hugging Face directory `save`; returns `save`.

    `dtype` is one of `DTYPES` (fp32 keeps every dequantized value exactly).
    An existing non-empty `save` is refused unless `overwrite`.
    """
    gguf_file, save = Path(gguf_file), Path(save)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"--gguf-file {gguf_file}: no such file; pass a .gguf file")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading a GGUF file needs the 'gguf' package: pip install gguf (make install does)")
    refuse_replacing_input(save, {"--gguf-file": gguf_file}, error=OutputExistsError)
    if save.exists() and (not save.is_dir() or any(save.iterdir())) and not overwrite:
        raise OutputExistsError(f"{save} already exists and is not empty: choose another --save, or pass --overwrite")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    logger.info("reading and dequantizing %s to %s", gguf_file, dtype)
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(**where)
    state, storages = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in storages:
            continue  # a tied weight (lm_head = embeddings): transformers re-ties it on load
        storages.add(tensor.data_ptr())
        state[name] = tensor.contiguous()
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights written are plain tensors
    with staged_directory(save) as tmp:
        save_safetensors(state, tmp / SAFETENSORS_FILE)
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info("wrote %s (%s, %d tensors)", save, config.model_type, len(state))
    return save


__all__ = ["gguf_to_hf"]
