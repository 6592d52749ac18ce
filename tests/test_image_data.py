"""Image Dataset, transforms, per-epoch sampler, validation subsample and the suspicious label."""

import albumentations as A
import cv2
import numpy as np
import polars as pl
import pytest
import torch

from utils.image.data import (
    ImageDataset,
    NegativeResampler,
    collate_batch,
    eval_transforms,
    train_transforms,
    validation_subsample,
)
from utils.io import HDF5Images, ImageReadError, read_metadata
from utils.labels import suspicious_label


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


def test_sampler_repeats_positives_and_redraws_negatives_each_epoch():
    labels = np.zeros(1000)
    positives = [3, 50, 400, 999]
    labels[positives] = 1
    sampler = NegativeResampler(labels, neg_ratio=1.0, pos_repeat=2, seed=0, fold=1)
    draws = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == len(sampler) == 4 * 2 + 8  # 4P: positives twice, 1:1 negatives
        assert len(set(indices)) == len(indices)  # the 2nd copy of row i comes as i + 1000
        rows = [i % 1000 for i in indices]
        assert sorted(r for r in rows if labels[r] == 1) == sorted(positives * 2)
        negatives = [r for r in rows if labels[r] == 0]
        assert len(negatives) == len(set(negatives)) == 8
        assert [labels[r] for r in rows] == [1, 0] * 8  # interleaved as in the reference
        draws.append(set(negatives))
    assert draws[0] != draws[1] != draws[2]
    sampler.set_epoch(1)
    assert {i for i in sampler if i < 1000 and labels[i] == 0} == draws[1]  # same draw
    again = NegativeResampler(labels, 1.0, 2, seed=0, fold=1)
    again.set_epoch(1)
    assert list(again) == list(sampler)  # same (seed, fold, epoch) -> same order
    other_fold = NegativeResampler(labels, 1.0, 2, seed=0, fold=2)
    other_fold.set_epoch(1)
    assert list(other_fold) != list(sampler)


@pytest.mark.parametrize(
    ("n_pos", "n_neg", "ratio", "repeat", "expected_neg"),
    [(5, 100, 1.0, 2, 10), (5, 100, 3.0, 1, 15), (5, 100, 2.5, 2, 25), (3, 4, 1.0, 2, 4)],
)
def test_sampler_counts(n_pos, n_neg, ratio, repeat, expected_neg):
    labels = np.array([1] * n_pos + [0] * n_neg)
    sampler = NegativeResampler(labels, neg_ratio=ratio, pos_repeat=repeat)
    indices = list(sampler)
    assert sampler.num_negatives() == expected_neg
    assert len(indices) == len(sampler) == n_pos * repeat + expected_neg
    assert sum(labels[i % len(labels)] == 1 for i in indices) == n_pos * repeat


def test_repeated_positive_copies_get_their_own_augmentation(sample):
    meta, images = sample
    labels = np.array([1, 0, 0, 0, 0])
    ds = ImageDataset(images, meta["isic_id"], labels, train_transforms(32))
    ds.seed = 3
    sampler = NegativeResampler(labels, neg_ratio=1.0, pos_repeat=2)
    assert sorted(sampler)[-1] == 5  # row 0's second copy
    first, second = ds[0], ds[5]
    assert first["index"] == second["index"] == 0 and second["target"] == 1
    assert not torch.equal(first["image"], second["image"])
    assert torch.equal(ds[5]["image"], second["image"])  # still fixed by (seed, index)


def test_sampler_defaults_are_the_recipe_and_errors():
    sampler = NegativeResampler(np.array([1, 0, 0, 1, 0, 0, 0, 0]))
    assert (sampler.neg_ratio, sampler.pos_repeat) == (1.0, 2)
    assert len(sampler) == 8
    labels = np.array([1, 0, 0, 1, 0])
    assert sorted(NegativeResampler(labels, neg_ratio=None, pos_repeat=1)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="no positive"):
        NegativeResampler(np.zeros(4), 1.0)
    with pytest.raises(ValueError, match="pos_repeat"):
        NegativeResampler(labels, 1.0, pos_repeat=0)


def test_validation_subsample_counts_and_determinism():
    rng = np.random.default_rng(0)
    targets = np.zeros(500)
    targets[rng.choice(500, 7, replace=False)] = 1
    rows = validation_subsample(targets, neg_per_pos=10, seed=42)
    assert len(rows) == 7 + 70 and len(set(rows)) == len(rows)
    assert np.all(np.diff(rows) > 0)  # sorted row indices
    assert set(np.flatnonzero(targets == 1)) <= set(rows)
    assert np.array_equal(rows, validation_subsample(targets, 10, seed=42))
    assert not np.array_equal(rows, validation_subsample(targets, 10, seed=43))
    eligible = np.arange(500) % 2 == 0
    limited = validation_subsample(targets, 10, seed=42, eligible=eligible)
    assert all(eligible[i] for i in limited if targets[i] == 0) and len(limited) == 77
    few = np.array([1, 0, 0, 1, 0])
    assert list(validation_subsample(few, 10)) == [0, 1, 2, 3, 4]  # fewer negatives: all
    assert len(validation_subsample(np.zeros(50), 10)) == 10  # no positive: neg_per_pos rows
    with pytest.raises(ValueError, match="eligible"):
        validation_subsample(few, 10, eligible=[True])


