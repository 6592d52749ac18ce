"""One predict function for every image model: fold checkpoints in, probabilities out.

Stage 1 scores its validation fold with `predict_with_models`; stage 4 (the submission kernel)
and stage 5 load a finished run dir with `load_fold_models` and score test images with
`predict`, whose value per image is the mean of the fold models' probabilities. That is not how
the OOF feature is made: there each row is scored by the one fold model that did not see it, at
the epoch chosen on that held-out fold's own score, so the OOF is a little optimistic and less
smooth than the fold mean a test row gets. fp16 autocast and channels_last on CUDA; CPU works the
same.

Several GPUs: `predict` on device None or "cuda" (no index) scores on every visible GPU at once
(`predict_on_devices`: a contiguous share of the ids per GPU, one thread each, since the GPU work
and the DataLoader workers run outside the GIL). Loading is checked: a missing, empty, truncated
or foreign `fold{k}.pt` raises CheckpointError naming the file and why (never a bare torch/zip
error).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from utils.image.data import ImageDataset, collate_batch, eval_transforms, reseed_worker
from utils.image.distributed import shard_bounds, workers_per_process
from utils.image.models import ImageModel
from utils.io import HDF5Images
from utils.layout import CONFIG_FILE, fold_file
from utils.manifest import verified_json
from utils.settings import ImageConfig


class CheckpointError(ValueError):
    """A fold checkpoint that cannot be used; the message names the file and why."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_devices(device: torch.device | None = None) -> list[torch.device]:
    """The devices `predict` uses: every visible GPU for None or "cuda" without an index (one
    GPU: ["cuda:0"]), else `device` alone (the CPU, or one GPU given as "cuda:k")."""
    device = device or default_device()
    if device.type == "cuda" and device.index is None:
        return [torch.device("cuda", k) for k in range(max(1, torch.cuda.device_count()))]
    return [device]


def resolve_images(images: HDF5Images | str | Path) -> HDF5Images:
    return images if isinstance(images, HDF5Images) else HDF5Images(images)


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    num_workers: int,
    generator: torch.Generator | None = None,
    batch_sampler: Sampler[list[int]] | None = None,
) -> DataLoader:
    """DataLoader of the item dicts, in order; a `batch_sampler` (utils.image.distributed.
    RankBatches) gives each batch's indices itself, in place of `batch_size`."""
    if batch_sampler is not None:
        batching = {"batch_sampler": batch_sampler}
    else:
        batching = {"batch_size": batch_size}
    return DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=reseed_worker,
        collate_fn=collate_batch,
        generator=generator,
    )


def batch_images(batch: dict, device: torch.device) -> torch.Tensor:
    """The batch's uint8 images on `device`: channels_last on CUDA (as collate_batch stacks them,
    so no copy), contiguous NCHW on CPU, where timm's models run faster that way."""
    x = batch["image"].to(device, non_blocking=True)
    if device.type == "cuda":
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def build_model(cfg: ImageConfig, weights_path: str | None = None) -> ImageModel:
    """The architecture `cfg` trains (head pooling and norm included), so inference rebuilds it;
    a fold checkpoint's fp16 weights load into it as float32 (load_state_dict casts)."""
    return ImageModel(
        cfg.backbone,
        cfg.image_size,
        weights_path=weights_path,
        dropout=cfg.dropout,
        dropout_samples=cfg.dropout_samples,
        pool=cfg.pool,
        head_norm=cfg.head_norm,
    )


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to device; channels_last on CUDA, where it speeds up the convolutions."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


