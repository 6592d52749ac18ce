"""image.predict's numeric path: the ConvNeXt head under fp16, as the submission kernel runs it;
several devices scoring shares of the ids as one device does, and the time estimate counting
the GPUs."""

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from utils import inference, submission_time
from utils.image.distributed import workers_per_process
from utils.image.layers import MultiScaleGeM
from utils.image.predict import inference_devices, predict_on_devices, predict_with_models
from utils.io import HDF5Images
from utils.settings import image_config, resolve


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


# ---------------------------------------------------------------------------------- several GPUs


class Brightness(nn.Module):
    """Logit = the image's mean pixel / `scale` - 2: a per-image score that tells images apart."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, images):
        return {"logits": images.float().mean((1, 2, 3)) / self.scale - 2}


class Broken(nn.Module):
    def forward(self, images):
        raise ValueError("no memory left")


@pytest.fixture
def some_ids(synthetic_dir):
    images = HDF5Images(synthetic_dir / "train-image.hdf5")
    ids = sorted(images)[:7]
    return images, ids[:3] + ["ISIC_absent"] + ids[3:]


def test_devices_share_the_ids_and_join_them_back_in_order(some_ids):
    images, ids = some_ids
    cpu = torch.device("cpu")
    models = [Brightness(64.0), Brightness(32.0)]
    one = predict_with_models(models, images, ids, 16, 2, 0, cpu)
    for copies in (2, 3, 9):  # 9 devices for 8 ids: one share is empty
        probs, ok = predict_on_devices([(cpu, models)] * copies, images, ids, 16, 2, 0)
        np.testing.assert_array_equal(probs, one[0])
        np.testing.assert_array_equal(ok, one[1])
    assert ok.tolist() == [True] * 3 + [False] + [True] * 4 and np.isnan(probs[3]).all()
    assert np.unique(probs[ok, 0]).size == 7  # each row its own image's score
    with pytest.raises(
        RuntimeError, match=r"ids 4\.\.7 \(4\) on cpu failed: ValueError: no memory"
    ):
        predict_on_devices([(cpu, models), (cpu, [Broken()])], images, ids, 16, 2, 0)


def test_cuda_without_an_index_means_every_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Tesla T4")
    cuda = torch.device("cuda")
    assert inference_devices(cuda) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert inference_devices(torch.device("cuda", 1)) == [torch.device("cuda", 1)]
    assert inference_devices(torch.device("cpu")) == [torch.device("cpu")]
    assert inference._device_name(cuda) == "cuda (2 x Tesla T4), fp16 autocast"
    assert inference._device_name(torch.device("cuda", 1)) == "cuda:1 (Tesla T4), fp16 autocast"
    assert workers_per_process(4, 2) == 2 and workers_per_process(1, 2) == 1
    assert workers_per_process(0, 2) == 0


def test_gpu_time_estimate_counts_every_gpu(monkeypatch, capsys):
    """Measured on the first GPU with its share of the workers, times the GPUs."""
    measured = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def load_fold_models(path, device, folds):
        measured.append(device)
        return image_config("vit_tiny", "demo"), []

    monkeypatch.setattr(submission_time, "load_fold_models", load_fold_models)

    def measure(run, ids, batch_size, batches):
        return 250.0

    monkeypatch.setattr(submission_time, "measure_images_per_s", measure)
    cfg = dataclasses.replace(resolve("full").inference, num_workers=4)
    ids = [f"ISIC_{i}" for i in range(1000)]
    estimate = submission_time.estimate_time(
        Path("art"), ["vit_tiny"], None, ids, cfg, torch.device("cuda")
    )
    assert estimate.images_per_s == {"vit_tiny": 500.0} and not estimate.projected
    assert measured == [torch.device("cuda", 0)]
    assert (
        "measured on cuda:0 with 2 DataLoader worker(s), times 2 GPU(s)" in capsys.readouterr().out
    )
