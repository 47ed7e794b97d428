"""megatron-core's GPT datasets as the trainer reads them (`megatron_consa.data.gpt`): the
checks before megatron-core builds anything, and unweighted blends that last the run."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_consa.data.gpt import DataConfig, build_gpt_sources, check_split, documents_per_split
from megatron_consa.data.indexed import DataError, write_indexed_dataset


class CharTokenizer:
    """Characters as ids (a-z), EOD the last id: enough to write indexed datasets."""

    vocab_size = 32
    eod = 31
    eos = 31
    unique_identifiers = {"class": "CharTokenizer"}  # megatron-core keys its index cache by it

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text]


def _dataset(path, documents: int, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    texts = ["".join(chr(ord("a") + int(i)) for i in torch.randint(0, 26, (int(n),), generator=gen))
             for n in torch.randint(20, 60, (documents,), generator=gen)]
    write_indexed_dataset(texts, path, tokenizer_factory=CharTokenizer)
    return str(path)


def _sources(prefixes, split, train, valid=0, tmp_path=None):
    config = DataConfig(data_path=list(prefixes), split=split, cache_path=str(tmp_path / "cache"))
    return build_gpt_sources(config, CharTokenizer(), seq_length=16, train_samples=train, valid_samples=valid)


def test_a_blend_built_by_several_threads_reads_the_same_samples(tmp_path):
    """--num-dataset-builder-threads: megatron-core's builder builds the blend's datasets in
    threads; the samples are the serial build's, in the same order."""
    prefixes = [_dataset(tmp_path / f"d{i}", 30 + 7 * i, seed=i) for i in range(4)]
    built = []
    for threads in (1, 3):
        config = DataConfig(data_path=prefixes, split="90,10,0", cache_path=str(tmp_path / f"cache{threads}"),
                            num_dataset_builder_threads=threads)
        train, valid, _ = build_gpt_sources(config, CharTokenizer(), seq_length=16, train_samples=60, valid_samples=8)
        built.append(([train.sample(i) for i in range(60)], [valid.sample(i) for i in range(8)]))
    (serial_train, serial_valid), (threaded_train, threaded_valid) = built
    assert all(torch.equal(a, b) for a, b in zip(serial_train + serial_valid, threaded_train + threaded_valid))
    assert len({tuple(t.tolist()) for t in serial_train}) > 50  # (distinct samples: the comparison means something)


@pytest.mark.parametrize("bad", ["abc", "0,0,0", "1,1,1,1", "-1,2,0", "", "1,inf", "nan,1,1"])
def test_a_bad_split_is_refused_naming_the_flag(bad):
    with pytest.raises(DataError, match="--split"):
        check_split(bad)


@pytest.mark.parametrize("paths,message", [
    (["0.3", "a", "b"], "a weighted blend alternates WEIGHT PREFIX pairs ('b' stands where a weight should)"),
    (["0.3", "a", "0.7"], "a weighted blend alternates WEIGHT PREFIX pairs; give a weight before every prefix"),
    (["0.3", "a", "b", "c"], "('b' stands where a weight should)"),
    (["0.3", "a", "0", "b"], "weights [0.3, 0.0] must all be finite numbers > 0"),
    (["nan", "a", "1", "b"], "weights [nan, 1.0] must all be finite numbers > 0"),
    (["inf", "a", "1", "b"], "weights [inf, 1.0] must all be finite numbers > 0"),
])
def test_a_weighted_blend_that_does_not_pair_is_refused_naming_the_flag(paths, message):
    """`--data-path 0.3 A B` (a weight without its pair) is named as such, not read as a prefix called 0.3;
    a blend without weights stays a list of prefixes."""
    from megatron_consa.data.gpt import _parse_blend

    with pytest.raises(DataError, match=re.escape(f"--data-path {' '.join(paths)}" if "> 0" not in message else "")
                       + ".*" + re.escape(message)):
        _parse_blend(paths)
    assert _parse_blend(["a", "b"]) == (["a", "b"], None)
    assert _parse_blend(["1", "a", "3", "b"]) == (["a", "b"], [1.0, 3.0])


