"""What the conversion tests share: the conversion CLIs, comparisons, and tiny random checkpoints.

Tiny random Hugging Face checkpoints of every supported family, saved as
safetensors; `IMPORT` / `EXPORT` (tools/convert_hf_to_megatron.py and
tools/convert_megatron_to_hf.py as modules: `run_tool(IMPORT.main, argv)`);
the logit tolerance and the bit-exact weight comparison.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TOL = 1e-5
"""Largest |ours - transformers| relative to max |transformers| (fp32 logits)."""


def tool(name: str):
    """tools/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMPORT, EXPORT = tool("convert_hf_to_megatron"), tool("convert_megatron_to_hf")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors file(s) (read here, not by the code under test)."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def assert_weights_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The same names, and every tensor equal bit for bit (dtype and shape included)."""
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and torch.equal(got[k], w), k

L, G, SEQ, VOCAB, WINDOW = 4, 2, 24, 96, 5

FAMILIES = ("qwen3", "qwen3_hybrid", "qwen2_bias", "llama_tied", "mistral")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""Llama 3.1's RoPE scaling (with head_dim 16 its lowest frequencies are rescaled)."""


def hf_model(kind: str):
    import transformers

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=G, rms_norm_eps=1e-6, max_position_embeddings=64, attention_dropout=0.0,
    )
    if kind == "qwen3":  # head_dim != hidden / heads
        cfg, cls = transformers.Qwen3Config(head_dim=24, rope_theta=10000.0, **common), transformers.Qwen3ForCausalLM
    elif kind == "qwen3_hybrid":  # mixed layer_types: imported with the equivalent allocation
        cfg = transformers.Qwen3Config(
            head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], **common,
        )
        cls = transformers.Qwen3ForCausalLM
    elif kind == "qwen2_bias":
        cfg, cls = transformers.Qwen2Config(rope_theta=20000.0, **common), transformers.Qwen2ForCausalLM
    elif kind == "llama_tied":  # Llama 3.x: tied embeddings, llama3 RoPE scaling
        cfg = transformers.LlamaConfig(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE, **common)
        cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        cfg, cls = transformers.MistralConfig(sliding_window=None, **common), transformers.MistralForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    torch.manual_seed(FAMILIES.index(kind))
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))  # non-trivial biases and norms
    return model


def save_hf(kind: str, directory: Path, *, sharded: bool = False) -> Path:
    model = hf_model(kind)
    model.save_pretrained(directory, max_shard_size="60KB" if sharded else "10GB")
    return directory


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def hf_logits(model_or_dir, toks=None) -> torch.Tensor:
    import transformers

    toks = tokens() if toks is None else toks
    model = model_or_dir
    if not isinstance(model_or_dir, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(toks).logits
