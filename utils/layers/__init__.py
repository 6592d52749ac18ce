"""Pooling layers of the image models (timm style: a pure function plus a thin module)."""

from utils.layers.gem import GeM, gem
from utils.layers.multiscale_pool import MultiScaleGeM
from utils.layers.token_pool import ClassToken, class_token

__all__ = ["ClassToken", "GeM", "MultiScaleGeM", "class_token", "gem"]
