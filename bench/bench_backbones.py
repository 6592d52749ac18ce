"""Training and inference images/s per image backbone on CPU at the demo and full image sizes.

    python -m bench.bench_backbones [--sizes 32 224] [--batch 16] [--steps 3] [--threads N]

Random input tensors (no data loading); one warm-up step, then the mean over --steps. The demo
preset trains at 32 px and the full preset at 224 px (utils.settings). CPU ms per image
(user + sys over all torch threads) is printed next to the rate: on a shared machine the wall
rate falls with other people's load, CPU time much less.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_seconds, print_end, print_machine  # noqa: E402
from utils.image.models import BACKBONES, ImageModel  # noqa: E402


def images_per_second(
    model: ImageModel, x: torch.Tensor, steps: int, train: bool
) -> tuple[float, float]:
    """Images/s and CPU ms per image of training steps or inference batches, after warm-up."""
    y = torch.zeros(len(x))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train(train)
    seconds = cpu = 0.0
    for step in range(steps + 1):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        if train:
            optimizer.zero_grad()
            model(x, y)["loss"].backward()
            optimizer.step()
        else:
            with torch.no_grad():
                model(x)
        if step:  # the first step is warm-up
            seconds += time.perf_counter() - start
            cpu += cpu_seconds() - start_cpu
    return steps * len(x) / seconds, 1000 * cpu / (steps * len(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(f"torch {torch.__version__}, {args.threads} torch threads; batch {args.batch}")
    print(f"{'backbone':18s}{'px':>5s}{'train img/s':>13s}{'cpu ms/img':>11s}", end="")
    print(f"{'infer img/s':>13s}{'cpu ms/img':>11s}")
    for name in BACKBONES:
        for size in args.sizes:
            torch.manual_seed(0)
            model = ImageModel(name, size, dropout=0.3, dropout_samples=5)
            x = torch.randn(args.batch, 3, size, size)
            train, train_cpu = images_per_second(model, x, args.steps, train=True)
            infer, infer_cpu = images_per_second(model, x, args.steps, train=False)
            print(
                f"{name:18s}{size:5d}{train:13.1f}{train_cpu:11.1f}{infer:13.1f}{infer_cpu:11.1f}"
            )
    print_end()


if __name__ == "__main__":
    main()