def test_a_test_split_is_evaluated_only_where_it_holds_documents(tmp_path):
    """What the run evaluates after training: mock data's test share, a blend's test share where it holds a
    document of every dataset (969,30,1 gives 37 documents none), a --test-data-path blend with documents."""
    from megatron_consa.data.gpt import has_test_split

    prefix = _dataset(tmp_path / "d", 37)
    tiny = _letters_dataset(tmp_path / "tiny", 2, 0, 5)  # 80,10,10 gives its test share no document
    assert documents_per_split(2, "80,10,10")[2] == 0 < documents_per_split(37, "80,10,10")[2]
    assert has_test_split(DataConfig(mock=True)) and not has_test_split(DataConfig(mock=True, split="90,10,0"))
    assert not has_test_split(DataConfig(data_path=[prefix], split="969,30,1"))
    assert has_test_split(DataConfig(data_path=[prefix], split="80,10,10"))
    assert not has_test_split(DataConfig(data_path=["1", prefix, "1", tiny], split="80,10,10"))
    assert not has_test_split(DataConfig(train_data_path=[prefix], valid_data_path=[prefix]))
    assert has_test_split(DataConfig(train_data_path=[prefix], test_data_path=[tiny]))
    # a split asked for no samples is no source, mock data's included (megatron-core builds all three there)
    train, valid, test = build_gpt_sources(DataConfig(mock=True, cache_path=str(tmp_path / "cache")), CharTokenizer(),
                                           seq_length=16, train_samples=4, valid_samples=0, test_samples=2)
    assert train is not None and valid is None and test is not None


def test_documents_per_split_is_megatron_cores_split(tmp_path):
    """The count the checks use is the one megatron-core builds (documents in each split)."""
    prefix = _dataset(tmp_path / "d", 37)
    for split in ("969,30,1", "80,15,5", "1,1,1", "95,5"):
        train, valid, test = _sources([prefix], split, train=50, valid=10, tmp_path=tmp_path)
        counts = documents_per_split(37, split)
        assert len(train.dataset.indices) == counts[0] and len(valid.dataset.indices) == counts[1], split
        assert sum(counts) == 37


@pytest.mark.timeout(120)
def test_an_empty_split_the_run_reads_is_refused_and_one_it_does_not_read_is_skipped(tmp_path):
    """With the default split a small dataset has an empty test split: unread, it is not built
    (megatron-core, asked for samples of it, looped forever); an empty split the run reads is
    refused naming --split and the prefix."""
    prefix = _dataset(tmp_path / "d", 40)
    assert documents_per_split(40, "969,30,1")[2] == 0
    train, valid, _ = _sources([prefix], "969,30,1", train=64, valid=8, tmp_path=tmp_path)
    assert len(train) >= 64 and len(valid) >= 8
    small = _dataset(tmp_path / "small", 10)
    with pytest.raises(DataError, match=r"--split 969,30,1: the valid split of --data-path .*small \(10 documents\)"):
        _sources([small], "969,30,1", train=64, valid=8, tmp_path=tmp_path)


