"""Stage 1: one training loop and one predict function for every image backbone.

A run trains `n_folds` fold models of one image model (IMAGE_MODELS) and writes to
`<output_dir>/<model_name>/`: `config.json` (resolved config, folds and data fingerprint),
`fold{k}.pt` (best checkpoint of fold k, with its validation predictions and history),
`history.csv` and `oof.csv` (every training row exactly once, utils.oof format).

Folds: `n_folds` is the n_splits of utils.folds.assign_folds with `seed`, so any stage that
calls assign_folds(df, n_folds, seed) gets the same folds; a metadata `fold` column, when
present, is used as given (external data sets). A partial run (e.g. 2 folds in tests) is a
complete 2-fold cross-validation, not 2 of 5 folds, so the OOF still covers every row.

Resume: a fold is finished once `fold{k}.pt` exists and is skipped on restart; an unfinished
fold continues after its last completed epoch from `fold{k}.last.pt`. Each epoch is seeded
from (seed, fold, epoch), so a resumed run draws the same samples as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.folds import assign_folds
from utils.image_data import (
    ImageDataset,
    NegativeResampler,
    collate_batch,
    eval_transforms,
    reseed_worker,
    train_transforms,
)
from utils.io import DataDir, HDF5Images
from utils.labels import suspicious_label
from utils.metric import pauc
from utils.models import BACKBONES, ImageModel
from utils.oof import write_oof

CONFIG_FILE = "config.json"
OOF_FILE = "oof.csv"
HISTORY_FILE = "history.csv"
LABELS = ("target", "suspicious")
# Settings that may change between a run and its resume (they do not change the result).
RESUME_FREE = ("num_workers", "eval_batch_size")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that fixes one image-model run; saved as config.json next to its outputs."""

    model_name: str = "convnextv2_nano"
    backbone: str = "convnextv2_nano"
    label: str = "target"  # training label; validation and OOF always use the real target
    preset: str = "full"
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 30
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup: float = 0.05  # fraction of all steps with linear warm-up
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    neg_ratio: float | None = 20.0  # negatives drawn per positive each epoch; None = all
    dropout: float = 0.3
    dropout_samples: int = 5  # multi-sample dropout heads
    n_folds: int = 5
    seed: int = 42
    num_workers: int = 4
    eval_batch_size: int = 128
    weights_path: str | None = None

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"TrainConfig: unknown backbone {self.backbone!r}")
        if self.label not in LABELS:
            raise ValueError(f"TrainConfig: label must be one of {LABELS}, got {self.label!r}")
        if self.n_folds < 2:
            raise ValueError(f"TrainConfig: n_folds must be >= 2, got {self.n_folds}")


PRESETS: dict[str, TrainConfig] = {
    # The paper's Table 1.
    "full": TrainConfig(preset="full"),
    # Small enough for a few minutes on 2 CPU cores with a synthetic data dir.
    "demo": TrainConfig(
        preset="demo",
        image_size=64,
        batch_size=32,
        epochs=2,
        lr=3e-4,
        neg_ratio=5.0,
        num_workers=0,
        eval_batch_size=128,
    ),
}

IMAGE_MODELS: dict[str, dict] = {
    "convnextv2_nano": {"backbone": "convnextv2_nano", "label": "target"},
    "vit_tiny": {"backbone": "vit_tiny", "label": "target"},
    "vit_tiny_suspicious": {"backbone": "vit_tiny", "label": "suspicious"},
    "vit_small_suspicious": {"backbone": "vit_small", "label": "suspicious"},
}


