"""megatron-consa: learned FA/SWA allocation (ConSA) for megatron-core models.

Importing the package makes `import megatron.core` work on machines without
triton (see `megatron_consa.compat.ensure_importable`); the runtime CPU shims
are applied explicitly with `megatron_consa.compat.apply_cpu_shims()`.
"""

from megatron_consa.compat.importable import ensure_importable as _ensure_importable

_ensure_importable()

__version__ = "0.1.0"
