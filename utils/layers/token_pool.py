"""Pooling of a ViT token sequence to one vector per image."""

from __future__ import annotations

import torch
from torch import nn


class TokenPool(nn.Module):
    """ViT tokens (N, T, C) -> (N, C): the class token ('cls') or the patch-token mean ('avg')."""

    def __init__(self, num_prefix_tokens: int = 1, mode: str = "cls"):
        super().__init__()
        if mode not in ("cls", "avg"):
            raise ValueError(f"TokenPool: mode must be 'cls' or 'avg', got {mode!r}")
        if mode == "cls" and num_prefix_tokens < 1:
            raise ValueError("TokenPool: mode 'cls' needs a class token (num_prefix_tokens >= 1)")
        self.num_prefix_tokens = num_prefix_tokens
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            return x[:, 0]
        return x[:, self.num_prefix_tokens :].mean(dim=1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode!r}, num_prefix_tokens={self.num_prefix_tokens})"
        )
