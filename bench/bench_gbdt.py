"""Time synthetic generation, the stage-3 features and the 5-fold x 4-member GBDT CV at full scale.

    python -m bench.bench_gbdt [--rows 401059] [--image-size 128] [--threads N]
    python -m bench.bench_gbdt --skip-generate --data-dir /work/runs/full [--max-folds 2]
    python -m bench.bench_gbdt --skip-generate --data-dir DIR --recipe plus   # plus's stage 3

Steps as in notebooks/03_gbdt: generate (unless --skip-generate), read the train metadata, build
the features, assign folds, then cross-validate each member (shared binning included). Each
step prints wall seconds, CPU seconds (user + sys, all threads) and its peak RSS. The metadata
frame stays alive during the CV as it does in the notebook. `--image-columns` adds that many fake
image-OOF columns (target plus noise) so the members see the real width. `--max-folds N` runs
only N folds per member and extrapolates to all folds (said so in the output). `--params` takes
a params JSON (file or inline) as utils.tabular.libraries.load_params reads, to compare settings;
`--per-fold-bins` bins each fold's training rows anew (the behaviour before shared binning).
`--recipe plus` builds what that recipe's GBDTConfig turns on (utils.settings.PLUS_GBDT: feature
groups, patient-relative features of the fake image columns, every model seed - each with its own
resample, OOF averaged - and a fitted blend when set) and times it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Steps, print_end, print_machine, usable_cores  # noqa: E402
from utils.metric import pauc  # noqa: E402
from utils.settings import RECIPES, resolve  # noqa: E402
from utils.synthetic import REAL_ROWS, generate  # noqa: E402
from utils.tabular.blend import member_floors, nested_blend  # noqa: E402
from utils.tabular.cv import iter_cv  # noqa: E402
from utils.tabular.gbdt import feature_groups, load_training_frame  # noqa: E402
from utils.tabular.libraries import (  # noqa: E402
    GBDT_MODELS,
    META_MEMBER,
    load_params,
    make_members,
    resolve_params,
)
from utils.tabular.plus_features import patient_image_feature_names, patient_image_features  # noqa: E402


def fake_image_columns(y: np.ndarray, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` probability-like columns weakly tied to the target, standing in for image OOFs."""
    rng = np.random.default_rng(seed)
    return {
        f"img_fake{k}": (1 / (1 + np.exp(-(1.0 * y + rng.normal(-4, 1.5, y.size))))).astype(
            np.float32
        )
        for k in range(n)
    }


def params_overrides(text: str | None) -> dict:
    """A params JSON from a file path or inline text (checked by gbdt_libraries.load_params)."""
    if not text:
        return {}
    if Path(text).is_file():
        return load_params(text)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.json"
        path.write_text(text)
        return load_params(path)


