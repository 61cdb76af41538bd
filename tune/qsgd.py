"""QSGD (Alistarh et al., 2017): gradients quantized stochastically for what data-parallel
processes exchange, so that the bytes on the wire shrink while the expected gradient stays exact.

A vector is cut into chunks of `chunk` values; each chunk v is sent as its norm ||v|| (float32)
and, per value, sign(v_i) * l_i with l_i in {0, ..., s}: |v_i| / ||v|| * s rounded up with
probability equal to its fractional part, down otherwise. So E[Q(v)] = v, and with the 2-norm
E||Q(v) - v||^2 <= min(d / s^2, sqrt(d) / s) * ||v||_2^2 for a chunk of d values (the paper's
Lemma 3.1). The norm may also be the chunk's largest magnitude ||v||_inf (`norm="max"`): still
unbiased, its step ||v||_inf / s is at most the 2-norm's, so the same bound holds, and each value's
variance is at most (||v||_inf / s)^2 / 4. On SmolLM2's adapters (two processes, 10 steps, three
seeds; README, bench/bench_qsgd.py) 4-bit codes in chunks of 512 ended at +0.9% of the
uncompressed run's held-out loss with it and +4.0% with the 2-norm, and in chunks of 128 (qtune's
default: 7.5x fewer bytes than float32) at +0.4%, inside the uncompressed seeds' range; so
`--grad-compression qsgd:N` uses it. A code takes `bits` bits (sign and level, offset
by 2^(bits-1)), so s = 2^(bits-1) - 1: 7 levels in 4 bits, 127 in 8.

`qsgd_hook` is a DistributedDataParallel communication hook (register_comm_hook): each process
encodes its bucket, the encoded bytes are all-gathered (differently scaled codes cannot be summed
in flight, so an all-reduce does not apply) and every process decodes and averages them all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

BITS = (2, 4, 8)
NORMS = ("l2", "max")


@dataclass(frozen=True)
class QSGD:
    """The codec: `bits` per value (2, 4 or 8) and one float32 norm ("l2" or "max") per `chunk`
    values."""

    bits: int = 4
    chunk: int = 512
    norm: str = "max"

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"QSGD codes take {', '.join(map(str, BITS))} bits, not {self.bits}")
        if self.norm not in NORMS:
            raise ValueError(f"QSGD norm {self.norm!r}: choose from {', '.join(NORMS)}")
        if self.chunk < 1 or self.chunk % (8 // self.bits):
            raise ValueError(f"the QSGD chunk ({self.chunk}) must be a positive multiple of {8 // self.bits}")

    @property
    def levels(self) -> int:
        """s: the levels of |v_i| / ||v|| in (0, 1]."""
        return (1 << (self.bits - 1)) - 1

    def chunks(self, numel: int) -> int:
        return -(-numel // self.chunk)

    def wire_bytes(self, numel: int) -> int:
        """Bytes of one encoded vector of `numel` values: its norms and its packed codes."""
        n = self.chunks(numel)
        return 4 * n + n * self.chunk * self.bits // 8

    def encode(self, v: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """v (any shape) as one uint8 tensor of wire_bytes(v.numel()): the norms, then the codes."""
        flat = v.detach().reshape(-1).float()
        n = self.chunks(flat.numel())
        x = torch.zeros(n * self.chunk)
        x[:flat.numel()] = flat
        x = x.view(n, self.chunk)
        norms = x.abs().amax(dim=1) if self.norm == "max" else torch.linalg.vector_norm(x, dim=1)
        scaled = x.abs() / torch.where(norms > 0, norms, 1.0)[:, None] * self.levels
        low = scaled.floor()
        level = low + (torch.rand(scaled.shape, generator=generator) < scaled - low)
        codes = (torch.sign(x) * level).to(torch.int16) + (1 << (self.bits - 1))  # 1 .. 2^bits - 1
        per_byte = 8 // self.bits
        codes = codes.view(-1, per_byte).to(torch.uint8)
        packed = torch.zeros(codes.shape[0], dtype=torch.uint8)
        for j in range(per_byte):
            packed |= codes[:, j] << (j * self.bits)
        return torch.cat([norms.view(torch.uint8), packed])

    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        """The float32 vector of `numel` values that encode() sent as `data`."""
        n = self.chunks(numel)
        norms = data[:4 * n].view(torch.float32)
        packed = data[4 * n:]
        per_byte, mask = 8 // self.bits, (1 << self.bits) - 1
        codes = torch.stack([(packed >> (j * self.bits)) & mask for j in range(per_byte)], dim=1)
        values = codes.reshape(n, self.chunk).float() - (1 << (self.bits - 1))
        return (values * (norms / self.levels)[:, None]).reshape(-1)[:numel]


@dataclass
class QSGDState:
    """What qsgd_hook keeps between buckets: the codec, the random stream of this process's
    rounding, the bytes it has sent (encoded) and would have sent (float32), and with
    error_feedback each bucket's residual: what its last encoding left out, added to its next
    gradient before encoding (Karimireddy et al., 2019), so that no part of a gradient is lost
    for good to the rounding."""

    codec: QSGD
    generator: torch.Generator = field(default_factory=torch.Generator)
    process_group: object = None
    bytes_sent: int = 0
    bytes_uncompressed: int = 0
    error_feedback: bool = False
    residuals: dict = field(default_factory=dict)


def qsgd_hook(state: QSGDState, bucket):  # no return annotation: DDP checks it, and this module's are strings
    """DDP communication hook: the bucket's gradient, QSGD-encoded, all-gathered, decoded and
    averaged over the processes; returns the Future of that average (torch.futures.Future)."""
    import torch.distributed as dist

    grad = bucket.buffer()
    sent = grad
    if state.error_feedback:
        residual = state.residuals.get(bucket.index())
        if residual is not None and residual.shape == grad.shape:  # DDP may rebuild its buckets once
            sent = grad + residual
    payload = state.codec.encode(sent, state.generator)
    if state.error_feedback:
        state.residuals[bucket.index()] = (sent - state.codec.decode(payload, grad.numel()).reshape(grad.shape)).float()
    world = dist.get_world_size(state.process_group)
    gathered = [torch.empty_like(payload) for _ in range(world)]
    state.bytes_sent += payload.numel()
    state.bytes_uncompressed += grad.numel() * 4
    work = dist.all_gather(gathered, payload, group=state.process_group, async_op=True)

    def average(_) -> torch.Tensor:
        total = sum(state.codec.decode(p, grad.numel()) for p in gathered)
        return grad.copy_((total / world).reshape(grad.shape).to(grad.dtype))

    return work.get_future().then(average)
