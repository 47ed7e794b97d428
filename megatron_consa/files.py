"""File I/O the package shares: atomic writes (a temporary file in the same directory, fsync, then
`os.replace`) and JSON reads whose errors name the file.

A reader (or a crash) sees the old file or the new one, never half of one. Used by
every file the package writes as a result (allocation.json, unit scores, evaluation
reports).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional


def _fsync_dir(directory: str) -> None:
    """Best effort: persist the rename (POSIX); ignored where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    """The process umask (read once: reading it means setting it, briefly)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: str | os.PathLike) -> None:
    """Give a file or directory made by `tempfile` (private: 0600 / 0700) the mode `open` or `mkdir` would have
    given it under the process umask, so the renamed result is as readable as any other output."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def unwritable_reason(directory: str | os.PathLike) -> Optional[str]:
    """Why nothing could be written into `directory` (made with its missing parents first), or None: its
    nearest existing ancestor, itself included, must be a directory this process can write in (tried with
    a temporary file, so a read-only file system is caught too). Nothing is made."""
    existing = Path(os.path.abspath(directory))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as err:
        return f"{existing} is not writable ({err.strerror or err})"
    return None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path` (its parent directory made) for the caller to write the result to: once
    the block ends, the file is fsynced and renamed onto `path` with the mode a plain write would give it; if
    the block raises, it is removed and `path` is left as it was."""
    path = Path(path)
    directory = str(path.parent.resolve())
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        plain_mode(tmp)
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def refuse_replacing_input(save: str | os.PathLike, inputs: dict[str, Optional[str | os.PathLike]], *,
                           error: type[Exception]) -> None:
    """Raise `error` when writing the directory `save` as a whole (`staged_directory`: the new one renamed into
    place, the old one deleted) would delete one of `inputs` ({flag: path}; None skipped): `save` is that
    input or a folder holding it."""
    out = Path(save).resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if source == out or out in source.parents:
            raise error(f"--save {save} {'is' if source == out else 'holds'} {flag} {path}: writing it would "
                        f"replace that input, deleting it; choose another --save")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (`atomic_output`). Returns the path."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_json(path: str | os.PathLike, *, what: str, error: type[Exception] = ValueError, hint: str = "") -> Any:
    """The JSON in `path`; a missing file or bad JSON raises `error` naming the path (`hint`: how to fix it)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: a directory, not the {what}: name the file") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file, so not the {what}{hint}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){hint}") from None


def json_round_trip_problem(value: Any) -> Optional[str]:
    """Why `value` would not come back equal from a JSON file (a value JSON cannot hold, NaN, a non-string
    key, a tuple), as a predicate ("is not JSON serializable (...)"), or None."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        return f"is not JSON serializable ({err})"
    if json.loads(text) != value:
        return "would not read back as written (keys must be strings and sequences lists)"
    return None


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """`obj` as indented JSON (no NaN / inf: they are not JSON), written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


__all__ = ["atomic_output", "plain_mode", "read_json", "unwritable_reason", "write_json_atomic", "write_text_atomic"]
