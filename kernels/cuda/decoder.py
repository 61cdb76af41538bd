"""One decode step on the GPU with static buffers, captured once as a CUDA graph and replayed.

CuPy costs several microseconds per kernel launch from Python, and a Llama-7B step launches
~500 kernels, several ms, where the step's weights take ~1 ms to read. The step runs the blocks of
qformat.block as kernels over buffers allocated here, one per buffer of the description, and
fuses what the description allows: linear steps that read one buffer share one int8
quantization of it (4-bit weights), residual adds and biases are folded into the GEMVs, and an
attention step is RoPE fused with the KV-cache store, then two attention passes. Per Llama layer:
two RMSNorms, the shared quantizations, seven GEMVs, three attention kernels and the SiLU gate:
15 kernels (13 without int8 activations). Even replayed from a graph, each kernel costs a few
microseconds of launch and tail, so fewer is faster. The step reads the position from device
memory (rope_store_at, attn_decode_split_at) and runs attention over a fixed number of splits
that covers the whole context (splits past the position are empty); the whole step is then one
CUDA graph, replayed per token after the position and the embedding are copied in. Where
capture fails (CUPY_... settings, an older CuPy), the same step runs eagerly; so does a mixture
of experts, whose routing reads the router's logits on the host to launch the chosen experts.
"""
from __future__ import annotations

import numpy as np

from qformat.block import (GATE, LOGITS, UP, X, Attention, Block, Glu, HeadNorm, Linear, Moe, Norm, SigmoidGate,
                           Softcap, expert_name)

from .. import reference
from ..lora import LoraOp
from . import module
from .device import CHUNK, THREADS, CUDAOps

# Capture the step as a CUDA graph (tests on the host emulation turn it off).
CUDA_GRAPHS = True


def _groups(steps) -> list:
    """Steps with runs of consecutive linear steps that read one buffer gathered into lists."""
    out: list = []
    for s in steps:
        if isinstance(s, Linear) and out and isinstance(out[-1], list) and out[-1][0].src == s.src:
            out[-1].append(s)
        else:
            out.append([s] if isinstance(s, Linear) else s)
    return out


