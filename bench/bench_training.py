"""Projected T4 hours of each stage-1 training kernel (one image model, all folds, `full`):
training, per-epoch validation and the OOF pass, before and after the reference recipe.

    python -m bench.bench_training [--utilisation 0.10 0.25] [--data-dir DIR]
                                   [--suspicious 1500] [--kaggle-workers 4]

No GPU needed: the GPU side is each backbone's counted forward FLOPs (bench_gpu.forward_gflops;
a training image costs 3x, forward + backward) at an assumed fraction of the T4's fp16 peak;
the CPU side is the augmentation and decode rates measured here per core (bench_gpu's synthetic
128 px JPEG) times the DataLoader workers. A phase costs the larger of the two (the loader
overlaps them). Images per fold, with k folds, N rows, P positives of the training label and
P_t of the real target (validation and OOF always use the real target):
- after (the recipe, utils.settings.TrainConfig): training pos_repeat x P (k-1)/k positives plus
  neg_ratio as many negatives per epoch; validation every P_t/k held-out positive plus
  val_neg_per_pos negatives per positive per epoch; one OOF pass over the N/k held-out rows.
- before (the code until issue 15): training P (k-1)/k positives plus 20 negatives each per
  epoch; the whole held-out fold (N/k) predicted after every epoch, no separate OOF pass.
Counts default to the ISIC 2024 training set (401,059 rows, 393 malignant); the suspicious label
(target, iddx_1 Indeterminate or any iddx_2) has about 1,100-1,500 positives there: --suspicious
takes the upper value, or --data-dir counts both from a train-metadata.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_gpu import T4_FP16_TFLOPS, decode_rate, forward_gflops  # noqa: E402
from bench.common import print_end, print_machine  # noqa: E402
from utils.image_data import train_transforms  # noqa: E402
from utils.io import decode_jpeg  # noqa: E402
from utils.settings import IMAGE_MODELS, TrainConfig, image_config  # noqa: E402

ROWS, MALIGNANT = 401_059, 393  # ISIC 2024 train-metadata.csv
GOAL_HOURS = 4.0  # a training kernel: one image model, all folds, one T4
BEFORE_NEG_PER_POS = 20.0  # the sampler until issue 15: positives once, 20 negatives each
TRAIN_COST = 3.0  # FLOPs of a training image / a forward pass (forward + backward)


@dataclass(frozen=True)
class Images:
    """Images one fold processes over a whole run, per phase."""

    train: float
    validation: float
    oof: float


def fold_images(
    cfg: TrainConfig, rows: int, positives: int, malignant: int, recipe: bool
) -> Images:
    """Images per fold of a run of `cfg`, after (`recipe`) or before issue 15."""
    share = (cfg.n_folds - 1) / cfg.n_folds
    train_pos, negatives = positives * share, (rows - positives) * share
    held_out, held_out_pos = rows / cfg.n_folds, malignant / cfg.n_folds
    if not recipe:
        per_epoch = train_pos + min(negatives, BEFORE_NEG_PER_POS * train_pos)
        return Images(cfg.epochs * per_epoch, cfg.epochs * held_out, 0.0)
    shown = cfg.pos_repeat * train_pos
    per_epoch = shown + (
        negatives if cfg.neg_ratio is None else min(negatives, cfg.neg_ratio * shown)
    )
    validation = held_out_pos * (1 + cfg.val_neg_per_pos)
    return Images(cfg.epochs * per_epoch, cfg.epochs * validation, held_out)


def phase_hours(images: float, gflops: float, utilisation: float, loader_rate: float) -> float:
    """Hours of a phase: the slower of the T4 at `utilisation` and the CPU loader."""
    gpu = images * gflops / (utilisation * T4_FP16_TFLOPS * 1e3)
    return max(gpu, images / loader_rate) / 3600


def kernel_hours(
    images: Images, gflops: float, utilisation: float, aug_rate: float, eval_rate: float, folds: int
) -> dict[str, float]:
    """T4 hours of a whole training kernel (all folds) per phase, and their total."""
    hours = {
        "train": phase_hours(images.train, TRAIN_COST * gflops, utilisation, aug_rate),
        "validation": phase_hours(images.validation, gflops, utilisation, eval_rate),
        "oof": phase_hours(images.oof, gflops, utilisation, eval_rate),
    }
    hours = {k: folds * v for k, v in hours.items()}
    return {**hours, "total": sum(hours.values())}


def augment_rate(image_size: int, n: int = 200) -> float:
    """Images/s of JPEG decode + the training augmentation on one core (128 px crop)."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), (7, 7), 2)
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
    transform = train_transforms(image_size, seed=0)
    start = time.perf_counter()
    for _ in range(n):
        transform(image=decode_jpeg(jpeg))
    return n / (time.perf_counter() - start)