def test_an_unweighted_blend_gives_fresh_epochs_not_a_replay(tmp_path):
    """Two prefixes without weights, asked for three epochs' worth: megatron-core draws all of
    them (weights by token count), instead of one epoch replayed in the same order."""
    a, b = _dataset(tmp_path / "a", 30, seed=1), _dataset(tmp_path / "b", 60, seed=2)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexes = [IndexedDataset(p) for p in (a, b)]  # alive while read: their arrays are views of an mmap
    one_epoch = sum(int(index.sequence_lengths.sum()) // 16 for index in indexes)  # samples of 16 + 1
    train, _, _ = _sources([a, b], "100,0,0", train=3 * one_epoch, tmp_path=tmp_path)
    assert len(train) >= 3 * one_epoch
    replayed = sum(torch.equal(train.sample(i), train.sample(i + one_epoch)) for i in range(one_epoch))
    assert replayed < one_epoch // 4


def test_eod_mask_loss_masks_what_megatron_core_masks_and_mmap_off_reads_the_same(tmp_path):
    """--eod-mask-loss: the batches' loss mask is zero exactly where the input is the EOD, as
    megatron-core's GPTDataset's own mask (the reference); --no-mmap-bin-files reads the same samples."""
    from megatron_consa.training.data import micro_batches

    prefix = _dataset(tmp_path / "d", 40, seed=3)
    sources = {}
    for eod_mask, mmap in ((False, True), (True, True), (True, False)):
        config = DataConfig(data_path=[prefix], split="100,0,0", cache_path=str(tmp_path / "cache"),
                            eod_mask_loss=eod_mask, mmap_bin_files=mmap)
        sources[eod_mask, mmap] = build_gpt_sources(config, CharTokenizer(), seq_length=16, train_samples=40,
                                                     valid_samples=0)[0]
    masked, plain = sources[True, True], sources[False, True]
    eods = 0
    for k in range(40):
        batch = micro_batches(masked, iteration=k, global_batch_size=1, micro_batch_size=1, dp_rank=0, dp_size=1)[0]
        torch.testing.assert_close(batch["loss_mask"][0], masked.dataset[k]["loss_mask"].float(), rtol=0, atol=0)
        assert torch.equal(batch["loss_mask"][0] == 0, batch["tokens"][0] == CharTokenizer.eod)
        eods += int((batch["tokens"][0] == CharTokenizer.eod).sum())
        unmasked = micro_batches(plain, iteration=k, global_batch_size=1, micro_batch_size=1, dp_rank=0, dp_size=1)[0]
        assert bool((unmasked["loss_mask"] == 1).all()) and torch.equal(unmasked["tokens"], batch["tokens"])
        assert torch.equal(sources[True, False].sample(k), masked.sample(k))
    assert eods >= 10  # documents of 20-60 letters in samples of 16: the EOD is seen often


def _letters_dataset(path, documents: int, first: int, last: int) -> str:
    gen = torch.Generator().manual_seed(first)
    texts = ["".join(chr(ord("a") + int(i)) for i in torch.randint(first, last + 1, (30,), generator=gen))
             for _ in range(documents)]
    write_indexed_dataset(texts, path, tokenizer_factory=CharTokenizer)
    return str(path)


def test_each_split_reads_its_own_blend_whole(tmp_path):
    """--train-data-path / --valid-data-path / --test-data-path (megatron-core's blend_per_split):
    each split's samples come from its own prefixes, every document of them (no --split
    share); a split the run reads without a blend is refused (megatron-core would fall back
    to its mock dataset), one it does not read is not built."""
    train_a = _letters_dataset(tmp_path / "ta", 20, 0, 5)
    train_b = _letters_dataset(tmp_path / "tb", 10, 6, 9)
    valid = _letters_dataset(tmp_path / "va", 12, 10, 15)
    test = _letters_dataset(tmp_path / "te", 8, 16, 25)
    config = DataConfig(train_data_path=[train_a, train_b], valid_data_path=[valid], test_data_path=[test],
                        cache_path=str(tmp_path / "cache"))
    train_src, valid_src, test_src = build_gpt_sources(config, CharTokenizer(), seq_length=16, train_samples=40,
                                                       valid_samples=10)
    eod = {CharTokenizer.eod}
    seen = set().union(*(set(train_src.sample(i).tolist()) for i in range(40))) - eod
    assert seen <= set(range(10)) and seen & set(range(6)) and seen & set(range(6, 10))  # both train prefixes
    assert set().union(*(set(valid_src.sample(i).tolist()) for i in range(10))) - eod <= set(range(10, 16))
    assert len(valid_src.dataset.indices) == 12  # every validation document, not a share
    assert test_src is None  # not read: not built
    with pytest.raises(DataError, match="no valid blend: give --valid-data-path"):
        build_gpt_sources(DataConfig(train_data_path=[train_a], cache_path=str(tmp_path / "cache")), CharTokenizer(),
                          seq_length=16, train_samples=8, valid_samples=4)
    with pytest.raises(DataError, match="--data-path with --train-data-path"):
        build_gpt_sources(DataConfig(data_path=[train_a], train_data_path=[train_a]), CharTokenizer(),
                          seq_length=16, train_samples=8, valid_samples=0)


def _sentencepiece(tmp_path, **kw):
    import sentencepiece

    from megatron_consa.data.demo_corpus import stdlib_documents

    texts = list(stdlib_documents(max_documents=40))
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(tmp_path / "sp"), vocab_size=600, byte_fallback=True,
        minloglevel=2, hard_vocab_limit=False, num_threads=1, **kw)
    return tmp_path / "sp.model"


