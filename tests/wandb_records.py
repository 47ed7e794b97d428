"""Read what a Weights & Biases run wrote offline (`run-<id>.wandb`), to check it in tests.

The file is wandb's record log: a 7-byte header (":W&B", a 2-byte magic, a version),
then LevelDB's log format (32 KiB blocks of records, each a 7-byte header: CRC, length,
type; a message longer than a block's rest is split FIRST / MIDDLE / LAST) holding
wandb's protobuf `Record` messages. wandb 0.31 reads it in its Go core only, so the
tests read it here.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

_FILE_HEADER, _BLOCK, _RECORD_HEADER = 7, 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def run_file(save_dir: Path) -> Path:
    """The one offline run's record file under a `wandb.init(dir=save_dir)`."""
    files = sorted(Path(save_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def records(path: Path):
    """Every protobuf Record in the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, parts = _FILE_HEADER, []
    while pos + _RECORD_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD_HEADER:  # a block's tail too short for a header: zeros
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _RECORD_HEADER])
        body = data[pos + _RECORD_HEADER:pos + _RECORD_HEADER + length]
        pos += _RECORD_HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        assert kind in (_FULL, _FIRST, _MIDDLE, _LAST) and len(body) == length, (pos, kind, length)
        assert crc == zlib.crc32(bytes([kind]) + body), f"chunk at {pos - length - _RECORD_HEADER}: bad CRC"
        assert (kind in (_FULL, _FIRST)) == (not parts), f"chunk of type {kind} out of order at {pos}"
        parts.append(body)
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record
    assert not parts, "the file ends inside a record"


def history(path: Path) -> dict[str, dict[int, object]]:
    """{key: {step: value}} of every `run.log` the file holds."""
    out: dict[str, dict[int, object]] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            step = record.history.step.num
            for item in record.history.item:
                value = json.loads(item.value_json)
                if item.key:
                    key = item.key
                else:  # a media object's fields: nested keys under its key
                    key, *path = item.nested_key
                    for part in reversed(path):
                        value = {part: value}
                if key.startswith("_"):
                    continue
                merged = out.setdefault(key, {})
                if isinstance(value, dict) and isinstance(merged.get(step), dict):
                    merged[step] = {**merged[step], **value}
                else:
                    merged[step] = value
    return out


def config(path: Path) -> dict[str, object]:
    """The run's configuration (wandb.init's `config`)."""
    out: dict[str, object] = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):  # (the run record holds the initial configuration)
            for item in (record.run.config if kind == "run" else record.config).update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
