"""What every command-line tool in tools/ shares: logging set-up and user-error exits.

A tool's `main(argv) -> int` parses flags and does I/O; `run_tool(main)` turns the
errors a user can fix (bad flag values, wrong files, mismatched models) into one
clear line on stderr and exit status 2, instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from megatron_consa.files import unwritable_reason

logger = logging.getLogger("megatron_consa.cli")

USER_ERROR_EXIT = 2
"""Exit status for an input the user must fix (argparse uses the same)."""


class UserInputError(ValueError):
    """A tool input (path, flag, file content) the user must fix; the message says how."""


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
"""ValueError covers UserInputError, ConsaConfigError and AllocationError."""


def flag_error(flag: str, value: object, err: BaseException | str) -> UserInputError:
    """`err` (a library message about the file or value `value`) as the error of `flag`:
    `<flag> <value>: <message>`, the value not repeated when the message starts with it."""
    message, value = str(err), str(value)
    if message.startswith(f"{value}:") or message.startswith(f"{value} "):
        return UserInputError(f"{flag} {message}")
    return UserInputError(f"{flag} {value}: {message}")


def in_flag_terms(message: str, fields: Mapping[str, str]) -> str:
    """A library message with its parameter names (`target_sparsity`, `target_sparsity=0.5`)
    written as the tool's flags (`--target-sparsity`, `--target-sparsity 0.5`); `fields`:
    parameter name -> flag. "pass <name>=None" becomes "drop <flag>"."""
    for name, flag in fields.items():
        message = re.sub(rf"\bpass {name}=None\b", f"drop {flag}", message)
        message = re.sub(rf"(?<![-\w']){name}=", f"{flag} ", message)
        message = re.sub(rf"(?<![-\w']){name}\b(?!')", flag, message)
    return message


PRESET_FLAGS = {"target_sparsity": "--target-sparsity", "calibration_scores": "--calibration-scores",
                "sink_tokens": "--sink-tokens"}
"""The parameters of `allocation.allocation_from_spec` (named in its messages) -> the flags of the tools
that make a preset from them (`in_flag_terms`)."""


def below_minimum(*checks: tuple[str, Optional[float], float]) -> Optional[str]:
    """`'<flag> <value>: must be >= <minimum>'` for the first (flag, value, minimum) whose value, when
    given (not None), is below its minimum; None when all are in range."""
    for flag, value, minimum in checks:
        if value is not None and value < minimum:
            return f"{flag} {value}: must be >= {minimum}"
    return None


def check_output_file(flag: str, path: str | os.PathLike, *, example: Optional[str] = None) -> None:
    """Refuse, before any work, an output file `path` that cannot be written: an existing
    directory, a file where a parent directory must be, or a directory without write
    permission (the atomic writers create missing parents). `example`: a file name to
    suggest inside a directory given by mistake."""
    p = Path(path)
    if p.is_dir():
        fix = f"give a file path, e.g. {p / example}" if example else "choose another path"
        raise UserInputError(f"{flag} {path}: is a directory; {fix}")
    problem = unwritable_reason(Path(os.path.abspath(p)).parent)
    if problem:
        raise UserInputError(f"{flag} {path}: {problem}; choose another path")


def check_distinct_outputs(*flags_and_paths: tuple[str, Optional[str | os.PathLike]],
                           inputs: Sequence[tuple[str, Optional[str | os.PathLike]]] = ()) -> None:
    """Refuse two output flags naming the same file (the second write would replace the first), and an output
    naming one of `inputs` ((flag, path) the tool reads; None skipped): its write would replace that input."""
    read = {Path(path).resolve(): (flag, path) for flag, path in inputs if path is not None}
    seen: dict[Path, str] = {}
    for flag, path in flags_and_paths:
        if path is None:
            continue
        key = Path(path).resolve()
        if key in read:
            source_flag, source = read[key]
            raise UserInputError(f"{flag} {path} is {source_flag} {source}: writing it would replace that input; "
                                 f"give {flag} another file")
        if key in seen:
            raise UserInputError(f"{seen[key]} and {flag} both name {path}: give each its own file")
        seen[key] = flag


NOISY_LOGGERS = ("megatron", "torch", "py.warnings")
"""Libraries whose INFO lines and deprecation notices bury ours (megatron-core's GPTModel, FSDP, async save)."""


def setup_logging(verbose: bool = False, *, level: Optional[int] = None,
                  fmt: str = "%(levelname)s %(name)s: %(message)s", datefmt: Optional[str] = None) -> None:
    """Our loggers at INFO (DEBUG with `verbose`); the noisy libraries at ERROR unless `verbose`."""
    logging.basicConfig(level=level if level is not None else logging.DEBUG if verbose else logging.INFO,
                        format=fmt, datefmt=datefmt)
    if not verbose:
        quiet_libraries()


def quiet_libraries() -> None:
    """The noisy libraries' loggers at ERROR, and their warnings off (megatron-core's "Apex is
    not installed", its deprecation notices): what a tool's process shows is ours. Also
    called by the processes a tool spawns (import ranks), which inherit none of this."""
    import warnings

    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module=r"(megatron|torch|transformers|huggingface_hub|safetensors)(\.|$)")


class _CurrentStderrHandler(logging.StreamHandler):
    """A handler on whatever `sys.stderr` is when a record is emitted (a redirected or
    captured stream included), not the one at import."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


user_errors = logging.getLogger("megatron_consa.user_error")
"""Where the entry points report an input the user must fix: the bare message, one line
on stderr, whatever the root logger's format (it does not propagate)."""
user_errors.addHandler(_CurrentStderrHandler())
user_errors.setLevel(logging.ERROR)
user_errors.propagate = False


def report_user_error(message: str) -> None:
    """`error: <message>` on stderr, through the `megatron_consa.user_error` logger."""
    user_errors.error("error: %s", message)


def run_tool(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run `main(argv)`; a user error becomes `error: <message>` on stderr and exit status 2."""
    try:
        return main(argv)
    except USER_ERRORS as err:
        report_user_error(str(err))
        return USER_ERROR_EXIT
