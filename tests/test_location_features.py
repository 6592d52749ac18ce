"""Within patient x location features (tabular.location_features), the optional-group registry
(tabular.plus_features.OPTIONAL_GROUPS) and the planted structures (utils.synthetic_structure)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bench import ablation
from utils.io import DataDir
from utils.settings import GBDTConfig
from utils.synthetic import default_truth_path, generate
from utils.synthetic_structure import SITE_OUTLIER_COLUMNS, Structure
from utils.tabular.features import EPS, NUMERIC_FEATURES, build_features
from utils.tabular.gbdt import FEATURE_GROUPS, load_training_frame
from utils.tabular.location_features import (
    OUTLIER_SUMMARY,
    location_norm_features,
    location_outlier_features,
)
from utils.tabular.plus_features import (
    OPTIONAL_GROUPS,
    add_optional_features,
    ugly_duckling_feature_names,
)

F = "tbp_lv_L"


def small_frame() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Patient p: three lesions on the leg, one on the arm; q: one lesion; one null value."""
    features = pl.DataFrame(
        {
            "isic_id": ["a", "b", "c", "d", "e", "f"],
            "patient_id": ["p", "p", "p", "p", "q", "p"],
            F: [10.0, 20.0, 30.0, 50.0, 5.0, None],
            "tbp_lv_H": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        }
    )
    metadata = pl.DataFrame(
        {
            "isic_id": ["f", "e", "d", "c", "b", "a"],  # another order: joined on isic_id
            "tbp_lv_location": ["Leg", "Arm", "Arm", "Leg", "Leg", "Leg"],
            "tbp_lv_location_simple": ["Leg", "Arm", "Arm", "Leg", "Leg", "Leg"],
            "anatom_site_general": [None, "upper", "upper", None, None, None],
            "target": [0, 1, 0, 0, 1, 0],
        }
    )
    return features, metadata


def values(frame: pl.DataFrame, name: str) -> list:
    return [None if v is None else round(v, 4) for v in frame[name].to_list()]


def test_location_norm_by_hand():
    features, metadata = small_frame()
    out, added = location_norm_features(features, metadata, [F, "tbp_lv_H"])
    # p x Leg: 10, 20, 30 (mean 20, std 10); p x Arm: 50 alone; q: 5 alone; a null stays null
    expected = [-10 / (10 + EPS), 0.0, 10 / (10 + EPS), 0.0, 0.0, None]
    assert values(out, f"{F}_loc_norm") == [None if v is None else round(v, 4) for v in expected]
    # site: the null site is a group of its own (a, b, c, f), as in features.py
    assert values(out, f"{F}_site_norm") == values(out, f"{F}_loc_norm")
    assert values(out, "tbp_lv_H_locsimple_norm") == [0.0] * 6  # constant: 0, never inf
    assert out.columns == features.columns + added and len(added) == 6
    assert all(out[n].dtype == pl.Float32 for n in added)


def test_location_outliers_by_hand():
    features, metadata = small_frame()
    out, added = location_outlier_features(features, metadata, [F, "tbp_lv_H"])
    assert values(out, f"{F}_loc_absz") == [1.0, 0.0, 1.0, 0.0, 0.0, None]
    # centred percentile within the patient (p's non-null values 10, 20, 30, 50)
    assert values(out, f"{F}_patient_pct") == [0.125, 0.375, 0.625, 0.875, 0.5, None]
    assert values(out, "loc_absz_max") == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert values(out, "loc_absz_std") == [0.5, 0.0, 0.5, 0.0, 0.0, 0.0]
    assert values(out, "loc_outlier_count") == [0.0] * 6
    assert added[-3:] == list(OUTLIER_SUMMARY)


def test_outlier_count_counts_features_beyond_two():
    n = 12
    features = pl.DataFrame(
        {
            "isic_id": [str(i) for i in range(n)],
            "patient_id": ["p"] * n,
            **{f: [0.0] * (n - 1) + [9.0] for f in NUMERIC_FEATURES[:3]},
        }
    )
    metadata = pl.DataFrame({"isic_id": features["isic_id"], "tbp_lv_location": ["Leg"] * n})
    out, _ = location_outlier_features(features, metadata, NUMERIC_FEATURES[:3])
    # the odd lesion's |z| = 11 / sqrt(12) > 2 in each of the three features
    assert out["loc_outlier_count"].to_list() == [0.0] * (n - 1) + [3.0]


def test_missing_columns_are_named():
    features, metadata = small_frame()
    with pytest.raises(KeyError, match="tbp_lv_location_simple"):
        location_norm_features(features, metadata.drop("tbp_lv_location_simple"), [F])
    with pytest.raises(KeyError, match="tbp_lv_Lext"):
        location_outlier_features(features, metadata, ["tbp_lv_Lext"])
    with pytest.raises(ValueError, match="unknown optional feature group"):
        add_optional_features(features, metadata, [], locations=True)


@pytest.fixture(scope="module")
def structured_dir(tmp_path_factory) -> pl.DataFrame:
    root = tmp_path_factory.mktemp("structured")
    structure = Structure.of(["site_outlier", "site_rates", "image_patient"])
    kwargs = dict(rows=1500, patients=20, positive_rate=0.03, image_size=16, workers=1, seed=3)
    generate(root / "plain", **kwargs)
    return generate(root / "data", structure=structure, **kwargs).out_dir