def _find(compose: A.Compose, kind: type) -> A.BasicTransform:
    found = [t for t in compose.transforms if isinstance(t, kind)]
    for group in compose.transforms:
        if isinstance(group, A.OneOf):
            found += [t for t in group.transforms if isinstance(t, kind)]
    assert len(found) == 1, kind
    return found[0]


def test_train_transforms_have_the_reference_strengths():
    compose = train_transforms(224)
    names = [type(t).__name__ for t in compose.transforms]
    assert names == [
        "Transpose", "VerticalFlip", "HorizontalFlip", "RandomBrightnessContrast", "OneOf",
        "OneOf", "CLAHE", "HueSaturationValue", "Affine", "Resize", "CoarseDropout", "ToTensorV2",
    ]  # fmt: skip
    blur, warp = (t for t in compose.transforms if isinstance(t, A.OneOf))
    assert [type(t).__name__ for t in blur.transforms] == [
        "MotionBlur", "MedianBlur", "GaussianBlur", "GaussNoise",
    ]  # fmt: skip
    assert [type(t).__name__ for t in warp.transforms] == [
        "OpticalDistortion", "GridDistortion", "ElasticTransform",
    ]  # fmt: skip
    assert blur.p == warp.p == 0.7
    rbc = _find(compose, A.RandomBrightnessContrast)
    assert (rbc.brightness_limit, rbc.contrast_limit, rbc.p) == ((-0.2, 0.2), (-0.1, 0.1), 0.75)
    noise = _find(compose, A.GaussNoise)
    # var 5..30 in 0-255 pixel units -> std sqrt(var) pixels -> a fraction of 255
    assert noise.std_range == pytest.approx((5**0.5 / 255, 30**0.5 / 255))
    assert noise.std_range == pytest.approx((0.008769, 0.021479), abs=1e-6)
    assert noise.mean_range == (0.0, 0.0) and noise.per_channel
    gauss = _find(compose, A.GaussianBlur)
    assert (gauss.blur_limit, gauss.sigma_limit) == ((3, 5), (0.8, 1.1))
    assert _find(compose, A.MotionBlur).blur_limit == (3, 5)
    assert _find(compose, A.MedianBlur).blur_limit == (3, 5)
    drop = _find(compose, A.CoarseDropout)
    assert drop.num_holes_range == (1, 1) and drop.p == 0.7
    assert drop.hole_height_range == drop.hole_width_range == (0.375, 0.375)
    optical = _find(compose, A.OpticalDistortion)
    assert optical.distort_limit == (-1.0, 1.0) and optical.mode == "camera"
    grid = _find(compose, A.GridDistortion)
    assert (grid.num_steps, grid.distort_limit, grid.normalized) == (5, (-1.0, 1.0), False)
    elastic = _find(compose, A.ElasticTransform)
    assert (elastic.alpha, elastic.sigma, elastic.noise_distribution) == (3, 50, "uniform")
    for warper in (optical, grid, elastic):
        assert warper.border_mode == cv2.BORDER_REFLECT_101
    clahe = _find(compose, A.CLAHE)
    assert (clahe.clip_limit, clahe.p) == ((1.0, 4.0), 0.7)
    hsv = _find(compose, A.HueSaturationValue)
    limits = (hsv.hue_shift_limit, hsv.sat_shift_limit, hsv.val_shift_limit, hsv.p)
    assert limits == ((-10, 10), (-20, 20), (-10, 10), 0.5)
    affine = _find(compose, A.Affine)
    assert affine.scale == {"x": (0.9, 1.1), "y": (0.9, 1.1)} and affine.keep_ratio
    assert affine.translate_percent == {"x": (-0.1, 0.1), "y": (-0.1, 0.1)}
    assert affine.rotate == (-15, 15) and affine.p == 0.85
    assert affine.border_mode == cv2.BORDER_CONSTANT
    assert [t.p for t in compose.transforms[:3]] == [0.5, 0.5, 0.5]


def test_gauss_noise_has_the_reference_sigma_in_pixels():
    # the reference's sigma = sqrt(var), var in 5..30: 2.24..5.48 grey levels
    noise = _find(train_transforms(32), A.GaussNoise)
    image = np.full((64, 64, 3), 128, np.uint8)
    sigmas = []
    for seed in range(20):
        noise.set_random_seed(seed)
        out = noise(image=image, force_apply=True)["image"]
        sigmas.append((out.astype(np.float64) - 128).std())
    assert min(sigmas) > 2.0 and max(sigmas) < 5.8 and max(sigmas) - min(sigmas) > 1.0


def test_coarse_dropout_cuts_one_hole_of_0375_the_side():
    drop = _find(train_transforms(32), A.CoarseDropout)
    image = np.full((32, 32, 3), 200, np.uint8)
    for seed in range(5):
        drop.set_random_seed(seed)
        out = drop(image=image, force_apply=True)["image"]
        assert int((out == 0).all(-1).sum()) == 12 * 12  # int(0.375 * 32) = 12 px a side


def test_suspicious_label_on_real_rows(fixtures_dir):
    meta = read_metadata(fixtures_dir / "train-metadata-sample5.csv", "train")
    expected = [
        int(t == 1 or i1 == "Indeterminate" or i2 is not None)
        for t, i1, i2 in meta.select("target", "iddx_1", "iddx_2").rows()
    ]
    assert suspicious_label(meta).to_list() == expected
    assert meta.with_columns(suspicious_label(meta))["suspicious"].dtype == pl.Int8


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
