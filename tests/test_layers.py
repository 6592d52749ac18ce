"""GeM, multi-scale GeM (paper eq. 1-2) and class-token pooling on tiny CPU tensors."""

import torch
import torch.nn.functional as F

from utils.image.layers import ClassToken, GeM, MultiScaleGeM, class_token, gem


def test_gem_p1_equals_average_pooling():
    x = torch.rand(2, 4, 5, 5) + 0.1
    assert torch.allclose(gem(x, p=1.0), F.adaptive_avg_pool2d(x, 1), atol=1e-6)
    windowed = gem(x, p=1.0, kernel_size=3)
    expected = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    assert torch.allclose(windowed, expected, atol=1e-6)


def test_gem_matches_formula_and_tends_to_max():
    x = torch.rand(1, 3, 4, 4) + 0.1
    expected = x.pow(3).mean(dim=(2, 3), keepdim=True).pow(1 / 3)
    assert torch.allclose(gem(x, p=3.0), expected, atol=1e-6)
    high = gem(x, p=60.0).flatten()
    assert torch.allclose(high, x.amax(dim=(2, 3)).flatten(), rtol=0.05)


def test_gem_module_shapes_repr_and_gradient():
    pool = GeM(p=3.0)
    x = torch.rand(2, 8, 7, 7, requires_grad=True)
    out = pool(x)
    assert out.shape == (2, 8, 1, 1)
    out.sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs() > 0
    assert repr(pool) == "GeM(p=3.0000, eps=1e-06, p_trainable=True)"
    assert GeM(kernel_size=3)(x).shape == x.shape  # stride 1, size-preserving
    assert not GeM(p_trainable=False).p.requires_grad


def test_multiscale_gem_formula_shape_and_gradients():
    head = MultiScaleGeM((3, 5), p=3.0)
    with torch.no_grad():
        head.weights.copy_(torch.tensor([0.3, 0.7]))
    x = torch.rand(2, 6, 7, 7) + 0.05
    out = head(x)
    assert out.shape == (2, 6)
    fused = 0.3 * gem(x, 3.0, kernel_size=3) + 0.7 * gem(x, 3.0, kernel_size=5)
    assert torch.allclose(out, fused.mean(dim=(2, 3)), atol=1e-5)
    out.sum().backward()
    assert head.weights.grad is not None and (head.weights.grad.abs() > 0).all()
    assert all(pool.p.grad.abs() > 0 for pool in head.pools)
    assert "kernel_sizes=[3, 5]" in repr(head)


def test_multiscale_gem_on_tiny_maps():
    assert MultiScaleGeM()(torch.rand(3, 4, 1, 1)).shape == (3, 4)


def test_class_token_is_the_first_token():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    assert torch.equal(ClassToken()(tokens), tokens[:, 0])
    assert torch.equal(class_token(tokens), tokens[:, 0])
    assert ClassToken()(tokens).shape == (2, 3)