def test_every_group_is_label_free_and_shares_names_once(structured_dir):
    """Identical features whatever the labels (shuffled), each registry group switched on."""
    metadata = DataDir(structured_dir).train_metadata()
    shuffled = metadata.with_columns(pl.col("target").shuffle(seed=5))
    assert not shuffled["target"].equals(metadata["target"])
    features, _ = build_features(metadata)
    groups = {g: True for g in OPTIONAL_GROUPS}
    ours, meta_names, image_names = add_optional_features(features, metadata, [], 1, **groups)
    theirs, _, _ = add_optional_features(features, shuffled, [], 1, **groups)
    assert ours.equals(theirs)
    assert image_names == [] and len(meta_names) == len(set(meta_names))
    assert ours.columns == features.columns + meta_names
    # location_outliers reuses the ugly-duckling group's |z| columns rather than recomputing
    assert set(ugly_duckling_feature_names()) <= set(meta_names)


def test_training_frame_records_every_group(structured_dir):
    groups = {g: True for g in FEATURE_GROUPS}
    data = load_training_frame(structured_dir, threads=1, **groups)
    assert data.groups == {g: g != "patient_image" for g in FEATURE_GROUPS}  # no image columns
    assert len(data.meta_features) == len(set(data.meta_features))
    assert set(FEATURE_GROUPS) <= {f.name for f in GBDTConfig.__dataclass_fields__.values()}


def test_default_data_are_unchanged_by_the_structure_switch(structured_dir):
    """Columns no structure touches are the default generator's, draw for draw."""
    plain = DataDir(structured_dir.parent / "plain").train_metadata()
    planted = DataDir(structured_dir).train_metadata()
    touched = set(SITE_OUTLIER_COLUMNS) | {"tbp_lv_deltaLBnorm", "tbp_lv_norm_border"}
    touched |= {"tbp_lv_norm_color", "target", "iddx_full", "iddx_1", "iddx_2", "iddx_3"}
    touched |= {"iddx_4", "iddx_5", "lesion_id", "mel_mitotic_index", "mel_thick_mm"}
    touched |= {"tbp_lv_dnn_lesion_confidence"}  # drawn after the labels
    same = [c for c in plain.columns if c not in touched]
    assert plain.select(same).equals(planted.select(same))
    assert not plain["tbp_lv_stdL"].equals(planted["tbp_lv_stdL"])


def test_site_outlier_shows_within_the_location_not_the_patient(structured_dir):
    truth = pl.read_csv(default_truth_path(structured_dir)).filter(pl.col("split") == "train")
    meta = DataDir(structured_dir).train_metadata().join(truth, on="isic_id")
    x = pl.col("tbp_lv_stdL").log()
    by_location = x - x.mean().over("patient_id", "tbp_lv_location")
    by_patient = x - x.mean().over("patient_id")
    table = meta.select(by_location.alias("loc"), by_patient.alias("pat"), "site_score")
    corr = {k: np.corrcoef(table[k], table["site_score"])[0, 1] for k in ("loc", "pat")}
    assert corr["loc"] > corr["pat"] + 0.1
    # the image part is one value per patient, and patients differ
    per_patient = truth.join(meta.select("isic_id", "patient_id"), on="isic_id")
    spread = per_patient.group_by("patient_id").agg(pl.col("image_patient_part").n_unique())
    assert (spread["image_patient_part"] == 1).all()
    assert per_patient["image_patient_part"].n_unique() == per_patient["patient_id"].n_unique()


def test_site_rates_raise_the_head_and_lower_the_legs(structured_dir):
    truth = pl.read_csv(default_truth_path(structured_dir)).filter(pl.col("split") == "train")
    meta = DataDir(structured_dir).train_metadata().join(truth, on="isic_id")
    rate = meta.group_by("anatom_site_general").agg(pl.col("site_rate").first())
    rates = dict(rate.iter_rows())
    assert rates["head/neck"] > rates["posterior torso"] > rates["lower extremity"]
    with pytest.raises(ValueError, match="unknown synthetic structure"):
        Structure.of(["site_outliers"])


def test_standins_carry_the_patient_part_and_the_ablation_sees_the_structures():
    truth = pl.DataFrame(
        {"isic_id": ["a", "b"], "prob": [0.5, 0.5], "image_patient_part": [1.0, -1.0]}
    )
    out = ablation.standin_image_oofs(truth, pl.Series(["a", "b"]), seed=0, noise={"m": 0.0})
    np.testing.assert_allclose(out["img_m"].to_numpy(), 1 / (1 + np.exp([-1.0, 1.0])), rtol=1e-5)
    assert ablation.data_structures(["isic_id", "prob", "site_score"]) == ["site_outlier"]
    assert ablation.data_structures(["isic_id", "prob"]) == []


def test_ablation_on_real_image_oofs_keeps_their_folds(synthetic_dir, image_oof_dir, tmp_path):
    """No truth file needed: the real image columns are used and their folds kept every seed."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train-metadata.csv", "train-image.hdf5"):
        (data / name).symlink_to(synthetic_dir / name)
    results, _ = ablation.ablation(
        data,
        seeds=(0, 1),
        candidates=("location_outliers", "blend_floor"),
        preset="demo",
        threads=1,
        member_names=("lgb_meta", "lgb"),
        gbdt_overrides={"rounds": {"lgb": {"n_estimators": 8}}},
        image_oof_dirs=[image_oof_dir],
        verbose=False,
    )
    rows = ["paper", "paper + location_outliers", "paper + blend_floor"]
    assert results["row"].unique(maintain_order=True).to_list()[:3] == rows
    assert results["pauc"].is_between(0.0, 0.2).all()
    inputs = ablation.load_inputs(data, ("location_outliers",), 1, [image_oof_dir])
    assert inputs.images == ["img_vit_tiny"] and inputs.folds is not None
    oof = pl.read_csv(image_oof_dir / "oof.csv").select("isic_id", "fold")
    joined = inputs.frame.select("isic_id").join(oof, on="isic_id", maintain_order="left")
    np.testing.assert_array_equal(inputs.folds, joined["fold"].to_numpy())