class CudaDecodeStep:
    """(embedding row (dim,) on the device, position) -> logits (vocab,) as a NumPy array."""

    def __init__(self, blocks: list[Block], args, linears: dict, vectors: dict, cache, cos, sin):
        cp = module.cupy()
        self.blocks = [_groups(b.steps) for b in blocks]
        self.args, self.cache = args, cache
        self.lin, self.vec = linears, vectors
        self.cos, self.sin = cos, sin
        widths = {name: w for b in blocks for name, w in b.widths.items()}
        self.bufs = {name: cp.zeros(w, cp.float32) for name, w in widths.items()}  # (width,) each
        self.pos = cp.zeros(1, cp.int32)
        self.slots = cp.zeros(cache.context, cp.int32)  # the sequence's slot map (kvcache.py)
        self.host_slots = np.full(cache.context, -1, np.int32)  # what self.slots holds
        self.n_splits = (cache.context + CHUNK - 1) // CHUNK
        self.part = cp.zeros((args.n_heads, self.n_splits, args.head_dim + 2), cp.float32)
        self.graph = None
        self.stream = None
        self.ops = CUDAOps()  # the per-token kernels' launchers
        self.eager = any(isinstance(s, Moe) for b in blocks for s in b.steps)
        self.moe_out = cp.zeros(args.dim, cp.float32) if self.eager else None  # one expert's output

    def _moe(self, s: Moe) -> None:
        """The chosen experts of the token, launched after its routing on the host."""
        cp = module.cupy()
        x, logits = self.bufs[s.src], self.bufs[s.logits]
        self.lin[s.router].gemv(x, logits)
        experts, weights = reference.route(cp.asnumpy(logits)[None], s.top_k, s.norm_topk)
        gate, up, dst = self.bufs[GATE], self.bufs[UP], self.bufs[s.dst]
        total = cp.zeros_like(dst)
        for j in np.argsort(experts[0], kind="stable"):  # in ascending expert order
            e = int(experts[0, j])
            self.lin[expert_name(s.gate, e)].gemv(x, gate)
            self.lin[expert_name(s.up, e)].gemv(x, up)
            self.ops.glu(s.activation, gate, up)
            self.lin[expert_name(s.down, e)].gemv(gate, self.moe_out)
            total += np.float32(weights[0, j]) * self.moe_out
        if s.residual:
            dst += total
        else:
            dst[...] = total

    def _rmsnorm(self, x, w, out, rows: int = 1, add: bool = False):
        d = x.size // rows
        module.kernel("ops", "rmsnorm_f32")((rows,), (THREADS,),
                                            (x, w, out, np.int32(d), np.float32(self.args.norm_eps), np.int32(add)))

    def _project(self, steps: list[Linear]) -> None:
        """Each step's dst = W src (+ bias, or + dst when residual), the src quantized once where
        the ops would all quantize it alike (CudaGroupQuantOp.shared_input)."""
        ops = [self.lin[s.weight] for s in steps]
        x = self.bufs[steps[0].src]
        key = ops[0].shared_input
        quantized = ops[0].quantize(x) if key is not None and all(op.shared_input == key for op in ops) else None
        for op, s in zip(ops, steps):
            out = self.bufs[s.dst]
            bias = self.vec[s.bias] if s.bias is not None else None
            op.gemv(x, out, out if s.residual else bias, quantized)
            if s.residual and bias is not None:
                out += bias

    def _attention(self, layer: int, s: Attention) -> None:
        a, hd = self.args, self.args.head_dim
        q, k, v, dst = (self.bufs[b] for b in (s.q, s.k, s.v, s.dst))
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        pairs = (a.n_heads + a.n_kv_heads) * hd // 2
        module.kernel("ops", "rope_store_at")(((pairs + THREADS - 1) // THREADS,), (THREADS,),
                                              (q, k, v, self.cos[s.rope], self.sin[s.rope], kc, vc, np.int32(a.n_heads),
                                               np.int32(a.n_kv_heads), np.int32(hd), self.slots, self.pos,
                                               np.int32(self.cos.shape[-1])))
        module.kernel("ops", "attn_decode_split_at")(
            (a.n_heads * self.n_splits,), (THREADS,),
            (q, kc, vc, self.slots, self.part, np.int32(a.n_heads), np.int32(a.n_kv_heads), np.int32(hd), self.pos,
             np.int32(s.window or 0), np.float32(s.scale), np.float32(s.softcap or 0), np.int32(self.n_splits)))
        module.kernel("ops", "attn_decode_combine")((a.n_heads,), (THREADS,),
                                                    (self.part, dst, np.int32(hd), np.int32(self.n_splits)))

    def _step(self) -> None:
        """The decode step over the static buffers (what the graph captures)."""
        for layer, steps in enumerate(self.blocks):
            for s in steps:
                if isinstance(s, list):
                    self._project(s)
                elif isinstance(s, Norm):
                    self._rmsnorm(self.bufs[s.src], self.vec[s.weight], self.bufs[s.dst], add=s.residual)
                elif isinstance(s, HeadNorm):
                    buf = self.bufs[s.buf]
                    self._rmsnorm(buf, self.vec[s.weight], buf, buf.size // s.width)
                elif isinstance(s, Attention):
                    self._attention(layer, s)
                elif isinstance(s, Glu):
                    self.ops.glu(s.activation, self.bufs[s.gate], self.bufs[s.up])
                elif isinstance(s, Moe):
                    self._moe(s)
                elif isinstance(s, Softcap):
                    self.ops.softcap(self.bufs[s.buf], s.cap)
                elif isinstance(s, SigmoidGate):
                    self.ops.sigmoid_gate_add(*(self.bufs[b].reshape(1, -1) for b in (s.dst, s.src, s.gate)))
                else:
                    raise NotImplementedError(f"the CUDA decode step has no kernel for {type(s).__name__}")

    def _capture(self) -> None:
        cp = module.cupy()
        self.stream = cp.cuda.Stream()  # ordered after the default stream's copies of x
        with self.stream:
            self._step()  # compiles every kernel before capture
            self.stream.synchronize()
            try:
                self.stream.begin_capture()
                self._step()
                self.graph = self.stream.end_capture()
            except Exception:  # capture unsupported here: run eagerly
                self.graph = None
                self.stream = None

    def __call__(self, x, pos: int, slots: np.ndarray) -> np.ndarray:
        """Logits after the token of embedding x at position pos of the sequence whose slot map
        is slots (L,) int32 (copied up only where it changed)."""
        cp = module.cupy()
        n = pos + 1  # the positions this step reads
        changed = np.flatnonzero(self.host_slots[:n] != slots[:n])
        if changed.size:
            lo, hi = int(changed[0]), int(changed[-1]) + 1
            self.slots[lo:hi] = cp.asarray(slots[lo:hi])
            self.host_slots[lo:hi] = slots[lo:hi]
        if CUDA_GRAPHS and not self.eager and self.graph is None and self.stream is None:
            self._capture()
        if self.graph is not None:
            with self.stream:
                self.bufs[X][...] = x
                self.pos[...] = pos
                self.graph.launch(self.stream)
                return cp.asnumpy(self.bufs[LOGITS], stream=self.stream)
        self.bufs[X][...] = x
        self.pos[...] = pos
        self._step()
        return cp.asnumpy(self.bufs[LOGITS])


def build(blocks: list[Block], reader, args, cache, cos, sin, linears: dict) -> CudaDecodeStep | None:
    """The GPU decode step of `blocks` over the Transformer's own ops (`linears`: tensor name ->
    op); the blocks' norm weights and biases are copied up here. None with a LoRA adapter: the
    step fuses the weights' own kernels, so an adapter's products run on the per-operation path."""
    weights = {n for b in blocks for n in b.ops()}
    if any(isinstance(linears[n], LoraOp) for n in weights):
        return None
    cp = module.cupy()
    vectors = {n: cp.asarray(np.asarray(reader[n].arrays["data"], np.float32))
               for b in blocks for n in b.tensors() if n not in weights}
    return CudaDecodeStep(blocks, args, linears, vectors, cache, cp.asarray(cos), cp.asarray(sin))
