"""Data parallelism for qtune under torchrun: one process per core group or machine, each on its
share of every batch, the adapters' gradients averaged through DistributedDataParallel with the
chosen compression (QSGD codes, float16, or none), and the bytes each process sends counted."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .qsgd import QSGD, QSGDState, qsgd_hook

# qsgd:N scales each chunk by its largest magnitude, qsgd-l2:N by its 2-norm (tune/qsgd.py)
COMPRESSIONS = ("qsgd:2", "qsgd:4", "qsgd:8", "qsgd-l2:2", "qsgd-l2:4", "qsgd-l2:8", "fp16", "none")


@dataclass
class Counted:
    """Bytes sent by a hook that does not count them itself (float16 or float32 all-reduce)."""

    bytes_per_value: int
    bytes_sent: int = 0
    bytes_uncompressed: int = 0


def world() -> tuple[int, int]:
    """(rank, processes) of this process: torchrun's environment, or (0, 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def data_parallel(model: torch.nn.Module, compression: str, seed: int, rank: int, error_feedback: bool = False,
                  chunk: int = 128):
    """(the model wrapped in DistributedDataParallel with the compression's hook, the hook's
    state, whose bytes_sent / bytes_uncompressed count what this process sent); error_feedback:
    QSGD carries each bucket's rounding residual into its next gradient; chunk: QSGD's values per
    norm."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    if compression not in COMPRESSIONS:
        raise ValueError(f"--grad-compression {compression!r}: choose from {', '.join(COMPRESSIONS)}")
    ddp = DistributedDataParallel(model, forward_sync_buffers=False)  # the buffers are the frozen base's
    if compression.startswith("qsgd"):
        gen = torch.Generator().manual_seed(seed * 1000 + rank)  # each process rounds on its own stream
        name, bits = compression.split(":")
        state = QSGDState(QSGD(bits=int(bits), chunk=chunk, norm="l2" if name == "qsgd-l2" else "max"), gen,
                          error_feedback=error_feedback)
        ddp.register_comm_hook(state, qsgd_hook)
        return ddp, state
    if error_feedback:
        raise ValueError(f"--error-feedback applies to QSGD, not --grad-compression {compression}")
    counted = Counted(2 if compression == "fp16" else 4)
    inner = default_hooks.fp16_compress_hook if compression == "fp16" else default_hooks.allreduce_hook

    def counting(state: Counted, bucket):
        n = bucket.buffer().numel()
        state.bytes_sent += n * state.bytes_per_value
        state.bytes_uncompressed += n * 4
        return inner(None, bucket)

    ddp.register_comm_hook(counted, counting)
    return ddp, counted
