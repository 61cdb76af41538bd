"""qformat.runtime: run a .qbin model on the CPU or an NVIDIA GPU (`qformat.load(path)` or the
`qrun` command)."""
from __future__ import annotations


def load(path, device: str = "cpu", **kwargs):
    """Open a .qbin file for generation on `device` ("cpu", "cuda" or "auto"); the other
    arguments (threads, context, verify, kv_blocks, lora, lora_scale) are
    qformat.runtime.api.load's."""
    from .api import load as _load

    return _load(path, device=device, **kwargs)


__all__ = ["load"]
