"""What every command-line tool in tools/ shares: logging set-up and user-error exits.

A tool's `main(argv) -> int` parses flags and does I/O; `run_tool(main)` turns the
errors a user can fix (bad flag values, wrong files, mismatched models) into one
clear line on stderr and exit status 2, instead of a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Optional, Sequence

logger = logging.getLogger("megatron_consa.cli")

USER_ERROR_EXIT = 2
"""Exit status for an input the user must fix (argparse uses the same)."""


class UserInputError(ValueError):
    """A tool input (path, flag, file content) the user must fix; the message says how."""


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
"""ValueError covers UserInputError, ConsaConfigError and AllocationError."""


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
