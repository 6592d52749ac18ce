"""Projected T4 hours of each stage-1 training kernel (one image model, all folds, `full`):
training, per-epoch validation and the OOF pass, before and after the reference recipe.

    python -m bench.bench_training [--utilisation 0.10 0.25] [--data-dir DIR]
                                   [--suspicious 1500] [--kaggle-workers 4]
                                   [--gpus 2] [--link-gbps 6] [--measure-steps 20]

No GPU needed: the GPU side is each backbone's counted forward FLOPs (bench_gpu.forward_gflops;
a training image costs 3x, forward + backward) at an assumed fraction of the T4's fp16 peak;
the CPU side is the augmentation and decode rates measured here per core (bench_gpu's synthetic
128 px JPEG) times the DataLoader workers. A phase costs the larger of the two (the loader
overlaps them). Images per fold, with k folds, N rows, P positives of the training label and
P_t of the real target (validation and OOF always use the real target):
- after (the recipe, utils.settings.ImageConfig): training pos_repeat x P (k-1)/k positives plus
  neg_ratio as many negatives per epoch; validation every P_t/k held-out positive plus
  val_neg_per_pos negatives per positive per epoch; one OOF pass over the N/k held-out rows.
- before (the sampler the reference recipe replaced): training P (k-1)/k positives plus 20
  negatives each per epoch; the whole held-out fold (N/k) predicted after every epoch, no
  separate OOF pass.
Counts default to the ISIC 2024 training set (401,059 rows, 393 malignant); the suspicious label
(target, iddx_1 Indeterminate or any iddx_2) has about 1,100-1,500 positives there: --suspicious
takes the upper value, or --data-dir counts both from a train-metadata.csv.

Several GPUs (`--gpus N`, default 2: Kaggle's T4 x 2 next to one T4; docs/multi_gpu.md): DDP
shares every phase's images between the N GPUs (image.train), so the GPU side of a phase is 1/N
of one T4's, plus, per training step (global batch `batch_size`), one ring all-reduce of the
fp32 gradients: each GPU sends and receives 2 (N-1)/N of their bytes over the link between the
cards, at an assumed --link-gbps (Kaggle's T4s share PCIe 3.0 x16, 15.75 GB/s a direction; with
no peer-to-peer path NCCL goes through host memory, about half of it), counted as if it did
not overlap the backward pass (DDP overlaps its buckets: conservative). The CPU side does not
scale: the same machine's 4 vCPUs feed every GPU. The submission kernel's image models (the
hidden test's 500k images x 4 models x 5 folds, utils.image.predict) scale the same way, without the
all-reduce. With CUDA present the script also measures the speed-up of DDP training steps and
of inference batches with every visible GPU against one (GPU work on synthetic uint8 batches,
no decoding).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_gpu import T4_FP16_TFLOPS, batch_of, decode_rate, forward_gflops  # noqa: E402
from bench.common import print_end, print_machine  # noqa: E402
from utils.image import distributed  # noqa: E402
from utils.image.budget import (  # noqa: E402
    ISIC_MALIGNANT,
    ISIC_ROWS,
    FoldImages as Images,
    fold_images as recipe_fold_images,
)
from utils.image.data import train_transforms  # noqa: E402
from utils.image.models import ImageModel  # noqa: E402
from utils.image.predict import to_device  # noqa: E402
from utils.io import decode_jpeg  # noqa: E402
from utils.settings import IMAGE_MODELS, ImageConfig, image_config  # noqa: E402

ROWS, MALIGNANT = ISIC_ROWS, ISIC_MALIGNANT  # ISIC 2024 train-metadata.csv
GOAL_HOURS = 4.0  # a training kernel: one image model, all folds, one T4
BEFORE_NEG_PER_POS = 20.0  # the earlier sampler: positives once, 20 negatives each
TRAIN_COST = 3.0  # FLOPs of a training image / a forward pass (forward + backward)
GRAD_BYTES = 4  # fp32 gradients: autocast keeps the weights, and so DDP's buckets, in fp32
LINK_GBPS = 6.0  # assumed all-reduce bandwidth between Kaggle's two T4s (see the docstring)
TEST_IMAGES, TEST_FOLDS = 500_000, 5  # the submission kernel: hidden test, folds per model


def fold_images(
    cfg: ImageConfig, rows: int, positives: int, malignant: int, recipe: bool
) -> Images:
    """Images per fold of a run of `cfg`: the reference recipe (`recipe`, utils.image.budget's
    accounting, validated on the real target) or the earlier sampler."""
    if recipe:
        return recipe_fold_images(cfg, rows, positives, malignant)
    share = (cfg.n_folds - 1) / cfg.n_folds
    train_pos, negatives = positives * share, (rows - positives) * share
    per_epoch = train_pos + min(negatives, BEFORE_NEG_PER_POS * train_pos)
    return Images(cfg.epochs * per_epoch, cfg.epochs * rows / cfg.n_folds, 0.0)


def phase_hours(
    images: float,
    gflops: float,
    utilisation: float,
    loader_rate: float,
    gpus: int = 1,
    sync_s: float = 0.0,
) -> float:
    """Hours of a phase: the slower of `gpus` T4s at `utilisation` (each a share of the images,
    plus `sync_s` seconds of gradient all-reduce per image) and the one machine's CPU loader."""
    gpu = images * (gflops / (utilisation * T4_FP16_TFLOPS * 1e3 * gpus) + sync_s)
    return max(gpu, images / loader_rate) / 3600


