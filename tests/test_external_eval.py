"""External evaluation (utils.external_eval, notebook 05) on a generated PH2 + HAM10000 dir."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from notebook_checks import assert_thin_and_clean, run_notebook
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from utils import external_eval
from utils.external import load_ph2
from utils.external_eval import (
    FUSION_MEMBERS,
    PAPER_RESULTS,
    binary_metrics,
    encode_metadata,
    evaluate_dataset,
    gbdt_params,
    load_datasets,
    paper_table,
    torch_threads,
    write_metrics,
)
from utils.folds import assign_folds
from utils.io import HDF5Images
from utils.layout import METRICS_FILE, PREDICTIONS_FILE
from utils.manifest import verify_manifest
from utils.metric import pauc
from utils.oof import read_oof
from utils.settings import PAPER_GBDT_PARAMS, presets, resolve
from utils.tabular.plus_features import patient_image_feature_names

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "05_external_eval.ipynb"
PARAMETERS = {
    "data_dir",
    "datasets",
    "ph2_dir",
    "ham_metadata",
    "ham_image_dir",
    "output_dir",
    "preset",
    "recipe",
    "image_models",
    "n_folds",
    "epochs",
    "image_size",
    "batch_size",
    "weights_path",
    "num_workers",
    "threshold",
    "threads",
}
PH2_VARIANTS = ["metadata", "image_vit_tiny", "fusion_lgb", "fusion_soft_vote"]


def make_eval_config(preset="demo", **overrides):
    """Stage 5 settings of `preset` with `overrides` (utils.settings)."""
    return resolve(preset, external=overrides).external


def test_binary_metrics_match_sklearn():
    y = np.array([0, 0, 1, 0, 1, 1, 0, 0, 1, 0])
    s = np.array([0.1, 0.6, 0.7, 0.2, 0.4, 0.9, 0.3, 0.55, 0.8, 0.05])
    got = binary_metrics(y, s)
    assert got["accuracy"] == accuracy_score(y, s >= 0.5) == 0.7
    assert got["auc"] == pytest.approx(roc_auc_score(y, s))
    assert got["ap"] == pytest.approx(average_precision_score(y, s))
    assert got["pauc"] == pytest.approx(pauc(y, s))
    # a stated threshold moves accuracy only: 0.35 flags 0.4 (a positive) and nothing else new
    lower = binary_metrics(y, s, threshold=0.35)
    assert lower["accuracy"] == 0.8
    assert {k: lower[k] for k in ("auc", "ap", "pauc")} == {
        k: got[k] for k in ("auc", "ap", "pauc")
    }


def test_binary_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="1 score.*NaN"):
        binary_metrics([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="both classes"):
        binary_metrics([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        binary_metrics([0, 1, 1], [0.1, 0.2])


def test_categorical_metadata_is_one_hot_with_null_as_zeros(external_data):
    ds = load_datasets(external_data, ["HAM10000"])[0]
    frame = pl.concat([ds.frame.head(200), ds.frame.filter(pl.col("sex").is_null()).head(5)])
    small = dataclasses.replace(ds, frame=frame)
    encoded, columns = encode_metadata(small)
    assert columns[0] == "age"
    sex = [c for c in columns if c.startswith("sex__")]
    assert sex == ["sex__female", "sex__male"]
    row = encoded.join(small.frame.select("isic_id", pl.col("sex").alias("raw")), on="isic_id")
    male = row.filter(pl.col("raw") == "male")
    assert (male["sex__male"] == 1).all() and (male["sex__female"] == 0).all()
    nulls = row.filter(pl.col("raw").is_null())
    assert nulls.height > 0 and (nulls["sex__male"] + nulls["sex__female"] == 0).all()
    n_sites = small.frame["localization"].drop_nulls().n_unique()
    assert len([c for c in columns if c.startswith("localization__")]) == n_sites


def test_gbdt_leaves_are_capped_only_for_small_sets():
    published = PAPER_GBDT_PARAMS["lgb"]["min_data_in_leaf"]
    full, demo = make_eval_config("full"), make_eval_config("demo")
    assert gbdt_params(full, 160)["lgb_meta"]["min_data_in_leaf"] == 8
    assert gbdt_params(full, 40)["lgb"]["min_data_in_leaf"] == 5
    assert gbdt_params(full, 8000)["lgb_meta"]["min_data_in_leaf"] == published
    rounds = gbdt_params(demo, 8000)["lgb"]["n_estimators"]
    assert rounds < PAPER_GBDT_PARAMS["lgb"]["n_estimators"]


def test_eval_config_presets_and_bad_settings():
    cfg = make_eval_config("demo", image_models=["vit_tiny"], epochs=None, n_folds=3)
    assert cfg.image_models == ("vit_tiny",) and cfg.epochs == 1 and cfg.n_folds == 3
    assert len(make_eval_config("full").image_models) == 4
    with pytest.raises(KeyError, match="unknown image model.*resnet"):
        make_eval_config("demo", image_models=["resnet"])
    with pytest.raises(KeyError, match="weights_path names.*vit_small_suspicious"):
        make_eval_config("demo", weights_path={"vit_small_suspicious": "w.pth"})
    with pytest.raises(ValueError, match="threshold"):
        make_eval_config("demo", threshold=1.5)


def test_torch_threads_are_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_load_datasets_defaults_and_errors(external_data, tmp_path, fixtures_dir):
    with pytest.raises(KeyError, match="ISIC2019"):
        load_datasets(external_data, ["ISIC2019"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_datasets(external_data, ["PH2"], ph2_dir=tmp_path / "nowhere")
    # <data_dir>/ham10000/images is picked up when present
    ham = tmp_path / "ham10000"
    (ham / "images").mkdir(parents=True)
    rows = pl.read_csv(external_data / "ham10000" / "HAM10000_metadata.csv").head(3)
    rows.write_csv(ham / "HAM10000_metadata.csv")
    jpeg = HDF5Images(fixtures_dir / "test-image.hdf5").read_bytes("ISIC_0015657").tobytes()
    for image_id in rows["image_id"]:
        (ham / "images" / f"{image_id}.jpg").write_bytes(jpeg)
    (ds,) = load_datasets(tmp_path, ["HAM10000"])
    assert sorted(ds.image_paths) == sorted(rows["image_id"])


def test_variants_share_folds_and_scores_match_predictions(external_data, tmp_path):
    ph2 = load_ph2(external_data / "ph2")
    keep = ph2.frame.filter(pl.col("target") == 1).head(15)["isic_id"].to_list()
    keep += ph2.frame.filter(pl.col("target") == 0).head(30)["isic_id"].to_list()
    subset = dataclasses.replace(
        ph2,
        frame=ph2.frame.filter(pl.col("isic_id").is_in(keep)),
        image_paths={i: ph2.image_paths[i] for i in keep},
    )
    cfg = make_eval_config("demo", n_folds=3, threads=1)
    result = evaluate_dataset(subset, cfg, tmp_path)
    assert [e["variant"] for e in result.entries] == PH2_VARIANTS
    pred = pl.read_csv(tmp_path / "PH2" / PREDICTIONS_FILE)
    assert sorted(pred["isic_id"]) == sorted(keep)
    np.testing.assert_array_equal(pred["fold"].to_numpy(), assign_folds(pred, 3, 42))
    image_oof = read_oof(tmp_path / "PH2" / "vit_tiny" / "oof.csv")
    joined = pred.join(image_oof, on="isic_id", suffix="_run")
    assert (joined["fold"] == joined["fold_run"]).all()
    np.testing.assert_allclose(joined["image_vit_tiny"], joined["pred"], rtol=1e-6)
    y = pred["target"].to_numpy()
    for entry in result.entries:
        score = pred[entry["variant"]].to_numpy()
        assert entry["auc"] == pytest.approx(roc_auc_score(y, score))
        assert entry["ap"] == pytest.approx(average_precision_score(y, score))
        assert entry["accuracy"] == pytest.approx(accuracy_score(y, score >= 0.5))
        assert entry["fold_scheme"]["n_folds"] == 3 and len(entry["fold_auc"]) == 3
        assert entry["rows"] == 45 and entry["positives"] == 15
    # PH2's annotations are the dermoscopic criteria of melanoma: strongly predictive
    assert result.entries[0]["auc"] > 0.85
    assert len(FUSION_MEMBERS) == 4


def test_plus_applies_stage_3s_blend_and_the_groups_external_metadata_allows(
    external_data, tmp_path, monkeypatch
):
    """Stage 5 under a recipe uses stage 3's blend and feature groups: patient-relative image
    scores apply; a group that needs ISIC 2024 columns is skipped and recorded as such."""
    monkeypatch.setattr(
        presets, "PLUS_GBDT", {"blend": "nested", "patient_image": True, "site_features": True}
    )
    ph2 = load_ph2(external_data / "ph2")
    keep = ph2.frame.filter(pl.col("target") == 1).head(15)["isic_id"].to_list()
    keep += ph2.frame.filter(pl.col("target") == 0).head(30)["isic_id"].to_list()
    subset = dataclasses.replace(
        ph2,
        frame=ph2.frame.filter(pl.col("isic_id").is_in(keep)),
        image_paths={i: ph2.image_paths[i] for i in keep},
    )
    cfg = resolve("demo", "plus", external={"n_folds": 3, "threads": 1}).external
    seen, real = [], external_eval.run_gbdt
    monkeypatch.setattr(
        external_eval,
        "run_gbdt",
        lambda f, m, images, *a: seen.append(images) or real(f, m, images, *a),
    )
    result = evaluate_dataset(subset, cfg, tmp_path)
    variants = [e["variant"] for e in result.entries]
    assert variants == ["metadata", "image_vit_tiny", "fusion_lgb", "fusion_nested_blend"]
    assert seen[-1] == ["img_vit_tiny", *patient_image_feature_names(["img_vit_tiny"])]
    assert all(e["recipe"] == "plus" for e in result.entries)
    record = json.loads(write_metrics([result], tmp_path, cfg).read_text())
    assert record["stage3"] == {
        "recipe": "plus",
        "blend": "nested",
        "feature_groups": ["patient_image"],
        "skipped_feature_groups": {
            "site_features": "needs ISIC 2024 metadata columns the external sets lack"
        },
    }
    paper = resolve("demo", "paper").external
    assert external_eval.stage3_choices(paper) == {
        "recipe": "paper", "blend": "equal", "feature_groups": [], "skipped_feature_groups": {},
    }  # fmt: skip


def test_nothing_to_evaluate_is_an_error(external_data, tmp_path):
    ph2 = load_ph2(external_data / "ph2")
    bare = dataclasses.replace(ph2, numeric_columns=(), image_paths={})
    with pytest.raises(ValueError, match="PH2: neither metadata columns nor images"):
        evaluate_dataset(bare, make_eval_config("demo"), tmp_path)


def test_metrics_file_and_paper_table(external_data, tmp_path):
    ham = load_datasets(external_data, ["HAM10000"])[0]
    small = dataclasses.replace(ham, frame=ham.frame.head(1500))
    cfg = make_eval_config("demo", image_models=[], threads=1)
    result = evaluate_dataset(small, cfg, tmp_path)
    path = write_metrics([result], tmp_path, cfg)
    record = json.loads(path.read_text())
    assert path.name == METRICS_FILE and record["settings"]["preset"] == "demo"
    (entry,) = record["entries"]
    assert entry["dataset"] == "HAM10000" and entry["variant"] == "metadata"
    assert "lesion_id" in entry["fold_scheme"]["description"]
    table = paper_table(record["entries"])
    assert table["model"].to_list() == ["metadata", "FusionNetX paper (reported)"]
    assert table["accuracy_%"][0] == round(100 * entry["accuracy"], 1)
    assert table.row(1, named=True)["auc"] == PAPER_RESULTS["HAM10000"]["auc"]
    assert table["pauc"][1] is None


def test_notebook_is_thin_and_clean():
    assert_thin_and_clean(NOTEBOOK, PARAMETERS)


def test_notebook_demo_on_generated_data(external_data, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    executed = run_notebook(
        str(NOTEBOOK),
        {
            "data_dir": str(external_data),
            "output_dir": str(out),
            "preset": "demo",
            "threads": 1,
            # as papermill's -p delivers lists: JSON strings
            "datasets": '["PH2", "HAM10000"]',
            "image_models": '["vit_tiny"]',
        },
        tmp_path,
        monkeypatch,
    )
    record = json.loads((out / METRICS_FILE).read_text())
    variants = [(e["dataset"], e["variant"]) for e in record["entries"]]
    assert variants == [("PH2", v) for v in PH2_VARIANTS] + [("HAM10000", "metadata")]
    for entry in record["entries"]:
        assert entry["fold_scheme"]["n_folds"] == 5 and entry["fold_scheme"]["seed"] == 42
        pred = pl.read_csv(out / entry["dataset"] / PREDICTIONS_FILE)
        y, score = pred["target"].to_numpy(), pred[entry["variant"]].to_numpy()
        assert entry["auc"] == pytest.approx(roc_auc_score(y, score))
    ham = pl.read_csv(out / "HAM10000" / PREDICTIONS_FILE)
    raw = pl.read_csv(external_data / "ham10000" / "HAM10000_metadata.csv")
    assert ham.height == raw.height and ham["patient_id"].n_unique() < ham.height
    assert ham.group_by("patient_id").agg(pl.col("fold").n_unique())["fold"].max() == 1
    assert verify_manifest(out) == []
    text = executed.read_text()
    assert "HAM10000: no images given, so the metadata model only" in text
    assert "FusionNetX paper (reported)" in text
    assert "IProgress not found" not in text and "TqdmWarning" not in text
