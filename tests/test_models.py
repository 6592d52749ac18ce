"""The image model: registry, local pretrained weights, the reference heads and AdamW groups."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from utils.image.models import BACKBONES, ImageModel, param_groups

SIZE = 32
FINAL_NORM = {"convnextv2_nano": "head.norm", "vit_tiny": "norm", "vit_small": "norm"}


def _capture(module: nn.Module, store: dict, key: str, what: str = "output"):
    def hook(_module, args, output):
        store[key] = args[0] if what == "input" else output
        store.setdefault("order", []).append(key)

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_pretrained_weights_from_local_file(tmp_path, backbone):
    # As kaggle_build.download_weights saves it: the whole timm model, 1000-class head included.
    # Kaggle's timm (1.0.26) read the AugReg ViT files as JAX .npz through this path.
    reference = timm.create_model(BACKBONES[backbone].timm_name, pretrained=False)
    state = reference.state_dict()
    norm = FINAL_NORM[backbone]
    # a fresh norm is ones and zeros; distinct values show that the file's land in the head
    state[f"{norm}.weight"] = torch.rand_like(state[f"{norm}.weight"]) + 0.5
    state[f"{norm}.bias"] = torch.randn_like(state[f"{norm}.bias"])
    path = tmp_path / f"{backbone}.pth"
    torch.save(state, path)
    model = ImageModel(backbone, SIZE, weights_path=path, head_norm=True)
    loaded = model.backbone.state_dict()
    # ViT position embeddings are resampled to the 32 px grid; every other weight is the file's
    same = [k for k in state if k in loaded and k != "pos_embed"]
    assert len(same) > 10
    for key in same:
        assert torch.equal(loaded[key], state[key]), key
    assert torch.equal(model.norm.weight, state[f"{norm}.weight"])
    assert torch.equal(model.norm.bias, state[f"{norm}.bias"])
    assert not any(k.startswith(f"{norm}.") for k in loaded)  # taken out of the backbone
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


def test_convnext_head_pools_the_raw_stage4_map_then_norm_then_mlp():
    torch.manual_seed(0)
    model = ImageModel("convnextv2_nano", SIZE, head_norm=True).eval()
    assert isinstance(model.backbone.head, nn.Identity)  # timm's per-pixel LayerNorm2d is gone
    assert (model.hidden[0].in_features, model.hidden[0].out_features) == (640, 256)
    assert isinstance(model.hidden[1], nn.ReLU)
    assert len(model.dropouts) == 1 and model.dropouts[0].p == 0.5
    assert (model.fc.in_features, model.fc.out_features) == (256, 1)
    seen: dict = {}
    hooks = [
        _capture(model.backbone.stages[-1], seen, "stage4"),
        _capture(model.pool, seen, "pool_in", "input"),
        _capture(model.norm, seen, "norm_in", "input"),
        _capture(model.hidden[0], seen, "hidden_in", "input"),
        _capture(model.hidden[1], seen, "relu"),
        _capture(model.dropouts[0], seen, "dropout"),
        _capture(model.fc, seen, "fc"),
    ]
    logits = model(torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8))["logits"]
    for hook in hooks:
        hook.remove()
    assert seen["order"] == ["stage4", "pool_in", "norm_in", "hidden_in", "relu", "dropout", "fc"]
    raw = seen["stage4"]
    assert seen["pool_in"] is raw
    # a per-pixel layer-normalised map would have channel std 1 at every pixel
    assert not torch.allclose(raw.std(1, unbiased=False), torch.ones(()), atol=0.05)
    pooled = model.pool(raw)
    assert pooled.shape == (2, 640) and torch.equal(seen["norm_in"], pooled)
    normed = F.layer_norm(pooled, (640,), model.norm.weight, model.norm.bias, model.norm.eps)
    assert torch.allclose(seen["hidden_in"], normed, atol=1e-5)
    expected = model.fc(torch.relu(model.hidden[0](normed))).squeeze(1)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_convnext_recipe_has_no_head_norm_and_avg_pool_works():
    model = ImageModel("convnextv2_nano", SIZE).eval()
    assert isinstance(model.norm, nn.Identity)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(("backbone.head", "norm.")) for n in names)
    avg = ImageModel("convnextv2_nano", SIZE, pool="avg").eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    raw = avg.backbone.forward_features(x)
    assert torch.allclose(avg.features(x), raw.mean(dim=(2, 3)), atol=1e-6)
    assert avg(x)["logits"].shape == (2,)
    with pytest.raises(ValueError, match="token"):
        ImageModel("convnextv2_nano", SIZE, pool="token")
    with pytest.raises(ValueError, match="avg"):
        ImageModel("vit_tiny", SIZE, pool="avg")


@pytest.mark.parametrize("head_norm", [False, True])
def test_vit_head_class_token_without_final_norm_to_64_to_1(head_norm):
    torch.manual_seed(0)
    model = ImageModel("vit_tiny", SIZE, head_norm=head_norm).eval()
    assert isinstance(model.backbone.norm, nn.Identity)
    assert isinstance(model.backbone.fc_norm, nn.Identity)
    assert (model.hidden[0].in_features, model.hidden[0].out_features) == (192, 64)
    assert len(model.dropouts) == 1 and model.dropouts[0].p == 0.5
    assert (model.fc.in_features, model.fc.out_features) == (64, 1)
    seen: dict = {}
    hook = _capture(model.backbone.blocks[-1], seen, "tokens")
    x = torch.randn(2, 3, SIZE, SIZE)
    features = model.features(x)
    hook.remove()
    cls = seen["tokens"][:, 0]
    if head_norm:
        assert isinstance(model.norm, nn.LayerNorm)
        cls = F.layer_norm(cls, (192,), model.norm.weight, model.norm.bias, model.norm.eps)
    else:
        assert isinstance(model.norm, nn.Identity)
    assert features.shape == (2, 192) and torch.allclose(features, cls, atol=1e-6)


@pytest.mark.parametrize("backbone", ["convnextv2_nano", "vit_tiny"])
def test_forward_loss_backward_and_frozen_tokens(backbone):
    model = ImageModel(backbone, SIZE, dropout_samples=3)
    pixels = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    out = model(pixels, torch.tensor([0.0, 1.0]))
    assert out["logits"].shape == (2,) and out["loss"].ndim == 0
    out["loss"].backward()
    assert model.fc.weight.grad is not None and model.hidden[0].weight.grad is not None
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen == set(BACKBONES[backbone].frozen)
    model.eval()
    assert torch.equal(model(pixels)["logits"], model(pixels)["logits"])


def _names(model: nn.Module, params: list) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_vit_no_decay_on_backbone_biases_and_norms():
    model = ImageModel("vit_tiny", SIZE)
    groups = param_groups(model)
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0]
    decayed, exempt = (_names(model, g["params"]) for g in groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | exempt == trainable and not decayed & exempt
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert exempt == {
        n for n in trainable if n.startswith("backbone.") and ("bias" in n or "norm" in n)
    }
    assert {"backbone.blocks.0.norm1.weight", "backbone.patch_embed.proj.bias"} <= exempt
    # the reference decays its whole new head, biases included
    assert {"backbone.blocks.0.attn.qkv.weight", "hidden.0.bias", "fc.bias"} <= decayed
    every = {n for n, _ in model.named_parameters()}
    assert {"backbone.cls_token", "backbone.pos_embed"} <= every - decayed - exempt
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.05), lr=1e-4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


def test_param_groups_convnext_decay_every_parameter():
    model = ImageModel("convnextv2_nano", SIZE)
    groups = param_groups(model)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-2
    assert _names(model, groups[0]["params"]) == {n for n, _ in model.named_parameters()}
    assert {"pool.weights", "pool.pools.0.p", "fc.bias"} <= _names(model, groups[0]["params"])
