"""GPU throughput per backbone (fp32 / fp16 autocast / fp16 autocast + channels_last) and the
projected submission-kernel time for the hidden test set on one Kaggle T4.

    python -m bench.bench_gpu [--size 224] [--train-batch 32] [--infer-batch 128] [--steps 20]
                              [--test-images 500000] [--folds 5] [--budget-s 540]
    python -m bench.bench_gpu --flops-only [--utilisation 0.10 0.25]    # no GPU needed

Sized for a 10-minute run: 3 backbones x 3 modes x (train + inference) of `--steps` timed batches
after 3 warm-up batches, uint8 input as the DataLoader gives it (the model normalises on the
device). Measurements stop once `--budget-s` has passed and the script says which were skipped.

Projection (the submission kernel's design): `utils.image.predict.predict_with_models` makes one
pass over the test images per image model, decoding each image once and feeding the batch to all 5
fold models in fp16 autocast + channels_last. So per model: GPU time = images x folds / (fp16 +
channels_last inference rate on a T4), CPU time = images / (decode + resize rate per core x
DataLoader workers); the loader overlaps the two, so the model costs the larger. The T4 rate is
this card's rate x T4_FP16_TFLOPS / this card's dense fp16 tensor peak (by name; --card-tflops
overrides): it assumes inference is compute-bound and scales with peak fp16 throughput. Small
models leave a large card idler than a T4, which makes the T4 estimate conservative (too slow);
a T4's clocks sag under sustained load, which goes the other way: read it as +-2x. The decode
rate is measured here on this machine's CPU on a synthetic 128 px JPEG (Kaggle's T4 kernels have
4 vCPUs: --kaggle-workers).

Without a GPU, `--flops-only` counts each backbone's forward FLOPs and projects the same kernel
at an assumed fraction of the T4's fp16 peak: a bound to check the design against, not a
measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_end, print_machine  # noqa: E402
from utils.image.data import eval_transforms  # noqa: E402
from utils.image.models import BACKBONES, ImageModel  # noqa: E402
from utils.io import decode_jpeg  # noqa: E402
from utils.settings import IMAGE_MODELS  # noqa: E402

T4_FP16_TFLOPS = 65.0
GOAL_HOURS = 3.0  # the submission kernel's image-model budget (Kaggle's limit is 12 h)
# Dense fp16 tensor-core peak, TFLOPs (vendor data sheets).
CARD_FP16_TFLOPS = {"T4": 65.0, "P100": 18.7, "V100": 112.0, "A10": 125.0, "L4": 121.0,
                    "L40": 181.0, "L40S": 362.0, "A100": 312.0, "H100": 990.0,
                    "H200": 990.0}  # fmt: skip
# mode -> (fp16 autocast, channels_last)
MODES = {"fp32": (False, False), "fp16 autocast": (True, False),
         "fp16 + channels_last": (True, True)}  # fmt: skip
KERNEL_MODE = "fp16 + channels_last"  # what predict_with_models runs on CUDA


def card_tflops(name: str) -> float | None:
    """Dense fp16 peak of a card named like `name`, None if unknown (longest key first, so an
    A100 is not taken for an A10)."""
    keys = sorted(CARD_FP16_TFLOPS, key=len, reverse=True)
    return next((CARD_FP16_TFLOPS[k] for k in keys if k in name.upper()), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: ImageModel, x: torch.Tensor, steps: int, train: bool, fp16: bool) -> float:
    """Images/s of training steps or inference batches, after 3 warm-up batches, synchronised.

    The device is x's: CUDA for the figures, CPU only to test this code path without a GPU."""
    device = x.device.type
    y = torch.zeros(len(x), device=x.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=fp16)
    model.train(train)
    for step in range(steps + 3):
        if step == 3:
            synchronize(x.device)
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.float16, enabled=fp16):
            if train:
                optimizer.zero_grad(set_to_none=True)
                loss = model(x, y)["loss"]
            else:
                with torch.no_grad():
                    model(x)
        if train:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    synchronize(x.device)
    return steps * len(x) / (time.perf_counter() - start)


def decode_rate(image_size: int, n: int = 500) -> float:
    """Images/s of JPEG decode + resize on one core, for a synthetic 128 px crop."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), (7, 7), 2)
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
    transform = eval_transforms(image_size)
    start = time.perf_counter()
    for _ in range(n):
        transform(image=decode_jpeg(jpeg))
    return n / (time.perf_counter() - start)


def batch_of(n: int, size: int, channels_last: bool, device: torch.device) -> torch.Tensor:
    """A uint8 NCHW batch on the device, as utils.image.predict.batch_images gives it the model."""
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def run_modes(
    args: argparse.Namespace, deadline: float, device: torch.device | str = "cuda"
) -> dict[tuple[str, str], float]:
    """Print train/inference images/s per backbone and mode; return inference rates."""
    print(f"{'backbone':18s}{'mode':22s}{'train img/s':>12s}{'infer img/s':>12s}")
    infer_rates = {}
    for backbone in BACKBONES:
        for mode, (fp16, channels_last) in MODES.items():
            if time.perf_counter() > deadline:
                print(f"{backbone:18s}{mode:22s}  skipped: --budget-s {args.budget_s} s reached")
                continue
            torch.manual_seed(0)
            model = ImageModel(backbone, args.size).to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            xt = batch_of(args.train_batch, args.size, channels_last, device)
            xi = batch_of(args.infer_batch, args.size, channels_last, device)
            train = measure(model, xt, args.steps, True, fp16)
            infer = measure(model, xi, args.steps, False, fp16)
            infer_rates[backbone, mode] = infer
            print(f"{backbone:18s}{mode:22s}{train:12.0f}{infer:12.0f}", flush=True)
            del model, xt, xi
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return infer_rates


def forward_gflops(backbone: str, size: int) -> float:
    """Forward GFLOPs (2 x multiply-adds) of one image through the image model, counted by
    torch's FlopCounterMode on CPU (matmuls and convolutions; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = ImageModel(backbone, size).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    return counter.get_total_flops() / 1e9


