"""Multi-scale GeM pooling, eq. (1)-(2) of the FusionNetX paper.

Y = sum_k w_k * GeM_k(X) over window sizes k (stride 1, size-preserving) with learnable weights
w_k, followed by global average pooling to one vector per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.image.layers.gem import GeM


class MultiScaleGeM(nn.Module):
    """Weighted sum of windowed GeM maps (one learnable p per scale), then global average pool."""

    def __init__(self, kernel_sizes: Sequence[int] = (3, 5), p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.pools = nn.ModuleList(GeM(p, eps, kernel_size=k) for k in kernel_sizes)
        self.weights = nn.Parameter(torch.full((len(kernel_sizes),), 1.0 / len(kernel_sizes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C); computed in float32 since x^p overflows float16."""
        x = x.float()
        fused = sum(w * pool(x) for w, pool in zip(self.weights, self.pools, strict=True))
        return F.adaptive_avg_pool2d(fused, 1).flatten(1)

    def __repr__(self) -> str:
        sizes = [pool.kernel_size for pool in self.pools]
        weights = [round(w, 4) for w in self.weights.tolist()]
        return f"{type(self).__name__}(kernel_sizes={sizes}, weights={weights})"
