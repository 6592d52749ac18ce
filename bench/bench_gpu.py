"""GPU throughput per backbone (fp32 / fp16 autocast / fp16 + channels_last) and the projected
submission time for the hidden test set on one Kaggle T4.

    python -m bench.bench_gpu [--size 224] [--batch 64] [--steps 20] [--test-images 500000]

Random input tensors. Projection: inference images/s of the best mode, scaled by
T4_FP16_TFLOPS / this card's dense fp16 tensor TFLOPs (looked up by name; --card-tflops
overrides), i.e. it assumes inference is compute-bound and scales with peak fp16 throughput.
That is optimistic for a card much larger than a T4 (memory bandwidth and launch overheads scale
less), so the T4 figure is a lower bound on time; JPEG decode must keep up too (bench_image_io).
"""

from __future__ import annotations

import argparse
import time

import torch

from utils.models import BACKBONES, ImageModel

T4_FP16_TFLOPS = 65.0
# Dense fp16 tensor-core peak, TFLOPs (vendor data sheets).
CARD_FP16_TFLOPS = {"T4": 65.0, "P100": 18.7, "V100": 112.0, "A10": 125.0, "L4": 121.0,
                    "A100": 312.0, "H100": 990.0, "H200": 990.0}  # fmt: skip
IMAGE_MODELS = {"convnextv2_nano": "convnextv2_nano", "vit_tiny": "vit_tiny",
                "vit_tiny_suspicious": "vit_tiny", "vit_small_suspicious": "vit_small"}  # fmt: skip


def card_tflops(name: str) -> float | None:
    return next((v for k, v in CARD_FP16_TFLOPS.items() if k in name.upper()), None)


def measure(model: ImageModel, x: torch.Tensor, steps: int, train: bool, fp16: bool) -> float:
    """Images/s of training steps or inference batches, after warm-up, synchronised."""
    y = torch.zeros(len(x), device=x.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    model.train(train)
    for step in range(steps + 3):
        if step == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
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
    torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--test-images", type=int, default=500_000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--card-tflops", type=float)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU; use bench.bench_backbones on CPU")
    name = torch.cuda.get_device_name()
    tflops = args.card_tflops or card_tflops(name)
    torch.backends.cudnn.benchmark = True
    print(
        f"device: {name} (fp16 peak {tflops} TFLOPs), torch {torch.__version__}, "
        f"{args.size} px, batch {args.batch}"
    )
    print(f"{'backbone':18s}{'mode':22s}{'train img/s':>12s}{'infer img/s':>12s}")
    best: dict[str, float] = {}
    for backbone in BACKBONES:
        for mode, fp16, channels_last in [
            ("fp32", False, False),
            ("fp16 autocast", True, False),
            ("fp16 + channels_last", True, True),
        ]:
            torch.manual_seed(0)
            model = ImageModel(backbone, args.size).cuda()
            x = torch.randn(args.batch, 3, args.size, args.size, device="cuda")
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                x = x.to(memory_format=torch.channels_last)
            train = measure(model, x, args.steps, True, fp16)
            infer = measure(model, x, args.steps, False, fp16)
            best[backbone] = max(best.get(backbone, 0.0), infer)
            print(f"{backbone:18s}{mode:22s}{train:12.0f}{infer:12.0f}")
            del model, x
            torch.cuda.empty_cache()
    if tflops is None:
        print("unknown card: pass --card-tflops to project T4 time")
        return
    scale = T4_FP16_TFLOPS / tflops
    hours = (
        sum(args.test_images * args.folds / (best[b] * scale) for b in IMAGE_MODELS.values()) / 3600
    )
    print(
        f"projection: {args.test_images:,} images x {len(IMAGE_MODELS)} models x {args.folds} "
        f"folds on one T4 (x{scale:.3f} of this card's best inference rate): {hours:.2f} h of "
        "GPU time (the one-pass predict decodes each image once per model)"
    )


if __name__ == "__main__":
    main()
