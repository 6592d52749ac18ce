"""Image Dataset over the hdf5 crops, transforms, per-epoch sampler and validation subsample."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset, Sampler, default_collate

from utils.io import HDF5Images, ImageReadError

# The reference (train_*.py of the 3rd-place code) ran albumentations 1.4.13; these are its
# transforms with the 2.x names and, where a 2.x default differs, the 1.4.13 value spelt out.
# GaussNoise(var_limit=(5, 30)) drew a variance in 0-255 pixel units, so sigma = sqrt(var) is
# 2.24-5.48 pixels; 2.x takes std as a fraction of the max value (255): 0.0088-0.0215. (Not
# sqrt(var / 255) = 0.14-0.34, 16x too strong.) 1.4.13 drew var, 2.x draws std uniformly: the
# mean sigma is 3.9 instead of 4.1 pixels.
NOISE_VARIANCE = (5.0, 30.0)
NOISE_STD_RANGE = (NOISE_VARIANCE[0] ** 0.5 / 255, NOISE_VARIANCE[1] ** 0.5 / 255)
# CoarseDropout(max_height=int(0.375 * size), max_width=..., min_holes=1): under 1.4.13 the
# unset max_holes stays None, so num_holes_range keeps its default (1, 1), and the unset
# min_height makes the side exactly max_height: one hole of 0.375 x the side (84 px at 224).
HOLES = (1, 1)
HOLE_SIDE = 0.375


def train_transforms(image_size: int, seed: int | None = None) -> A.Compose:
    """Training augmentation of the reference recipe (albumentations 2.x names, 1.4.13 values).

    Output is a uint8 CHW tensor: ImageNet normalisation happens in the model, on the device,
    which moves 4x fewer bytes to the GPU and saves the CPU a float pass per image.
    """
    reflect = cv2.BORDER_REFLECT_101  # 1.4.13's default border for the distortions
    return A.Compose(
        [
            A.Transpose(p=0.5),
            A.VerticalFlip(p=0.5),
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.1, p=0.75),
            A.OneOf(
                [
                    A.MotionBlur(blur_limit=5),
                    A.MedianBlur(blur_limit=5),
                    # 1.4.13: kernel 3 or 5, sigma from the kernel as OpenCV does (0.8 or 1.1)
                    A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.8, 1.1)),
                    A.GaussNoise(std_range=NOISE_STD_RANGE),
                ],
                p=0.7,
            ),
            A.OneOf(
                [
                    A.OpticalDistortion(distort_limit=1.0, border_mode=reflect),
                    A.GridDistortion(
                        num_steps=5, distort_limit=1.0, normalized=False, border_mode=reflect
                    ),
                    A.ElasticTransform(
                        alpha=3, sigma=50, noise_distribution="uniform", border_mode=reflect
                    ),
                ],
                p=0.7,
            ),
            A.CLAHE(clip_limit=4.0, p=0.7),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5),
            # ShiftScaleRotate(0.1, 0.1, 15, border_mode=0): one scale for both axes
            A.Affine(
                scale=(0.9, 1.1),
                keep_ratio=True,
                translate_percent=(-0.1, 0.1),
                rotate=(-15, 15),
                border_mode=cv2.BORDER_CONSTANT,
                p=0.85,
            ),
            A.Resize(image_size, image_size),
            A.CoarseDropout(
                num_holes_range=HOLES,
                hole_height_range=(HOLE_SIDE, HOLE_SIDE),
                hole_width_range=(HOLE_SIDE, HOLE_SIDE),
                p=0.7,
            ),
            ToTensorV2(),
        ],
        seed=seed,
    )


def eval_transforms(image_size: int) -> A.Compose:
    """Resize only (to a uint8 CHW tensor)."""
    return A.Compose([A.Resize(image_size, image_size), ToTensorV2()])


class ImageDataset(Dataset):
    """Crops by isic_id from an hdf5 file, transformed; items are dicts (image, target, ok).

    With `skip_unreadable` a missing or undecodable image yields a black image and ok=False
    (the caller masks it) instead of raising ImageReadError. With `seed` set, item i is
    augmented from (seed, i) alone, so results do not depend on the DataLoader worker count.
    Item i + k * len(self) is row i again with its own augmentation: NegativeResampler asks for
    the k-th copy of a repeated positive that way. The item's "index" is the row.
    """

    def __init__(
        self,
        images: HDF5Images,
        isic_ids: Sequence[str],
        targets: Sequence[float] | np.ndarray | None = None,
        transform: A.Compose | None = None,
        skip_unreadable: bool = False,
    ):
        if targets is not None and len(targets) != len(isic_ids):
            raise ValueError(f"ImageDataset: {len(isic_ids)} ids but {len(targets)} targets")
        self.images = images
        self.isic_ids = list(isic_ids)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self.seed: int | None = None

    def __len__(self) -> int:
        return len(self.isic_ids)

    def _read(self, isic_id: str) -> tuple[np.ndarray, bool]:
        try:
            return self.images.read(isic_id), True
        except ImageReadError:
            if not self.skip_unreadable:
                raise
            return np.zeros((32, 32, 3), np.uint8), False

    def __getitem__(self, index: int) -> dict:
        row = index % len(self.isic_ids)
        image, ok = self._read(self.isic_ids[row])
        if self.transform is not None:
            if self.seed is not None:
                self.transform.set_random_seed((self.seed * 1_000_003 + index) % 2**32)
            image = self.transform(image=image)["image"]
        target = np.float32("nan") if self.targets is None else self.targets[row]
        return {"image": image, "target": torch.tensor(target), "ok": ok, "index": row}


def collate_batch(items: list[dict]) -> dict:
    """default_collate, except that the images stack into a channels_last uint8 batch.

    ToTensorV2 returns each image as a CHW view of its HWC array; stacking those views into a
    contiguous NCHW batch is a strided copy (about 0.4 ms per 224 px image on one core, as much
    as the resize). Stacking the HWC arrays is a plain copy, and the NHWC batch viewed as NCHW is
    exactly the channels_last layout the CUDA path wants. Shapes and values are unchanged.
    """
    images = torch.stack([item["image"].permute(1, 2, 0) for item in items]).permute(0, 3, 1, 2)
    batch = default_collate([{k: v for k, v in item.items() if k != "image"} for item in items])
    batch["image"] = images
    return batch


def reseed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker (and each epoch) its own augmentation stream.

    albumentations 2.x Compose keeps a private generator that forked workers would all copy;
    this matters only for a dataset without a per-item `seed`.
    """
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if isinstance(transform, A.Compose):
        transform.set_random_seed(torch.initial_seed() % 2**32)


