"""Image Dataset, transforms, negative-resampling sampler and the suspicious label."""

import numpy as np
import polars as pl
import pytest
import torch

from utils.image_data import (
    ImageDataset,
    NegativeResampler,
    collate_batch,
    eval_transforms,
    train_transforms,
)
from utils.io import HDF5Images, ImageReadError, read_metadata
from utils.labels import suspicious_label, with_suspicious


@pytest.fixture
def sample(fixtures_dir):
    meta = read_metadata(fixtures_dir / "train-metadata-sample5.csv", "train")
    return meta, HDF5Images(fixtures_dir / "train-image-sample5.hdf5")


def test_dataset_reads_and_transforms_real_crops(sample):
    meta, images = sample
    ds = ImageDataset(images, meta["isic_id"], meta["target"].to_numpy(), train_transforms(48, 0))
    item = ds[0]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.uint8
    assert item["target"].item() == meta["target"][0] and item["ok"]
    plain = ImageDataset(images, meta["isic_id"], transform=eval_transforms(40))[1]["image"]
    assert plain.shape == (3, 40, 40) and plain.dtype == torch.uint8  # the model normalises
    assert torch.isnan(ImageDataset(images, meta["isic_id"])[0]["target"])


def test_train_transforms_are_seeded(sample):
    meta, images = sample
    raw = images.read(meta["isic_id"][0])
    a = [train_transforms(32, seed=1)(image=raw)["image"] for _ in range(2)]
    b = train_transforms(32, seed=2)(image=raw)["image"]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], b)


def test_dataset_seed_fixes_each_items_augmentation(sample):
    meta, images = sample
    ds = ImageDataset(images, meta["isic_id"], transform=train_transforms(32))
    ds.seed = 5
    first = [ds[i]["image"] for i in (0, 1)]
    assert torch.equal(ds[1]["image"], first[1]) and torch.equal(ds[0]["image"], first[0])
    ds.seed = 6
    assert not torch.equal(ds[0]["image"], first[0])


def test_dataset_missing_image_raises_or_is_masked(sample):
    _, images = sample
    ids = ["ISIC_0082829", "ISIC_missing"]
    with pytest.raises(ImageReadError, match="ISIC_missing"):
        ImageDataset(images, ids, transform=eval_transforms(32))[1]
    item = ImageDataset(images, ids, transform=eval_transforms(32), skip_unreadable=True)[1]
    assert not item["ok"] and item["image"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="2 ids but 1 targets"):
        ImageDataset(images, ids, [0.0])


def test_sampler_keeps_positives_and_redraws_negatives():
    labels = np.zeros(1000)
    labels[[3, 50, 400, 999]] = 1
    sampler = NegativeResampler(labels, neg_ratio=10, seed=0)
    draws = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == len(sampler) == 4 + 40
        assert len(set(indices)) == len(indices)
        assert {3, 50, 400, 999} <= set(indices)
        draws.append({i for i in indices if labels[i] == 0})
    assert draws[0] != draws[1] != draws[2]
    sampler.set_epoch(1)
    assert {i for i in sampler if labels[i] == 0} == draws[1]  # same epoch -> same draw


def test_sampler_ratio_caps_and_errors():
    labels = np.array([1, 0, 0, 1, 0])
    assert len(NegativeResampler(labels, neg_ratio=100)) == 5
    assert sorted(NegativeResampler(labels, neg_ratio=None)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="no positive"):
        NegativeResampler(np.zeros(4), 1.0)


def test_suspicious_label_on_real_rows(fixtures_dir):
    meta = read_metadata(fixtures_dir / "train-metadata-sample5.csv", "train")
    expected = [
        int(t == 1 or i1 == "Indeterminate" or i2 is not None)
        for t, i1, i2 in meta.select("target", "iddx_1", "iddx_2").rows()
    ]
    assert suspicious_label(meta).to_list() == expected
    assert with_suspicious(meta)["suspicious"].dtype == pl.Int8


def test_suspicious_label_each_rule():
    df = pl.DataFrame(
        {
            "target": [0, 1, 0, 0, 0],
            "iddx_1": ["Benign", "Malignant", "Indeterminate", "Benign", None],
            "iddx_2": [None, "x", None, "Benign melanocytic proliferations", None],
        }
    )
    assert suspicious_label(df).to_list() == [0, 1, 1, 1, 0]
    with pytest.raises(KeyError, match="iddx_2"):
        suspicious_label(df.drop("iddx_2"))


def test_collate_batch_matches_default_collate_in_channels_last(sample):
    meta, images = sample
    ds = ImageDataset(images, meta["isic_id"], meta["target"].to_numpy(), eval_transforms(40))
    items = [ds[i] for i in range(len(ds))]
    batch, reference = collate_batch(items), torch.utils.data.default_collate(items)
    assert batch.keys() == reference.keys()
    assert batch["image"].shape == (5, 3, 40, 40) and batch["image"].dtype == torch.uint8
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    for key in reference:
        assert torch.equal(batch[key], reference[key]), key
