"""Stage 1: one training loop for every image model (prediction lives in utils.image.predict).

`run_image_stage(model, data_dir, output_dir, preset, recipe, **overrides)` is the entry the
notebooks, tests and bench call. A run trains `n_folds` fold models of one image model
(utils.settings.IMAGE_MODELS) and writes to `<output_dir>/<model_name>/`: `config.json` (resolved
config, folds, data fingerprint and `config_hash`, the run's identity: settings that change the
output only, never the recipe), `fold{k}.pt` (the chosen
checkpoint of fold k: fp16 weights, config, best epoch and score, held-out ids and predictions,
history), `history.csv`, `oof.csv` (every training row exactly once, utils.oof format) and,
last, `manifest.json` (utils.manifest).

Recipe (utils.settings.ImageConfig, the reference's): each epoch trains on every positive twice
plus as many fresh negatives (utils.image.data.NegativeResampler) with AdamW on the backbone's
parameter groups (utils.image.models.param_groups), no gradient clipping, and validates on a fixed
subsample of the held-out fold (every positive plus 10 eligible negatives per positive, drawn
once per fold, on the model's own label: a suspicious-label model validates on the suspicious
label, as the reference; `validate_on="target"` uses the real target) whose pAUC picks the
checkpoint; the chosen checkpoint then predicts the whole
held-out fold once for the OOF (the full fold every epoch cost more than the training itself).
`oof_epoch="last"` keeps the last epoch instead (issue 16, candidate 6); each fold prints both
epochs' validation pAUC and `epoch_choice(history)` tabulates them.

Folds: `n_folds` is the n_splits of utils.folds.assign_folds with `seed`, so any stage that
calls assign_folds(df, n_folds, seed) gets the same folds; a metadata `fold` column, when
present, is used as given (external data sets). A partial run (e.g. 2 folds in tests) is a
complete 2-fold cross-validation, not 2 of 5 folds, so the OOF still covers every row.

Resume: a fold is finished once `fold{k}.pt` exists and is skipped on restart; an unfinished
fold continues after its last completed epoch from `fold{k}.last.pt` (and `fold{k}.best.pt`).
Each epoch is seeded from (seed, fold, epoch), so a resumed run draws the same samples as an
uninterrupted one. `folds=[...]` trains only those folds (one model's folds split over several
Kaggle sessions) and `resume_from=` copies the folds of an earlier output of the same run
first; oof.csv and the manifest wait until every fold is finished.
Time budget (run_image_stage's `time_budget_h`, default 11 h: Kaggle's 12-hour session less an
hour): no fold starts that cannot finish by the folds timed so far in this session; the run then
ends cleanly and `progress.json` names the finished and the remaining folds for the next one.
Rerun: other settings or data (another `config_hash`), or `force`, move the old run dir aside
(`<output_dir>/.previous/<model_name>`) and train from scratch.

Several GPUs (utils.image.distributed, docs/multi_gpu.md): with more than one visible GPU the run
spawns one DistributedDataParallel process per GPU (NCCL; `world_size=` sets the count, gloo
processes on the CPU in tests); under `torchrun` (python -m utils.image.train_ddp) each process is a
rank of torchrun's group, on one machine or several. `batch_size` stays the global batch: each
epoch's draw is cut into the same global batches as one process takes, and every rank trains on
a contiguous piece of each (RankBatches), its mean loss weighted by its share, so DDP's gradient
average is the global batch's gradient and N processes take the steps one process takes (equal
weights within float rounding when dropout is off; dropout draws a stream per rank). Nothing is
dropped or repeated: a last batch smaller than the world pads a rank with one image at weight 0.
Validation and the OOF pass give each rank a contiguous share of the ids, gathered by isic_id.
Rank 0 alone writes (the set-up of the run dir, last/best/fold checkpoints, history.csv, oof.csv,
manifest.json) and the others wait at barriers; rank 0 decides which folds are finished, and
every rank reads the resume files. The process count is no setting: config_hash is unchanged,
so a run started on two GPUs resumes on one and the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.folds import assign_folds
from utils.image import distributed
from utils.image.budget import DEFAULT_TIME_BUDGET_H, Budget
from utils.image.data import (
    ImageDataset,
    NegativeResampler,
    train_transforms,
    validation_subsample,
)
from utils.image.distributed import Group, RankBatches, gather_predictions
from utils.image.models import BACKBONES, param_groups
from utils.image.predict import (
    batch_images,
    build_model,
    default_device,
    make_loader,
    predict_with_models,
    resolve_images,
    to_device,
)
from utils.io import DataDir, HDF5Images
from utils.labels import suspicious_label
from utils.layout import (
    CONFIG_FILE,
    HISTORY_FILE,
    MANIFEST_FILE,
    OOF_FILE,
    PROGRESS_FILE,
    fold_file,
)
from utils.manifest import (
    atomic_output,
    config_hash,
    data_fingerprint,
    set_aside,
    write_json,
    write_manifest,
)
from utils.metric import pauc
from utils.notebook_params import list_parameter
from utils.oof import write_oof
from utils.settings import TRAIN_IDENTITY_FREE, ImageConfig, image_config

CONFIDENCE = "tbp_lv_dnn_lesion_confidence"  # the reference's validation-negative filter
# Settings that may change between a run and its resume or reuse (they do not change the result).
RESUME_FREE = TRAIN_IDENTITY_FREE


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


# ---------------------------------------------------------------------------------- data


def prepare_frame(cfg: ImageConfig, metadata: pl.DataFrame) -> pl.DataFrame:
    """isic_id, patient_id, target, label, fold for training; folds from assign_folds if absent.

    `metadata` needs isic_id, patient_id, target; for label "suspicious" either a `suspicious`
    column or the iddx_1/iddx_2 columns it is derived from; optionally a `fold` column. `eligible`
    marks the rows whose negatives may validate every epoch (cfg.val_min_confidence).
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
    eligible = pl.lit(True)
    if cfg.val_min_confidence is not None and CONFIDENCE in df.columns:
        eligible = (pl.col(CONFIDENCE) > cfg.val_min_confidence).fill_null(False)
    df = df.select(
        "isic_id",
        "patient_id",
        pl.col("target").cast(pl.Int8),
        pl.col(cfg.label).cast(pl.Float32).alias("label"),
        pl.col("fold").cast(pl.Int8),
        eligible.alias("eligible"),
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


def run_record(cfg: ImageConfig, frame: pl.DataFrame, folds_source: str) -> dict:
    """What config.json and the manifest record: config, folds, data fingerprint and the hash
    of all three without the RESUME_FREE settings (the run's identity, which stage 3 records):
    only what changes stage 1's output, so another recipe or preset name reuses the run."""
    record = {
        "config": dataclasses.asdict(cfg),
        "folds": {"n_folds": cfg.n_folds, "seed": cfg.seed, "source": folds_source},
        "data": data_fingerprint(frame, "label"),  # resume must see the same data
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
    cfg: ImageConfig,
    device: torch.device,
    desc: str,
    loss_weights: Sequence[float] | None = None,
    group: Group | None = None,
) -> float:
    """One pass over the sampled training rows; returns the mean training loss (over every
    rank's images in a distributed run).

    `loss_weights` (RankBatches.loss_weights: one per step) weight a DDP rank's mean loss so
    that the averaged gradient is that of the global batch; a weight-0 step (padding) counts no
    image in the loss it reports.
    """
    model.train()
    cuda = device.type == "cuda"
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, mininterval=5)
    for step, batch in enumerate(bar):
        weight = 1.0 if loss_weights is None else loss_weights[step]
        x = batch_images(batch, device)
        y = batch["target"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
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
    isic_ids: list[str],
    cfg: ImageConfig,
    device: torch.device,
    desc: str,
) -> np.ndarray:
    """One model's probabilities for `isic_ids` (utils.image.predict at the run's eval settings)."""
    return predict_with_models(
        [model],
        images,
        isic_ids,
        cfg.image_size,
        cfg.eval_batch_size,
        cfg.num_workers,
        device,
        desc,
    )[0][:, 0]


