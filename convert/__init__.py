"""qconvert: Hugging Face checkpoints to .qbin files with round-to-nearest schemes."""
from __future__ import annotations

from .converter import ConvertError, ConvertReport, TensorReport, convert

__all__ = ["ConvertError", "ConvertReport", "TensorReport", "convert"]
