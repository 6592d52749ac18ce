"""Generalized-mean (GeM) pooling: (mean over a window of x^p)^(1/p); p=1 is average pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gem(
    x: torch.Tensor,
    p: torch.Tensor | float = 3.0,
    eps: float = 1e-6,
    kernel_size: int | None = None,
) -> torch.Tensor:
    """GeM pooling of an NCHW tensor: global when `kernel_size` is None, else windowed.

    Windowed pooling (stride 1) pads by kernel_size // 2 and averages over valid pixels only, so
    it keeps the spatial size and borders are not pulled towards zero.
    """
    x = x.clamp(min=eps).pow(p)
    if kernel_size is None:
        x = F.adaptive_avg_pool2d(x, 1)
    else:
        x = F.avg_pool2d(x, kernel_size, 1, kernel_size // 2, count_include_pad=False)
    return x.pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with a (by default learnable) exponent p; global unless `kernel_size` is set."""

    def __init__(
        self,
        p: float = 3.0,
        eps: float = 1e-6,
        p_trainable: bool = True,
        kernel_size: int | None = None,
    ):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=p_trainable)
        self.eps = eps
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps, self.kernel_size)

    def __repr__(self) -> str:
        window = "" if self.kernel_size is None else f", kernel_size={self.kernel_size}"
        return (
            f"{type(self).__name__}(p={self.p.item():.4f}, eps={self.eps}, "
            f"p_trainable={self.p.requires_grad}{window})"
        )
