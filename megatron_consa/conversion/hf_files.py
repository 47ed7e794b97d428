"""Reading Hugging Face checkpoint directories: config.json, safetensors (sharded too), tokenizer.

Only safetensors are read (no pickle). Nothing here builds a model.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from megatron_consa.files import plain_mode

if TYPE_CHECKING:
    from megatron_consa.architecture import ArchitectureConfig

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)
"""Files copied verbatim between checkpoint directories (those present)."""


HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"


def generation_eos_ids(directory: str | Path) -> list[int]:
    """The end-of-sequence ids of `directory`'s generation_config.json, where transformers'
    `generate` stops (a chat model may list several: Llama 3 Instruct's end of turn beside its
    end of text); [] without the file or the field."""
    from megatron_consa.cli import UserInputError
    from megatron_consa.data.tokenizer import id_list
    from megatron_consa.files import read_json

    file = Path(directory) / GENERATION_CONFIG
    if not file.is_file():
        return []
    data = read_json(file, what="generation config", error=UserInputError)
    eos = data.get("eos_token_id") if isinstance(data, dict) else None
    ids = id_list(eos) if eos is None or isinstance(eos, (int, list)) else None
    if not isinstance(data, dict) or ids is None or not all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in ids):
        raise UserInputError(f"{file}: expected a JSON object whose eos_token_id is an id or a list of ids; fix it "
                             "or remove it")
    return ids


def hf_config_file(path: str | Path, *, step: Optional[int] = None, flag: Optional[str] = None) -> Path:
    """The config.json `path` names: the file itself, the one in a Hugging Face directory or a
    megatron-consa checkpoint, or (as `--load` reads them, and training's `--hf-config`) the
    one in the latest checkpoint of a training `--save` directory (its iteration `step`, if
    given) or in finalize's output. The directory is resolved by
    `training.checkpoint.resolve_load_dir` (its messages name `path` after `flag`, or alone); a
    missing file is the caller's to report."""
    path = Path(path)
    if not path.is_dir() or (path / HF_CONFIG).is_file():
        return path / HF_CONFIG if path.is_dir() else path
    from megatron_consa.training.checkpoint import TRACKER_FILE, resolve_load_dir

    try:
        return resolve_load_dir(path, step=step, flag=flag) / HF_CONFIG
    except FileNotFoundError:
        if step is not None or (path / TRACKER_FILE).is_file():  # a --save directory without that checkpoint
            raise
        return path / HF_CONFIG  # (load_hf_config names what is missing)


def load_hf_config(path: str | Path) -> Any:
    """A transformers config from a checkpoint directory or a config.json file (or a training
    `--save` directory: see `hf_config_file`). A file transformers refuses (an unknown
    model_type, a field of the wrong type, fields that contradict each other) raises
    `UserInputError` naming the file and the problem."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING, AutoConfig

    from megatron_consa.cli import UserInputError
    from megatron_consa.files import read_json

    file = hf_config_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: pass a Hugging Face checkpoint directory or its config.json "
                                "(or a megatron-consa checkpoint, or a training --save directory)")
    data = read_json(file, what="Hugging Face config", error=UserInputError)
    if not isinstance(data, dict):
        raise UserInputError(f"{file}: expected a JSON object, got {type(data).__name__}; it is not a Hugging Face "
                             "model config")
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise UserInputError(f"{file} has no 'model_type' field; it is not a Hugging Face model config")
    if model_type not in CONFIG_MAPPING:
        raise UserInputError(f"{file}: model_type={model_type!r} is not known to transformers")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (StrictDataclassError, ValueError, TypeError, KeyError) as err:
        # transformers' validation (huggingface_hub's strict dataclasses) wraps the cause in a
        # multi-line message; the cause alone says what is wrong
        cause = err.__cause__ if isinstance(err, StrictDataclassError) and err.__cause__ is not None else err
        problem = " ".join(str(cause).split())
        raise UserInputError(f"{file}: not a valid {model_type} config: {problem}; fix config.json (or re-save it "
                             "with transformers' save_pretrained)") from err


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files of `src` that exist into `dst` (their contents: the copies get the
    umask's mode, as the output's other files); returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, Path(dst) / name)
            copied.append(name)
    if not copied:
        logger.warning("no tokenizer files in %s; the output has none", src)
    return copied


def hf_config_from_arch(arch: ArchitectureConfig) -> Any:
    """A stock transformers config for `arch` (when the checkpoint carries no config.json)."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim, rope_theta=arch.rope_theta,
        rms_norm_eps=arch.rms_norm_eps, tie_word_embeddings=arch.tie_word_embeddings,
        max_position_embeddings=arch.max_position_embeddings, hidden_act="silu",
    )
    if arch.model_type in ("qwen3", "llama"):
        kw["attention_bias"] = arch.qkv_bias
    if arch.rope_scaling_factor is not None:
        from megatron_consa.architecture import LLAMA3_ROPE_FIXED

        kw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": arch.rope_theta,
                                 "factor": arch.rope_scaling_factor, **LLAMA3_ROPE_FIXED}
    return AutoConfig.for_model(arch.model_type, **kw)