def test_gpt_sentencepiece_tokenizer_is_ours_and_every_text_tokenizer_saves_itself(tmp_path):
    """Megatron-LM's GPTSentencePieceTokenizer is our SentencePieceTokenizer (EOD = EOS, no BOS
    in documents); each text tokenizer type writes its files beside a checkpoint, whence the
    tools rebuild it (a checkpoint save calls save_to)."""
    from megatron_consa.data.tokenizer import TEXT_TOKENIZER_TYPES, build_tokenizer, tokenizer_from_path
    from megatron_consa.training.arguments import parse_run_config

    model = _sentencepiece(tmp_path, bos_id=2, eos_id=1, unk_id=0, pad_id=-1)
    text = "def f(x):\n    return x\n"
    plain, gpt = (build_tokenizer(t, str(model)) for t in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"))
    ids = plain.encode(text)
    assert plain.encode_document(text) == gpt.encode_document(text) == ids and 2 not in ids and gpt.eod == 1
    run = parse_run_config(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                            "--seq-length", "32", "--train-iters", "2", "--data-path", "/data/x_text_document",
                            "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", str(model),
                            "--consa-target-warmup-iters", "0"])
    assert run.tokenizer.tokenizer_type == "GPTSentencePieceTokenizer"
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tokenizer_fixtures import hf_tokenizer_dir

    sources = {"HuggingFaceTokenizer": str(hf_tokenizer_dir([text] * 8, tmp_path / "hf"))}
    for name in TEXT_TOKENIZER_TYPES:
        tokenizer = build_tokenizer(name, sources.get(name, str(model)))
        saved = tmp_path / f"saved_{name}"
        saved.mkdir()
        tokenizer.save_to(saved)
        assert tokenizer_from_path(saved).encode(text) == tokenizer.encode(text), name
    # a sentencepiece model is read once: saved again after its file went (a checkpoint of --load that
    # --save-retain-interval deleted), the same bytes
    source = tmp_path / "gone" / "tokenizer.model"
    source.parent.mkdir()
    source.write_bytes(model.read_bytes())
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(source))
    source.unlink()
    (tmp_path / "after").mkdir()
    tokenizer.save_to(tmp_path / "after")
    assert (tmp_path / "after" / "tokenizer.model").read_bytes() == model.read_bytes()


def test_a_tokenizer_without_eos_has_no_end_of_document(tmp_path):
    """The datasets end documents with the EOS; a tokenizer without one is refused where a
    dataset is written (naming --tokenizer-model), not given an ordinary token as EOD."""
    from megatron_consa.data.tokenizer import SentencePieceTokenizer, TokenizerError

    model = _sentencepiece(tmp_path, eos_id=-1, bos_id=-1, unk_id=0)
    tokenizer = SentencePieceTokenizer(model)
    assert tokenizer.eos is None and tokenizer.encode("x = 1")  # it still encodes (generation needs no EOD)
    with pytest.raises(TokenizerError, match="--tokenizer-model .*no EOS token"):
        tokenizer.eod  # noqa: B018
    with pytest.raises(TokenizerError, match="no EOS token"):
        write_indexed_dataset(["x = 1"], tmp_path / "out", tokenizer_factory=lambda: tokenizer)
    assert not list(tmp_path.glob("out*"))