def with_ddp(model: nn.Module, group: Group) -> nn.Module:
    """`model` wrapped in DistributedDataParallel when the run has several ranks (it broadcasts
    rank 0's weights and averages the gradients), else `model` itself."""
    if not group.distributed:
        return model
    device_ids = [group.device.index] if group.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def read_state(path: Path, group: Group) -> dict:
    """torch.load of a resume file rank 0 found; a rank that cannot see it names the reason."""
    if not path.is_file():
        raise FileNotFoundError(
            f"rank {group.rank}: {path} is missing here but rank 0 reads it: ranks on several "
            "machines need output_dir on one shared file system to resume"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclasses.dataclass
class FoldRun:
    """What one fold's steps share: the model (and its DDP wrapper), the training loader and
    its sampler, the optimiser, scheduler and scaler, the validation rows and the resumable
    state (last epoch, best epoch and score, history)."""

    cfg: ImageConfig
    local: ImageConfig  # cfg with this rank's share of the loader workers
    fold: int
    run_dir: Path
    net: nn.Module
    dataset: ImageDataset
    batches: RankBatches
    generator: torch.Generator
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    subset_ids: list[str]
    subset_target: np.ndarray
    state: dict = dataclasses.field(
        default_factory=lambda: {"epoch": -1, "best": None, "history": []}
    )
    model: nn.Module | None = None  # net, wrapped in DDP on several ranks
    best_state: dict | None = None  # the best epoch's weights once this session beats the best

    def path(self, kind: str = "") -> Path:
        """This fold's checkpoint: final (""), "last" (resume) or "best" (best epoch)."""
        return self.run_dir / fold_file(self.fold, kind)


def fold_setup(
    cfg: ImageConfig,
    train_rows: pl.DataFrame,
    valid_rows: pl.DataFrame,
    images: HDF5Images,
    fold: int,
    run_dir: Path,
    group: Group,
) -> FoldRun:
    """A fold's model (seeded init), training loader, optimiser and validation rows."""
    device = group.device
    # loaders of this rank: the machine's workers shared by its ranks (no effect on results)
    local = dataclasses.replace(cfg, num_workers=group.loader_workers(cfg.num_workers))
    seed_everything(epoch_seed(cfg, fold, -1))
    net = to_device(build_model(cfg, cfg.weights_path), device)
    transform = train_transforms(cfg.image_size)
    dataset = ImageDataset(images, train_rows["isic_id"], train_rows["label"].to_numpy(), transform)
    sampler = NegativeResampler(
        dataset.targets, cfg.neg_ratio, pos_repeat=cfg.pos_repeat, seed=cfg.seed, fold=fold
    )
    batches = RankBatches(sampler, cfg.batch_size, group.rank, group.world_size)
    generator = torch.Generator()
    loader = make_loader(dataset, cfg.batch_size, local.num_workers, None, generator, batches)
    total_steps = cfg.epochs * len(loader)
    warmup_steps = max(1, int(cfg.warmup * total_steps))
    optimizer = torch.optim.AdamW(param_groups(net, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    subset = validation_rows(cfg, valid_rows, fold)
    if group.is_main:
        print(
            f"{cfg.model_name} fold {fold}: {len(sampler):,} training images per epoch, "
            f"validation on {len(subset):,} of {len(valid_rows):,} held-out rows"
        )
    return FoldRun(
        cfg, local, fold, run_dir, net, dataset, batches, generator, loader, optimizer,
        scheduler, scaler, subset["isic_id"].to_list(),
        subset["target"].to_numpy().astype(np.float64),
    )  # fmt: skip


def restore_or_init(run: FoldRun, group: Group) -> None:
    """Continue from fold{k}.last.pt when rank 0 sees one (else the fresh init stays); then
    wrap the model for DDP."""
    last = run.path("last")
    if group.broadcast(last.is_file()):
        saved = read_state(last, group)
        run.net.load_state_dict(saved["model"])
        run.optimizer.load_state_dict(saved["optimizer"])
        run.scheduler.load_state_dict(saved["scheduler"])
        run.scaler.load_state_dict(saved["scaler"])
        run.state = saved["state"]
        if group.is_main:
            print(
                f"{run.cfg.model_name} fold {run.fold}: resuming after epoch {run.state['epoch']}"
            )
    run.model = with_ddp(run.net, group)


def one_epoch(run: FoldRun, images: HDF5Images, epoch: int, group: Group) -> bool:
    """Train epoch `epoch` (seeded from (seed, fold, epoch)), validate it and add its history
    row; True when it is the best epoch so far."""
    cfg, device = run.cfg, group.device
    seed = epoch_seed(cfg, run.fold, epoch)
    seed_everything(seed + group.rank)  # rank 0 as one process; a dropout stream per rank
    run.generator.manual_seed(seed)
    run.dataset.seed = seed
    run.batches.set_epoch(epoch)
    desc = f"{cfg.model_name} fold {run.fold} epoch {epoch}"
    train_loss = train_one_epoch(
        run.model, run.loader, run.optimizer, run.scheduler, run.scaler, cfg, device, desc,
        loss_weights=run.batches.loss_weights(), group=group,
    )  # fmt: skip
    pred = gather_predictions(
        group,
        run.subset_ids,
        lambda ids: predict_ids(run.net, images, ids, run.local, device, f"{desc} valid"),
    )
    val_loss = bce(run.subset_target, pred)
    score = safe_score(run.subset_target, pred, val_loss)
    row = {
        "fold": run.fold,
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_pauc": score if np.unique(run.subset_target).size == 2 else float("nan"),
        "lr": run.scheduler.get_last_lr()[0],
    }
    run.state["history"].append(row)
    if group.is_main:
        shown = ("train_loss", "val_loss", "val_pauc")
        print(f"{desc}: " + ", ".join(f"{k} {row[k]:.4f}" for k in shown))
    improved = run.state["best"] is None or score > run.state["best"]["score"]
    if improved:
        run.state["best"] = {"score": score, "epoch": epoch}
    run.state["epoch"] = epoch
    return improved


def keep_checkpoint(run: FoldRun, improved: bool, group: Group) -> None:
    """Rank 0 saves the best epoch's weights (when this one is) and everything a resume needs
    (fold{k}.last.pt); every rank waits until both files are complete."""
    if improved:
        run.best_state = cpu_state(run.net)
        if group.is_main:
            save_atomic({"state_dict": run.best_state}, run.path("best"))
    if group.is_main:
        resume = {
            "model": cpu_state(run.net),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "state": run.state,
        }
        save_atomic(resume, run.path("last"))
    group.barrier()  # the epoch's files are complete before any rank goes on


def predict_held_out(
    run: FoldRun, images: HDF5Images, valid_rows: pl.DataFrame, group: Group
) -> dict:
    """The kept epoch (best or last, cfg.oof_epoch) in fp16 predicts the whole held-out fold:
    the fold's OOF; rank 0 writes fold{k}.pt and drops the resume files. The checkpoint."""
    cfg, state = run.cfg, run.state
    if cfg.oof_epoch == "last":  # net holds the last epoch (trained now or resumed from last.pt)
        kept, chosen = cpu_state(run.net), state["history"][-1]
    else:
        if run.best_state is None:  # the best epoch ran in an earlier session
            run.best_state = read_state(run.path("best"), group)["state_dict"]
        kept = run.best_state
        chosen = next(r for r in state["history"] if r["epoch"] == state["best"]["epoch"])
    if group.is_main:
        last_row = state["history"][-1]
        print(
            f"{cfg.model_name} fold {run.fold}: keeps epoch {chosen['epoch']} ({cfg.oof_epoch}); "
            f"val_pauc best epoch {state['best']['epoch']} {state['best']['score']:.4f}, "
            f"last epoch {last_row['epoch']} {last_row['val_pauc']:.4f}"
        )
    weights = half_state(kept)
    run.net.load_state_dict(weights)  # the OOF comes from the weights the checkpoint keeps
    valid_ids = valid_rows["isic_id"].to_list()
    desc = f"{cfg.model_name} fold {run.fold} oof"
    pred = gather_predictions(
        group,
        valid_ids,
        lambda ids: predict_ids(run.net, images, ids, run.local, group.device, desc),
    )
    checkpoint = {
        "state_dict": weights,
        "config": dataclasses.asdict(cfg),
        "fold": run.fold,
        "best_epoch": state["best"]["epoch"],
        "score": state["best"]["score"],
        "oof_epoch": cfg.oof_epoch,
        "chosen_epoch": chosen["epoch"],
        "val_ids": valid_ids,
        "val_pred": torch.from_numpy(pred),
        "history": state["history"],
    }
    if group.is_main:
        save_atomic(checkpoint, run.path())
        run.path("best").unlink()
        run.path("last").unlink()
    group.barrier()
    return checkpoint


def train_fold(
    cfg: ImageConfig,
    frame: pl.DataFrame,
    images: HDF5Images,
    fold: int,
    run_dir: Path,
    group: Group,
) -> dict:
    """Train fold `fold` (resuming from fold{k}.last.pt) and write fold{k}.pt; returns it.

    Each epoch validates on `validation_rows` (pAUC on cfg.validate_on's label picks the
    checkpoint, or the last epoch with cfg.oof_epoch "last");
    the chosen checkpoint, in the fp16 weights fold{k}.pt keeps, then predicts the whole
    held-out fold once: those are the fold's OOF predictions. On several ranks (`group`) each
    trains on its piece of every batch (RankBatches) under DDP and predicts its share of the
    validation and held-out ids (gather_predictions); every rank reads the resume files,
    rank 0 alone writes.
    """
    train_rows = frame.filter(pl.col("fold") != fold)
    valid_rows = frame.filter(pl.col("fold") == fold)
    run = fold_setup(cfg, train_rows, valid_rows, images, fold, run_dir, group)
    restore_or_init(run, group)
    for epoch in range(run.state["epoch"] + 1, cfg.epochs):
        improved = one_epoch(run, images, epoch, group)
        keep_checkpoint(run, improved, group)
    return predict_held_out(run, images, valid_rows, group)


def chosen_folds(folds: Sequence[int] | int | str | None, n_folds: int) -> list[int]:
    """The folds a run trains: every fold, or `folds` (checked: in range, none twice). One
    number, or a JSON list as `papermill -p folds "[0, 1]"` delivers it, also works."""
    if folds is None:
        return list(range(n_folds))
    items = [folds] if isinstance(folds, int) else list_parameter(folds, "folds")
    try:
        chosen = [int(k) for k in items]
    except (TypeError, ValueError):
        chosen = []
    if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= set(range(n_folds)):
        raise ValueError(f"folds must be distinct fold numbers in 0..{n_folds - 1}, got {folds}")
    return chosen


def copy_earlier_run(earlier: Path, run_dir: Path, record: dict) -> list[str]:
    """Copy an earlier output of this same run (same config_hash) into `run_dir`: each finished
    fold{k}.pt, and for an unfinished fold its fold{k}.last.pt and fold{k}.best.pt, so a new
    session (e.g. a Kaggle kernel reading its own earlier output) keeps finished folds and
    continues the unfinished one. A fold `run_dir` already holds is left alone."""
    path = earlier / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"resume_from: no {CONFIG_FILE} in {earlier}")
    old = json.loads(path.read_text()).get("config_hash")
    if old != record["config_hash"]:
        raise ValueError(
            f"resume_from: {earlier} holds another run (config_hash {old}, this run "
            f"{record['config_hash']}): other settings or data, so its folds cannot continue"
        )
    copied = []
    for k in range(record["folds"]["n_folds"]):
        if any((run_dir / f"fold{k}{end}").exists() for end in (".pt", ".last.pt")):
            continue
        ends = (".pt",) if (earlier / f"fold{k}.pt").is_file() else (".last.pt", ".best.pt")
        for name in [f"fold{k}{end}" for end in ends if (earlier / f"fold{k}{end}").is_file()]:
            shutil.copyfile(earlier / name, run_dir / name)
            copied.append(name)
    print(f"resume_from {earlier}: copied {copied or 'nothing'}")
    return copied


def start_run(run_dir: Path, record: dict, force: bool, resume_from: str | Path | None) -> None:
    """The run dir's set-up, done once (one process, or rank 0 / the launching parent):
    prepare_run_dir, then the folds of `resume_from` copied in."""
    prepare_run_dir(run_dir, record, force)
    if resume_from is not None:
        copy_earlier_run(Path(resume_from) / run_dir.name, run_dir, record)


def train_folds(
    group: Group,
    cfg: ImageConfig,
    frame: pl.DataFrame,
    images: HDF5Images,
    run_dir: Path,
    chosen: list[int],
    record: dict,
    deadline: float | None = None,
) -> pl.DataFrame | None:
    """Every rank's part of train_image_model once the run dir is set up: train the chosen
    unfinished folds, starting none that cannot finish before `deadline` (time.time(); by the
    folds trained so far, rank 0's measure); rank 0 writes history.csv, oof.csv and the manifest
    (the others wait at a barrier) and returns the OOF rows, the other ranks None."""
    hashes = group.all_gather(record["config_hash"])
    if len(set(hashes)) > 1:
        raise ValueError(
            f"{cfg.model_name}: the ranks see other settings or data (config_hash per rank "
            f"{hashes}); every machine needs the same data dir and arguments"
        )
    parts, history, budget, over = [], [], Budget(deadline), []
    for fold in range(cfg.n_folds):
        path = run_dir / fold_file(fold)
        if group.broadcast(path.is_file()):  # rank 0's view decides
            if not group.is_main:
                continue
            print(f"{cfg.model_name} fold {fold}: finished earlier, skipped ({path})")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        elif fold in chosen and not group.broadcast(budget.allows()):
            over.append(fold)
            if group.is_main:
                print(
                    f"{cfg.model_name} fold {fold}: not started, about "
                    f"{budget.fold_estimate() / 3600:.2f} h by the folds so far and "
                    f"{budget.left() / 3600:.2f} h left of the time budget"
                )
            continue
        elif fold in chosen:
            fresh, started = not (run_dir / fold_file(fold, "last")).is_file(), time.time()
            checkpoint = train_fold(cfg, frame, images, fold, run_dir, group)
            if fresh:  # a resumed fold's time says little about a whole one
                budget.record(time.time() - started)
        else:
            continue
        parts.append(
            pl.DataFrame(
                {
                    "isic_id": checkpoint["val_ids"],
                    "pred": checkpoint["val_pred"].numpy().astype(np.float64),
                }
            )
        )
        history.extend(checkpoint["history"])
    oof = finish_run(cfg, frame, run_dir, record, parts, history, over) if group.is_main else None
    group.barrier()
    return oof


def finish_run(
    cfg: ImageConfig,
    frame: pl.DataFrame,
    run_dir: Path,
    record: dict,
    parts: list[pl.DataFrame],
    history: list[dict],
    over_budget: Sequence[int] = (),
) -> pl.DataFrame:
    """history.csv, and once every fold is finished oof.csv and the manifest; the OOF rows.
    While folds remain, progress.json names the finished and the remaining ones (and those the
    time budget left out) for the session that continues the run."""
    with atomic_output(run_dir / HISTORY_FILE) as tmp:
        pl.DataFrame(history).write_csv(tmp)
    empty = pl.DataFrame(schema={"isic_id": pl.String, "pred": pl.Float64})
    preds = pl.concat(parts) if parts else empty  # the time budget may leave no fold done
    oof = (
        frame.filter(pl.col("isic_id").is_in(preds["isic_id"].implode()))
        .select("isic_id", "patient_id", "fold", "target")
        .join(preds, on="isic_id", how="left")
    )
    remaining = [k for k in range(cfg.n_folds) if not (run_dir / fold_file(k)).is_file()]
    if remaining:
        why = f" ({list(over_budget)} left out by the time budget)" if over_budget else ""
        print(
            f"{cfg.model_name}: fold(s) {remaining} of {cfg.n_folds} remain{why}; oof.csv and "
            f"the manifest are written once every fold is finished (next: folds={remaining} "
            f"with resume_from this output)"
        )
        finished = sorted(set(range(cfg.n_folds)) - set(remaining))
        progress = {"finished": finished, "remaining": remaining, "over_budget": list(over_budget)}
        write_json(run_dir / PROGRESS_FILE, progress)
        return oof.sort("isic_id")
    (run_dir / PROGRESS_FILE).unlink(missing_ok=True)
    write_oof(oof, run_dir / OOF_FILE)
    write_manifest(run_dir, record, {"stage": "image", "model": cfg.model_name})
    return oof.sort("isic_id")


def train_rank(
    cfg: ImageConfig,
    frame: pl.DataFrame,
    images_path: Path,
    run_dir: Path,
    chosen: list[int],
    record: dict,
    deadline: float | None = None,
) -> pl.DataFrame | None:
    """A launched rank's train_folds (distributed.launch initialised its group; the parent set
    up the run dir)."""
    images = HDF5Images(images_path)
    check_images(frame, images)  # caches the extents in this process
    group = distributed.current()
    return train_folds(group, cfg, frame, images, run_dir, chosen, record, deadline)


def train_image_model(
    cfg: ImageConfig,
    metadata: pl.DataFrame,
    images: HDF5Images | str | Path,
    output_dir: str | Path,
    device: torch.device | None = None,
    force: bool = False,
    folds: Sequence[int] | None = None,
    resume_from: str | Path | None = None,
    world_size: int | None = None,
    time_budget_h: float | None = None,
) -> pl.DataFrame:
    """Train (or resume) the folds of `cfg.model_name`; write and return the OOF table.

    `metadata` needs isic_id, patient_id, target (see prepare_frame); `images` is the hdf5 file
    holding those ids. Works for the Kaggle data and for external sets in the same form. The run
    dir starts clean when `force` or when it holds a run of other settings or data; the manifest
    is written last. `folds` trains only those folds (e.g. [0, 1] in one Kaggle session, the rest
    in the next); `resume_from` is an earlier output dir of the same run whose folds are copied
    in first (copy_earlier_run). oof.csv and the manifest are written once all n_folds folds are
    finished; before that the OOF rows of the finished folds are returned and the missing folds
    named.

    Processes: with `device` None (or "cuda" without an index) and several visible GPUs, one
    DDP process per GPU is spawned (distributed.launch); `world_size` sets the count (gloo
    processes on a CPU `device`). Inside an initialised group (torchrun) this process is one
    rank of it and returns None unless it is rank 0.

    `time_budget_h`: no fold starts that cannot finish within that many hours from now by the
    folds trained so far; those left out are named in progress.json (None: no limit).
    """
    deadline = None if time_budget_h is None else time.time() + time_budget_h * 3600
    images = resolve_images(images)
    run_dir = Path(output_dir) / cfg.model_name
    frame = prepare_frame(cfg, metadata)
    check_images(frame, images)
    folds_source = "metadata" if "fold" in metadata.columns else "assign_folds"
    record = run_record(cfg, frame, folds_source)
    chosen = chosen_folds(folds, cfg.n_folds)
    group = distributed.current()
    if group is None:
        processes, device_type = distributed.training_world(device, world_size)
        if processes > 1:
            start_run(run_dir, record, force, resume_from)
            print(f"{cfg.model_name}: DDP on {processes} {device_type} processes (spawned)")
            args = (cfg, frame, images.path, run_dir, chosen, record, deadline)
            return distributed.launch(train_rank, args, processes, device_type)
        group = Group(device=device or default_device())
    if group.is_main:
        start_run(run_dir, record, force, resume_from)
    group.barrier()
    return train_folds(group, cfg, frame, images, run_dir, chosen, record, deadline)


def check_weights(cfg: ImageConfig, allow_random_init: bool = False) -> None:
    """Raise unless the `full` preset has pretrained weights (or random init is asked for)."""
    if cfg.preset != "full" or cfg.weights_path or allow_random_init:
        return
    raise ValueError(
        f"{cfg.model_name}: the full preset needs pretrained weights (weights_path: a local timm "
        f"state dict of {BACKBONES[cfg.backbone].timm_name}, e.g. <weights-dir>/{cfg.backbone}"
        ".pth); from random init on ~400 positives the image features are useless. Pass "
        "allow_random_init=True to train from scratch on purpose."
    )


def run_image_stage(
    model_name: str,
    data_dir: str | Path,
    output_dir: str | Path,
    preset: str = "demo",
    recipe: str = "paper",
    force: bool = False,
    folds: Sequence[int] | None = None,
    resume_from: str | Path | None = None,
    allow_random_init: bool = False,
    world_size: int | None = None,
    time_budget_h: float | None = DEFAULT_TIME_BUDGET_H,
    **overrides,
) -> tuple[ImageConfig, pl.DataFrame | None]:
    """Stage 1 entry: the model's config (utils.settings), trained on a Kaggle-layout data dir
    (train-metadata.csv + train-image.hdf5) into `<output_dir>/<model_name>/`; config and OOF
    (of the finished folds while some remain; None on a torchrun rank other than 0). `folds` /
    `resume_from` / `world_size`: see train_image_model (by default every visible GPU); the
    full preset without `weights_path` stops unless `allow_random_init`. `time_budget_h`
    (default: an hour under Kaggle's 12-hour session) starts no fold that cannot finish in time."""
    cfg = image_config(model_name, preset, recipe, **overrides)
    check_weights(cfg, allow_random_init)
    data = DataDir(data_dir)
    metadata, images = data.train_metadata(), data.train_images()
    oof = train_image_model(
        cfg,
        metadata,
        images,
        output_dir,
        force=force,
        folds=folds,
        resume_from=resume_from,
        world_size=world_size,
        time_budget_h=time_budget_h,
    )
    return cfg, oof


def epoch_choice(history: pl.DataFrame) -> pl.DataFrame:
    """Per fold, from history.csv: the validation pAUC of the best epoch and of the last epoch
    (the two choices of ImageConfig.oof_epoch), on the fold's validation subsample. The best
    epoch's figure is optimistic: the same labels chose it."""
    rows = []
    for fold in sorted(history["fold"].unique()):
        part = history.filter(pl.col("fold") == fold).sort("epoch")
        best = part.sort("val_pauc", descending=True, nulls_last=True, maintain_order=True).row(
            0, named=True
        )
        last = part.row(-1, named=True)
        rows.append(
            {
                "fold": fold,
                "best_epoch": best["epoch"],
                "best_val_pauc": best["val_pauc"],
                "last_epoch": last["epoch"],
                "last_val_pauc": last["val_pauc"],
            }
        )
    return pl.DataFrame(rows)


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