def make_config(model_name: str, preset: str = "demo", **overrides) -> TrainConfig:
    """The preset with the image model's settings and every override that is not None."""
    if model_name not in IMAGE_MODELS:
        raise KeyError(f"unknown image model {model_name!r}; known: {sorted(IMAGE_MODELS)}")
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(
        PRESETS[preset], model_name=model_name, **IMAGE_MODELS[model_name], **given
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(cfg: TrainConfig, fold: int, epoch: int) -> int:
    """One seed per (run seed, fold, epoch), so resumed epochs repeat exactly; epoch -1 = init."""
    return int(np.random.SeedSequence([cfg.seed, fold, epoch + 1]).generate_state(1)[0])


def lr_factor(step: int, total: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of lr at `step`: linear warm-up, then cosine decay down to min_lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return (min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / lr


# ---------------------------------------------------------------------------------- data


def prepare_frame(cfg: TrainConfig, metadata: pl.DataFrame) -> pl.DataFrame:
    """isic_id, patient_id, target, label, fold for training; folds from assign_folds if absent.

    `metadata` needs isic_id, patient_id, target; for label "suspicious" either a `suspicious`
    column or the iddx_1/iddx_2 columns it is derived from; optionally a `fold` column.
    """
    missing = [c for c in ("isic_id", "patient_id", "target") if c not in metadata.columns]
    if missing:
        raise KeyError(f"image training metadata lacks column(s) {missing}")
    dupes = metadata.filter(pl.col("isic_id").is_duplicated())["isic_id"].unique()
    if len(dupes):
        raise ValueError(f"image training metadata: duplicate isic_id(s) {dupes.head(3).to_list()}")
    df = metadata
    if cfg.label == "suspicious" and "suspicious" not in df.columns:
        df = df.with_columns(suspicious_label(df))
    if "fold" not in df.columns:
        df = df.with_columns(pl.Series("fold", assign_folds(df, cfg.n_folds, cfg.seed)))
    df = df.select(
        "isic_id",
        "patient_id",
        pl.col("target").cast(pl.Int8),
        pl.col(cfg.label).cast(pl.Float32).alias("label"),
        pl.col("fold").cast(pl.Int8),
    )
    bad = df.filter(~pl.col("fold").is_between(0, cfg.n_folds - 1))
    if len(bad):
        raise ValueError(
            f"image training metadata: fold outside 0..{cfg.n_folds - 1} for "
            f"{bad['isic_id'].head(3).to_list()}"
        )
    return df


def check_images(frame: pl.DataFrame, images: HDF5Images) -> None:
    """Raise naming the hdf5 file unless every training isic_id has an image."""
    absent = images.index(frame["isic_id"].to_list())  # caches extents for the workers
    if absent:
        raise ValueError(
            f"{images.path}: {len(absent)} training image(s) missing, e.g. {absent[:3]}"
        )


def data_fingerprint(frame: pl.DataFrame) -> dict:
    """Row count, positives and a hash of (isic_id, fold, label): resume must see the same data."""
    rows = frame.sort("isic_id").select("isic_id", "fold", "label").rows()
    digest = hashlib.sha1("\n".join(f"{i},{f},{y}" for i, f, y in rows).encode()).hexdigest()
    return {"rows": len(frame), "positives": int(frame["target"].sum()), "sha1": digest}


def write_or_check_config(
    run_dir: Path, cfg: TrainConfig, frame: pl.DataFrame, folds_source: str
) -> None:
    """Write config.json, or check that an existing one (a run to resume) matches."""
    record = {
        "config": dataclasses.asdict(cfg),
        "folds": {"n_folds": cfg.n_folds, "seed": cfg.seed, "source": folds_source},
        "data": data_fingerprint(frame),
    }
    path = run_dir / CONFIG_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        for key in RESUME_FREE:
            old["config"].pop(key, None)
        new = json.loads(json.dumps(record))
        for key in RESUME_FREE:
            new["config"].pop(key, None)
        if old != new:
            raise ValueError(
                f"{path}: an earlier run with other settings or data is here; "
                "use another output_dir or delete it"
            )
    path.write_text(json.dumps(record, indent=2))


def resolve_images(images: HDF5Images | str | Path) -> HDF5Images:
    return images if isinstance(images, HDF5Images) else HDF5Images(images)


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    num_workers: int,
    sampler: NegativeResampler | None = None,
    generator: torch.Generator | None = None,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=reseed_worker,
        collate_fn=collate_batch,
        generator=generator,
        persistent_workers=False,
    )


def batch_images(batch: dict, device: torch.device) -> torch.Tensor:
    """The batch's uint8 images on `device`: channels_last on CUDA (as collate_batch stacks them,
    so no copy), contiguous NCHW on CPU, where timm's models run faster that way."""
    x = batch["image"].to(device, non_blocking=True)
    if device.type == "cuda":
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


# ---------------------------------------------------------------------------------- predict


def build_model(cfg: TrainConfig, weights_path: str | None = None) -> ImageModel:
    return ImageModel(
        cfg.backbone,
        cfg.image_size,
        weights_path=weights_path,
        dropout=cfg.dropout,
        dropout_samples=cfg.dropout_samples,
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
    cuda = device.type == "cuda"
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=5):
        x = batch_images(batch, device)
        index = batch["index"].numpy()
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            for j, model in enumerate(models):
                probs[index, j] = torch.sigmoid(model(x)["logits"].float()).cpu().numpy()
        ok[index] = batch["ok"].numpy()
    probs[~ok] = np.nan
    return probs, ok


def load_config(model_dir: str | Path) -> TrainConfig:
    """The TrainConfig saved in `model_dir`/config.json."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in image model dir {model_dir}")
    return TrainConfig(**json.loads(path.read_text())["config"])


def load_fold_models(
    model_dir: str | Path, device: torch.device | None = None
) -> tuple[TrainConfig, list[ImageModel]]:
    """Config and every fold{k}.pt model of a run dir, on `device`, in eval mode."""
    device = device or default_device()
    cfg = load_config(model_dir)
    models = []
    for k in range(cfg.n_folds):
        path = Path(model_dir) / f"fold{k}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the run of {cfg.model_name} is unfinished")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(cfg)
        model.load_state_dict(checkpoint["state_dict"])
        models.append(to_device(model, device).eval())
    return cfg, models


def predict(
    model_dir: str | Path,
    images: HDF5Images | str | Path,
    isic_ids: Sequence[str],
    batch_size: int = 128,
    num_workers: int = 2,
    device: torch.device | None = None,
) -> pl.DataFrame:
    """isic_id, pred (mean of the fold models' probabilities), image_ok for one image model.

    Unreadable or missing images get pred NaN and image_ok False (counted and reported), so the
    caller can fall back to a metadata-only score for those rows.
    """
    device = device or default_device()
    cfg, models = load_fold_models(model_dir, device)
    images = resolve_images(images)
    probs, ok = predict_with_models(
        models, images, isic_ids, cfg.image_size, batch_size, num_workers, device, cfg.model_name
    )
    if (~ok).any():
        bad = [i for i, good in zip(isic_ids, ok, strict=True) if not good]
        print(f"{cfg.model_name}: {len(bad)} unreadable image(s) in {images.path}, e.g. {bad[:3]}")
    return pl.DataFrame(
        {"isic_id": list(isic_ids), "pred": probs.mean(axis=1), "image_ok": ok},
        schema={"isic_id": pl.String, "pred": pl.Float64, "image_ok": pl.Boolean},
    )


# ---------------------------------------------------------------------------------- train


def safe_score(target: np.ndarray, pred: np.ndarray, loss: float) -> float:
    """Validation criterion: pAUC, or -loss when the fold lacks a class (tiny data only)."""
    if np.unique(target).size < 2:
        return -loss
    return pauc(target, pred)


def bce(target: np.ndarray, pred: np.ndarray) -> float:
    p = np.clip(pred, 1e-7, 1 - 1e-7)
    return float(-np.mean(target * np.log(p) + (1 - target) * np.log(1 - p)))


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    device: torch.device,
    desc: str,
) -> float:
    """One pass over the sampled training rows; returns the mean training loss."""
    model.train()
    cuda = device.type == "cuda"
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, mininterval=5)
    for batch in bar:
        x = batch_images(batch, device)
        y = batch["target"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = model(x, y)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.item() * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: an interrupted save leaves no broken file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train_fold(
    cfg: TrainConfig,
    frame: pl.DataFrame,
    images: HDF5Images,
    fold: int,
    run_dir: Path,
    device: torch.device,
) -> dict:
    """Train fold `fold` (resuming from fold{k}.last.pt) and write fold{k}.pt; returns it."""
    final, last = run_dir / f"fold{fold}.pt", run_dir / f"fold{fold}.last.pt"
    train_rows, valid_rows = (
        frame.filter(pl.col("fold") != fold),
        frame.filter(pl.col("fold") == fold),
    )
    seed_everything(epoch_seed(cfg, fold, -1))
    model = to_device(build_model(cfg, cfg.weights_path), device)
    transform = train_transforms(cfg.image_size)
    dataset = ImageDataset(images, train_rows["isic_id"], train_rows["label"].to_numpy(), transform)
    sampler = NegativeResampler(dataset.targets, cfg.neg_ratio, seed=cfg.seed + fold)
    generator = torch.Generator()
    loader = make_loader(dataset, cfg.batch_size, cfg.num_workers, sampler, generator)
    total_steps = cfg.epochs * len(loader)
    warmup_steps = max(1, int(cfg.warmup * total_steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    state = {"epoch": -1, "best": None, "history": []}
    if last.is_file():
        saved = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = saved["state"]
        print(f"{cfg.model_name} fold {fold}: resuming after epoch {state['epoch']}")
    valid_ids = valid_rows["isic_id"].to_list()
    valid_target = valid_rows["target"].to_numpy().astype(np.float64)
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        seed = epoch_seed(cfg, fold, epoch)
        seed_everything(seed)
        generator.manual_seed(seed)
        dataset.seed = seed
        sampler.set_epoch(epoch)
        desc = f"{cfg.model_name} fold {fold} epoch {epoch}"
        train_loss = train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, device, desc)
        pred = predict_with_models(
            [model],
            images,
            valid_ids,
            cfg.image_size,
            cfg.eval_batch_size,
            cfg.num_workers,
            device,
            f"{desc} valid",
        )[0][:, 0]
        val_loss = bce(valid_target, pred)
        score = safe_score(valid_target, pred, val_loss)
        row = {
            "fold": fold,
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_pauc": score if np.unique(valid_target).size == 2 else float("nan"),
            "lr": scheduler.get_last_lr()[0],
        }
        state["history"].append(row)
        shown = ("train_loss", "val_loss", "val_pauc")
        print(f"{desc}: " + ", ".join(f"{k} {row[k]:.4f}" for k in shown))
        if state["best"] is None or score > state["best"]["score"]:
            state["best"] = {"score": score, "epoch": epoch}
            save_atomic(
                {"state_dict": cpu_state(model), "val_pred": torch.from_numpy(pred)},
                run_dir / f"fold{fold}.best.pt",
            )
        state["epoch"] = epoch
        save_atomic(
            {
                "model": cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "state": state,
            },
            last,
        )
    best = torch.load(run_dir / f"fold{fold}.best.pt", map_location="cpu", weights_only=True)
    checkpoint = {
        "state_dict": best["state_dict"],
        "config": dataclasses.asdict(cfg),
        "fold": fold,
        "best_epoch": state["best"]["epoch"],
        "score": state["best"]["score"],
        "val_ids": valid_ids,
        "val_pred": best["val_pred"],
        "history": state["history"],
    }
    save_atomic(checkpoint, final)
    (run_dir / f"fold{fold}.best.pt").unlink()
    last.unlink()
    return checkpoint


def train_image_model(
    cfg: TrainConfig,
    metadata: pl.DataFrame,
    images: HDF5Images | str | Path,
    output_dir: str | Path,
    device: torch.device | None = None,
) -> pl.DataFrame:
    """Train (or resume) every fold of `cfg.model_name`; write and return the OOF table.

    `metadata` needs isic_id, patient_id, target (see prepare_frame); `images` is the hdf5 file
    holding those ids. Works for the Kaggle data and for external sets in the same form.
    """
    device = device or default_device()
    images = resolve_images(images)
    run_dir = Path(output_dir) / cfg.model_name
    run_dir.mkdir(parents=True, exist_ok=True)
    frame = prepare_frame(cfg, metadata)
    check_images(frame, images)
    folds_source = "metadata" if "fold" in metadata.columns else "assign_folds"
    write_or_check_config(run_dir, cfg, frame, folds_source)
    parts, history = [], []
    for fold in range(cfg.n_folds):
        path = run_dir / f"fold{fold}.pt"
        if path.is_file():
            print(f"{cfg.model_name} fold {fold}: finished earlier, skipped ({path})")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        else:
            checkpoint = train_fold(cfg, frame, images, fold, run_dir, device)
        parts.append(
            pl.DataFrame(
                {
                    "isic_id": checkpoint["val_ids"],
                    "pred": checkpoint["val_pred"].numpy().astype(np.float64),
                }
            )
        )
        history.extend(checkpoint["history"])
    preds = pl.concat(parts)
    oof = frame.select("isic_id", "patient_id", "fold", "target").join(
        preds, on="isic_id", how="left"
    )
    write_oof(oof, run_dir / OOF_FILE)
    pl.DataFrame(history).write_csv(run_dir / HISTORY_FILE)
    return oof.sort("isic_id")


def train_from_data_dir(
    cfg: TrainConfig, data_dir: str | Path, output_dir: str | Path
) -> pl.DataFrame:
    """train_image_model on a Kaggle-layout data dir (train-metadata.csv + train-image.hdf5)."""
    data = DataDir(data_dir)
    return train_image_model(cfg, data.train_metadata(), data.train_images(), output_dir)


def fold_scores(oof: pl.DataFrame) -> pl.DataFrame:
    """Rows, positives and pAUC per fold and overall ("all") of an OOF table."""
    rows = []
    for name, part in [
        (str(k), oof.filter(pl.col("fold") == k)) for k in sorted(oof["fold"].unique())
    ] + [("all", oof)]:
        y, p = part["target"].to_numpy(), part["pred"].to_numpy()
        score = pauc(y, p) if np.unique(y).size == 2 else float("nan")
        rows.append({"fold": name, "rows": len(part), "positives": int(y.sum()), "pauc": score})
    return pl.DataFrame(rows)