def test_a_trained_sentencepiece_model_keeps_code_as_it_is(tmp_path):
    """Newlines, indentation and runs of spaces survive encode/decode (NFKC and whitespace
    folding would turn code into one line)."""
    from megatron_consa.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    from megatron_consa.data.demo_corpus import stdlib_documents

    model = train_sentencepiece(stdlib_documents(max_documents=40), tmp_path / "tok", vocab_size=600)
    tokenizer = SentencePieceTokenizer(model)
    code = "def f(x):\n    return x  # two  spaces\n\n\nclass A:\tpass\n"
    assert tokenizer.decode(tokenizer.encode(code)) == code
    assert tokenizer.eos == 1 and tokenizer.eod == 1 and tokenizer.bos is None


def test_a_sentencepiece_runs_checkpoint_as_tokenizer_model_is_its_sentencepiece_model(tmp_path):
    """A checkpoint of a sentencepiece run holds `tokenizer.model` beside a config.json: given alone as
    --tokenizer-model, preprocessing and training read it as that model (as evaluation and export do), not as
    the tokenizer transformers would build from the config's model type (other ids, an added EOS)."""
    import importlib.util
    import json
    import shutil
    from pathlib import Path

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_consa.cli import run_tool
    from megatron_consa.data.demo_corpus import stdlib_documents
    from megatron_consa.data.tokenizer import SentencePieceTokenizer, tokenizer_from_path, train_sentencepiece
    from megatron_consa.training.arguments import parse_run_config

    docs = list(stdlib_documents(max_documents=20))
    model = train_sentencepiece(docs, tmp_path / "tok", vocab_size=400)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(model, ckpt / "tokenizer.model")
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": 512}))
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("preprocess_data", root / "tools" / "preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d[:2000]}) + "\n" for d in docs))
    assert run_tool(tool.main, ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
                                "--tokenizer-model", str(ckpt)]) == 0
    reference = SentencePieceTokenizer(model)
    written = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [written[i].tolist() for i in range(len(docs))] == [reference.encode(d[:2000]) + [1] for d in docs]
    assert isinstance(tokenizer_from_path(ckpt), SentencePieceTokenizer)
    run = parse_run_config(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length",
                            "32", "--train-iters", "1", "--mock-data", "--tokenizer-model", str(ckpt)])
    assert run.tokenizer.tokenizer_type == "SentencePieceTokenizer"


