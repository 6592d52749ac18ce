"""One demo artifacts dir and one small test set for every submission-kernel test module.

`build_artifacts` trains a tiny vit_tiny (32 px, 1 epoch, 2 folds, the stage 1 entry) and the
GBDT stage's artifacts on its OOF (the stage 3 entry, few trees) on the synthetic data dir; the
first call builds, later calls reuse the dir. tests/conftest.py wraps it, `small_test_set` and
`member_scores` in session fixtures (`artifacts`, `test_data`, `intact_scores`), so
test_inference.py, test_submission_checks.py and test_submission_robustness.py share one build.
Tests copy the artifacts or the test set before they damage anything.

Also here: what those modules share to run and judge the kernel: `member_scores` (every GBDT
member's score computed apart from the kernel), `run_kernel` (the real notebook, papermill) and
`submission_of` (the written submission, checked complete and valid).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nbformat
import numpy as np
import polars as pl
import pytest
import torch
from notebook_checks import run_notebook

from utils.image.predict import predict
from utils.io import TEST_IMAGES, TEST_METADATA, read_test_metadata
from utils.settings import resolve
from utils.submission_file import validate_submission
from utils.tabular.ensemble import GBDTEnsemble
from utils.tabular.features import build_features

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "04_inference.ipynb"
IMAGE_MODEL = "vit_tiny"
N_FOLDS = 2
FEW_TREES = {"lgb": {"n_estimators": 20}, "cat": {"iterations": 20}, "xgb": {"n_estimators": 20}}
TEST_ROWS = 30  # rows of the small test set (small_test_set)
BATCH = 16
FAST = resolve("demo", inference={"estimate_batches": 0, "threads": 1}).inference
_BUILT: dict[Path, Path] = {}


def train_gbdt(data_dir: Path, out_dir: Path, image_dirs: list[Path]) -> Path:
    """The stage 3 entry with few trees and N_FOLDS folds; returns the gbdt dir."""
    from utils.tabular.gbdt import run_gbdt_stage

    params = out_dir / "few_trees.json"
    params.write_text(json.dumps(FEW_TREES))
    run = run_gbdt_stage(data_dir, out_dir, image_dirs, params, "demo", n_folds=N_FOLDS, threads=1)
    params.unlink()
    return run.out_dir


def build_artifacts(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<dir>/vit_tiny (2 fold checkpoints) and <dir>/gbdt trained with img_vit_tiny, each with
    its manifest; built on the first call of the session."""
    from utils.image.train import run_image_stage

    if synthetic_dir not in _BUILT:
        out = tmp_path_factory.mktemp("inference_artifacts")
        sizes = {"epochs": 1, "image_size": 32, "batch_size": 32, "num_workers": 0}
        run_image_stage(IMAGE_MODEL, synthetic_dir, out, "demo", n_folds=N_FOLDS, **sizes)
        train_gbdt(synthetic_dir, out, [out / IMAGE_MODEL])
        _BUILT[synthetic_dir] = out
    return _BUILT[synthetic_dir]


def small_test_set(synthetic_dir: Path, root: Path) -> Path:
    """`root` holding the first TEST_ROWS rows of the synthetic test set with their images."""
    root.mkdir(parents=True, exist_ok=True)
    text = pl.read_csv(synthetic_dir / TEST_METADATA, infer_schema=False).head(TEST_ROWS)
    text.write_csv(root / TEST_METADATA)
    shutil.copy2(synthetic_dir / TEST_IMAGES, root / TEST_IMAGES)
    return root


def member_scores(artifacts: Path, data: Path, folds: list[int] | None = None) -> dict:
    """Every GBDT member's score and the vote on `data`, computed apart from the kernel, with
    the image column the mean of `folds` (default all)."""
    metadata, _ = read_test_metadata(data / TEST_METADATA)
    frame, _ = build_features(metadata)
    ids = metadata["isic_id"].to_list()
    pred = predict(
        artifacts / IMAGE_MODEL, data / TEST_IMAGES, ids, BATCH, 0, torch.device("cpu"), folds
    )
    column = pl.Series(f"img_{IMAGE_MODEL}", pred["pred"].to_numpy()).cast(pl.Float32)
    return GBDTEnsemble.load(artifacts / "gbdt").predict(frame.with_columns(column), threads=1)


def edit_metadata(data: Path, change: Callable[[pl.DataFrame], pl.DataFrame]) -> Path:
    """Rewrite `<data>/test-metadata.csv` (read as text) through `change`; its path."""
    path = data / TEST_METADATA
    change(pl.read_csv(path, infer_schema=False)).write_csv(path)
    return path


def run_kernel(data: Path, art: Path, out: Path, tmp_path: Path, monkeypatch) -> str:
    """Run the real notebook; its printed output."""
    executed = run_notebook(
        NOTEBOOK,
        {
            "data_dir": str(data),
            "output_dir": str(out),
            "preset": "demo",
            "artifacts_dir": str(art),
            "batch_size": BATCH,
            "num_workers": 0,
        },
        tmp_path,
        monkeypatch,
    )
    cells = nbformat.read(executed, as_version=4).cells
    outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)


def submission_of(out: Path, data: Path) -> np.ndarray:
    """The written submission's targets, after checking it is complete and valid."""
    sub = pl.read_csv(out / "submission.csv")
    ids = read_test_metadata(data / TEST_METADATA)[0]["isic_id"].to_list()
    validate_submission(sub, ids)
    assert sub.height == TEST_ROWS
    return sub["target"].to_numpy()
