"""Papermill run of notebooks/03_gbdt.ipynb on the small synthetic data dir."""

import json
from pathlib import Path

import numpy as np
import polars as pl
from notebook_checks import assert_thin_and_clean, run_notebook

from utils.io import DataDir
from utils.manifest import read_manifest, verify_manifest
from utils.oof import read_oof
from utils.settings import DEMO_FOLDS
from utils.tabular.ensemble import GBDTEnsemble
from utils.tabular.libraries import ENSEMBLE, GBDT_MODELS

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "03_gbdt.ipynb"
PARAMETERS = {
    "data_dir",
    "output_dir",
    "preset",
    "recipe",
    "image_oof_dirs",
    "params_path",
    "seeds",
    "threads",
}


def test_notebook_is_thin_and_clean():
    assert_thin_and_clean(NOTEBOOK, PARAMETERS)


def test_notebook_writes_gbdt_artifacts(synthetic_dir, demo_image_oof_dir, tmp_path, monkeypatch):
    params = tmp_path / "best_params.json"
    params.write_text(json.dumps({"cat": {"iterations": 20}, "xgb": {"n_estimators": 20}}))
    out = tmp_path / "runs"
    run_notebook(
        str(NOTEBOOK),
        {
            "data_dir": str(synthetic_dir),
            "output_dir": str(out),
            "preset": "demo",
            "image_oof_dirs": [str(demo_image_oof_dir)],
            "params_path": str(params),
            "seeds": "[0, 1]",  # as `papermill -p seeds '[0, 1]'` delivers it
            "threads": 1,
        },
        tmp_path,
        monkeypatch,
    )
    gbdt_dir = out / "gbdt"
    report = json.loads((gbdt_dir / "cv_report.json").read_text())
    assert report["image_columns"] == ["img_vit_tiny"] and not report["metadata_only"]
    assert set(report["scores"]) == set(GBDT_MODELS) | {ENSEMBLE}
    assert all(len(s["folds"]) == DEMO_FOLDS for s in report["scores"].values())
    assert [row["setting"] for row in report["ablation"]][-1].startswith("full")
    assert json.loads((gbdt_dir / "params.json").read_text())["cat"]["iterations"] == 20
    result = read_oof(gbdt_dir / "oof.csv")
    assert sorted(result["isic_id"]) == sorted(DataDir(synthetic_dir).train_metadata()["isic_id"])
    np.testing.assert_allclose(report["scores"][ENSEMBLE]["overall"], _pauc(result), rtol=1e-9)
    for plot in ("roc.png", "importance.png", "fold_scores.png"):
        assert (gbdt_dir / plot).stat().st_size > 1000
    ensemble = GBDTEnsemble.load(gbdt_dir)
    assert set(ensemble.models) == set(GBDT_MODELS)
    # provenance: per image column the image model and its run's config hash, and a manifest
    image_run = json.loads((demo_image_oof_dir / "config.json").read_text())
    source = ensemble.image_sources["img_vit_tiny"]
    assert source["image_model"] == "vit_tiny"
    assert source["config_hash"] == image_run["config_hash"]
    assert verify_manifest(gbdt_dir) == []
    manifest = read_manifest(gbdt_dir)
    assert manifest["config"]["image_sources"] == ensemble.image_sources
    assert manifest["config"]["gbdt"]["preset"] == "demo" and "roc.png" in manifest["files"]
    assert manifest["config"]["gbdt"]["seeds"] == [0, 1]


def _pauc(oof: pl.DataFrame) -> float:
    from utils.metric import pauc

    return pauc(oof["target"].to_numpy(), oof["pred"].to_numpy())
