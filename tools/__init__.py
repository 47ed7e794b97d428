"""The command-line tools: run from a clone as ``python tools/<tool>.py``; installed (``pip
install``) as the package ``megatron_consa_tools`` with a console script per tool,
``consa-<tool>`` (``consa-finalize-allocation``, ``consa-convert-hf-to-megatron``, ...).
Each parses flags and does I/O; the work is in ``megatron_consa``."""
