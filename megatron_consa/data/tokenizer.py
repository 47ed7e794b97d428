"""Tokenizers the training entry and the preprocessing tool share.

Megatron-LM's names for `--tokenizer-type`:

* `SentencePieceTokenizer`: a sentencepiece `.model` file (`--tokenizer-model`);
  `train_sentencepiece` makes one from text, offline;
* `HuggingFaceTokenizer`: a local Hugging Face tokenizer directory (`--tokenizer-model`),
  loaded with `transformers.AutoTokenizer` (never from a hub);
* `NullTokenizer`: no text at all, for `--mock-data`: ids 0..vocab_size-1, EOD = vocab_size - 1;
* `GPTSentencePieceTokenizer`: Megatron-LM's name for what `SentencePieceTokenizer` is here (a
  sentencepiece model, EOD = its EOS, no extra special tokens: Megatron-LM's own
  `SentencePieceTokenizer` appends <EOD> and others after the model's vocabulary).

Each exposes `vocab_size`, `eod`, `encode(text) -> list[int]` (the text alone),
`encode_document(text)` (a dataset document as Megatron-LM's preprocessing tokenizes it:
a Hugging Face tokenizer's special tokens included, e.g. a Llama or Mistral BOS first;
the EOD is appended after it), the attributes
megatron-core's GPTDataset reads (`tokenizer.eod`, `tokenizer.vocab_size`), and
`eos`: the end-of-sequence id where the tokenizer has one (else None), where
generation stops, and `bos` likewise (what a checkpoint's config.json records). `eod` is the EOS (the null tokenizer's is its last id); a text
tokenizer without an EOS has no token to end documents with, and asking for its
`eod` (preprocessing, the datasets) is an error naming --tokenizer-model, not a
fall-back to an ordinary token.

A sentencepiece model also writes itself as Hugging Face tokenizer files
(`SentencePieceTokenizer.save_hf`: what an export carries, so that
`transformers.AutoTokenizer` loads the model's own tokenizer whatever its `model_type`).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer", "GPTSentencePieceTokenizer")
TEXT_TOKENIZER_TYPES = tuple(t for t in TOKENIZER_TYPES if t != "NullTokenizer")
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")


def id_list(ids) -> list[int]:
    """None, one token id or a sequence of them (what transformers' `eos_token_id` fields hold) as a list."""
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or does not fit; the message names the flag and the fix."""


TOKENIZER_FLAG = "--tokenizer-model"
"""The flag a tokenizer's errors name unless its caller gives its own (`flag=`: a tool's --tokenizer, or the
--load / --hf-path whose directory it was read from)."""


class _Tokenizer:
    flag = TOKENIZER_FLAG  # (the flag its errors name)

    @property
    def unique_identifiers(self) -> dict:
        """What megatron-core hashes into its dataset cache keys (it reads this attribute)."""
        return {"class": type(self).__name__, "source": str(getattr(self, "source", "")), "vocab_size": self.vocab_size}

    @property
    def eod(self) -> int:
        """The end-of-document id the datasets put between documents: the EOS."""
        if self.eos is None:
            raise TokenizerError(
                f"{self.flag} {getattr(self, 'source', '')}: the tokenizer has no EOS token, which ends each "
                "document in the datasets (any other id is ordinary text): use a tokenizer with one "
                "(tools/preprocess_data.py --train-sentencepiece trains one with EOS id 1)"
            )
        return self.eos

    def encode_document(self, text: str) -> list[int]:
        """A dataset document (see the module docstring): the text alone, here."""
        return self.encode(text)


class SentencePieceTokenizer(_Tokenizer):
    def __init__(self, model_file: str | os.PathLike, *, flag: str = TOKENIZER_FLAG):
        import sentencepiece

        path = Path(model_file)
        if not path.is_file():
            raise TokenizerError(f"{flag} {path}: no sentencepiece model file there")
        self.model_file = self.source = path
        self.flag = flag
        # (read once: a run saves it beside every checkpoint, and the file may go meanwhile, e.g. from a checkpoint
        # of --load that --save-retain-interval deletes)
        self._model_bytes = path.read_bytes()
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._model_bytes)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{flag} {path}: not a sentencepiece model ({err})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        eos, bos = int(self._sp.eos_id()), int(self._sp.bos_id())
        self.eos: Optional[int] = eos if eos >= 0 else None
        self.bos: Optional[int] = bos if bos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_prompt(self, text: str) -> list[int]:
        """A generation prompt, as a dataset document starts: the text alone, no BOS even where the model
        has one (Megatron-LM's GPTSentencePieceTokenizer writes none into the data, so a model trained on
        it never saw one; the Hugging Face tokenizer an export carries encodes alike)."""
        return self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(list(ids))

    def save_to(self, directory: Path) -> None:
        (Path(directory) / "tokenizer.model").write_bytes(self._model_bytes)  # (the umask's mode, not the source's)

    @functools.cached_property
    def hf_tokenizer(self):
        """The model as a transformers tokenizer that encodes and decodes as it does (`sentencepiece_as_hf`;
        a `TokenizerError` where the conversion cannot)."""
        return sentencepiece_as_hf(self.model_file)

    def save_hf(self, directory: str | os.PathLike) -> list[str]:
        """Write `hf_tokenizer` as Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`)
        into `directory`, whence `transformers.AutoTokenizer` loads it; returns their names."""
        names = [Path(f).name for f in self.hf_tokenizer.save_pretrained(str(directory))]
        config = Path(directory) / "tokenizer_config.json"
        from megatron_consa.files import read_json, write_json_atomic

        # the class every transformers version knows (this one's default name is transformers 5's alone)
        fields = read_json(config, what="tokenizer config", error=TokenizerError)
        write_json_atomic(config, {**fields, "tokenizer_class": "PreTrainedTokenizerFast"})
        return names


_SP_NORMAL, _SP_USER_DEFINED = 1, 4
"""sentencepiece piece types: the pieces its encoder matches in text (the others are control, unknown,
byte and unused pieces, which only ids or the byte fallback produce)."""
_SP_UNIGRAM, _SP_BPE = 1, 2
_SP_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
_NEVER_MATCHED = -1e6
"""A unigram score no segmentation picks (a normal piece's is a log-probability, about -20 at worst)."""
HF_PROBES = (
    "def fibonacci(n):\n    if n < 2:\n        return n  # two  spaces\n\treturn fibonacci(n - 1)\r\n",
    "  leading spaces, trailing  ", " x", "\n\nnewlines\n", "0123456789 3.14e-10 1,000", "x</s>y <unk> <s> <0x41>",
    "héllo wörld — “quotes” ﬁ ＡＢＣ ① ½ 日本語 🤖", "▁literal▁", "",
)
"""Texts a converted tokenizer must encode and decode as sentencepiece does (`sentencepiece_as_hf`)."""


def sentencepiece_as_hf(model_file: str | os.PathLike):
    """The sentencepiece model at `model_file` as a `transformers.PreTrainedTokenizerFast` that encodes
    (without special tokens) and decodes as `sentencepiece.SentencePieceProcessor` does.

    The backend is transformers' own sentencepiece conversion
    (`SpmConverter.build_tokenizer_from_spm_proto`, legacy prefixing: the model's normalizer, dummy
    prefix and byte fallback; BPE merges ranked by piece score), with what sentencepiece never does
    from text kept out: a special token's text (`</s>`) is encoded as text (`split_special_tokens`), and
    a unigram model's control, unknown, byte and unused pieces never match text. Special tokens: the
    model's unk / bos / eos / pad; an encoding with special tokens adds none (no BOS, as `encode_prompt`
    and the dataset documents). No `clean_up_tokenization_spaces` (it would change decoded text).
    `HF_PROBES` are checked before it is returned: a model it does not reproduce is a `TokenizerError`.
    (transformers' LlamaTokenizer, legacy=False, does not reproduce these models: it encodes leading
    spaces otherwise and adds a `<s>` the model does not have.)

    Two differences remain, outside ordinary text: with an NFKC model (sentencepiece's default
    normalization; `train_sentencepiece` uses none) a combining mark after a character NFKC expands
    ("ﬁ" + U+0301) is dropped by transformers' normalizer; and ids whose byte pieces do not form UTF-8
    decode to more replacement characters than sentencepiece's.
    """
    import sentencepiece
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:  # it needs protobuf
        raise TokenizerError(f"{model_file}: writing it as Hugging Face tokenizer files needs protobuf ({err}): "
                             "pip install protobuf") from None
    path = Path(model_file)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    pieces, model_type = proto.pieces, proto.trainer_spec.model_type
    if model_type == _SP_BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
    elif model_type == _SP_UNIGRAM:
        vocab = [(p.piece, p.score if p.type in (_SP_NORMAL, _SP_USER_DEFINED) else _NEVER_MATCHED) for p in pieces]
    else:
        raise TokenizerError(
            f"{path}: a sentencepiece {_SP_MODEL_TYPES.get(model_type, model_type)!r} model has no Hugging Face "
            "tokenizer here (bpe and unigram models have), and transformers would load another one in its place: "
            "use a bpe or unigram model (--tokenizer-model; tools/preprocess_data.py --train-sentencepiece trains bpe)")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    spec = proto.trainer_spec
    special = {f"{name}_token": pieces[i].piece for name, i in
               (("unk", spec.unk_id), ("bos", spec.bos_id), ("eos", spec.eos_id), ("pad", spec.pad_id)) if i >= 0}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                        split_special_tokens=True, **special)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    for text in HF_PROBES:
        want, got = sp.encode(text), tokenizer.encode(text, add_special_tokens=False)
        if got != want or tokenizer.decode(want) != sp.decode(want):
            raise TokenizerError(
                f"{path}: transformers' conversion of this sentencepiece model does not reproduce it "
                f"({text!r}: sentencepiece {want}, converted {got}, or a different decode), so transformers "
                "would load a tokenizer that encodes otherwise: use a model tools/preprocess_data.py "
                "--train-sentencepiece trains (--tokenizer-model)")
    return tokenizer


class HuggingFaceTokenizer(_Tokenizer):
    def __init__(self, directory: str | os.PathLike, *, flag: str = TOKENIZER_FLAG):
        from transformers import AutoTokenizer

        path = Path(directory)
        if not path.is_dir():
            raise TokenizerError(f"{flag} {path}: not a Hugging Face tokenizer directory")
        self.directory = self.source = path
        self.flag = flag
        try:
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:  # (a damaged tokenizer.json: a JSONDecodeError)
            raise TokenizerError(f"{flag} {path}: transformers cannot read the tokenizer there "
                                 f"({type(err).__name__}: {err})") from None
        self.vocab_size = int(len(self._tok))
        eos = self._tok.eos_token_id
        self.eos: Optional[int] = int(eos) if eos is not None else None
        bos = self._tok.bos_token_id
        self.bos: Optional[int] = int(bos) if bos is not None else None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> list[int]:
        """A generation prompt as transformers encodes one: with the tokenizer's special tokens
        (a Llama or Mistral BOS)."""
        return list(self._tok.encode(text, add_special_tokens=True))

    def encode_document(self, text: str) -> list[int]:
        """A dataset document as Megatron-LM's HuggingFaceTokenizer tokenizes it for
        preprocessing: with the tokenizer's special tokens (so a Llama or Mistral model keeps
        seeing the BOS its pretraining put at every document's start)."""
        return self.encode_prompt(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def save_to(self, directory: Path) -> None:
        self._tok.save_pretrained(str(directory))


class NullTokenizer(_Tokenizer):
    """No text: the mock-data tokenizer (ids are given, EOD is the last id)."""

    def __init__(self, vocab_size: int):
        if vocab_size < 2:
            raise TokenizerError(f"--vocab-size {vocab_size}: the null tokenizer needs at least 2 ids")
        self.vocab_size = int(vocab_size)
        self.eos: Optional[int] = None
        self.bos: Optional[int] = None

    @property
    def eod(self) -> int:
        return self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        raise TokenizerError("--tokenizer-type NullTokenizer has no text encoding; use it with --mock-data only")

    def save_to(self, directory: Path) -> None:  # nothing to save
        return None


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None, *, vocab_size: Optional[int] = None):
    """The tokenizer named by Megatron-LM's `--tokenizer-type` (see the module docstring)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type!r}: use one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise TokenizerError("--tokenizer-type NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)
    if not tokenizer_model:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model (a file or directory)")
    if tokenizer_type in SENTENCEPIECE_TYPES:
        model = Path(tokenizer_model)
        return SentencePieceTokenizer(model / "tokenizer.model" if model.is_dir() else model)
    return HuggingFaceTokenizer(tokenizer_model)


def tokenizer_type_of(model: str | os.PathLike) -> str:
    """The `--tokenizer-type` a `--tokenizer-model` given alone means, as `tokenizer_from_path` reads a
    path: a file is a sentencepiece model, a directory a Hugging Face tokenizer unless it holds no Hugging
    Face tokenizer files but a `tokenizer.model` (a sentencepiece run's checkpoint: its `config.json` would
    have transformers build another tokenizer from the model type)."""
    path = Path(model)
    if path.is_dir() and (_holds_hf_tokenizer(path) or not (path / "tokenizer.model").is_file()):
        return "HuggingFaceTokenizer"
    return "SentencePieceTokenizer"


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
"""Any of these marks a Hugging Face tokenizer directory."""


def _holds_hf_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in HF_TOKENIZER_FILES)


def tokenizer_from_path(path: str | os.PathLike, *, flag: str = TOKENIZER_FLAG) -> Optional[_Tokenizer]:
    """The tokenizer at `path`: a sentencepiece `.model` file, or a directory holding a Hugging Face
    tokenizer or a `tokenizer.model` (a model or checkpoint directory); None when there is none. Its
    errors name `flag`, the flag that gave `path`."""
    path = Path(path)
    if path.is_file():
        return SentencePieceTokenizer(path, flag=flag)
    if _holds_hf_tokenizer(path):
        return HuggingFaceTokenizer(path, flag=flag)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model", flag=flag)
    return None


_SP_TRAINING_CHARS = 1 << 14
"""The longest piece of text sentencepiece is given to train on: its limit is 64 KiB of UTF-8 per "sentence"
(`max_sentence_length`), and it skips longer ones without a word."""


def _training_pieces(texts: Iterable[str], errors: list) -> Iterator[str]:
    """Each text in pieces of at most `_SP_TRAINING_CHARS` characters, cut after a newline where one is
    near (newlines stay inside the pieces: code keeps them); an exception of `texts` is kept in `errors`
    (sentencepiece would report it as its own failure)."""
    try:
        for text in texts:
            while len(text) > _SP_TRAINING_CHARS:
                cut = text.rfind("\n", _SP_TRAINING_CHARS // 2, _SP_TRAINING_CHARS) + 1 or _SP_TRAINING_CHARS
                yield text[:cut]
                text = text[cut:]
            if text:
                yield text
    except Exception as err:  # noqa: BLE001 - re-raised by train_sentencepiece
        errors.append(err)
        raise


def train_sentencepiece(texts: Iterable[str], model_prefix: str | os.PathLike, *, vocab_size: int,
                        model_type: str = "bpe") -> Path:
    """Train a sentencepiece model on `texts` (offline); returns the `.model` path.

    Byte fallback is on (no unknown tokens on any input), the text is kept as it is
    (no NFKC, newlines and runs of spaces kept: code decodes to itself), and id 1 is
    the EOS the datasets use as the end-of-document token. Long documents are given to
    sentencepiece in pieces (it skips any over 64 KiB); a vocabulary smaller than asked (a
    corpus with fewer merges to make) is a warning.
    """
    import sentencepiece

    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    errors: list = []
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_training_pieces(texts, errors), model_prefix=str(prefix), vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=0.9995, unk_id=0, eos_id=1, bos_id=-1,
            pad_id=-1, max_sentence_length=1 << 16, num_threads=1, minloglevel=2, hard_vocab_limit=False,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
        )
    except RuntimeError as err:
        if errors:  # the input's own error (a bad JSONL line), not sentencepiece's
            raise errors[0] from None
        advice = {"sentences_.empty()": "the input holds no text to train on",
                  "Vocabulary size": "a larger vocabulary fixes it"}
        hint = next((fix for key, fix in advice.items() if key in str(err)), "")
        raise TokenizerError(f"--train-sentencepiece {vocab_size}: sentencepiece refused ({err})"
                             + (f": {hint}" if hint else "")) from err
    model = prefix.with_name(prefix.name + ".model")  # sentencepiece appends it (a dotted prefix keeps its dots)
    made = sentencepiece.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    if made < vocab_size:
        logger.warning("--train-sentencepiece %d: the input gave a vocabulary of %d pieces (sentencepiece found "
                       "no more merges in it): train on more text for a larger one", vocab_size, made)
    return model
