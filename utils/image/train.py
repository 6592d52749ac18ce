"""Stage 1: one training loop for every image model (prediction lives in utils.image.predict).

`run_image_stage(model, data_dir, output_dir, preset, recipe, **overrides)` is the entry the
notebooks, tests and bench call. A run trains `n_folds` fold models of one image model
(utils.settings.IMAGE_MODELS) and writes to `<output_dir>/<model_name>/`: `config.json`,
`fold{k}.pt` (the chosen checkpoint of fold k: fp16 weights, config, best epoch and score,
held-out ids and predictions, history), `history.csv`, `oof.csv` and, last, `manifest.json`
(utils.image.run_files). One fold's training, its recipe and its epoch loop:
utils.image.fold_training.

Folds: `n_folds` is the n_splits of utils.folds.assign_folds with `seed`, so any stage that
calls assign_folds(df, n_folds, seed) gets the same folds; a metadata `fold` column, when
present, is used as given (external data sets). A partial run (e.g. 2 folds in tests) is a
complete 2-fold cross-validation, not 2 of 5 folds, so the OOF still covers every row.

Resume: a fold is finished once `fold{k}.pt` exists and is skipped on restart; an unfinished
fold continues after its last completed epoch. `folds=[...]` trains only those folds (one
model's folds split over several Kaggle sessions) and `resume_from=` copies the folds of an
earlier output of the same run first; oof.csv and the manifest wait until every fold is finished.
Time budget (run_image_stage's `time_budget_h`, default 11 h: Kaggle's 12-hour session less an
hour): no fold starts that cannot finish by the folds timed so far in this session; the run then
ends cleanly and `progress.json` names the finished and the remaining folds for the next one.
Rerun: other settings or data, or `force`, start afresh (utils.image.run_files).

Several GPUs (utils.image.distributed, docs/multi_gpu.md): with more than one visible GPU the run
spawns one DistributedDataParallel process per GPU (`world_size=` sets the count, gloo processes
on the CPU in tests); under `torchrun` (python -m utils.image.train_ddp) each process is a rank of
torchrun's group, on one machine or several. Rank 0 alone writes and decides which folds are
finished; the others wait at barriers. The process count is no setting (config_hash is
unchanged), so a run started on two GPUs resumes on one and the other way round.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch

from utils.folds import assign_folds
from utils.image import distributed
from utils.image.budget import DEFAULT_TIME_BUDGET_H, Budget
from utils.image.distributed import Group
from utils.image.fold_training import train_fold
from utils.image.models import BACKBONES
from utils.image.predict import default_device, resolve_images
from utils.image.run_files import finish_run, run_record, start_run
from utils.io import DataDir, HDF5Images
from utils.labels import suspicious_label
from utils.layout import fold_file
from utils.metric import pauc
from utils.notebook_params import list_parameter
from utils.settings import ImageConfig, image_config

CONFIDENCE = "tbp_lv_dnn_lesion_confidence"  # the reference's validation-negative filter


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


def train_rank(
    cfg: ImageConfig,
    frame: pl.DataFrame,
    images: HDF5Images | Path,
    run_dir: Path,
    chosen: list[int],
    record: dict,
    deadline: float | None = None,
    group: Group | None = None,
) -> pl.DataFrame | None:
    """Every rank's part of train_image_model once the run dir is set up: train the chosen
    unfinished folds, starting none that cannot finish before `deadline` (time.time(); by the
    folds trained so far, rank 0's measure); rank 0 writes history.csv, oof.csv and the manifest
    (the others wait at a barrier) and returns the OOF rows, the other ranks None. A launched rank
    (`group` None: distributed.launch initialised it) opens `images`, a path, itself."""
    if group is None:
        group = distributed.current()
        images = HDF5Images(images)
        check_images(frame, images)  # caches the extents in this process
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
        preds = checkpoint["val_pred"].numpy()  # float64, as predict_with_models returns them
        parts.append(pl.DataFrame({"isic_id": checkpoint["val_ids"], "pred": preds}))
        history.extend(checkpoint["history"])
    oof = finish_run(cfg, frame, run_dir, record, parts, history, over) if group.is_main else None
    group.barrier()
    return oof


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
    """Train (or resume) the folds of `cfg.model_name`; write and return the OOF table, of the
    finished folds while some remain (resume, `folds`, `resume_from`, `time_budget_h` (None: no
    limit) and `force`: the module's docstring).

    `metadata` needs isic_id, patient_id, target (see prepare_frame); `images` is the hdf5 file
    holding those ids: the Kaggle data or an external set in the same form. Processes: with
    `device` None (or "cuda" without an index) and several visible GPUs, one DDP process per GPU
    is spawned (distributed.launch); `world_size` sets the count (gloo processes on a CPU
    `device`). Inside an initialised group (torchrun) this process is one rank of it and returns
    None unless it is rank 0.
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
    return train_rank(cfg, frame, images, run_dir, chosen, record, deadline, group)


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
    oof = train_image_model(
        cfg,
        data.train_metadata(),
        data.train_images(),
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
    by_score = {"descending": True, "nulls_last": True, "maintain_order": True}
    return (
        history.sort("fold", "epoch")
        .group_by("fold", maintain_order=True)
        .agg(
            best_epoch=pl.col("epoch").sort_by("val_pauc", **by_score).first(),
            best_val_pauc=pl.col("val_pauc").sort_by("val_pauc", **by_score).first(),
            last_epoch=pl.col("epoch").last(),
            last_val_pauc=pl.col("val_pauc").last(),
        )
    )


def fold_scores(oof: pl.DataFrame) -> pl.DataFrame:
    """Rows, positives and pAUC per fold and overall ("all") of an OOF table."""
    folds = [(str(k), oof.filter(pl.col("fold") == k)) for k in sorted(oof["fold"].unique())]
    rows = []
    for name, part in [*folds, ("all", oof)]:
        y, p = part["target"].to_numpy(), part["pred"].to_numpy()
        score = pauc(y, p) if np.unique(y).size == 2 else float("nan")
        rows.append({"fold": name, "rows": len(part), "positives": int(y.sum()), "pauc": score})
    return pl.DataFrame(rows)
