"""The `plus` recipe: its settings, every stage 3 switch from the training frame to the
artifacts, and the submission kernel on `plus` artifacts (same code, same checks).

The GBDT here is trained on the session's tiny vit_tiny run (tests/inference_artifacts.py) with
every switch on, whatever PLUS_GBDT keeps, so each one is exercised end to end.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from inference_artifacts import FEW_TREES, IMAGE_MODEL, N_FOLDS, build_artifacts

from utils.image.predict import predict
from utils.inference import predict_submission
from utils.io import DataDir
from utils.metric import pauc
from utils.oof import read_oof
from utils.settings import PLUS_GBDT, PRESETS, RECIPES, GBDTConfig, resolve
from utils.submission_file import validate_submission
from utils.tabular.ensemble import GBDTEnsemble
from utils.tabular.features import build_features
from utils.tabular.gbdt import FEATURE_GROUPS, load_training_frame, run_gbdt_stage
from utils.tabular.libraries import ENSEMBLE, META_MEMBER
from utils.tabular.plus_features import (
    OPTIONAL_GROUPS,
    add_optional_features,
    patient_image_feature_names,
    ugly_duckling_feature_names,
)

EVERY_SWITCH = {
    "site_features": True,
    "ugly_duckling": True,
    "patient_image": True,
    "blend": "nested",
    "patient_lof": True,
    "location_norm": True,
    "location_outliers": True,
    "blend_floor": 0.1,
    "seeds": (0, 1),
}
GROUPS = {g: True for g in FEATURE_GROUPS}
IMAGE_COLUMN = f"img_{IMAGE_MODEL}"
FAST = resolve("demo", "plus", inference={"estimate_batches": 0, "threads": 1}).inference


def test_plus_is_paper_with_the_kept_switches_at_every_preset():
    assert RECIPES == ("paper", "plus")
    assert set(PLUS_GBDT) <= set(EVERY_SWITCH)
    for preset in PRESETS:
        paper, plus = resolve(preset, "paper"), resolve(preset, "plus")
        assert (paper.gbdt.site_features, paper.gbdt.ugly_duckling) == (False, False)
        assert (paper.gbdt.patient_image, paper.gbdt.blend) == (False, "equal")
        assert not any(getattr(paper.gbdt, g) for g in FEATURE_GROUPS)
        assert (paper.gbdt.blend_floor, paper.gbdt.seeds) == (0.0, (0,))
        assert {k: getattr(plus.gbdt, k) for k in PLUS_GBDT} == PLUS_GBDT
        back = {k: getattr(paper.gbdt, k) for k in PLUS_GBDT}
        assert dataclasses.replace(plus.gbdt, recipe="paper", **back) == paper.gbdt
        assert dataclasses.replace(plus.image, recipe="paper") == paper.image
    with pytest.raises(ValueError, match="blend must be one of"):
        GBDTConfig(blend="rank")


@pytest.fixture(scope="module")
def plus_artifacts(synthetic_dir, tmp_path_factory) -> Path:
    """<dir>/vit_tiny (linked from the session's run) and <dir>/gbdt with every switch on."""
    base = build_artifacts(synthetic_dir, tmp_path_factory)
    out = tmp_path_factory.mktemp("plus_artifacts")
    (out / IMAGE_MODEL).symlink_to(base / IMAGE_MODEL, target_is_directory=True)
    params = tmp_path_factory.mktemp("plus_params") / "few_trees.json"
    params.write_text(json.dumps(FEW_TREES))
    image_dirs = [base / IMAGE_MODEL]
    overrides = {"n_folds": N_FOLDS, "threads": 1, **EVERY_SWITCH}
    run_gbdt_stage(synthetic_dir, out, image_dirs, params, "demo", "plus", **overrides)
    return out


def test_every_switch_reaches_the_members_and_the_artifacts(plus_artifacts):
    gbdt = plus_artifacts / "gbdt"
    spec = json.loads((gbdt / "features.json").read_text())
    groups = GROUPS
    assert spec["feature_groups"] == groups
    derived = patient_image_feature_names([IMAGE_COLUMN])
    assert spec["image_columns"] == [IMAGE_COLUMN] and spec["image_derived"] == derived
    record = json.loads((gbdt / "ensemble.json").read_text())
    for name, member in record["members"].items():
        features = set(member["features"])
        assert set(ugly_duckling_feature_names()) <= features, name
        assert any(f.endswith("_site_norm") for f in features), name
        assert {"loc_outlier_count", "tbp_lv_L_loc_norm"} <= features, name
        # the image-derived features go to the image members only, as the image columns do
        assert (set(derived) <= features) == (name != META_MEMBER), name
        assert (IMAGE_COLUMN in features) == (name != META_MEMBER), name
    weights = record["weights"]
    assert set(weights) == set(record["members"]) and min(weights.values()) >= 0
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights[META_MEMBER] >= EVERY_SWITCH["blend_floor"] - 1e-9
    report = json.loads((gbdt / "cv_report.json").read_text())
    assert report["blend"]["kind"] == "nested" and report["blend"]["weights"] == weights
    oof = read_oof(gbdt / "oof.csv")
    honest = pauc(oof["target"].to_numpy(), oof["pred"].to_numpy())
    assert report["blend"]["pauc"] == pytest.approx(honest)
    assert report["scores"][ENSEMBLE]["overall"] == pytest.approx(honest)
    ensemble = GBDTEnsemble.load(gbdt)
    assert ensemble.weights == weights and ensemble.feature_groups == groups


def test_submission_kernel_builds_the_recorded_groups_and_applies_the_weights(
    plus_artifacts, synthetic_dir
):
    submission, report = predict_submission(synthetic_dir, plus_artifacts, FAST)
    data = DataDir(synthetic_dir)
    metadata = data.test_metadata()
    ids = metadata["isic_id"].to_list()
    validate_submission(submission, ids)
    assert report.plan.run == (IMAGE_MODEL,) and report.n_fallback == 0
    # the same score, computed apart: test features, the image model's fold mean, the groups
    images = predict(plus_artifacts / IMAGE_MODEL, data.test_images(), ids, num_workers=0)
    frame, _ = build_features(metadata, site_features=True)
    frame = frame.join(
        images.select("isic_id", pl.col("pred").cast(pl.Float32).alias(IMAGE_COLUMN)),
        on="isic_id",
        how="left",
        maintain_order="left",
    )
    optional = {g: True for g in OPTIONAL_GROUPS}
    frame, meta_added, image_added = add_optional_features(
        frame, metadata, [IMAGE_COLUMN], threads=1, **optional
    )
    assert set(ugly_duckling_feature_names()) <= set(meta_added)
    assert image_added == patient_image_feature_names([IMAGE_COLUMN])
    ensemble = GBDTEnsemble.load(plus_artifacts / "gbdt")
    preds = ensemble.predict(frame, threads=1)
    np.testing.assert_allclose(submission["target"].to_numpy(), preds[ENSEMBLE], rtol=1e-6)
    weighted = sum(ensemble.weights[m] * preds[m] for m in ensemble.models)
    np.testing.assert_allclose(preds[ENSEMBLE], weighted, rtol=1e-6)


def test_fitted_weights_are_renormalised_over_the_members_left(plus_artifacts):
    ensemble = GBDTEnsemble.load(plus_artifacts / "gbdt")
    a, b = np.array([0.1, 0.2]), np.array([0.3, 0.5])
    partial = dataclasses.replace(ensemble, weights={"lgb_meta": 0.2, "lgb": 0.6, "cat": 0.2})
    blended = partial.blend({"lgb_meta": a, "lgb": b})  # cat dropped: its weight shared out
    np.testing.assert_allclose(blended, (0.2 * a + 0.6 * b) / 0.8)
    zero = dataclasses.replace(ensemble, weights={"lgb_meta": 0.0, "lgb": 0.0, "cat": 1.0})
    np.testing.assert_allclose(zero.blend({"lgb_meta": a, "lgb": b}), (a + b) / 2)
    equal = dataclasses.replace(ensemble, weights=None)
    np.testing.assert_allclose(equal.blend({"lgb_meta": a, "lgb": b}), (a + b) / 2)


def test_training_frame_groups_read_no_label(synthetic_dir, tmp_path):
    """The ugly-duckling features of load_training_frame are the same whatever the labels."""
    train = pl.read_csv(synthetic_dir / "train-metadata.csv", infer_schema_length=None)
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    target = np.random.default_rng(0).permutation(train["target"].to_numpy())
    train.with_columns(target=pl.Series(target)).write_csv(flipped / "train-metadata.csv")
    names = ugly_duckling_feature_names()
    ours, theirs = (
        load_training_frame(d, ugly_duckling=True, threads=1).frame.select("isic_id", *names)
        for d in (synthetic_dir, flipped)
    )
    assert not np.array_equal(target, train["target"].to_numpy())
    assert ours.sort("isic_id").equals(theirs.sort("isic_id"))
