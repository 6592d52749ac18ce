"""One demo artifacts dir for every submission-kernel test module, built once per session.

`build_artifacts` trains a tiny vit_tiny (32 px, 1 epoch, 2 folds, the stage 1 entry) and the
GBDT stage's artifacts on its OOF (the stage 3 entry, few trees) on the synthetic data dir. Test
modules wrap it in their own session fixture; the first call builds, later calls reuse the dir,
so test_inference.py and test_submission_robustness.py share one build. Tests copy it before
they damage anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

IMAGE_MODEL = "vit_tiny"
N_FOLDS = 2
FEW_TREES = {"lgb": {"n_estimators": 20}, "cat": {"iterations": 20}, "xgb": {"n_estimators": 20}}
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
