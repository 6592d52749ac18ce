"""Papermill runs of the four stage-1 notebooks on a tiny synthetic data dir."""

import json
from pathlib import Path

import polars as pl
import pytest
from notebook_checks import assert_thin_and_clean, run_notebook

from utils.folds import assign_folds
from utils.io import DataDir
from utils.oof import read_oof
from utils.train import IMAGE_MODELS

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = {name: REPO / "notebooks" / f"01_image_{name}.ipynb" for name in IMAGE_MODELS}
PARAMETERS = {"data_dir", "output_dir", "preset", "folds", "epochs", "image_size", "batch_size"}
PARAMETERS |= {"weights_path", "num_workers"}


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A tiny data dir: 160 rows over 12 patients, ~10% positives, 40 px crops."""
    from utils.synthetic import generate

    root = tmp_path_factory.mktemp("image_nb")
    summary = generate(
        root / "data", rows=160, patients=12, positive_rate=0.1, image_size=40,
        test_rows=10, seed=11, workers=1,
    )  # fmt: skip
    return summary.out_dir


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_thin_and_clean(name):
    assert_thin_and_clean(NOTEBOOKS[name], PARAMETERS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_writes_valid_oof(name, tiny_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "artifacts"
    run_notebook(
        str(NOTEBOOKS[name]),
        {
            "data_dir": str(tiny_data_dir),
            "output_dir": str(out),
            "preset": "demo",
            "folds": 2,
            "epochs": 1,
            "image_size": 32,
            "batch_size": 32,
            "num_workers": 0,
        },
        tmp_path,
        monkeypatch,
    )
    run_dir = out / name
    oof = read_oof(run_dir / "oof.csv")
    meta = DataDir(tiny_data_dir).train_metadata()
    assert sorted(oof["isic_id"]) == sorted(meta["isic_id"])
    expected = meta.select(
        "isic_id",
        pl.Series("expected_fold", assign_folds(meta, 2, 42)),
        pl.col("target").alias("real_target"),
    )
    joined = oof.join(expected, on="isic_id")
    assert (joined["fold"] == joined["expected_fold"]).all()
    assert (joined["target"] == joined["real_target"]).all()  # OOF carries the real target
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["label"] == IMAGE_MODELS[name]["label"]
    assert (config["image_size"], config["epochs"], config["n_folds"]) == (32, 1, 2)
    assert sorted(p.name for p in run_dir.glob("fold*.pt")) == ["fold0.pt", "fold1.pt"]
