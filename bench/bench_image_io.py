"""Image input speed: hdf5 read + JPEG decode + resize + augment against plain JPEG decode of the
same bytes, first read against cached extents, and scaling with DataLoader workers 0/1/2.

    python -m bench.bench_image_io [--data-dir DIR] [--n 2000] [--image-size 224] [--cold]

Without --data-dir a small synthetic data dir (128 px crops, like the real ones) is generated in
a temp folder. One process, one thread (as in a DataLoader worker): "plain decode" decodes bytes
already in memory, the limit for a worker. "first read" opens a fresh HDF5Images and looks up
each id's byte extent; "cached" reads again with the extents known (the file's pages may be in
the OS cache either way; `--cold` asks the OS to drop this file's cached pages first).
Each pipeline stage is shown as images/s and as a ratio to plain decode, and to the same
transform applied to images decoded from memory (which isolates the cost of hdf5). DataLoader
rates are steady state: persistent workers, one warm-up pass, then a timed pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_seconds, print_end, print_machine  # noqa: E402
from utils.image.data import (  # noqa: E402
    ImageDataset,
    collate_batch,
    eval_transforms,
    reseed_worker,
    train_transforms,
)
from utils.io import TRAIN_IMAGES, HDF5Images, decode_jpeg  # noqa: E402


def timed(fn: Callable, items: Iterable) -> tuple[float, float]:
    """Wall and CPU seconds of fn over items."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    for item in items:
        fn(item)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def drop_cached_pages(path: Path) -> bool:
    """Ask the OS to forget this file's cached pages (so the next read comes from disk)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


class Table:
    """Rows of images/s with ratios to plain decode and to the in-memory reference."""

    def __init__(self, n: int):
        self.n = n
        self.limit = 0.0
        print(f"{'step (one process, one thread)':46s}{'img/s':>9s}{'cpu ms/img':>11s}", end="")
        print(f"{'/ plain':>9s}{'/ in-memory same':>18s}")

    def row(self, label: str, wall: float, cpu: float, reference: float | None = None) -> float:
        rate = self.n / wall
        self.limit = self.limit or rate
        ref = f"{rate / reference:18.2f}" if reference else f"{'':18s}"
        print(f"{label:46s}{rate:9.0f}{1000 * cpu / self.n:11.2f}{rate / self.limit:9.2f}{ref}")
        return rate


def loader_rate(dataset: ImageDataset, workers: int, batch: int) -> tuple[float, float]:
    """Steady-state images/s of a DataLoader (a warm-up pass, then a timed pass), and CPU s."""
    loader = DataLoader(
        dataset,
        batch_size=batch,
        num_workers=workers,
        worker_init_fn=reseed_worker,
        collate_fn=collate_batch,
        persistent_workers=workers > 0,
    )
    for _ in loader:
        pass
    wall, cpu = time.perf_counter(), cpu_seconds()
    count = sum(len(b["image"]) for b in loader)
    wall = time.perf_counter() - wall
    # workers are still alive, so their CPU is not counted here: report wall only for them
    return count / wall, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--n", type=int, default=2000, help="images per measurement")
    parser.add_argument("--image-size", type=int, default=224, help="model input side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cold", action="store_true", help="drop the file's cached pages first")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print_machine(
        f"torch {torch.__version__} ({torch.get_num_threads()} thread), OpenCV {cv2.__version__} "
        f"({cv2.getNumThreads()} thread)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            from utils.synthetic import generate

            data_dir = generate(Path(tmp) / "data", rows=args.n, image_size=128, workers=1).out_dir
        path = Path(data_dir) / TRAIN_IMAGES
        keys = list(HDF5Images(path))
        rng = np.random.default_rng(0)
        ids = [keys[i] for i in np.sort(rng.choice(len(keys), min(args.n, len(keys)), False))]
        if args.cold:
            print(f"dropped cached pages of {path.name}: {drop_cached_pages(path)}")
        first = HDF5Images(path)
        wall_first, cpu_first = timed(first.read, ids)
        raw = {i: first.read_bytes(i) for i in ids}
        decoded = {i: decode_jpeg(raw[i]) for i in ids}
        sides = np.array([img.shape[0] for img in decoded.values()])
        mib = sum(r.size for r in raw.values()) / 2**20
        print(
            f"{len(ids)} images sampled from {len(keys):,} in {path}: {mib:.1f} MiB of JPEG, "
            f"sides {sides.min()}-{sides.max()} px (median {np.median(sides):.0f}) -> "
            f"{args.image_size} px"
        )
        table = Table(len(ids))
        plain = table.row("plain JPEG decode (bytes in memory)", *timed(decode_jpeg, raw.values()))
        table.row("hdf5 read + decode, first read", wall_first, cpu_first, plain)
        table.row("hdf5 read + decode, cached extents", *timed(first.read, ids), plain)
        table.row("hdf5 read bytes only, cached extents", *timed(first.read_bytes, ids))
        rates = {}
        for name, transform in [
            ("resize (eval)", eval_transforms(args.image_size)),
            ("resize + train augmentation", train_transforms(args.image_size, seed=0)),
        ]:
            in_memory = table.row(
                f"decode + {name}, in memory",
                *timed(lambda i, t=transform: t(image=decode_jpeg(raw[i]))["image"], ids),
            )
            ds = ImageDataset(first, ids, transform=transform)
            rates[name] = table.row(
                f"hdf5 + decode + {name}", *timed(ds.__getitem__, range(len(ds))), in_memory
            )
        print(f"\nDataLoader (batch {args.batch}), steady state; per worker / plain decode")
        for name, transform in [
            ("resize (eval)", eval_transforms(args.image_size)),
            ("train aug", train_transforms(args.image_size, seed=0)),
        ]:
            ds = ImageDataset(HDF5Images(path), ids, transform=transform)
            for workers in (0, 1, 2):
                rate, _ = loader_rate(ds, workers, args.batch)
                per_worker = rate / max(workers, 1)
                print(
                    f"  {name:14s} {workers} worker(s): {rate:7.0f} img/s, "
                    f"{per_worker:7.0f} per worker = {per_worker / plain:.2f} x plain decode"
                )
    print_end()


if __name__ == "__main__":
    main()