@pytest.mark.parametrize("kind", ["bpe", "unigram", "defaults_with_bos"])
def test_a_sentencepiece_model_saves_itself_as_the_same_hugging_face_tokenizer(tmp_path, kind):
    """`save_hf` writes files `AutoTokenizer` loads (whatever config.json's model_type: a qwen3 one
    once gave Qwen2's byte-level tokenizer) as a tokenizer that encodes and decodes as the
    sentencepiece model itself on varied text; its special tokens are the model's, none added to an
    encoding (a document, a prompt: Megatron-LM's GPTSentencePieceTokenizer puts no BOS in the data). Our models (bpe, unigram: identity normalization) and
    sentencepiece's defaults (unigram, NFKC, a BOS: defined, never added)."""
    import json
    import sys
    from pathlib import Path

    import sentencepiece
    from transformers import AutoTokenizer

    from megatron_consa.data.demo_corpus import stdlib_documents
    from megatron_consa.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, tokenizer_from_path
    from megatron_consa.data.tokenizer import train_sentencepiece

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tokenizer_fixtures import assert_same_as_sentencepiece, varied_texts

    if kind == "defaults_with_bos":
        model = _sentencepiece(tmp_path, bos_id=2, eos_id=1, unk_id=0, pad_id=-1)
    else:
        model = train_sentencepiece(stdlib_documents(max_documents=40), tmp_path / "tok", vocab_size=600, model_type=kind)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    out = tmp_path / "hf"
    out.mkdir()
    assert sorted(SentencePieceTokenizer(model).save_hf(out)) == ["tokenizer.json", "tokenizer_config.json"]
    (out / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    hf = AutoTokenizer.from_pretrained(str(out))
    assert_same_as_sentencepiece(hf, model, varied_texts())
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (bos, sp.eos_id(), sp.unk_id()) == (
        2 if kind == "defaults_with_bos" else None, 1, 0)
    text = "def f(x):\n    return x"
    assert hf.encode(text) == SentencePieceTokenizer(model).encode_prompt(text) == sp.encode(text)
    # the tools read the directory as a Hugging Face tokenizer, with the same ids
    again = tokenizer_from_path(out)
    assert isinstance(again, HuggingFaceTokenizer) and again.encode(text) == sp.encode(text) and again.eos == 1
    # one document, one encoding: the data written with the model file or with its export, and a prompt
    from megatron_consa.data.indexed import document_ids

    doc = document_ids(SentencePieceTokenizer(model), text)
    assert doc == document_ids(again, text) == sp.encode(text) + [1]


def test_a_sentencepiece_model_transformers_cannot_reproduce_is_refused(tmp_path):
    """A word model has no Hugging Face conversion: refused, naming the model and the fix, rather than
    written as a tokenizer that encodes otherwise."""
    from megatron_consa.data.tokenizer import SentencePieceTokenizer, TokenizerError

    model = _sentencepiece(tmp_path, model_type="word", eos_id=1, bos_id=-1, unk_id=0)
    with pytest.raises(TokenizerError, match=r"sp\.model: a sentencepiece 'word' model .*use a bpe or unigram model \(--tokenizer-model"):
        SentencePieceTokenizer(model).save_hf(tmp_path)
    assert not list(tmp_path.glob("tokenizer*"))


def test_data_from_another_tokenizer_is_refused_by_name(tmp_path):
    """Ids beyond the tokenizer's vocabulary (data tokenized with a larger one) fail with an
    error naming the flags, not an embedding index error (a device-side assert on a GPU)."""

    class Smaller(CharTokenizer):
        vocab_size = 16

    prefix = _dataset(tmp_path / "d", 20)
    config = DataConfig(data_path=[prefix], split="100,0,0", cache_path=str(tmp_path / "cache"))
    train, _, _ = build_gpt_sources(config, CharTokenizer(), seq_length=16, train_samples=8, valid_samples=0)
    assert int(train.sample(0).max()) < 32
    train, _, _ = build_gpt_sources(config, Smaller(), seq_length=16, train_samples=8, valid_samples=0)
    with pytest.raises(DataError, match="beyond the tokenizer's 16 ids.*--data-path and --tokenizer-model"):
        train.sample(0)
    # pre-tokenized data read with the NullTokenizer: the advice is Megatron-LM's convention, not a tokenizer
    from megatron_consa.data.tokenizer import NullTokenizer

    train, _, _ = build_gpt_sources(config, NullTokenizer(16), seq_length=16, train_samples=8, valid_samples=0)
    with pytest.raises(DataError, match=r"beyond the NullTokenizer's 16 ids .*its EOD is the last id, 15.*--vocab-size V\+1"):
        train.sample(0)


def test_input_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    from megatron_consa.data.indexed import iter_jsonl_texts

    bad = tmp_path / "in.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"in\.jsonl:2: not UTF-8"):
        list(iter_jsonl_texts([bad]))
    bad.write_text('{"text": "fine"}\n{"text": "scraped \\ud800 text"}\n')  # valid JSON, a lone surrogate
    with pytest.raises(DataError, match=r"in\.jsonl:2: field 'text' holds '\\ud800', a lone surrogate"):
        list(iter_jsonl_texts([bad]))


def test_a_rewrite_killed_between_its_renames_never_pairs_a_new_bin_with_an_old_idx(tmp_path, monkeypatch):
    """Over an existing dataset, a kill after the .bin is in place leaves the prefix without
    an .idx (refused by name), not the new .bin read through the old .idx."""
    import os

    from megatron_consa.data.gpt import check_data_paths

    prefix = _dataset(tmp_path / "d", 10)
    real, calls = os.replace, []

    def killed_at_the_idx(src, dst):
        calls.append(dst)
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_idx)
    with pytest.raises(KeyboardInterrupt):
        _dataset(tmp_path / "d", 30, seed=5)
    monkeypatch.setattr(os, "replace", real)
    assert [str(c)[-4:] for c in calls] == [".bin", ".idx"]
    with pytest.raises(DataError, match=r"d\.idx does not exist"):
        check_data_paths(DataConfig(data_path=[prefix]))


