"""Low-rank adapters beside a frozen projection, laid out and initialised as peft's LoRA (so that
an adapter trained here is peft's `lora_A` / `lora_B` weights, and peft loads it)."""
from __future__ import annotations

import math

import torch


class LoraLinear(torch.nn.Module):
    """base(x) + B(A(dropout(x))) * alpha / rank, with A (rank, in) and B (out, rank) trained and
    the base frozen. A starts Kaiming-uniform and B at zero, as peft's, so training starts at the
    base model exactly."""

    def __init__(self, base: torch.nn.Module, in_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, not {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha, self.scaling, self.dropout_p = rank, alpha, alpha / rank, dropout
        self.lora_A = torch.nn.Linear(in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_B.weight)
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a dense (out, in) weight difference: what merging it adds."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling
