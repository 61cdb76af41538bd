"""qformat.runtime: run a .qbin model on the CPU or an NVIDIA GPU (`qformat.load(path)` or the
`qrun` command)."""
from __future__ import annotations


def load(path, device: str = "cpu", threads: int | None = None, context: int | None = None,
         verify: bool = False):
    """Open a .qbin file for generation on `device` ("cpu", "cuda" or "auto"); see
    qformat.runtime.api.load and Model."""
    from .api import load as _load

    return _load(path, device=device, threads=threads, context=context, verify=verify)


__all__ = ["load"]
