"""Ablation of the `plus` recipe's candidates, from the command line: 5-fold CV of the metadata +
image GBDT ensemble for `paper`, `paper` + each candidate alone and the kept candidates together,
over seeds (the core, its rule and its candidates: utils.tabular.ablation).

    python -m bench.ablation --data-dir /tmp/syn_full [--seeds 0 1 2] [--bag-seeds 3]
        [--candidates patient_image ugly_duckling site_features patient_lof location_norm
                      location_outliers blend blend_floor rank_blend seed_bagging]
        [--preset full]
        [--threads N] [--members lgb_meta lgb cat xgb]
        [--image-oof-dirs RUN_DIR ...]

Data: a synthetic data dir and its truth file (`<data dir>-truth.csv`, utils.synthetic), whose
true probabilities give the stand-in image OOFs; or any data dir (the competition's) with
`--image-oof-dirs` (real stage 1 runs, their folds kept for every seed). On Kaggle the same
ablation runs as the kernel 06_ablation (notebooks/06_ablation.ipynb), which writes the table as
ablation.json and ablation.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_end, print_machine, usable_cores  # noqa: E402
from utils.synthetic import default_truth_path  # noqa: E402
from utils.tabular import ablation as core  # noqa: E402
from utils.tabular.ablation import (  # noqa: E402, F401 (the names tests and users import here)
    BLENDS,
    CANDIDATES,
    STANDIN_NOISE,
    Inputs,
    data_structures,
    kept_candidates,
    load_inputs,
    plus_row_name,
    row_plan,
    standin_image_oofs,
    summarise,
)
from utils.tabular.libraries import GBDT_MODELS  # noqa: E402


def ablation(
    data_dir: str | Path, *args: Any, image_oof_dirs: Sequence[str | Path] = (), **kwargs: Any
) -> tuple[pl.DataFrame, list[str]]:
    """utils.tabular.ablation.ablation (same arguments), its stand-ins drawn from
    `<data_dir>-truth.csv` when no image OOF dirs are given."""
    truth = None if image_oof_dirs else default_truth_path(data_dir)
    return core.ablation(data_dir, *args, image_oof_dirs=image_oof_dirs, truth_path=truth, **kwargs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        required=True,
        help="a synthetic data dir beside its truth file, or any with --image-oof-dirs",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--bag-seeds", type=int, default=3, help="GBDT seeds with seed_bagging")
    parser.add_argument("--preset", default="full", choices=("demo", "full"))
    parser.add_argument("--threads", type=int, default=None, help="default: every usable core")
    parser.add_argument("--members", nargs="+", default=list(GBDT_MODELS), choices=GBDT_MODELS)
    parser.add_argument(
        "--image-oof-dirs",
        type=Path,
        nargs="*",
        default=[],
        help="real image runs (stage 1 dirs) instead of stand-ins (no truth file needed)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> pl.DataFrame:
    args = parse_args(argv)
    print_machine(f"GBDT threads {args.threads or usable_cores()}; preset {args.preset}")
    start = time.perf_counter()
    results, kept = ablation(
        args.data_dir,
        args.seeds,
        args.candidates,
        args.bag_seeds,
        args.preset,
        args.threads,
        args.members,
        image_oof_dirs=args.image_oof_dirs,
    )
    table = summarise(results)
    print(f"kept in plus: {kept or 'none'}")
    with pl.Config(
        tbl_rows=-1, tbl_cols=-1, tbl_width_chars=220, fmt_str_lengths=80, float_precision=4
    ):
        print(table)
    print(f"total wall {time.perf_counter() - start:.1f} s")
    print_end()
    return table


if __name__ == "__main__":
    main()
