"""Compute kernels for qbin tensors: the (device, kind, form) table, each device's backend, the
shared layout rules (layouts.py) and the NumPy references the kernels are tested against."""
import sys

if __name__ == "kernels":
    # This folder is qformat.kernels. Run from the repository root (python -m, pytest), the root
    # is on sys.path, so the folder also answers `import kernels` and shadows Hugging Face's
    # `kernels` package, which transformers (>= 5.25) imports: hand that import to the installed
    # package. Without one this stays an empty module with no version, which transformers'
    # availability check (it imports the name as a last resort) takes for "not installed".
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or ".") != root])
    if spec is not None:
        sys.modules["kernels"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
else:
    from .registry import LinearOp, backend, device_ops, fused_decoder, linear_op, lora_op, registered

    __all__ = ["LinearOp", "backend", "device_ops", "fused_decoder", "linear_op", "lora_op", "registered"]
