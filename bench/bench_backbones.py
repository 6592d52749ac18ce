"""Training and inference images/s per image backbone on CPU at the demo and full image sizes.

    python -m bench.bench_backbones [--sizes 64 224] [--batch 16] [--steps 3] [--threads N]

Random input tensors (no data loading); one warm-up step, then the mean over --steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from utils.models import BACKBONES, ImageModel


def images_per_second(model: ImageModel, x: torch.Tensor, steps: int, train: bool) -> float:
    y = torch.zeros(len(x))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train(train)
    seconds = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        if train:
            optimizer.zero_grad()
            model(x, y)["loss"].backward()
            optimizer.step()
        else:
            with torch.no_grad():
                model(x)
        if step:  # the first step is warm-up
            seconds += time.perf_counter() - start
    return steps * len(x) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"{args.threads} torch threads, torch {torch.__version__}; batch {args.batch}"
    )
    print(f"{'backbone':18s}{'px':>5s}{'train img/s':>14s}{'infer img/s':>14s}")
    for name in BACKBONES:
        for size in args.sizes:
            torch.manual_seed(0)
            model = ImageModel(name, size, dropout=0.3, dropout_samples=5)
            x = torch.randn(args.batch, 3, size, size)
            train = images_per_second(model, x, args.steps, train=True)
            infer = images_per_second(model, x, args.steps, train=False)
            print(f"{name:18s}{size:5d}{train:14.1f}{infer:14.1f}")


if __name__ == "__main__":
    main()