def library_versions() -> str:
    """Versions of the GBDT libraries, Polars and NumPy."""
    import catboost
    import lightgbm
    import xgboost

    return (
        f"lightgbm {lightgbm.__version__}, catboost {catboost.__version__}, xgboost "
        f"{xgboost.__version__}, polars {pl.__version__}, numpy {np.__version__}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="default: /tmp/bench_gbdt/…")
    parser.add_argument("--skip-generate", action="store_true", help="reuse --data-dir as is")
    parser.add_argument("--rows", type=int, default=REAL_ROWS)
    parser.add_argument("--image-size", type=int, default=128, help="synthetic JPEG side")
    parser.add_argument("--workers", type=int, default=None, help="generation processes")
    parser.add_argument("--image-columns", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="GBDT threads; default: all")
    parser.add_argument("--preset", default="full", choices=("demo", "full"))
    parser.add_argument("--recipe", default="paper", choices=RECIPES)
    parser.add_argument("--members", nargs="+", default=list(GBDT_MODELS), choices=GBDT_MODELS)
    parser.add_argument("--params", default=None, help="params JSON file or inline JSON")
    parser.add_argument("--per-fold-bins", action="store_true")
    parser.add_argument("--max-folds", type=int, default=None, help="sample N folds per member")
    return parser.parse_args(argv)


def member_oof(
    frame: pl.DataFrame,
    y: np.ndarray,
    folds: np.ndarray,
    member: Any,
    cfg: Any,
    threads: int | None,
    bin_once: bool,
    run_folds: int,
) -> tuple[np.ndarray, list[float]]:
    """One member's OOF (mean over cfg.seeds, each seed its own resample; NaN where no fold ran)
    and its fold scores. Fewer folds than all (`run_folds`) run the first seed only."""
    partial = run_folds < len(np.unique(folds))
    seeds = cfg.seeds[:1] if partial else cfg.seeds
    results = iter_cv(
        frame, y, folds, {member.name: member}, seeds, cfg.sampling, threads, bin_once
    )
    total, count, scores = np.zeros(y.size), np.zeros(y.size), []
    for fr in itertools.islice(results, run_folds * len(seeds)):
        total[fr.valid_rows] += fr.pred
        count[fr.valid_rows] += 1
        scores.append(fr.score)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan), scores


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = args.threads
    print_machine(f"{library_versions()}; GBDT threads {threads or usable_cores()}")
    steps = Steps()
    data_dir = args.data_dir or Path(f"/tmp/bench_gbdt/data_{args.rows}")
    if args.skip_generate:
        if not (data_dir / "train-metadata.csv").is_file():
            raise SystemExit(f"--skip-generate: no train-metadata.csv in {data_dir}")
    else:
        with steps(f"generate {args.rows:,} rows, {args.image_size} px"):
            summary = generate(
                data_dir, rows=args.rows, image_size=args.image_size, workers=args.workers
            )
        print(summary)

    start = time.perf_counter()
    cfg = resolve(args.preset, args.recipe).gbdt
    groups = feature_groups(cfg) | {"patient_image": False}  # needs the image columns: below
    on = [g for g, v in feature_groups(cfg).items() if v]
    with steps(
        f"read + build_features + folds (utils.tabular.gbdt.load_training_frame) {on or ''}"
    ):
        data = load_training_frame(data_dir, threads=threads, **groups)
    with steps("fake image columns"):
        y, folds, meta = data.y, data.folds, list(data.meta_features)
        images = fake_image_columns(y, args.image_columns)
        frame = data.frame.with_columns(pl.Series(k, v) for k, v in images.items())
    derived: list[str] = []
    if cfg.patient_image:
        with steps("patient_image_features"):
            frame = patient_image_features(frame, list(images))
            derived = patient_image_feature_names(list(images))
    print(f"{frame.height:,} rows, {int(y.sum())} positives, {len(meta)} metadata features")

    params = resolve_params(cfg, params_overrides(args.params))
    members = make_members(meta, list(images) + derived, params, names=args.members)
    n_folds = len(np.unique(folds))
    run_folds = min(args.max_folds or n_folds, n_folds)
    oof: dict[str, np.ndarray] = {}
    cv_wall = cv_cpu = 0.0
    seeds = cfg.seeds  # seed bagging (`plus`): each seed its own resample, OOF averaged
    for name, member in members.items():
        ran = len(seeds) if run_folds == n_folds else 1  # member_oof: a partial run, one seed
        label = f"CV {name} ({run_folds} of {n_folds} folds x {ran} of {len(seeds)} seed(s))"
        with steps(label):
            pred, scores = member_oof(
                frame, y, folds, member, cfg, threads, not args.per_fold_bins, run_folds
            )
        wall, cpu, _ = steps.results[label]
        scale = n_folds * len(seeds) / len(scores)  # fits in all / fits run
        cv_wall, cv_cpu = cv_wall + wall * scale, cv_cpu + cpu * scale
        done = ~np.isnan(pred)
        print(
            f"    {name}: mean fold pAUC {np.nanmean(scores):.4f}, pAUC over its folds' rows "
            f"{pauc(y[done], pred[done]):.4f}" + ("" if scale == 1 else f"; x{scale:.1f} for all")
        )
        oof[name] = pred
    if run_folds == n_folds and len(members) > 1:
        print(f"ensemble OOF pAUC {pauc(y, np.mean(list(oof.values()), axis=0)):.4f}")
        if cfg.blend == "nested":
            with steps("nested blend of the members' OOF"):
                floors = member_floors(list(oof), META_MEMBER, cfg.blend_floor)
                blended = nested_blend(np.column_stack(list(oof.values())), y, folds, floors=floors)
            print(f"nested-blend OOF pAUC {blended.pauc:.4f}, weights {blended.weights.round(2)}")
    total = time.perf_counter() - start
    features = sum(v[0] for k, v in steps.results.items() if not k.startswith(("CV", "gen")))
    features_cpu = sum(v[1] for k, v in steps.results.items() if not k.startswith(("CV", "gen")))
    sampled = "" if run_folds == n_folds else f" (extrapolated from {run_folds} folds)"
    print(
        f"read + features + folds: wall {features:.1f} s, cpu {features_cpu:.1f} s; "
        f"CV{sampled}: wall {cv_wall:.1f} s, cpu {cv_cpu:.1f} s; "
        f"total wall {features + cv_wall:.1f} s (measured {total:.1f} s)"
    )
    print(f"peak RSS {max(v[2] for v in steps.results.values()):.2f} GiB (max over the steps)")
    print(json.dumps({k: [round(x, 2) for x in v] for k, v in steps.results.items()}))
    print_end()


if __name__ == "__main__":
    main()
