"""qconvert: Hugging Face checkpoints to .qbin files, by round-to-nearest, GPTQ or AWQ, with
pruning, 16-bit outliers and SmoothQuant W8A8 (convert/methods.py lists them); GGUF files
imported (gguf_import.py) and qbin files exported to GGUF (gguf_export.py); GPTQ, AWQ and
compressed-tensors folders imported (hf_import.py) and qbin files exported to compressed-tensors
and GPTQ folders for transformers, vLLM and SGLang (hf_export.py)."""
from __future__ import annotations

from .converter import convert
from .gguf_export import export_gguf
from .gguf_import import import_gguf
from .hf_export import export_hf
from .hf_import import import_hf_quantized
from .options import ConvertOptions
from .plan import ConvertError
from .report import ConvertReport, TensorReport

__all__ = ["ConvertError", "ConvertOptions", "ConvertReport", "TensorReport", "convert", "export_gguf", "export_hf", "import_gguf",
           "import_hf_quantized"]