def allreduce_s(params: int, gpus: int, link_gbps: float = LINK_GBPS) -> float:
    """Seconds of one ring all-reduce of `params` fp32 gradients over `gpus` GPUs: each sends
    and receives 2 (N-1)/N of the bytes over a link of `link_gbps` GB/s (0 on one GPU)."""
    return 2 * (gpus - 1) / gpus * params * GRAD_BYTES / (link_gbps * 1e9)


def trainable_params(backbone: str, size: int = 224) -> int:
    """Parameters DDP all-reduces: the image model's trainable ones (built on the meta device,
    no weights allocated)."""
    with torch.device("meta"):
        model = ImageModel(backbone, size)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def kernel_hours(
    images: Images,
    gflops: float,
    utilisation: float,
    aug_rate: float,
    eval_rate: float,
    folds: int,
    gpus: int = 1,
    sync_s: float = 0.0,
) -> dict[str, float]:
    """T4 hours of a whole training kernel (all folds) per phase, and their total, on `gpus`
    T4s with `sync_s` seconds of all-reduce per training image (one step's over its batch)."""
    hours = {
        "train": phase_hours(
            images.train, TRAIN_COST * gflops, utilisation, aug_rate, gpus, sync_s
        ),
        "validation": phase_hours(images.validation, gflops, utilisation, eval_rate, gpus),
        "oof": phase_hours(images.oof, gflops, utilisation, eval_rate, gpus),
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


def submission_hours(gflops: float, utilisation: float, eval_rate: float, gpus: int) -> float:
    """Hours of one image model in the submission kernel: the hidden test's images through its
    fold models (one decode, TEST_FOLDS forward passes each), on `gpus` T4s."""
    return phase_hours(TEST_IMAGES, TEST_FOLDS * gflops, utilisation, eval_rate, gpus)


def project_gpus(
    args: argparse.Namespace,
    gflops: dict[str, float],
    params: dict[str, int],
    aug: float,
    decode: float,
) -> list[dict]:
    """Print, per utilisation, each training kernel and the submission kernel on one T4 and on
    `args.gpus` T4s; return the rows."""
    rows, positives, malignant = label_counts(args.data_dir, args.suspicious)
    aug_rate, eval_rate = aug * args.kaggle_workers, decode * args.kaggle_workers
    n = args.gpus
    print(
        f"\nT4 x 1 next to T4 x {n} (DDP; loader: the same {args.kaggle_workers} workers for "
        f"every GPU; all-reduce of fp32 gradients at {args.link_gbps:g} GB/s, not overlapped)"
    )
    table = []
    for utilisation in args.utilisation:
        print(f"\nT4 at {utilisation:.0%} of {T4_FP16_TFLOPS:.0f} fp16 TFLOPs (an assumption):")
        print(
            f"| model | all-reduce per step | train x1 → x{n} | valid + OOF x1 → x{n} | "
            f"kernel x1 → x{n} | speed-up | submission x1 → x{n} |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, spec in IMAGE_MODELS.items():
            cfg = image_config(name, "full")
            images = fold_images(cfg, rows, positives[spec.label], malignant, True)
            g = gflops[spec.backbone]
            step_s = allreduce_s(params[spec.backbone], n, args.link_gbps)
            hours = {
                k: kernel_hours(images, g, utilisation, aug_rate, eval_rate, cfg.n_folds, k, sync)
                for k, sync in ((1, 0.0), (n, step_s / cfg.batch_size))
            }
            sub = {k: submission_hours(g, utilisation, eval_rate, k) for k in (1, n)}
            one, many = hours[1], hours[n]
            print(
                f"| {name} | {1e3 * step_s:.1f} ms | {one['train']:.2f} → {many['train']:.2f} h "
                f"| {one['validation'] + one['oof']:.2f} → {many['validation'] + many['oof']:.2f}"
                f" h | **{one['total']:.2f} → {many['total']:.2f} h** | "
                f"{one['total'] / many['total']:.2f}x | {sub[1]:.2f} → {sub[n]:.2f} h |"
            )
            table.append(
                {"model": name, "utilisation": utilisation, "hours": hours, "submission": sub}
            )
        total = {k: sum(r["submission"][k] for r in table[-len(IMAGE_MODELS) :]) for k in (1, n)}
        print(
            f"submission kernel, all {len(IMAGE_MODELS)} image models on {TEST_IMAGES:,} images: "
            f"{total[1]:.2f} h on one T4, {total[n]:.2f} h on {n} ({total[1] / total[n]:.2f}x)"
        )
    return table


def ddp_train_rate(backbone: str, size: int, batch: int, steps: int) -> float:
    """Images/s of DDP training steps summed over the ranks (`batch` images per rank, fp16
    autocast and channels_last on CUDA), timed on rank 0 after 3 warm-up steps; outside a
    group, one process's plain training steps. Runs under distributed.launch."""
    from utils.image.train import with_ddp

    cuda = torch.cuda.is_available()
    group = distributed.current() or distributed.Group(
        device=torch.device("cuda", 0) if cuda else torch.device("cpu")
    )
    torch.manual_seed(0)
    net = to_device(ImageModel(backbone, size), group.device)
    model = with_ddp(net, group)
    x = batch_of(batch, size, cuda, group.device)
    y = torch.zeros(batch, device=group.device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(group.device.type, enabled=cuda)
    for step in range(steps + 3):
        if step == 3:
            if cuda:
                torch.cuda.synchronize(group.device)
            group.barrier()
            start = time.perf_counter()
        with torch.autocast(group.device.type, dtype=torch.float16, enabled=cuda):
            loss = model(x, y)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    if cuda:
        torch.cuda.synchronize(group.device)
    group.barrier()
    return group.world_size * batch * steps / (time.perf_counter() - start)


def infer_rate(devices: list[torch.device], backbone: str, size: int, batch: int, steps: int):
    """Images/s of inference batches on `devices` at once, a thread and a model copy each
    (as utils.image.predict.predict_on_devices runs them), after 3 warm-up batches."""
    cuda = devices[0].type == "cuda"
    torch.manual_seed(0)
    models = [to_device(ImageModel(backbone, size), d).eval() for d in devices]
    batches = [batch_of(batch, size, cuda, d) for d in devices]

    def run(k: int, count: int) -> None:
        with torch.no_grad(), torch.autocast(devices[k].type, torch.float16, enabled=cuda):
            for _ in range(count):
                models[k](batches[k])
        if cuda:
            torch.cuda.synchronize(devices[k])

    with ThreadPoolExecutor(len(devices)) as pool:
        list(pool.map(run, range(len(devices)), [3] * len(devices)))
        start = time.perf_counter()
        list(pool.map(run, range(len(devices)), [steps] * len(devices)))
    return len(devices) * batch * steps / (time.perf_counter() - start)


def measure_gpus(args: argparse.Namespace) -> list[dict]:
    """Measured speed-up of every visible GPU over one: DDP training steps (global batch
    --train-batch, shared by the ranks) and inference batches."""
    n = torch.cuda.device_count()
    names = ", ".join(torch.cuda.get_device_name(k) for k in range(n))
    print(f"\nmeasured on {n} GPU(s) ({names}), {args.size} px, {args.measure_steps} steps:")
    if n < 2:
        print("one GPU visible: no multi-GPU speed-up to measure")
        return []
    print(f"| backbone | train img/s x1 → x{n} | speed-up | infer img/s x1 → x{n} | speed-up |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    devices = [torch.device("cuda", k) for k in range(n)]
    for spec_backbone in sorted({s.backbone for s in IMAGE_MODELS.values()}):
        one = ddp_train_rate(spec_backbone, args.size, args.train_batch, args.measure_steps)
        ddp_args = (spec_backbone, args.size, args.train_batch // n, args.measure_steps)
        many = distributed.launch(ddp_train_rate, ddp_args, n, "cuda")
        infer = [
            infer_rate(d, spec_backbone, args.size, 128, args.measure_steps)
            for d in (devices[:1], devices)
        ]
        print(
            f"| {spec_backbone} | {one:.0f} → {many:.0f} | {many / one:.2f}x | "
            f"{infer[0]:.0f} → {infer[1]:.0f} | {infer[1] / infer[0]:.2f}x |",
            flush=True,
        )
        rows.append({"backbone": spec_backbone, "train": (one, many), "infer": tuple(infer)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--utilisation", type=float, nargs="+", default=[0.10, 0.25])
    parser.add_argument("--kaggle-workers", type=int, default=4)
    parser.add_argument("--suspicious", type=int, default=1_500)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--gpus", type=int, default=2, help="T4s to project next to one")
    parser.add_argument("--link-gbps", type=float, default=LINK_GBPS, help="all-reduce GB/s")
    parser.add_argument("--train-batch", type=int, default=32, help="measured: global batch")
    parser.add_argument("--measure-steps", type=int, default=20, help="measured: timed steps")
    args = parser.parse_args(argv)
    print_machine(f"FLOPs counted on CPU at {args.size} px; loader rates measured per core here")
    gflops = {
        spec.backbone: forward_gflops(spec.backbone, args.size) for spec in IMAGE_MODELS.values()
    }
    aug, decode = augment_rate(args.size), decode_rate(args.size)
    print(f"per core: decode + train augmentation {aug:.0f} img/s, decode + resize {decode:.0f}")
    print("GFLOPs per image (forward): " + ", ".join(f"{b} {g:.2f}" for b, g in gflops.items()))
    table = project(args, gflops, aug, decode)
    if args.gpus > 1:
        params = {b: trainable_params(b, args.size) for b in gflops}
        print(
            "trainable parameters: " + ", ".join(f"{b} {p / 1e6:.1f} M" for b, p in params.items())
        )
        project_gpus(args, gflops, params, aug, decode)
    if torch.cuda.is_available():
        measure_gpus(args)
    print_end()
    return table


if __name__ == "__main__":
    main()