@contextlib.contextmanager
def staged_directory(save: str | Path) -> Iterator[Path]:
    """A fresh temporary sibling of `save` to write an output into.

    On success it is renamed to `save`, replacing what was there (callers check
    `--overwrite` first): the old output is first renamed to a hidden sibling and
    removed only once the new one is in place, so a kill at any point leaves the old
    output or the new one (or the old one beside it, under `.<name>.old-*`), never
    neither. On any failure the temporary directory is removed, so nothing
    half-written is ever left at `save` or beside it.
    """
    save = Path(save)
    save.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save.name}.tmp-", dir=save.parent))
    try:
        plain_mode(tmp)  # mkdtemp's 0700 would make the output private
        yield tmp
        old = None
        if save.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{save.name}.old-", dir=save.parent))
            save.rename(old / save.name)
        try:
            tmp.rename(save)
        except BaseException:
            if old is not None:  # put the old output back
                (old / save.name).rename(save)
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def save_safetensors(tensors: dict, path: str | Path) -> Path:
    """`tensors` as a safetensors file at `path` (`save_pretrained`'s metadata), with the mode a plain write
    gives under the umask, as every other file of an output: safetensors writes a private temporary
    file (0600) and renames it into place."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    plain_mode(path)
    return Path(path)


def safetensors_files(hf_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory: one safetensors file or the shards its index names."""
    hf_dir = Path(hf_dir)
    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        from megatron_consa.files import read_json

        weight_map = read_json(index, what="sharded checkpoint index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map': the sharded checkpoint index is damaged")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names weight files that are missing from {hf_dir}: {missing}")
        return files
    single = hf_dir / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt"))
    hint = (
        f" (found {pickled}: pickle files are not read, since unpickling can run code; re-save the model "
        "with save_pretrained(..., safe_serialization=True))" if pickled else ""
    )
    raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {hf_dir}{hint}")


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def _open_safetensors(file: Path):
    """`safe_open(file)`; a damaged file (truncated, not safetensors) raises `ValueError` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err}); it may be truncated or damaged: "
                         "copy or download it again") from None


def check_safetensors(hf_dir: str | Path) -> list[Path]:
    """The checkpoint's weight files (`safetensors_files`), each header read: a missing,
    truncated or damaged file is refused with its name, before a model is built."""
    files = safetensors_files(hf_dir)
    for f in files:
        with _open_safetensors(f):
            pass
    return files


def _safetensors_entries(hf_dir: str | Path, desc: str) -> Iterator[tuple[Path, Any, str]]:
    """(file, open handle, tensor name) for every tensor of the checkpoint; refuses a name
    that two shards both hold."""
    from tqdm import tqdm

    seen: dict[str, str] = {}
    for f in tqdm(safetensors_files(hf_dir), desc=desc, unit="file", disable=None):  # None: off when stderr is not a terminal
        with _open_safetensors(f) as handle:
            names = list(handle.keys())
            clash = sorted(n for n in names if n in seen)
            if clash:
                raise ValueError(f"{f.name} repeats tensors already read from {seen[clash[0]]}: {clash[:5]}")
            seen.update((n, f.name) for n in names)
            for name in names:
                yield f, handle, name


def safetensors_meta(hf_dir: str | Path) -> dict:
    """Every tensor of the checkpoint as a meta tensor (its shape and dtype; no data is read)."""
    import torch

    state: dict = {}
    for f, handle, name in _safetensors_entries(hf_dir, "reading safetensors headers"):
        part = handle.get_slice(name)
        dtype = _SAFETENSORS_DTYPES.get(part.get_dtype())
        if dtype is None:
            raise ValueError(f"{f.name}: tensor {name!r} has dtype {part.get_dtype()}, which this reader does not know")
        state[name] = torch.empty(part.get_shape(), dtype=getattr(torch, dtype), device="meta")
    return state


Part = Callable[[str, tuple], Optional[tuple]]
"""(name, shape) -> the index of the tensor to read: None to skip it, `()` for all of it."""


def read_safetensors(hf_dir: str | Path, part: Optional[Part] = None) -> dict:
    """Every tensor of the checkpoint's safetensors file(s), by HF name; with `part`, only
    the part of each tensor it names (safetensors reads a slice without the rest)."""
    state: dict = {}
    for _, handle, name in _safetensors_entries(hf_dir, "reading safetensors"):
        if part is None:
            state[name] = handle.get_tensor(name)
            continue
        sliced = handle.get_slice(name)
        index = part(name, tuple(sliced.get_shape()))
        if index is None:
            continue
        state[name] = sliced[index] if index else handle.get_tensor(name)
    return state