class NegativeResampler(Sampler[int]):
    """Each epoch: every positive `pos_repeat` times and a fresh draw of negatives, interleaved.

    The reference (3rd-place code): positives twice (ratio_upsampling=2) plus as many negatives
    (ratio_int=1), about 4P images an epoch, the negatives redrawn each epoch. `neg_ratio`
    negatives are drawn per positive image, i.e. neg_ratio * pos_repeat * P of them (capped at
    what there is; None keeps every negative). As in the reference, shuffled positives and
    negatives alternate in that proportion, so every batch holds the same share of positives.
    The draw depends only on (seed, fold, epoch): call `set_epoch` before each epoch, as with
    DistributedSampler, so a resumed run draws the same sets. The k-th copy of row i comes as
    i + k * len(labels), which ImageDataset reads as row i with an augmentation of its own (the
    same index twice would get the same augmentation under a per-item seed).
    """

    def __init__(
        self,
        labels: Sequence[float] | np.ndarray,
        neg_ratio: float | None = 1.0,
        pos_repeat: int = 2,
        seed: int = 0,
        fold: int = 0,
    ):
        labels = np.asarray(labels)
        self.num_rows = len(labels)
        self.positives = np.flatnonzero(labels == 1)
        self.negatives = np.flatnonzero(labels == 0)
        if len(self.positives) == 0:
            raise ValueError("NegativeResampler: the training rows hold no positive")
        if pos_repeat < 1:
            raise ValueError(f"NegativeResampler: pos_repeat must be >= 1, got {pos_repeat}")
        self.neg_ratio = neg_ratio
        self.pos_repeat = pos_repeat
        self.seed = seed
        self.fold = fold
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def num_positives(self) -> int:
        return self.pos_repeat * len(self.positives)

    def num_negatives(self) -> int:
        if self.neg_ratio is None:
            return len(self.negatives)
        return min(len(self.negatives), round(self.neg_ratio * self.num_positives()))

    def __len__(self) -> int:
        return self.num_positives() + self.num_negatives()

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.fold, self.epoch])
        copies = [self.positives + k * self.num_rows for k in range(self.pos_repeat)]
        positives = rng.permutation(np.concatenate(copies))
        negatives = rng.choice(self.negatives, self.num_negatives(), replace=False)
        # positive i sits at i / n_pos and negative j at (j + 0.5) / n_neg of the epoch: for
        # neg_ratio 1 that is pos, neg, pos, neg, ...
        slots = np.concatenate(
            [
                np.arange(len(positives)) / len(positives),
                (np.arange(len(negatives)) + 0.5) / max(len(negatives), 1),
            ]
        )
        order = np.argsort(slots, kind="stable")
        return iter(np.concatenate([positives, negatives])[order].tolist())


def validation_subsample(
    targets: Sequence[float] | np.ndarray,
    neg_per_pos: float = 10,
    seed: int = 0,
    eligible: Sequence[bool] | np.ndarray | None = None,
) -> np.ndarray:
    """Sorted row indices of a held-out fold for per-epoch validation: every positive plus
    `neg_per_pos` random negatives per positive (all when fewer), drawn once from `seed`.

    `eligible` (optional, one bool per row) limits which negatives may be drawn; the reference
    draws them among tbp_lv_dnn_lesion_confidence > 80 with random_state=42 for every fold.
    A fold without positives keeps `neg_per_pos` negatives, so its loss can still be tracked.
    """
    targets = np.asarray(targets)
    positives = np.flatnonzero(targets == 1)
    pool = targets == 0
    if eligible is not None:
        eligible = np.asarray(eligible, dtype=bool)
        if eligible.shape != targets.shape:
            raise ValueError(
                f"validation_subsample: {len(targets)} targets but {len(eligible)} eligible flags"
            )
        pool &= eligible
    negatives = np.flatnonzero(pool)
    wanted = min(len(negatives), round(neg_per_pos * max(len(positives), 1)))
    drawn = np.random.default_rng(seed).choice(negatives, wanted, replace=False)
    return np.sort(np.concatenate([positives, drawn]))
