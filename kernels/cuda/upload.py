"""Weights from the memory map to device memory, once, at load.

A copy from pageable memory (an mmap) is synchronous: the driver stages it through its own small
pinned buffer, and the file's pages are read (faulted in) while the GPU waits. So the loader
stages each array through two pinned buffers of its own in turns: while one chunk is copied
to the device asynchronously, the next is read from the file into the other, across arrays;
the copies are waited for once, at the end of the load. A progress bar
counts the bytes of files large enough to take a while.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import numpy as np

from . import module

# Bytes per pinned staging buffer (two of them).
CHUNK = 16 << 20
# Files at least this large show a progress bar while they load.
PROGRESS_BYTES = 1 << 30
# Stage through pinned buffers (tests on the host emulation, which has no pinned memory, turn it off).
STAGING = True


class Uploader:
    """Copies host arrays to the device through two pinned buffers, counting bytes for a bar."""

    def __init__(self, total_bytes: int = 0, progress: bool = False, chunk: int = CHUNK):
        cp = module.cupy()
        self.chunk = chunk
        self.staged = STAGING
        if self.staged:
            import cupyx

            free, _ = cp.cuda.runtime.memGetInfo()
            if total_bytes > free:
                raise ValueError(f"the weights need {total_bytes / 2**30:.2f} GiB of GPU memory and "
                                 f"{free / 2**30:.2f} GiB is free; use --device cpu, a smaller scheme, or a "
                                 "GPU with more memory")

            self.buffers = [cupyx.empty_pinned(chunk, np.uint8) for _ in range(2)]
            self.done = [None, None]  # the event after each buffer's last copy
            self.stream = cp.cuda.Stream(non_blocking=True)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="weights to GPU", file=sys.stderr,
                            dynamic_ncols=True, leave=False)

    def __call__(self, a: np.ndarray):
        """The device copy of `a` (any layout; the copy is C-contiguous)."""
        cp = module.cupy()
        a = np.ascontiguousarray(a)
        if not self.staged:
            out = cp.asarray(a)
        else:
            out = cp.empty(a.shape, a.dtype)
            src = a.reshape(-1).view(np.uint8)
            for i, start in enumerate(range(0, src.size, self.chunk)):
                n = min(self.chunk, src.size - start)
                b = i % 2
                if self.done[b] is not None:
                    self.done[b].synchronize()  # its previous chunk has reached the device
                np.copyto(self.buffers[b][:n], src[start:start + n])
                cp.cuda.runtime.memcpyAsync(out.data.ptr + start, self.buffers[b].ctypes.data, n,
                                            cp.cuda.runtime.memcpyHostToDevice, self.stream.ptr)
                self.done[b] = self.stream.record()
        if self.bar is not None:
            self.bar.update(a.nbytes)
        return out

    def close(self) -> None:
        """Wait for the last copies (the weights are used on other streams after the load)."""
        if self.staged:
            self.stream.synchronize()
        if self.bar is not None:
            self.bar.close()


_active: Uploader | None = None


@contextmanager
def uploading(total_bytes: int):
    """Within: `to_device` stages through one Uploader, with a progress bar for large totals."""
    global _active
    previous, _active = _active, Uploader(total_bytes, progress=total_bytes >= PROGRESS_BYTES)
    try:
        yield _active
    finally:
        _active.close()
        _active = previous


def to_device(a: np.ndarray):
    """A host array (a view of the memory map) copied to the device."""
    if _active is not None:
        return _active(a)
    return module.cupy().asarray(np.ascontiguousarray(a))
