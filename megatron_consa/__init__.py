"""megatron-consa: learned FA/SWA allocation (ConSA) for megatron-core models.

Importing the package makes `import megatron.core` work on machines without
triton (see `megatron_consa.compat.ensure_importable`), and registers the
`consa` attention with Hugging Face transformers as soon as transformers'
modeling code is imported (`megatron_consa.inference.hf_hook`), so exports of a
head-wise allocation load with `from_pretrained`. The runtime CPU shims are
applied explicitly with `megatron_consa.compat.apply_cpu_shims()`.
"""

from megatron_consa.compat.importable import ensure_importable as _ensure_importable
from megatron_consa.inference.hf_hook import install as _install_hf_hook

_ensure_importable()
_install_hf_hook()

__version__ = "0.1.0"
