"""A qbin model in torch for fine-tuning: every projection a FrozenQuantLinear over the file's
own tensor (memory-mapped, dequantized tile by tile), LoRA adapters on the chosen ones, the norms
as frozen float tensors, and the decoder layer convert/layerwise.py runs for calibration (the
torch form of qformat/block.py's description, checked against it in tests/test_block.py)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from qformat import tensors as T
from qformat.convert.layerwise import embed, head_logits, layer_forward, rms_norm, rope_tables
from qformat.reader import QbinReader

from .lora import LoraLinear
from .qlinear import FrozenQuantLinear

# --targets' names (peft's short names of Llama's projections) -> the file's tensors
TARGETS = {"q": T.ATTN_Q, "k": T.ATTN_K, "v": T.ATTN_V, "o": T.ATTN_OUT, "gate": T.FFN_GATE, "up": T.FFN_UP,
           "down": T.FFN_DOWN}
PROJECTIONS = frozenset(TARGETS.values())


class QuantDecoder(torch.nn.Module):
    """The model of an open QbinReader: forward(tokens (B, T)) -> logits (B, T, vocab). Only the
    adapters train; with B at zero (as LoRA starts) it is the file's model on its dequantized
    weights."""

    def __init__(self, reader: QbinReader, targets: tuple[str, ...] = tuple(TARGETS), rank: int = 16,
                 alpha: float = 32.0, dropout: float = 0.0, checkpointing: bool = True):
        super().__init__()
        args = self.args = reader.model
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA targets {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
        if args.moe:
            raise ValueError(f"{reader.path}: a mixture of experts cannot be fine-tuned yet (its experts are one "
                             "stacked tensor per projection)")
        chosen = {TARGETS[t] for t in targets}
        self.checkpointing = checkpointing
        self.embedding = reader[T.TOK_EMBEDDINGS.name()]
        self.head = FrozenQuantLinear(reader[T.head_name(args)])
        self.norm = self._float(reader, T.OUTPUT_NORM.name())
        self.layers = torch.nn.ModuleList()
        self.weights: list[dict] = []
        for i in range(args.n_layers):
            w, modules = {}, torch.nn.ModuleDict()
            for entry in T.TENSORS:
                if not entry.per_layer or not entry.present(args):
                    continue
                name = entry.name(i)
                if entry in PROJECTIONS:
                    base = FrozenQuantLinear(reader[name])
                    w[entry.key] = (LoraLinear(base, base.in_features, base.out_features, rank, alpha, dropout)
                                    if entry in chosen else base)
                    modules[entry.key.replace(".", "_")] = w[entry.key]
                else:
                    w[entry.key] = self._float(reader, name)
            self.layers.append(modules)
            self.weights.append(w)

    @staticmethod
    def _float(reader: QbinReader, name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(reader[name].dequantize(), np.float32))  # a copy: the map is read-only

    def adapters(self) -> dict[str, LoraLinear]:
        """Tensor name (layers.{i}.<key>) -> its LoRA module."""
        return {f"layers.{i}.{k}": m for i, w in enumerate(self.weights) for k, m in w.items()
                if isinstance(m, LoraLinear)}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # only the rows these tokens use are dequantized (the embedding is the largest tensor)
        used, where = np.unique(np.asarray(tokens, np.int64), return_inverse=True)
        table = torch.from_numpy(np.ascontiguousarray(self.embedding.take_rows(used).dequantize(), np.float32))
        x = embed(table, where.reshape(np.shape(tokens)), self.args)
        rope = rope_tables(self.args, x.shape[1], x.device)  # LongRoPE's factors depend on the length
        for i, w in enumerate(self.weights):
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer_forward, x, w, self.args, rope, i, use_reentrant=False)
            else:
                x = layer_forward(x, w, self.args, rope, i)
        return head_logits(rms_norm(x, self.norm, self.args.norm_eps), self.head, self.args)
