"""Pooling layers of the image models (timm style: a pure function plus a thin module)."""

from utils.image.layers.gem import GeM, gem
from utils.image.layers.multiscale_pool import MultiScaleGeM
from utils.image.layers.token_pool import ClassToken, class_token

__all__ = ["ClassToken", "GeM", "MultiScaleGeM", "class_token", "gem"]
