"""Stage 1: one training loop for every image model (prediction lives in utils.predict).

`run_image_stage(model, data_dir, output_dir, preset, recipe, **overrides)` is the entry the
notebooks, tests and bench call. A run trains `n_folds` fold models of one image model
(utils.settings.IMAGE_MODELS) and writes to `<output_dir>/<model_name>/`: `config.json` (resolved
config, folds, data fingerprint and `config_hash`, the run's identity), `fold{k}.pt` (best
checkpoint of fold k, with its validation predictions and history), `history.csv`, `oof.csv`
(every training row exactly once, utils.oof format) and, last, `manifest.json` (utils.manifest).

Folds: `n_folds` is the n_splits of utils.folds.assign_folds with `seed`, so any stage that
calls assign_folds(df, n_folds, seed) gets the same folds; a metadata `fold` column, when
present, is used as given (external data sets). A partial run (e.g. 2 folds in tests) is a
complete 2-fold cross-validation, not 2 of 5 folds, so the OOF still covers every row.

Resume: a fold is finished once `fold{k}.pt` exists and is skipped on restart; an unfinished
fold continues after its last completed epoch from `fold{k}.last.pt`. Each epoch is seeded
from (seed, fold, epoch), so a resumed run draws the same samples as an uninterrupted one.
Rerun: other settings or data (another `config_hash`), or `force`, move the old run dir aside
(`<output_dir>/.previous/<model_name>`) and train from scratch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.folds import assign_folds
from utils.image_data import ImageDataset, NegativeResampler, train_transforms
from utils.io import DataDir, HDF5Images
from utils.labels import suspicious_label
from utils.manifest import MANIFEST_FILE, config_hash, set_aside, write_json, write_manifest
from utils.metric import pauc
from utils.oof import write_oof
from utils.predict import (
    CONFIG_FILE,
    batch_images,
    build_model,
    default_device,
    make_loader,
    predict_with_models,
    resolve_images,
    to_device,
)
from utils.settings import TrainConfig, image_config

OOF_FILE = "oof.csv"
HISTORY_FILE = "history.csv"
# Settings that may change between a run and its resume (they do not change the result).
RESUME_FREE = ("num_workers", "eval_batch_size")


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


def run_record(cfg: TrainConfig, frame: pl.DataFrame, folds_source: str) -> dict:
    """What config.json and the manifest record: config, folds, data fingerprint and the hash
    of all three without the RESUME_FREE settings (the run's identity, which stage 3 records)."""
    record = {
        "config": dataclasses.asdict(cfg),
        "folds": {"n_folds": cfg.n_folds, "seed": cfg.seed, "source": folds_source},
        "data": data_fingerprint(frame),
    }
    identity = json.loads(json.dumps(record))
    for key in RESUME_FREE:
        identity["config"].pop(key, None)
    return {**record, "config_hash": config_hash(identity)}


def prepare_run_dir(run_dir: Path, record: dict, force: bool = False) -> None:
    """Start clean when forced or when the run dir holds another run (other settings or data):
    that run is moved aside, never resumed or mixed in. Same run: resume (keep finished folds)."""
    path = run_dir / CONFIG_FILE
    if run_dir.is_dir():
        old = json.loads(path.read_text()).get("config_hash") if path.is_file() else None
        if force or old != record["config_hash"]:
            set_aside(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MANIFEST_FILE).unlink(missing_ok=True)  # written again once the run is complete
    write_json(path, record)


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
    force: bool = False,
) -> pl.DataFrame:
    """Train (or resume) every fold of `cfg.model_name`; write and return the OOF table.

    `metadata` needs isic_id, patient_id, target (see prepare_frame); `images` is the hdf5 file
    holding those ids. Works for the Kaggle data and for external sets in the same form. The run
    dir starts clean when `force` or when it holds a run of other settings or data; the manifest
    is written last.
    """
    device = device or default_device()
    images = resolve_images(images)
    run_dir = Path(output_dir) / cfg.model_name
    frame = prepare_frame(cfg, metadata)
    check_images(frame, images)
    folds_source = "metadata" if "fold" in metadata.columns else "assign_folds"
    record = run_record(cfg, frame, folds_source)
    prepare_run_dir(run_dir, record, force)
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
    write_manifest(run_dir, record, {"stage": "image", "model": cfg.model_name})
    return oof.sort("isic_id")


def run_image_stage(
    model_name: str,
    data_dir: str | Path,
    output_dir: str | Path,
    preset: str = "demo",
    recipe: str = "paper",
    force: bool = False,
    **overrides,
) -> tuple[TrainConfig, pl.DataFrame]:
    """Stage 1 entry: the model's config (utils.settings), trained on a Kaggle-layout data dir
    (train-metadata.csv + train-image.hdf5) into `<output_dir>/<model_name>/`; config and OOF."""
    cfg = image_config(model_name, preset, recipe, **overrides)
    data = DataDir(data_dir)
    metadata, images = data.train_metadata(), data.train_images()
    return cfg, train_image_model(cfg, metadata, images, output_dir, force=force)


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
