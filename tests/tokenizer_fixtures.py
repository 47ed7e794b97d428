"""Tokenizers made offline for tests (shared by the e2e and evaluation tests)."""

from __future__ import annotations

from pathlib import Path


def hf_tokenizer_dir(texts: list[str], out: Path, *, special: str = "") -> Path:
    """A byte-level BPE tokenizer trained here (offline) and saved as a Hugging Face tokenizer directory.

    `special`: the special tokens it adds to an encoded text (as Llama's and Mistral's do):
    "" none, "bos" a BOS first, "bos+eos" a BOS first and the EOS last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["<s>"] if special else [])
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    extra = {}
    if special:
        single = "<s> $A" + (" <|endoftext|>" if special == "bos+eos" else "")
        tok.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(t, tok.token_to_id(t)) for t in specials])
        extra["bos_token"] = "<s>"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", **extra).save_pretrained(str(out))
    return out
