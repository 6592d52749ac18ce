"""The one image model: a timm backbone, a pooling head and an FC head with multi-sample dropout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from utils.layers import MultiScaleGeM, TokenPool


@dataclass(frozen=True)
class Backbone:
    """A timm architecture and the pooling head that suits its output."""

    timm_name: str  # architecture.pretrained_tag, pinned: the tag fixes which weights are meant
    head: str  # "multiscale_gem" for NCHW feature maps, "token" for ViT token sequences


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES: dict[str, Backbone] = {
    "convnextv2_nano": Backbone("convnextv2_nano.fcmae_ft_in22k_in1k", "multiscale_gem"),
    "vit_tiny": Backbone("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "token"),
    "vit_small": Backbone("vit_small_patch16_224.augreg_in21k_ft_in1k", "token"),
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
        # custom_load=False: the file is a torch state dict (kaggle_build.download_weights).
        # timm <= 1.0.26 (Kaggle's image) keeps the AugReg ViT tags' custom_load=True when only
        # "file" is overlaid and then parses the .pth as a JAX .npz (KeyError 'embedding/kernel').
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_path), "custom_load": False}
    return timm.create_model(spec.timm_name, pretrained=bool(weights_path), **kwargs)


class ImageModel(nn.Module):
    """Backbone + pooling + linear head; forward returns {"logits"} and "loss" when given targets.

    Multi-sample dropout averages the head over `dropout_samples` dropout masks while training.
    uint8 input (0..255) is scaled and ImageNet-normalised here; float input is taken as is.
    """

    def __init__(
        self,
        backbone: str,
        image_size: int = 224,
        weights_path: str | Path | None = None,
        dropout: float = 0.0,
        dropout_samples: int = 1,
        token_pool: str = "cls",
    ):
        super().__init__()
        self.backbone = create_backbone(backbone, image_size, weights_path)
        if BACKBONES[backbone].head == "multiscale_gem":
            self.pool: nn.Module = MultiScaleGeM((3, 5))
        else:
            self.pool = TokenPool(getattr(self.backbone, "num_prefix_tokens", 1), token_pool)
        self.dropouts = nn.ModuleList(nn.Dropout(dropout) for _ in range(max(1, dropout_samples)))
        self.fc = nn.Linear(self.backbone.num_features, 1)
        self.register_buffer("mean", 255 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> ImageNet-normalised float; float images unchanged."""
        if images.dtype != torch.uint8:
            return images
        return (images.float() - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (N, num_features)."""
        return self.pool(self.backbone(self.normalize(images)))

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        x = self.features(images)
        if self.training and len(self.dropouts) > 1:
            logits = torch.stack([self.fc(drop(x)) for drop in self.dropouts]).mean(0)
        else:
            logits = self.fc(self.dropouts[0](x))
        out = {"logits": logits.squeeze(1)}
        if targets is not None:
            out["loss"] = F.binary_cross_entropy_with_logits(out["logits"].float(), targets.float())
        return out
