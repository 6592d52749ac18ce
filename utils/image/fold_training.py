"""Training one fold of an image model: `train_fold` and the epoch loop behind it.

Recipe (utils.settings.ImageConfig, the reference's): each epoch trains on every positive twice
plus as many fresh negatives (utils.image.data.NegativeResampler) with AdamW on the backbone's
parameter groups (utils.image.models.param_groups), no gradient clipping, and validates on a fixed
subsample of the held-out fold (every positive plus 10 eligible negatives per positive, drawn
once per fold, on the model's own label: a suspicious-label model validates on the suspicious
label, as the reference; `validate_on="target"` uses the real target) whose pAUC picks the
checkpoint; the chosen checkpoint then predicts the whole held-out fold once for the OOF (the
full fold every epoch cost more than the training itself). `oof_epoch="last"` keeps the last
epoch instead (a plus candidate); each fold prints both epochs' validation pAUC and
`utils.image.train.epoch_choice(history)` tabulates them.

Resume: an unfinished fold continues after its last completed epoch from `fold{k}.last.pt` (and
`fold{k}.best.pt`). Each epoch is seeded from (seed, fold, epoch), so a resumed run draws the
same samples as an uninterrupted one.

Several GPUs (utils.image.distributed, docs/multi_gpu.md): `batch_size` stays the global batch.
Every rank trains on its contiguous piece of each global batch (RankBatches), its mean loss
weighted by its share, so DDP's gradient average is the global batch's and N processes take the
steps one process takes (equal within float rounding when dropout is off; dropout draws a stream
per rank). Validation and the OOF pass give each rank a contiguous share of the ids, gathered by
isic_id. Rank 0 alone writes the checkpoints and the others wait at barriers; every rank reads
the resume files.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.image.data import ImageDataset, NegativeResampler, train_transforms, validation_subsample
from utils.image.distributed import Group, RankBatches, gather_predictions, workers_per_process
from utils.image.models import param_groups
from utils.image.predict import (
    batch_images,
    build_model,
    make_loader,
    predict_with_models,
    to_device,
)
from utils.io import HDF5Images
from utils.layout import fold_file
from utils.manifest import atomic_output
from utils.metric import pauc
from utils.settings import ImageConfig


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(cfg: ImageConfig, fold: int, epoch: int) -> int:
    """One seed per (run seed, fold, epoch), so resumed epochs repeat exactly; epoch -1 = init."""
    return int(np.random.SeedSequence([cfg.seed, fold, epoch + 1]).generate_state(1)[0])


def lr_factor(step: int, total: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of lr at `step`: linear warm-up, then cosine decay down to min_lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return (min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / lr


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
    cfg: ImageConfig,
    device: torch.device,
    desc: str,
    loss_weights: Sequence[float] | None = None,
    group: Group | None = None,
) -> float:
    """One pass over the sampled training rows; the mean training loss (over every rank's
    images in a distributed run). `loss_weights` (RankBatches.loss_weights: one per step) weight
    a DDP rank's mean loss so that the averaged gradient is the global batch's; a weight-0 step
    (padding) counts no image in the loss it reports."""
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, mininterval=5)
    for step, batch in enumerate(bar):
        weight = 1.0 if loss_weights is None else loss_weights[step]
        x = batch_images(batch, device)
        y = batch["target"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            loss = model(x, y)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss if weight == 1.0 else loss * weight).backward()
        if cfg.max_grad_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        images = len(y) if weight else 0
        total += loss.item() * images
        count += images
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    if group is not None:
        total, count = group.sum([total, count])
    return total / max(count, 1)


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save through a temporary file: an interrupted save leaves no broken file."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def half_state(state: dict) -> dict:
    """Floating-point tensors in fp16 (what a final fold checkpoint keeps: half the bytes;
    load_state_dict casts them back into a float32 model)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def read_state(path: Path, group: Group) -> dict:
    """torch.load of a resume file rank 0 found; a rank that cannot see it names the reason."""
    if not path.is_file():
        raise FileNotFoundError(
            f"rank {group.rank}: {path} is missing here but rank 0 reads it: ranks on several "
            "machines need output_dir on one shared file system to resume"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def validation_rows(cfg: ImageConfig, held_out: pl.DataFrame, fold: int) -> pl.DataFrame:
    """The held-out rows that validate every epoch: every positive plus cfg.val_neg_per_pos
    eligible negatives per positive, drawn once per (seed, fold). Their `target` is what the
    validation scores and picks the checkpoint on: the training label with cfg.validate_on
    "label" (the reference), the real target with "target"; the OOF keeps the real target."""
    seed = int(np.random.SeedSequence([cfg.seed, fold], spawn_key=(1,)).generate_state(1)[0])
    if cfg.validate_on == "label":
        held_out = held_out.with_columns(pl.col("label").cast(pl.Int8).alias("target"))
    rows = validation_subsample(
        held_out["target"].to_numpy(), cfg.val_neg_per_pos, seed, held_out["eligible"].to_numpy()
    )
    return held_out[rows]


def predict_ids(
    model: nn.Module,
    images: HDF5Images,
    ids: list[str],
    cfg: ImageConfig,
    device: torch.device,
    desc: str,
) -> np.ndarray:
    """One model's probabilities for `ids` (utils.image.predict at the run's eval settings)."""
    return predict_with_models(
        [model], images, ids, cfg.image_size, cfg.eval_batch_size, cfg.num_workers, device, desc
    )[0][:, 0]


def with_ddp(model: nn.Module, group: Group) -> nn.Module:
    """`model` wrapped in DistributedDataParallel when the run has several ranks (it broadcasts
    rank 0's weights and averages the gradients), else `model` itself."""
    if not group.distributed:
        return model
    device_ids = [group.device.index] if group.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


class FoldRun:
    """One fold's training on this rank: the model (and its DDP wrapper), the training loader and
    its sampler, the optimiser, scheduler and scaler, the validation rows and the resumable state
    (last epoch, best epoch and score, history)."""

    def __init__(
        self,
        cfg: ImageConfig,
        frame: pl.DataFrame,
        images: HDF5Images,
        fold: int,
        run_dir: Path,
        group: Group,
    ):
        """The fold's model (seeded init), training loader, optimiser and validation rows."""
        self.cfg = cfg
        # loaders of this rank: the machine's workers shared by its ranks (no effect on results)
        workers = workers_per_process(cfg.num_workers, group.local_world_size)
        self.local = dataclasses.replace(cfg, num_workers=workers)
        self.images = images
        self.fold = fold
        self.run_dir = run_dir
        self.group = group
        train_rows = frame.filter(pl.col("fold") != fold)
        self.valid_rows = frame.filter(pl.col("fold") == fold)
        seed_everything(epoch_seed(cfg, fold, -1))
        self.net = to_device(build_model(cfg, cfg.weights_path), group.device)
        transform = train_transforms(cfg.image_size)
        labels = train_rows["label"].to_numpy()
        self.dataset = ImageDataset(images, train_rows["isic_id"], labels, transform)
        sampler = NegativeResampler(
            self.dataset.targets, cfg.neg_ratio, pos_repeat=cfg.pos_repeat, seed=cfg.seed, fold=fold
        )
        self.batches = RankBatches(sampler, cfg.batch_size, group.rank, group.world_size)
        self.generator = torch.Generator()
        self.loader = make_loader(
            self.dataset, cfg.batch_size, self.local.num_workers, self.generator, self.batches
        )
        total_steps = cfg.epochs * len(self.loader)
        warmup_steps = max(1, int(cfg.warmup * total_steps))
        self.optimizer = torch.optim.AdamW(param_groups(self.net, cfg.weight_decay), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
        )
        self.scaler = torch.amp.GradScaler(group.device.type, enabled=group.device.type == "cuda")
        subset = validation_rows(cfg, self.valid_rows, fold)
        self.subset_ids = subset["isic_id"].to_list()
        self.subset_target = subset["target"].to_numpy().astype(np.float64)
        self.state = {"epoch": -1, "best": None, "history": []}
        self.model = self.net  # wrapped in DDP on several ranks by `restore`
        self.best_state: dict | None = None  # the best epoch's weights, once this session has it
        if group.is_main:
            print(
                f"{cfg.model_name} fold {fold}: {len(sampler):,} training images per epoch, "
                f"validation on {len(subset):,} of {len(self.valid_rows):,} held-out rows"
            )

    def path(self, kind: str = "") -> Path:
        """This fold's checkpoint: final (""), "last" (resume) or "best" (best epoch)."""
        return self.run_dir / fold_file(self.fold, kind)

    def predict(self, ids: list[str], desc: str) -> np.ndarray:
        """The net's probabilities for `ids`, each rank predicting its share."""
        return gather_predictions(
            self.group,
            ids,
            lambda share: predict_ids(
                self.net, self.images, share, self.local, self.group.device, desc
            ),
        )

    def restore(self) -> None:
        """Continue from fold{k}.last.pt when rank 0 sees one (else the fresh init stays); then
        wrap the model for DDP."""
        last = self.path("last")
        if self.group.broadcast(last.is_file()):
            saved = read_state(last, self.group)
            self.net.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
            self.state = saved["state"]
            if self.group.is_main:
                epoch = self.state["epoch"]
                print(f"{self.cfg.model_name} fold {self.fold}: resuming after epoch {epoch}")
        self.model = with_ddp(self.net, self.group)

    def train_epoch(self, epoch: int) -> bool:
        """Train epoch `epoch` (seeded from (seed, fold, epoch)), validate it and add its history
        row; True when it is the best epoch so far."""
        cfg, group = self.cfg, self.group
        seed = epoch_seed(cfg, self.fold, epoch)
        seed_everything(seed + group.rank)  # rank 0 as one process; a dropout stream per rank
        self.generator.manual_seed(seed)
        self.dataset.seed = seed
        self.batches.set_epoch(epoch)
        desc = f"{cfg.model_name} fold {self.fold} epoch {epoch}"
        train_loss = train_one_epoch(
            self.model,
            self.loader,
            self.optimizer,
            self.scheduler,
            self.scaler,
            cfg,
            group.device,
            desc,
            loss_weights=self.batches.loss_weights(),
            group=group,
        )
        pred = self.predict(self.subset_ids, f"{desc} valid")
        val_loss = bce(self.subset_target, pred)
        score = safe_score(self.subset_target, pred, val_loss)
        row = {
            "fold": self.fold,
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_pauc": score if np.unique(self.subset_target).size == 2 else float("nan"),
            "lr": self.scheduler.get_last_lr()[0],
        }
        self.state["history"].append(row)
        if group.is_main:
            shown = ("train_loss", "val_loss", "val_pauc")
            print(f"{desc}: " + ", ".join(f"{k} {row[k]:.4f}" for k in shown))
        improved = self.state["best"] is None or score > self.state["best"]["score"]
        if improved:
            self.state["best"] = {"score": score, "epoch": epoch}
        self.state["epoch"] = epoch
        return improved

    def save_epoch(self, improved: bool) -> None:
        """Rank 0 saves the best epoch's weights (when this one is) and everything a resume needs
        (fold{k}.last.pt); every rank waits until both files are complete."""
        if improved:
            self.best_state = cpu_state(self.net)
            if self.group.is_main:
                save_atomic({"state_dict": self.best_state}, self.path("best"))
        if self.group.is_main:
            resume = {
                "model": cpu_state(self.net),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "state": self.state,
            }
            save_atomic(resume, self.path("last"))
        self.group.barrier()  # the epoch's files are complete before any rank goes on

    def finish(self) -> dict:
        """The kept epoch (best or last, cfg.oof_epoch) in fp16 predicts the whole held-out fold:
        the fold's OOF; rank 0 writes fold{k}.pt and drops the resume files. The checkpoint."""
        cfg, state = self.cfg, self.state
        if (
            cfg.oof_epoch == "last"
        ):  # net holds the last epoch (trained now or resumed from last.pt)
            kept, chosen = cpu_state(self.net), state["history"][-1]
        else:
            if self.best_state is None:  # the best epoch ran in an earlier session
                self.best_state = read_state(self.path("best"), self.group)["state_dict"]
            kept = self.best_state
            chosen = next(r for r in state["history"] if r["epoch"] == state["best"]["epoch"])
        if self.group.is_main:
            last_row = state["history"][-1]
            print(
                f"{cfg.model_name} fold {self.fold}: keeps epoch {chosen['epoch']} "
                f"({cfg.oof_epoch}); val_pauc best epoch {state['best']['epoch']} "
                f"{state['best']['score']:.4f}, last epoch {last_row['epoch']} "
                f"{last_row['val_pauc']:.4f}"
            )
        weights = half_state(kept)
        self.net.load_state_dict(weights)  # the OOF comes from the weights the checkpoint keeps
        valid_ids = self.valid_rows["isic_id"].to_list()
        pred = self.predict(valid_ids, f"{cfg.model_name} fold {self.fold} oof")
        checkpoint = {
            "state_dict": weights,
            "config": dataclasses.asdict(cfg),
            "fold": self.fold,
            "best_epoch": state["best"]["epoch"],
            "score": state["best"]["score"],
            "oof_epoch": cfg.oof_epoch,
            "chosen_epoch": chosen["epoch"],
            "val_ids": valid_ids,
            "val_pred": torch.from_numpy(pred),
            "history": state["history"],
        }
        if self.group.is_main:
            save_atomic(checkpoint, self.path())
            self.path("best").unlink()
            self.path("last").unlink()
        self.group.barrier()
        return checkpoint


def train_fold(
    cfg: ImageConfig,
    frame: pl.DataFrame,
    images: HDF5Images,
    fold: int,
    run_dir: Path,
    group: Group,
) -> dict:
    """Train fold `fold` (resuming from fold{k}.last.pt) and write fold{k}.pt; returns it (the
    recipe, resume and the ranks' shares: the module's docstring)."""
    run = FoldRun(cfg, frame, images, fold, run_dir, group)
    run.restore()
    for epoch in range(run.state["epoch"] + 1, cfg.epochs):
        run.save_epoch(run.train_epoch(epoch))
    return run.finish()
