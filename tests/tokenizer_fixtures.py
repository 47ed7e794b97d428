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


VARIED_TEXTS = (
    "def fibonacci(n):",
    "def f(x):\n    return x  # two  spaces\n\n\nclass A:\tpass\n",
    "  two leading spaces", " one", "trailing  ", "   ", " ", "\n", "", "a\n\n b\r\nc\t\td",
    "0123456789 3.14159e-10 1,000,000 x2 2x",
    "héllo wörld — “quotes” ﬁ ＡＢＣ ① ½ ² 日本語 한국어 🤖👍🏽 é",
    "▁a literal metaspace", "x</s>y <unk> <s> <0x41>", "if (a && b) { return [1, 2]; } // done",
)
"""Text a tokenizer conversion gets wrong first: runs of spaces, leading spaces, newlines, tabs, digits,
unicode (NFKC-changed, multi-byte, byte-fallback), code, special tokens' text, the empty string."""


def varied_texts() -> list[str]:
    """`VARIED_TEXTS` and stdlib source chunks (past the ones the test tokenizers train on)."""
    from megatron_consa.data.demo_corpus import stdlib_documents

    return list(VARIED_TEXTS) + list(stdlib_documents(max_documents=140, chars=500))[100:]


def assert_same_as_sentencepiece(tokenizer, model_file: Path, texts: list[str]) -> None:
    """A transformers tokenizer encodes (without special tokens) and decodes every text as
    `sentencepiece.SentencePieceProcessor` does with `model_file`."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    for text in texts:
        ids = sp.encode(text)
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert tokenizer.decode(ids) == sp.decode(ids), text
