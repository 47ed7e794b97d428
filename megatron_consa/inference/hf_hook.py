"""Register the consa attention with transformers once transformers' modeling code is imported.

`import megatron_consa` calls `install()`. Importing transformers' modeling code
takes seconds, so the package does not do it: when `transformers.modeling_utils`
is already imported it registers at once (importing `megatron_consa.inference.hf` registers),
otherwise a meta-path finder registers right after that module has executed,
before `from_pretrained` can look the attention up. Imports neither torch nor
transformers itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys

logger = logging.getLogger(__name__)

TRIGGER_MODULE = "transformers.modeling_utils"
"""Where transformers defines `AttentionInterface` (its masks and caches are imported by it)."""


HF_MODULE = "megatron_consa.inference.hf"
"""Registers the attention when it is imported (it imports transformers' modeling code itself)."""


def _register() -> None:
    if HF_MODULE in sys.modules:
        return  # imported, or importing (it registers at its end)
    try:
        importlib.import_module(HF_MODULE)
    except Exception as err:  # never break the user's import of transformers
        logger.warning("megatron_consa could not register the consa attention with transformers: %r", err)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of `TRIGGER_MODULE` to register after it runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _uninstall()
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


_FINDER = _RegisterAfterImport()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now if transformers' modeling code is loaded, else when it gets imported (idempotent)."""
    if TRIGGER_MODULE in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
