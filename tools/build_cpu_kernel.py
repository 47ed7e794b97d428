#!/usr/bin/env python
"""Compile the banded CPU sliding-window kernel now (make install runs this), instead of on first use.

    python tools/build_cpu_kernel.py [--require]

Prints where the compiled module is. Where it does not build (no C++ compiler, a
torch without MKL) the library warns and uses the slower flash-op kernel; this
tool then says so and exits 0, or 1 with --require.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_consa.backends import cpu_extension


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--require", action="store_true", help="exit 1 when the kernel does not build")
    args = p.parse_args(argv)
    module = cpu_extension.extension()
    if module is None:
        if cpu_extension.mode() == "off":
            print(f"CPU SWA kernel: off ({cpu_extension.ENV_VAR}=0 in the environment): not built")
        else:
            print(f"CPU SWA kernel: not built (see the warning above; {cpu_extension.ENV_VAR}=0 turns it off)")
        return 1 if args.require else 0
    print(f"CPU SWA kernel: {module.__file__}")
    return 0


def cli() -> int:
    """The `consa-build-cpu-kernel` console script."""
    return main()


if __name__ == "__main__":
    sys.exit(cli())
