"""The one image model: a timm backbone, its pooling and the MLP head of the reference recipe.

The reference is the public 3rd-place ISIC 2024 code (kyohei-123/kaggle-isic-2024-3rd-place-
solution, train_*.py). Per backbone it keeps the raw last feature map or token sequence (timm's
final norm removed), pools it (ConvNeXt: global average, here the paper's multi-scale GeM; ViT:
the class token) and scores it with Linear -> ReLU -> Dropout(0.5) -> Linear(., 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.layers import SelectAdaptivePool2d
from torch import nn

from utils.image.layers import ClassToken, MultiScaleGeM


@dataclass(frozen=True)
class Backbone:
    """A timm architecture with the head and AdamW settings the reference gives it."""

    timm_name: str  # architecture.pretrained_tag, pinned: the tag fixes which weights are meant
    head: str  # default pooling: "multiscale_gem" for NCHW feature maps, "token" for ViT tokens
    hidden: int  # width of the head's hidden layer
    weight_decay: float  # AdamW weight decay
    no_decay: tuple[str, ...] = ()  # backbone parameters whose name holds one of these: no decay
    frozen: tuple[str, ...] = ()  # backbone parameters the reference never updates


# The reference's values. ConvNeXt (train_20240827234748.py): Linear(640, 256) head and
# AdamW(model.parameters()) at torch's default weight decay 1e-2 on every parameter. ViT
# (train_20240830205516.py to _20240902001446.py): Linear(C, 64) head; get_optimizer_params gives
# the head and the patch_embed/blocks weights decay 1e-3, names holding "bias" or "norm" none,
# and leaves cls_token and pos_embed out of the optimiser, so they keep their pretrained values.
_VIT_NO_DECAY = ("bias", "norm")
_VIT_FROZEN = ("cls_token", "pos_embed")
BACKBONES: dict[str, Backbone] = {
    "convnextv2_nano": Backbone("convnextv2_nano.fcmae_ft_in22k_in1k", "multiscale_gem", 256, 1e-2),
    "vit_tiny": Backbone(
        "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "token", 64, 1e-3, _VIT_NO_DECAY, _VIT_FROZEN
    ),
    "vit_small": Backbone(
        "vit_small_patch16_224.augreg_in21k_ft_in1k", "token", 64, 1e-3, _VIT_NO_DECAY, _VIT_FROZEN
    ),
}
# Poolings each kind of backbone output accepts; "avg" is the reference's own ConvNeXt pooling.
POOLS: dict[str, tuple[str, ...]] = {
    "multiscale_gem": ("multiscale_gem", "avg"),
    "token": ("token",),
}
POOL_LAYERS = {
    "multiscale_gem": lambda: MultiScaleGeM((3, 5)),
    "avg": lambda: SelectAdaptivePool2d(pool_type="avg", flatten=True),
    "token": ClassToken,
}


def create_backbone(
    name: str, image_size: int, weights_path: str | Path | None = None
) -> nn.Module:
    """timm backbone without classifier or pooling; weights from a local file when given."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    kwargs: dict = {"num_classes": 0, "global_pool": ""}
    if spec.head == "token":
        kwargs["img_size"] = image_size  # position embeddings are resampled to this grid
    if weights_path:
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"pretrained weights for {name} not found: {weights_path}")
        # custom_load=False: the file is a torch state dict (kaggle.build.download_weights).
        # timm <= 1.0.26 (Kaggle's image) keeps the AugReg ViT tags' custom_load=True when only
        # "file" is overlaid and then parses the .pth as a JAX .npz (KeyError 'embedding/kernel').
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_path), "custom_load": False}
    return timm.create_model(spec.timm_name, pretrained=bool(weights_path), **kwargs)


