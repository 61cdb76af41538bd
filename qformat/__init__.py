"""qformat: one self-contained quantized model file (.qbin) and a runtime that memory-maps it."""
from __future__ import annotations

from .config import GenerationDefaults, ModelArgs, Provenance, RopeScaling, TokenizerInfo
from .errors import QbinError
from .reader import QbinReader, open_qbin
from .schemes import KINDS, Scheme, Tensor, parse_scheme
from .writer import QbinWriter

__version__ = "0.1.0"


def load(path, device: str = "cpu", **kwargs):
    """Load a .qbin model for generation (forwards to qformat.runtime, imported on first use)."""
    from .runtime import load as _load

    return _load(path, device=device, **kwargs)


__all__ = [
    "GenerationDefaults", "KINDS", "ModelArgs", "Provenance", "QbinError", "QbinReader", "QbinWriter",
    "RopeScaling", "Scheme", "Tensor", "TokenizerInfo", "load", "open_qbin", "parse_scheme", "__version__",
]
