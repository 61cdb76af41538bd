"""qtune: fine-tuning a qbin model (torch allowed here): QLoRA adapters over frozen quantized
weights (qlinear.py, lora.py) and QSGD-compressed gradients between data-parallel processes
(qsgd.py)."""
from __future__ import annotations

from .lora import LoraLinear
from .qlinear import FrozenQuantLinear
from .qsgd import QSGD, qsgd_hook

__all__ = ["FrozenQuantLinear", "LoraLinear", "QSGD", "qsgd_hook"]