def take_final_norm(backbone: nn.Module) -> nn.LayerNorm:
    """Remove timm's final norm from `backbone`; return it (pretrained values) for (N, C) input.

    ConvNeXt's sits in its head and normalises each pixel of the map (LayerNorm2d): removing the
    head leaves forward_features the raw stage-4 map. A ViT's normalises each token.
    """
    if isinstance(getattr(backbone, "head", None), nn.Module) and hasattr(backbone.head, "norm"):
        old = backbone.head.norm
        backbone.head = nn.Identity()
    else:
        old = backbone.norm
        backbone.norm = nn.Identity()
    norm = nn.LayerNorm(old.normalized_shape, eps=old.eps)
    norm.load_state_dict(old.state_dict())
    return norm


class ImageModel(nn.Module):
    """Backbone + pooling + (optional) final norm + MLP head; forward returns {"logits", "loss"}.

    The pooling sees the backbone's raw output: timm's final norm is taken out of the backbone
    and, with `head_norm`, applied after the pooling (timm's own pool -> norm order, pretrained
    values); the reference has no norm there. `pool` defaults to the backbone's (POOLS).
    With `dropout_samples` > 1 the head averages over that many dropout masks while training
    (the reference: 1). uint8 input (0..255) is scaled and ImageNet-normalised here; float input
    is taken as is.
    """

    def __init__(
        self,
        backbone: str,
        image_size: int = 224,
        weights_path: str | Path | None = None,
        dropout: float = 0.5,
        dropout_samples: int = 1,
        pool: str | None = None,
        head_norm: bool = False,
    ):
        super().__init__()
        self.backbone = create_backbone(backbone, image_size, weights_path)
        self.backbone_name = backbone
        spec = BACKBONES[backbone]
        pool = pool or spec.head
        if pool not in POOLS[spec.head]:
            raise ValueError(
                f"ImageModel: pool {pool!r} does not fit {backbone}; use one of {POOLS[spec.head]}"
            )
        final_norm = take_final_norm(self.backbone)
        self.pool = POOL_LAYERS[pool]()
        self.norm: nn.Module = final_norm if head_norm else nn.Identity()
        self.hidden = nn.Sequential(nn.Linear(self.backbone.num_features, spec.hidden), nn.ReLU())
        self.dropouts = nn.ModuleList(nn.Dropout(dropout) for _ in range(max(1, dropout_samples)))
        self.fc = nn.Linear(spec.hidden, 1)
        for name, param in self.backbone.named_parameters():
            if name in spec.frozen:
                param.requires_grad_(False)
        self.register_buffer("mean", 255 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> ImageNet-normalised float; float images unchanged."""
        if images.dtype != torch.uint8:
            return images
        return (images.float() - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled (and, with head_norm, normalised) embedding (N, num_features)."""
        return self.norm(self.pool(self.backbone.forward_features(self.normalize(images))))

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        x = self.hidden(self.features(images))
        if self.training and len(self.dropouts) > 1:
            logits = torch.stack([self.fc(drop(x)) for drop in self.dropouts]).mean(0)
        else:
            logits = self.fc(self.dropouts[0](x))
        out = {"logits": logits.squeeze(1)}
        if targets is not None:
            out["loss"] = F.binary_cross_entropy_with_logits(out["logits"].float(), targets.float())
        return out


def param_groups(model: ImageModel, weight_decay: float | None = None) -> list[dict]:
    """AdamW parameter groups of the reference for `model`'s backbone (BACKBONES): `weight_decay`
    (default: the backbone's) on every trainable parameter but the backbone's named with one of
    its `no_decay` parts, which get none; frozen parameters are in no group."""
    spec = BACKBONES[model.backbone_name]
    decay = spec.weight_decay if weight_decay is None else weight_decay
    decayed, exempt = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone = name.startswith("backbone.")
        exempt_name = in_backbone and any(part in name for part in spec.no_decay)
        (exempt if exempt_name else decayed).append(param)
    groups = [{"params": decayed, "weight_decay": decay}, {"params": exempt, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
