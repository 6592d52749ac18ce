"""The image model: backbones from the registry and local pretrained weights."""

import pytest
import timm
import torch

from utils.models import BACKBONES, ImageModel

SIZE = 32


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_pretrained_weights_from_local_file(tmp_path, backbone):
    # As kaggle_build.download_weights saves it: the whole timm model, 1000-class head included.
    # Kaggle's timm (1.0.26) read the AugReg ViT files as JAX .npz through this path (issue 12).
    reference = timm.create_model(BACKBONES[backbone].timm_name, pretrained=False)
    path = tmp_path / f"{backbone}.pth"
    torch.save(reference.state_dict(), path)
    model = ImageModel(backbone, SIZE, weights_path=path)
    loaded = model.backbone.state_dict()
    # ViT position embeddings are resampled to the 32 px grid; every other weight is the file's
    same = [k for k, v in reference.state_dict().items() if k in loaded and k != "pos_embed"]
    assert len(same) > 10
    for key in same:
        assert torch.equal(loaded[key], reference.state_dict()[key]), key
    fresh = ImageModel(backbone, SIZE).backbone.state_dict()
    assert not all(torch.equal(fresh[k], loaded[k]) for k in same)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        ImageModel("vit_tiny", SIZE, weights_path=tmp_path / "nowhere.pth")


def test_registry_pins_pretrained_tags():
    assert {b.timm_name for b in BACKBONES.values()} == {
        "convnextv2_nano.fcmae_ft_in22k_in1k",
        "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        "vit_small_patch16_224.augreg_in21k_ft_in1k",
    }
