"""Time the stage-3 features and the 5-fold x 4-member GBDT CV at full scale (401,059 rows).

    python bench/bench_gbdt.py [--data-dir DIR] [--rows 401059] [--image-columns 4] [--threads N]

Without --data-dir it generates a synthetic data dir (tiny crops; images are not read here).
`--image-columns` adds that many fake image-OOF columns (target plus noise) so the members see
the real width. Prints wall time per step, peak RSS and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.features import build_features  # noqa: E402
from utils.folds import assign_folds  # noqa: E402
from utils.gbdt import ENSEMBLE, FoldResult, cross_validate, make_members, resolve_params  # noqa: E402
from utils.io import DataDir  # noqa: E402
from utils.synthetic import REAL_ROWS, generate  # noqa: E402


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or platform's guess."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def step(label: str, start: float) -> float:
    """Print the seconds since `start` and the peak RSS; return now."""
    now = time.perf_counter()
    print(f"{label:<34} {now - start:8.1f} s   peak RSS {peak_rss_gib():5.2f} GiB", flush=True)
    return now


def fake_image_columns(y: np.ndarray, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` probability-like columns weakly tied to the target, standing in for image OOFs."""
    rng = np.random.default_rng(seed)
    return {
        f"img_fake{k}": (1 / (1 + np.exp(-(1.0 * y + rng.normal(-4, 1.5, y.size))))).astype(
            np.float32
        )
        for k in range(n)
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_gbdt"))
    parser.add_argument("--rows", type=int, default=REAL_ROWS)
    parser.add_argument("--image-columns", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="default: every core")
    parser.add_argument("--preset", default="full", choices=("demo", "full"))
    args = parser.parse_args(argv)

    threads = args.threads or os.cpu_count()
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}; GBDT threads {threads}")
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = args.work_dir / f"data_{args.rows}"
        if not (data_dir / "train-metadata.csv").is_file():
            start = time.perf_counter()
            print(generate(data_dir, rows=args.rows, image_size=8, positive_rate=0.001))
            step("generate synthetic data (untimed)", start)

    start = t0 = time.perf_counter()
    train = DataDir(data_dir).train_metadata()
    start = step(f"read metadata ({train.height:,} rows)", start)
    frame, meta = build_features(train, source=data_dir)
    start = step(f"build_features ({len(meta)} features)", start)
    y = train["target"].to_numpy()
    folds = assign_folds(train)
    images = fake_image_columns(y, args.image_columns)
    frame = frame.with_columns(pl.Series(k, v) for k, v in images.items())
    start = step("folds + image columns", start)

    members = make_members(meta, list(images), resolve_params(preset=args.preset))
    seconds: dict[str, float] = {}
    last = [time.perf_counter()]

    def on_fold(fr: FoldResult) -> None:
        now = time.perf_counter()
        seconds[fr.member] = seconds.get(fr.member, 0.0) + now - last[0]
        last[0] = now

    result = cross_validate(frame, y, folds, members, threads=threads, on_fold=on_fold)
    for name, secs in seconds.items():
        print(f"  {name:<10} 5 folds {secs:8.1f} s   OOF pAUC {result.overall_scores()[name]:.4f}")
    step("5-fold x 4-member CV", start)
    print(f"ensemble OOF pAUC {result.overall_scores()[ENSEMBLE]:.4f}")
    print(
        f"total (features + CV) {time.perf_counter() - t0:.1f} s; peak RSS {peak_rss_gib():.2f} GiB"
    )


if __name__ == "__main__":
    main()