@torch.no_grad()
def predict_with_models(
    models: Sequence[nn.Module],
    images: HDF5Images,
    isic_ids: Sequence[str],
    image_size: int,
    batch_size: int = 128,
    num_workers: int = 2,
    device: torch.device | None = None,
    desc: str = "predict",
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (n_ids, n_models) from one pass over the images, and the readable-image mask.

    Each image is decoded once and the batch goes through every model (fp16 autocast on CUDA).
    Rows whose image is missing or undecodable are NaN and False in the mask.
    """
    device = device or default_device()
    dataset = ImageDataset(
        images, isic_ids, transform=eval_transforms(image_size), skip_unreadable=True
    )
    loader = make_loader(dataset, batch_size, num_workers)
    probs = np.full((len(dataset), len(models)), np.nan, dtype=np.float64)
    ok = np.zeros(len(dataset), dtype=bool)
    for model in models:
        model.eval()
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=5):
        x = batch_images(batch, device)
        index = batch["index"].numpy()
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            for j, model in enumerate(models):
                probs[index, j] = torch.sigmoid(model(x)["logits"].float()).cpu().numpy()
        ok[index] = batch["ok"].numpy()
    probs[~ok] = np.nan
    return probs, ok


def predict_on_devices(
    replicas: Sequence[tuple[torch.device, Sequence[nn.Module]]],
    images: HDF5Images,
    isic_ids: Sequence[str],
    image_size: int,
    batch_size: int = 128,
    num_workers: int = 2,
    desc: str = "predict",
) -> tuple[np.ndarray, np.ndarray]:
    """predict_with_models on several devices at once, each given as (device, its copies of the
    models): device k predicts the k-th contiguous share of the ids with its share of the
    `num_workers`, in a thread of its own; the shares are joined back in `isic_ids` order.
    One replica: predict_with_models itself. An error names the device and the share."""
    ids = list(isic_ids)
    if len(replicas) == 1:
        device, models = replicas[0]
        return predict_with_models(
            models, images, ids, image_size, batch_size, num_workers, device, desc
        )
    workers = workers_per_process(num_workers, len(replicas))

    def run(k: int) -> tuple[np.ndarray, np.ndarray]:
        device, models = replicas[k]
        lo, hi = shard_bounds(len(ids), k, len(replicas))
        share = ids[lo:hi]
        try:
            return predict_with_models(
                models, images, share, image_size, batch_size, workers, device, f"{desc} {device}"
            )
        except Exception as err:
            raise RuntimeError(
                f"{desc}: prediction of ids {lo}..{hi - 1} ({hi - lo}) on {device} failed: "
                f"{type(err).__name__}: {err}"
            ) from err

    with ThreadPoolExecutor(len(replicas), thread_name_prefix="predict") as pool:
        parts = list(pool.map(run, range(len(replicas))))
    return np.concatenate([p for p, _ in parts]), np.concatenate([ok for _, ok in parts])


def load_config(model_dir: str | Path) -> ImageConfig:
    """The ImageConfig saved in `model_dir`/config.json; when that file differs from the folder's
    manifest, the one the manifest records (utils.manifest.verified_json: a damaged file is
    never used)."""
    return ImageConfig(**verified_json(model_dir, CONFIG_FILE)["config"])


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a usable checkpoint, judged without loading it: absent, empty, or not
    a complete zip archive (torch.save writes one; a cut file loses the zip's closing record)."""
    path = Path(path)
    if not path.is_file():
        return f"{path}: missing"
    if path.stat().st_size == 0:
        return f"{path}: empty file (0 bytes)"
    if not zipfile.is_zipfile(path):
        return f"{path}: not a complete torch checkpoint (truncated? no zip end record)"
    return None


def load_checkpoint(path: str | Path) -> dict:
    """torch.load of a fold checkpoint; CheckpointError naming `path` when it cannot be read."""
    path = Path(path)
    if (why := checkpoint_problem(path)) is not None:
        raise CheckpointError(why)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a fold checkpoint (no state_dict)")
    return checkpoint


def load_fold_models(
    model_dir: str | Path,
    device: torch.device | None = None,
    folds: Sequence[int] | None = None,
) -> tuple[ImageConfig, list[ImageModel]]:
    """Config and the fold{k}.pt models of a run dir (every fold, or `folds`), on `device`, in
    eval mode; CheckpointError naming the file for one that cannot be loaded."""
    device = device or default_device()
    cfg = load_config(model_dir)
    models = []
    for k in range(cfg.n_folds) if folds is None else folds:
        path = Path(model_dir) / fold_file(k)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the run of {cfg.model_name} is unfinished")
        checkpoint = load_checkpoint(path)
        model = build_model(cfg)
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as err:
            raise CheckpointError(f"{path}: weights do not fit {cfg.backbone} ({err})") from err
        models.append(to_device(model, device).eval())
    return cfg, models


def predict(
    model_dir: str | Path,
    images: HDF5Images | str | Path,
    isic_ids: Sequence[str],
    batch_size: int = 128,
    num_workers: int = 2,
    device: torch.device | None = None,
    folds: Sequence[int] | None = None,
) -> pl.DataFrame:
    """isic_id, pred (mean of the fold models' probabilities), image_ok for one image model.

    `folds` restricts the mean to those fold models (the others damaged or missing).
    Unreadable or missing images get pred NaN and image_ok False (counted and reported), so the
    caller can fall back to a metadata-only score for those rows. `device`: inference_devices.
    """
    replicas = []
    for d in inference_devices(device):
        cfg, models = load_fold_models(model_dir, d, folds)
        replicas.append((d, models))
    images = resolve_images(images)
    probs, ok = predict_on_devices(
        replicas, images, isic_ids, cfg.image_size, batch_size, num_workers, cfg.model_name
    )
    if (~ok).any():
        bad = [i for i, good in zip(isic_ids, ok, strict=True) if not good]
        print(f"{cfg.model_name}: {len(bad)} unreadable image(s) in {images.path}, e.g. {bad[:3]}")
    return pl.DataFrame(
        {"isic_id": list(isic_ids), "pred": probs.mean(axis=1), "image_ok": ok},
        schema={"isic_id": pl.String, "pred": pl.Float64, "image_ok": pl.Boolean},
    )