def test_a_dataset_rewritten_under_its_prefix_is_not_read_through_old_cached_indices(tmp_path):
    """megatron-core keys its cached sample indices by the prefix, not the file: after the
    prefix is preprocessed again, the run reads the new documents."""
    prefix = _dataset(tmp_path / "d", 10, seed=1)
    config = DataConfig(data_path=[prefix], split="100,0,0")
    before, _, _ = build_gpt_sources(config, CharTokenizer(), seq_length=16, train_samples=8, valid_samples=0)
    old = [before.sample(i) for i in range(8)]
    _dataset(tmp_path / "d", 50, seed=2)
    after, _, _ = build_gpt_sources(config, CharTokenizer(), seq_length=16, train_samples=8, valid_samples=0)
    assert len(after.dataset.indices) == 50
    assert not all(torch.equal(a, b) for a, b in zip(old, (after.sample(i) for i in range(8))))


def test_an_unwritable_index_cache_is_refused_before_any_work(tmp_path):
    from megatron_consa.data.gpt import check_data_paths

    prefix = _dataset(tmp_path / "d", 10)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match=r"--data-cache-path .*a_file/cache is not writable"):
        check_data_paths(DataConfig(data_path=[prefix], cache_path=str(tmp_path / "a_file" / "cache")))


@pytest.mark.parametrize("special", ["bos", "bos+eos"])
def test_documents_keep_a_hugging_face_tokenizers_special_tokens_as_megatron_lm_writes_them(tmp_path, special):
    """A tokenizer that adds a BOS (Llama, Mistral): each document is what Megatron-LM's
    HuggingFaceTokenizer.tokenize gives (`tokenizer(text).input_ids`) followed by the EOD, in
    the .bin and in evaluation's packing; one that also adds the EOS gets no second one."""
    import sys
    from pathlib import Path

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from megatron_consa.data.tokenizer import HuggingFaceTokenizer
    from megatron_consa.evaluation.sequences import pack_documents

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tokenizer_fixtures import hf_tokenizer_dir

    docs = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "x = [1, 2, 3]\n"] * 4
    tok_dir = hf_tokenizer_dir(docs, tmp_path / "tok", special=special)
    reference = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    bos, eos = reference.bos_token_id, reference.eos_token_id
    expected = [reference(d).input_ids + ([] if special == "bos+eos" else [eos]) for d in docs]
    assert all(e[0] == bos and e[-1] == eos and e.count(eos) == 1 for e in expected)
    write_indexed_dataset(docs, tmp_path / "d", tokenizer_factory=lambda: HuggingFaceTokenizer(tok_dir))
    written = IndexedDataset(str(tmp_path / "d"))
    assert [written[i].tolist() for i in range(len(docs))] == expected
    packed = pack_documents(docs, HuggingFaceTokenizer(tok_dir), seq_length=8, max_sequences=4)
    stream = sum(expected, [])
    assert packed[:, :-1].reshape(-1).tolist() == stream[:32]