def project(args: argparse.Namespace, t4_rates: dict[str, float], decode: float) -> float:
    """Print the projected submission-kernel image time on one T4 from per-backbone T4
    inference rates (images/s per fold model); return the total hours."""
    loader = decode * args.kaggle_workers
    print(
        f"  {args.test_images:,} images x {len(IMAGE_MODELS)} models x {args.folds} folds; "
        f"decode + resize {decode:.0f} img/s per core x {args.kaggle_workers} workers = "
        f"{loader:.0f} img/s"
    )
    total = 0.0
    for model_name, spec in IMAGE_MODELS.items():
        rate = t4_rates.get(spec.backbone)
        if rate is None:
            print(f"  {model_name:22s} not measured (budget)")
            continue
        gpu_h = args.test_images * args.folds / rate / 3600
        cpu_h = args.test_images / loader / 3600
        total += max(gpu_h, cpu_h)
        print(
            f"  {model_name:22s} T4 {rate:7.0f} img/s per fold model: GPU {gpu_h:5.2f} h, "
            f"decode {cpu_h:5.2f} h -> {max(gpu_h, cpu_h):5.2f} h"
        )
    print(
        f"  image models total {total:.2f} h of the 12 h limit (goal < {GOAL_HOURS:.0f} h); GBDT "
        "scoring of "
        "500k rows takes minutes on CPU (bench_gbdt)"
    )
    return total


def analytic(args: argparse.Namespace, decode: float) -> None:
    """The projection without a GPU: counted FLOPs at a stated fraction of the T4's fp16 peak."""
    gflops = {backbone: forward_gflops(backbone, args.size) for backbone in BACKBONES}
    per_image = sum(gflops[spec.backbone] for spec in IMAGE_MODELS.values()) * args.folds
    print(f"{'backbone':18s}{'GFLOPs/img':>11s}")
    for backbone, value in gflops.items():
        print(f"{backbone:18s}{value:11.2f}")
    # GPU hours = images x GFLOPs / (u x peak): the utilisation at which they reach the 3 h goal
    break_even = args.test_images * per_image / (T4_FP16_TFLOPS * 1e3 * GOAL_HOURS * 3600)
    print(f"one test image through {len(IMAGE_MODELS)} models x {args.folds} folds: "
          f"{per_image:.1f} GFLOPs; {args.test_images:,} images stay under {GOAL_HOURS} h of "
          f"T4 compute down to {break_even:.1%} utilisation")  # fmt: skip
    for utilisation in args.utilisation:
        print(
            f"\nanalytic projection on one T4 at {utilisation:.0%} of its {T4_FP16_TFLOPS:.0f} "
            "fp16 TFLOPs (an assumption, not a measurement):"
        )
        t4_rates = {
            b: utilisation * T4_FP16_TFLOPS * 1e3 / g for b, g in gflops.items()
        }  # fmt: skip
        project(args, t4_rates, decode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--train-batch", type=int, default=32, help="ImageConfig.batch_size")
    parser.add_argument("--infer-batch", type=int, default=128, help="eval_batch_size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--test-images", type=int, default=500_000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--kaggle-workers", type=int, default=4)
    parser.add_argument("--card-tflops", type=float)
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="no GPU: count FLOPs per backbone and project at --utilisation of the T4 peak",
    )
    parser.add_argument("--utilisation", type=float, nargs="+", default=[0.10, 0.25])
    args = parser.parse_args(argv)
    if args.flops_only:
        print_machine(f"torch {torch.__version__}; FLOPs counted on CPU at {args.size} px")
        analytic(args, decode_rate(args.size))
        print_end()
        return
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_gpu needs a CUDA GPU; --flops-only projects without one, and "
            "bench.bench_backbones measures the CPU"
        )
    deadline = time.perf_counter() + args.budget_s
    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    tflops = args.card_tflops or card_tflops(name)
    torch.backends.cudnn.benchmark = True
    print_machine(
        f"GPU: {name}, {props.total_memory / 2**30:.0f} GiB, fp16 peak {tflops} TFLOPs; torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
        f"{args.size} px, train batch {args.train_batch}, inference batch {args.infer_batch}"
    )
    decode = decode_rate(args.size)
    rates = run_modes(args, deadline, "cuda")
    if tflops is None:
        print("unknown card: pass --card-tflops to project the T4 time")
        return
    scale = T4_FP16_TFLOPS / tflops
    print(f"\nprojection on one T4 ({KERNEL_MODE}, batch {args.infer_batch}; T4 rate = this "
          f"card's x {scale:.3f}):")  # fmt: skip
    project(args, {b: r * scale for (b, mode), r in rates.items() if mode == KERNEL_MODE}, decode)
    print_end()


if __name__ == "__main__":
    main()