def label_counts(data_dir: Path | None, suspicious: int) -> tuple[int, dict[str, int], int]:
    """Rows, positives per training label and malignant count: from a data dir or the defaults."""
    if data_dir is None:
        return ROWS, {"target": MALIGNANT, "suspicious": suspicious}, MALIGNANT

    from utils.io import DataDir
    from utils.labels import suspicious_label

    meta = DataDir(data_dir).train_metadata()
    malignant = int(meta["target"].sum())
    counts = {
        "target": malignant,
        "suspicious": int(meta.select(suspicious_label(meta)).sum().item()),
    }
    return meta.height, counts, malignant


def project(
    args: argparse.Namespace, gflops: dict[str, float], aug: float, decode: float
) -> list[dict]:
    """Print the before/after table per model and utilisation; return its rows."""
    rows, positives, malignant = label_counts(args.data_dir, args.suspicious)
    aug_rate, eval_rate = aug * args.kaggle_workers, decode * args.kaggle_workers
    print(
        f"{rows:,} rows, positives {positives}; loader {aug_rate:.0f} img/s training, "
        f"{eval_rate:.0f} img/s evaluation ({args.kaggle_workers} workers)"
    )
    table = []
    for utilisation in args.utilisation:
        print(f"\nT4 at {utilisation:.0%} of {T4_FP16_TFLOPS:.0f} fp16 TFLOPs (an assumption):")
        print("| model | P | before: train + valid = total | after: train + valid + oof = total |")
        print("|---|---:|---:|---:|")
        for name, spec in IMAGE_MODELS.items():
            cfg = image_config(name, "full")
            p = positives[spec.label]
            hours = {
                when: kernel_hours(
                    fold_images(cfg, rows, p, malignant, when == "after"),
                    gflops[spec.backbone],
                    utilisation,
                    aug_rate,
                    eval_rate,
                    cfg.n_folds,
                )
                for when in ("before", "after")
            }
            b, a = hours["before"], hours["after"]
            print(
                f"| {name} | {p:,} | {b['train']:.2f} + {b['validation']:.2f} = "
                f"**{b['total']:.2f} h** | {a['train']:.2f} + {a['validation']:.2f} + "
                f"{a['oof']:.2f} = **{a['total']:.2f} h** |"
            )
            table.append({"model": name, "utilisation": utilisation, **hours})
    worst = max(row["after"]["total"] for row in table)
    verdict = "under" if worst < GOAL_HOURS else "OVER"
    print(f"\nslowest kernel after: {worst:.2f} h, {verdict} the {GOAL_HOURS:.0f} h goal")
    return table


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--utilisation", type=float, nargs="+", default=[0.10, 0.25])
    parser.add_argument("--kaggle-workers", type=int, default=4)
    parser.add_argument("--suspicious", type=int, default=1_500)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args(argv)
    print_machine(f"FLOPs counted on CPU at {args.size} px; loader rates measured per core here")
    gflops = {
        spec.backbone: forward_gflops(spec.backbone, args.size) for spec in IMAGE_MODELS.values()
    }
    aug, decode = augment_rate(args.size), decode_rate(args.size)
    print(f"per core: decode + train augmentation {aug:.0f} img/s, decode + resize {decode:.0f}")
    print("GFLOPs per image (forward): " + ", ".join(f"{b} {g:.2f}" for b, g in gflops.items()))
    table = project(args, gflops, aug, decode)
    print_end()
    return table


if __name__ == "__main__":
    main()