def test_preprocess_takes_a_tokenizer_directory_as_hugging_face_and_names_the_output_by_key(tmp_path, capsys):
    """--tokenizer-model DIR alone is a Hugging Face tokenizer (as in training); the output is
    <prefix>_<key>_document (Megatron-LM's naming); --train-sentencepiece with a model is refused."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "tests"))
    from tokenizer_fixtures import hf_tokenizer_dir

    from megatron_consa.cli import run_tool

    spec = importlib.util.spec_from_file_location("preprocess_data", root / "tools" / "preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    docs = [f"def f{i}(x):\n    return x + {i}\n" for i in range(30)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    tok = hf_tokenizer_dir(docs, tmp_path / "tok")
    args = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"), "--json-keys", "content"]
    assert run_tool(tool.main, args + ["--tokenizer-model", str(tok)]) == 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    written = IndexedDataset(str(tmp_path / "out_content_document"))
    reference = AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
    assert written[3].tolist() == reference.encode(docs[3], add_special_tokens=False) + [reference.eos_token_id]
    assert run_tool(tool.main, args + ["--tokenizer-model", str(tok), "--train-sentencepiece", "300"]) == 2
    assert "drop --tokenizer-model" in capsys.readouterr().err
    # a missing input: refused before any work, nothing made
    missing = ["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "new" / "out")]
    assert run_tool(tool.main, missing + ["--train-sentencepiece", "300"]) == 2
    assert f"--input {tmp_path / 'nope.jsonl'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # an output that cannot be written is refused before any document is read (not a traceback at the end)
    (tmp_path / "taken_content_document.idx").mkdir()
    taken = args[:3] + [str(tmp_path / "taken")] + args[4:]
    assert run_tool(tool.main, taken + ["--tokenizer-model", str(tok)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output-prefix {tmp_path / 'taken'}: ") and "is a directory" in err
    assert not (tmp_path / "taken_content_document.bin").exists()
    # Megatron-LM's command line: several keys (one dataset each) and --append-eod (one EOD, as always)
    (tmp_path / "two.jsonl").write_text("".join(json.dumps({"content": d, "title": f"f{i}"}) + "\n"
                                                for i, d in enumerate(docs)))
    assert run_tool(tool.main, ["--input", str(tmp_path / "two.jsonl"), "--output-prefix", str(tmp_path / "two"),
                                "--json-keys", "content", "title", "--append-eod", "--tokenizer-model", str(tok)]) == 0
    for key, texts in (("content", docs), ("title", [f"f{i}" for i in range(30)])):
        written = IndexedDataset(str(tmp_path / f"two_{key}_document"))
        assert [written[i].tolist() for i in (0, 7)] == [
            reference.encode(texts[i], add_special_tokens=False) + [reference.eos_token_id] for i in (0, 7)]
    # a key the input lacks: refused before any output is made, whichever key it is (one pass for all)
    for keys in (["content", "nosuch"], ["nosuch", "content"]):
        assert run_tool(tool.main, ["--input", str(tmp_path / "two.jsonl"), "--output-prefix", str(tmp_path / "three"),
                                    "--json-keys", *keys, "--tokenizer-model", str(tok)]) == 2
        assert "two.jsonl:1: no string field 'nosuch' (choose it with --json-keys)" in capsys.readouterr().err
        assert not list(tmp_path.glob("three*"))
    assert run_tool(tool.main, ["--input", str(tmp_path), "--output-prefix", str(tmp_path / "d"),
                                "--tokenizer-model", str(tok)]) == 2
    assert f"--input {tmp_path}: a directory" in capsys.readouterr().err


def test_train_sentencepiece_learns_from_long_documents_and_reports_the_inputs_errors(tmp_path, caplog):
    """sentencepiece skips any training "sentence" over 64 KiB without a word: long documents are given
    to it in pieces. A bad input line is reported as itself; a vocabulary smaller than asked is a warning."""
    import json
    import logging

    from megatron_consa.data.demo_corpus import stdlib_documents
    from megatron_consa.data.indexed import DataError, iter_jsonl_texts
    from megatron_consa.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    text = "".join(stdlib_documents(max_documents=200, chars=3000))
    long_docs = [text[i:i + 70_000] for i in range(0, 210_000, 70_000)]
    assert all(len(d.encode()) > 1 << 16 for d in long_docs)
    model = train_sentencepiece(long_docs + ["short doc one"], tmp_path / "long", vocab_size=800)
    tok = SentencePieceTokenizer(model)
    assert tok.vocab_size == 800
    sample = long_docs[1][:5000]
    assert len(tok.encode(sample)) < 0.75 * len(sample.encode())  # learned from them (skipped: 1 id per byte)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + "{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON object"):
        train_sentencepiece(iter_jsonl_texts([bad]), tmp_path / "bad", vocab_size=300)

    with caplog.at_level(logging.WARNING, logger="megatron_consa.data.tokenizer"):
        small = SentencePieceTokenizer(train_sentencepiece(["ab ab ab"] * 20, tmp_path / "small", vocab_size=5000))
    assert small.vocab_size < 5000 and f"a vocabulary of {small.vocab_size} pieces" in caplog.text
