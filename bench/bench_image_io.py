"""Image input speed: hdf5 read + decode (+ augment) against plain JPEG decode, and worker scaling.

    python -m bench.bench_image_io [--data-dir DIR] [--n 400] [--image-size 224]

Without --data-dir a small synthetic data dir is generated in a temp folder. Prints images/s
for one process: JPEG decode of bytes already in memory (the limit), hdf5 read only, hdf5 read +
decode, + eval transforms, + train augmentation; then a DataLoader with 0/1/2 workers.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from utils.image_data import ImageDataset, eval_transforms, reseed_worker, train_transforms
from utils.io import TRAIN_IMAGES, HDF5Images, decode_jpeg


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.0f} img/s"


def timed(fn, ids) -> float:
    start = time.perf_counter()
    for i in ids:
        fn(i)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            from utils.synthetic import generate

            data_dir = generate(Path(tmp) / "data", rows=args.n, image_size=128, workers=1).out_dir
        images = HDF5Images(Path(data_dir) / TRAIN_IMAGES)
        ids = list(images)[: args.n]
        raw = {i: images.read_bytes(i) for i in ids}
        side = images.read(ids[0]).shape[0]
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
            f"torch {torch.__version__}; {len(ids)} images of ~{side} px -> {args.image_size} px"
        )
        limit = timed(lambda i: decode_jpeg(raw[i]), ids)
        print(f"jpeg decode from memory (limit) {rate(len(ids), limit)}")
        print(f"hdf5 read bytes only            {rate(len(ids), timed(images.read_bytes, ids))}")
        print(f"hdf5 read + decode              {rate(len(ids), timed(images.read, ids))}")
        for name, transform in [
            ("+ eval transforms", eval_transforms(args.image_size)),
            ("+ train augmentation", train_transforms(args.image_size, seed=0)),
        ]:
            ds = ImageDataset(images, ids, transform=transform)
            seconds = timed(ds.__getitem__, range(len(ds)))
            print(f"hdf5 read + decode {name:21s}{rate(len(ids), seconds)}  (one process)")
        ds = ImageDataset(images, ids, transform=train_transforms(args.image_size, seed=0))
        for workers in (0, 1, 2):
            loader = DataLoader(
                ds, batch_size=32, num_workers=workers, worker_init_fn=reseed_worker
            )
            start = time.perf_counter()
            count = sum(len(batch["image"]) for batch in loader)
            seconds = time.perf_counter() - start
            print(
                f"DataLoader train aug, {workers} worker(s) {rate(count, seconds)}  "
                "(incl. worker start-up)"
            )


if __name__ == "__main__":
    main()
