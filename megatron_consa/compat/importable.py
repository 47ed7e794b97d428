"""Make ``import megatron.core`` work where triton is absent (CPU machines, CI).

This module deliberately imports neither torch nor megatron: it must be usable
from ``megatron_consa/__init__.py`` before anything imports megatron.core.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any, Dict, List, Optional

PAGED_STASH_OPS_MODULE = "megatron.core.transformer.moe.ops.paged_stash"

# Values as of megatron-core 0.19.2, used only if the real source cannot be read.
_FALLBACK_CONSTANTS: Dict[str, Any] = {"GLOBAL_BLOCK_SIZE": 1024}
_FALLBACK_ALL: List[str] = [
    "GLOBAL_BLOCK_SIZE",
    "paged_stash_copy_kernel",
    "paged_stash_pop_kernel",
]

_UNAVAILABLE_MSG = (
    "MoE paged stash needs triton/CUDA: `{name}` is a Triton kernel from "
    "megatron.core.transformer.moe.ops.paged_stash, which megatron_consa replaced by a stub "
    "because `triton` is not installed. Install triton on a CUDA machine to use MoE paged stash."
)


class TritonKernelUnavailable:
    """Stand-in for a ``@triton.jit`` kernel: any launch raises a clear RuntimeError.

    Kernels are launched as ``kernel[grid](...)``; both the indexing and the call raise.
    """

    def __init__(self, name: str) -> None:
        self.__name__ = name
        self.__qualname__ = name

    def _fail(self, *args: Any, **kwargs: Any):
        raise RuntimeError(_UNAVAILABLE_MSG.format(name=self.__name__))

    __call__ = _fail
    __getitem__ = _fail

    def __repr__(self) -> str:
        return f"<TritonKernelUnavailable {self.__name__}>"


def _read_real_module_names(fullname: str) -> tuple[Dict[str, Any], List[str], List[str]]:
    """Literal top-level constants, ``__all__`` and top-level function/class names of the
    real (unimportable) module.

    Parsed with ``ast`` from the installed source so that a megatron-core upgrade that
    changes ``GLOBAL_BLOCK_SIZE`` or adds kernels is followed without editing this file.
    """
    parent_name, _, _ = fullname.rpartition(".")
    parent = sys.modules.get(parent_name)
    path = getattr(parent, "__path__", None)
    constants: Dict[str, Any] = {}
    names: List[str] = []
    defined: List[str] = []
    try:
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise FileNotFoundError(fullname)
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if not isinstance(target, ast.Name):
                    continue
                try:
                    value = ast.literal_eval(node.value)
                except (ValueError, TypeError, SyntaxError, RecursionError):
                    continue  # not a literal (e.g. a call): not a constant
                if target.id == "__all__":
                    names = list(value)
                else:
                    constants[target.id] = value
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.append(node.name)
    except (OSError, SyntaxError, ValueError, TypeError):
        return dict(_FALLBACK_CONSTANTS), list(_FALLBACK_ALL), []
    for key, value in _FALLBACK_CONSTANTS.items():
        constants.setdefault(key, value)
    return constants, names or list(_FALLBACK_ALL), defined


class _PagedStashStubLoader(importlib.abc.Loader):
    """Fills the stub module: real literal constants, raising placeholders for kernels."""

    def create_module(self, spec):  # default module creation
        return None

    def exec_module(self, module) -> None:
        constants, names, defined = _read_real_module_names(module.__name__)
        namespace = module.__dict__
        namespace.update(constants)
        for name in list(names) + list(defined):
            if name not in namespace:
                namespace[name] = TritonKernelUnavailable(name)
        namespace["__all__"] = list(names)
        namespace["__doc__"] = (
            "megatron_consa stub for megatron.core.transformer.moe.ops.paged_stash "
            "(triton not installed); kernels raise RuntimeError when launched."
        )
        namespace["MEGATRON_CONSA_STUB"] = True

        def __getattr__(name: str):  # PEP 562: names added by a future megatron-core
            if name.startswith("__"):
                raise AttributeError(name)
            kernel = TritonKernelUnavailable(name)
            namespace[name] = kernel
            return kernel

        namespace["__getattr__"] = __getattr__


class _PagedStashStubFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder answering only for ``PAGED_STASH_OPS_MODULE``.

    A finder (rather than a bare ``sys.modules`` entry) lets the ordinary import
    machinery import the parent packages first and bind the stub as an attribute of
    ``megatron.core.transformer.moe.ops``, exactly like the real module would be.
    """

    megatron_consa_stub_finder = True

    def __init__(self) -> None:
        self._loader = _PagedStashStubLoader()

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != PAGED_STASH_OPS_MODULE:
            return None
        return importlib.util.spec_from_loader(
            fullname, self._loader, origin="megatron_consa.compat (triton stub)"
        )


def triton_available() -> bool:
    """True when a ``triton`` distribution can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _installed_finder() -> Optional[_PagedStashStubFinder]:
    for finder in sys.meta_path:
        if getattr(finder, "megatron_consa_stub_finder", False):
            return finder  # type: ignore[return-value]
    return None


def ensure_importable() -> bool:
    """Let ``import megatron.core`` succeed on machines without triton.

    Covers ``megatron/core/transformer/moe/ops/paged_stash.py:4`` (megatron-core 0.19.2),
    an unguarded ``import triton`` reached from ``import megatron.core`` through
    ``transformer/moe/paged_stash.py:12`` (imported by ``gpt_model.py``, ``schedules.py``,
    ``moe/experts.py``). When ``triton`` is not installed, a meta-path finder serves a stub
    for that one module: it keeps the real module's literal constants (``GLOBAL_BLOCK_SIZE``)
    and every name of its ``__all__``; the Triton kernels are replaced by objects that raise
    ``RuntimeError("MoE paged stash needs triton/CUDA ...")`` when launched. No fake
    ``triton`` module is registered (torch probes for triton itself).

    Idempotent; never imports megatron.core or torch. Returns True when the stub is
    (already or newly) installed, False when triton is available or the real module is
    already imported.
    """
    if _installed_finder() is not None:
        return True
    existing = sys.modules.get(PAGED_STASH_OPS_MODULE)
    if existing is not None and not getattr(existing, "MEGATRON_CONSA_STUB", False):
        return False
    if triton_available():
        return False
    sys.meta_path.insert(0, _PagedStashStubFinder())
    return True


def paged_stash_stub_installed() -> bool:
    """Whether ``ensure_importable`` installed the triton stub in this process."""
    return _installed_finder() is not None
