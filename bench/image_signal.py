"""Does an image model learn the synthetic data's image-only signal? Prints OOF pAUC and how the
OOF predictions correlate with each planted part (metadata, patient context, image-only).

    python -m bench.image_signal [--rows 4000] [--model vit_tiny] [--epochs 8] [--image-size 64]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from utils.image.train import run_image_stage
from utils.metric import pauc
from utils.oof import read_oof
from utils.synthetic import generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.image_signal")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--positive-rate", type=float, default=0.05)
    parser.add_argument("--model", default="vit_tiny")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="image-signal-"))
    print(f"machine: {platform.processor() or platform.machine()}, work dir {work}")
    summary = generate(
        work / "data",
        rows=args.rows,
        patients=args.patients,
        positive_rate=args.positive_rate,
        image_size=args.image_size,
    )
    print(summary)
    start = time.perf_counter()
    sizes = {"epochs": args.epochs, "image_size": args.image_size, "n_folds": args.folds}
    run_image_stage(args.model, work / "data", work / "artifacts", "demo", **sizes)
    oof = read_oof(work / "artifacts" / args.model / "oof.csv")
    truth = pl.read_csv(summary.truth_path).filter(pl.col("split") == "train")
    joined = oof.join(truth.drop("target"), on="isic_id")
    y, pred = joined["target"].to_numpy(), joined["pred"].to_numpy()
    print(
        f"{args.model}: {args.folds} folds x {args.epochs} epochs "
        f"in {time.perf_counter() - start:.0f} s"
    )
    print(
        f"OOF pAUC {pauc(y, pred):.4f} (random ~0.02; "
        f"true probabilities {pauc(y, joined['prob']):.4f})"
    )
    for part in ("meta_score", "context_score", "image_score"):
        corr = np.corrcoef(pred, joined[part].to_numpy())[0, 1]
        print(
            f"  corr(pred, {part}) = {corr:+.3f}; pAUC of {part} alone {pauc(y, joined[part]):.4f}"
        )


if __name__ == "__main__":
    main()
