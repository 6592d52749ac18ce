"""utils.predict's numeric path: the ConvNeXt head under fp16, as the submission kernel runs it."""

import torch

from utils.layers import MultiScaleGeM


def test_multiscale_gem_on_fp16_feature_maps_stays_finite_and_close_to_fp32():
    """On a GPU the backbone hands the head fp16 maps (autocast); x**3 of an activation above
    ~40 overflows fp16 (max 65504), so the pooling must not compute the power in fp16."""
    torch.manual_seed(0)
    x = torch.rand(2, 16, 7, 7) * 60  # ConvNeXt activations reach tens
    pool = MultiScaleGeM((3, 5))
    reference = pool(x)
    assert not torch.isfinite(x.half().pow(3)).all()  # the overflow this guards against
    half = pool(x.half())
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, rtol=2e-3, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.float16):
        autocast = pool(x.half())
    assert torch.isfinite(autocast).all()
    torch.testing.assert_close(autocast.float(), reference, rtol=2e-3, atol=1e-2)
