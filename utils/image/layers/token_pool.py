"""Pooling of a ViT token sequence to one vector per image."""

from __future__ import annotations

import torch
from torch import nn


def class_token(x: torch.Tensor) -> torch.Tensor:
    """ViT tokens (N, T, C) -> the class token (N, C), which timm puts first."""
    return x[:, 0]


class ClassToken(nn.Module):
    """The class token of a ViT token sequence: the reference recipe's ViT pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return class_token(x)
