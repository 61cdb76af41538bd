"""qtune: fine-tuning a qbin model (torch allowed here): QLoRA adapters over frozen quantized
weights (qlinear.py, lora.py, model.py), trained on text or chat data (data.py, train.py) and
written in peft's layout (adapter.py), and QSGD-compressed gradients between data-parallel
processes (qsgd.py). The command line is cli.py's `qtune`."""
from __future__ import annotations

from .adapter import load_adapter, save_adapter
from .lora import LoraLinear
from .qlinear import FrozenQuantLinear
from .qsgd import QSGD, qsgd_hook
from .train import TuneOptions, TuneReport, tune

__all__ = ["FrozenQuantLinear", "LoraLinear", "QSGD", "TuneOptions", "TuneReport", "load_adapter", "qsgd_hook",
           "save_adapter", "tune"]
