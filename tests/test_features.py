"""Feature engineering: derived features by hand, patient context, nulls/NaN/inf, categoricals."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from standins import write_image_run

from utils.io import read_metadata
from utils.oof import write_oof
from utils.schema import CATEGORIES, NUMERIC_COLUMNS, TEST_COLUMNS, TRAIN_ONLY_COLUMNS, SchemaError
from utils.settings import resolve
from utils.tabular.features import (
    CONTEXT_FEATURES,
    DERIVED_FEATURES,
    EPS,
    NUMERIC_FEATURES,
    build_features,
    check_no_train_only,
    join_image_oofs,
)

PATIENTS = ["P1", "P1", "P1", "P2", "P3"]


def _five_rows() -> pl.DataFrame:
    """5 lesions (patients P1 x3, P2, P3) with distinct, readable numeric values."""
    rng = np.random.default_rng(0)
    data = {name: np.round(rng.uniform(0.5, 9.5, 5), 2) for name in NUMERIC_COLUMNS}
    data |= {
        "isic_id": [f"ISIC_{i}" for i in range(5)],
        "patient_id": PATIENTS,
        "sex": ["male", "female", None, "male", "female"],
        "anatom_site_general": ["head/neck", "head/neck", "lower extremity", None, "head/neck"],
        "tbp_tile_type": ["3D: XP"] * 5,
        "tbp_lv_location": ["Head & Neck"] * 5,
        "tbp_lv_location_simple": ["Head & Neck"] * 5,
        "attribution": ["ACEMID MIA"] * 5,
        "image_type": ["TBP tile: close-up"] * 5,
        "copyright_license": ["CC-BY"] * 5,
    }
    return pl.DataFrame(data).select(*TEST_COLUMNS).cast(TEST_COLUMNS)


def _reference(r: dict) -> dict[str, float]:
    """The published formulas, written out in plain Python for one row."""
    dist = math.sqrt(r["tbp_lv_x"] ** 2 + r["tbp_lv_y"] ** 2 + r["tbp_lv_z"] ** 2)
    nb, nc, sym = r["tbp_lv_norm_border"], r["tbp_lv_norm_color"], r["tbp_lv_symm_2axis"]
    da, db, dl = r["tbp_lv_deltaA"], r["tbp_lv_deltaB"], r["tbp_lv_deltaL"]
    area, perim, size, age = (
        r["tbp_lv_areaMM2"],
        r["tbp_lv_perimeterMM"],
        r["clin_size_long_diam_mm"],
        r["age_approx"],
    )
    return {
        "lesion_size_ratio": r["tbp_lv_minorAxisMM"] / size,
        "lesion_shape_index": area / perim**2,
        "hue_contrast": abs(r["tbp_lv_H"] - r["tbp_lv_Hext"]),
        "luminance_contrast": abs(r["tbp_lv_L"] - r["tbp_lv_Lext"]),
        "lesion_color_difference": math.sqrt(da**2 + db**2 + dl**2),
        "border_complexity": nb + sym,
        "color_uniformity": r["tbp_lv_color_std_mean"] / r["tbp_lv_radial_color_std_max"],
        "position_distance_3d": dist,
        "perimeter_to_area_ratio": perim / area,
        "area_to_perimeter_ratio": area / perim,
        "lesion_visibility_score": r["tbp_lv_deltaLBnorm"] + nc,
        "symmetry_border_consistency": sym * nb,
        "consistency_symmetry_border": sym * nb / (sym + nb),
        "color_consistency": r["tbp_lv_stdL"] / r["tbp_lv_Lext"],
        "consistency_color": r["tbp_lv_stdL"]
        * r["tbp_lv_Lext"]
        / (r["tbp_lv_stdL"] + r["tbp_lv_Lext"]),
        "size_age_interaction": size * age,
        "hue_color_std_interaction": r["tbp_lv_H"] * r["tbp_lv_color_std_mean"],
        "lesion_severity_index": (nb + nc + r["tbp_lv_eccentricity"]) / 3,
        "shape_complexity_index": nb + sym + area / perim**2,
        "color_contrast_index": da + db + dl + r["tbp_lv_deltaLBnorm"],
        "log_lesion_area": math.log(area + 1),
        "normalized_lesion_size": size / age,
        "mean_hue_difference": (r["tbp_lv_H"] + r["tbp_lv_Hext"]) / 2,
        "std_dev_contrast": math.sqrt((da**2 + db**2 + dl**2) / 3),
        "color_shape_composite_index": (
            r["tbp_lv_color_std_mean"] + r["tbp_lv_area_perim_ratio"] + sym
        )
        / 3,
        "lesion_orientation_3d": math.atan2(r["tbp_lv_y"], r["tbp_lv_x"]),
        # the reference's three that were missing (tabular-with-image-submission.ipynb)
        "overall_color_difference": (da + db + dl) / 3,
        "symmetry_perimeter_interaction": sym * perim,
        "comprehensive_lesion_index": (
            r["tbp_lv_area_perim_ratio"] + r["tbp_lv_eccentricity"] + nc + sym
        )
        / 4,
        "color_variance_ratio": r["tbp_lv_color_std_mean"] / r["tbp_lv_stdLExt"],
        "border_color_interaction": nb * nc,
        "border_color_interaction_2": nb * nc / (nb + nc),
        "size_color_contrast_ratio": size / r["tbp_lv_deltaLBnorm"],
        "age_normalized_nevi_confidence": r["tbp_lv_nevi_confidence"] / age,
        "age_normalized_nevi_confidence_2": math.sqrt(size**2 + age**2),
        "color_asymmetry_index": r["tbp_lv_radial_color_std_max"] * sym,
        "volume_approximation_3d": area * dist,
        "color_range": abs(r["tbp_lv_L"] - r["tbp_lv_Lext"])
        + abs(r["tbp_lv_A"] - r["tbp_lv_Aext"])
        + abs(r["tbp_lv_B"] - r["tbp_lv_Bext"]),
        "shape_color_consistency": r["tbp_lv_eccentricity"] * r["tbp_lv_color_std_mean"],
        "border_length_ratio": perim / (2 * math.pi * math.sqrt(area / math.pi)),
        "age_size_symmetry_index": age * size * sym,
        "index_age_size_symmetry": age * area * sym,
    }


def test_every_derived_feature_matches_the_hand_computed_value():
    df = _five_rows()
    feats, _ = build_features(df)
    for i, row in enumerate(df.iter_rows(named=True)):
        expected = _reference(row)
        assert set(expected) == set(DERIVED_FEATURES)
        for name, value in expected.items():
            assert feats[name][i] == pytest.approx(value, rel=1e-5), (name, i)


def test_feature_set_and_dtypes():
    feats, names = build_features(_five_rows())
    assert feats.columns[:2] == ["isic_id", "patient_id"]
    assert len(DERIVED_FEATURES) == 42  # the reference's list, no more, no less
    assert "overall_asymmetry" not in DERIVED_FEATURES  # not in the reference
    assert len(names) == len(set(names))
    assert all(feats[n].dtype == pl.Float32 for n in names)
    assert {f"{f}_patient_norm" for f in NUMERIC_FEATURES} <= set(names)
    assert not [n for n in names if n.endswith(("_site_norm", "_patient_pct"))]


def test_site_features_only_behind_their_switch():
    """Patient x site and within-patient percentiles are not in the reference: off in `paper`."""
    assert resolve("full", "paper").gbdt.site_features is False
    plain, names = build_features(_five_rows())
    feats, with_site = build_features(_five_rows(), site_features=True)
    added = {f"{f}{s}" for f in CONTEXT_FEATURES for s in ("_site_norm", "_patient_pct")}
    assert set(with_site) - set(names) == added
    assert feats.select(names).equals(plain.select(names))


def test_patient_normalisation_count_rank_and_single_lesion_patients():
    df = _five_rows()
    feats, _ = build_features(df, site_features=True)
    size = df["clin_size_long_diam_mm"].to_numpy()
    p1 = size[:3]
    expected = (p1 - p1.mean()) / (p1.std(ddof=1) + EPS)
    np.testing.assert_allclose(
        feats["clin_size_long_diam_mm_patient_norm"][:3], expected, rtol=1e-5
    )
    # P2 and P3 have one lesion: std is null, the lesion is its own typical lesion.
    assert feats["clin_size_long_diam_mm_patient_norm"][3:].to_list() == [0.0, 0.0]
    assert feats["clin_size_long_diam_mm_patient_pct"][3:].to_list() == [0.5, 0.5]
    ranks = p1.argsort().argsort() + 1
    np.testing.assert_allclose(feats["clin_size_long_diam_mm_patient_pct"][:3], (ranks - 0.5) / 3)
    assert feats["count_per_patient"].to_list() == [3, 3, 3, 1, 1]
    area = df["tbp_lv_areaMM2"].to_numpy()
    np.testing.assert_allclose(feats["patient_total_area"][:3], [area[:3].sum()] * 3, rtol=1e-6)
    np.testing.assert_allclose(
        feats["area_share_of_patient"][:3], area[:3] / area[:3].sum(), rtol=1e-5
    )


def test_site_normalisation_groups_by_patient_and_site():
    df = _five_rows()
    feats, _ = build_features(df, site_features=True)
    size = df["clin_size_long_diam_mm"].to_numpy()
    head = size[:2]  # P1's two head/neck lesions; its third is on the leg
    expected = (head - head.mean()) / (head.std(ddof=1) + EPS)
    np.testing.assert_allclose(feats["clin_size_long_diam_mm_site_norm"][:2], expected, rtol=1e-5)
    assert feats["clin_size_long_diam_mm_site_norm"][2] == 0.0


def test_nan_null_and_division_by_zero_become_null_never_inf():
    df = _five_rows().with_columns(
        pl.Series("tbp_lv_L", [float("nan"), 5.0, 7.0, 1.0, 2.0]),
        pl.Series("clin_size_long_diam_mm", [1.0, 0.0, 3.0, None, 4.0]),
        pl.Series("tbp_lv_x", [0.0, 1.0, float("inf"), 1.0, 1.0]),
    )
    feats, names = build_features(df, site_features=True)
    x = feats.select(names).to_numpy()
    assert not np.isinf(x).any()
    assert feats["tbp_lv_L"].null_count() == 1 and feats["tbp_lv_L"].is_nan().sum() == 0
    assert feats["lesion_size_ratio"][1] is None  # divided by clin_size 0
    assert feats["lesion_size_ratio"][3] is None  # clin_size null
    assert feats["tbp_lv_x"][2] is None
    # the NaN lesion is left out of P1's statistics: the other two normalise against each other
    assert feats["tbp_lv_L_patient_norm"][0] is None
    norm = feats["tbp_lv_L_patient_norm"][1:3].to_numpy()
    np.testing.assert_allclose(
        norm, [-1 / (math.sqrt(2) + EPS), 1 / (math.sqrt(2) + EPS)], rtol=1e-5
    )
    assert feats["tbp_lv_L_patient_pct"][1:3].to_list() == [0.25, 0.75]


def test_categoricals_fixed_lists_unseen_and_null():
    df = _five_rows().with_columns(
        pl.Series(
            "attribution", ["ACEMID MIA", "Some new hospital", None, "FNQH Cairns", "ACEMID MIA"]
        )
    )
    feats, names = build_features(df)
    onehot = [n for n in names if n.startswith("attribution__")]
    assert len(onehot) == len(CATEGORIES["attribution"]) + 1
    rows = feats.select(onehot).to_numpy()
    assert rows[0][onehot.index("attribution__acemid_mia")] == 1 and rows[0].sum() == 1
    assert rows[1][onehot.index("attribution__other")] == 1 and rows[1].sum() == 1
    assert rows[2].sum() == 0  # null: all zeros
    assert rows[3][onehot.index("attribution__fnqh_cairns")] == 1
    assert feats["sex__male"].to_list() == [1, 0, 0, 1, 0]


def test_no_train_only_column_reaches_the_features(fixtures_dir):
    train = read_metadata(fixtures_dir / "train-metadata-sample5.csv", "train")
    feats, names = build_features(train)
    assert not set(names) & set(TRAIN_ONLY_COLUMNS)
    assert not set(feats.columns) & set(TRAIN_ONLY_COLUMNS)
    bare, bare_names = build_features(train.drop(TRAIN_ONLY_COLUMNS))
    assert bare_names == names
    assert bare.equals(feats)
    with pytest.raises(ValueError, match="target"):
        check_no_train_only(["age_approx", "target"])


def test_train_and_test_files_give_the_same_features(fixtures_dir):
    _, train_names = build_features(
        read_metadata(fixtures_dir / "train-metadata-sample5.csv", "train")
    )
    test, test_names = build_features(read_metadata(fixtures_dir / "test-metadata.csv", "test"))
    assert test_names == train_names
    assert test.height == 3


def test_row_order_does_not_change_a_lesions_features():
    df = _five_rows()
    feats, names = build_features(df)
    shuffled, _ = build_features(df.reverse())
    assert shuffled.sort("isic_id").equals(feats.sort("isic_id"))


def test_missing_column_names_the_source():
    with pytest.raises(SchemaError, match=r"my\.csv.*tbp_lv_L"):
        build_features(_five_rows().drop("tbp_lv_L"), source="my.csv")


def _write_image_oof(root, name, frame, folds, pred, model="vit_tiny"):
    oof = frame.select("isic_id", "patient_id").with_columns(
        fold=pl.Series(folds), target=pl.lit(0), pred=pl.Series(pred)
    )
    return write_image_run(root / name, oof, model_name=model)


def test_join_image_oofs_by_id_and_checks_folds(tmp_path):
    frame, _ = build_features(_five_rows())
    folds = np.array([0, 0, 0, 1, 2])
    frame = frame.with_columns(fold=pl.Series(folds, dtype=pl.Int8))
    pred = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    good = _write_image_oof(tmp_path, "run_a", frame.reverse(), folds[::-1], pred[::-1])
    joined, sources = join_image_oofs(frame, [good])
    assert list(sources) == ["img_vit_tiny"]  # named after the recorded model, not the folder
    recorded = json.loads((good / "config.json").read_text())["config_hash"]
    assert sources["img_vit_tiny"]["config_hash"] == recorded
    np.testing.assert_allclose(joined["img_vit_tiny"], pred, rtol=1e-6)
    assert joined["isic_id"].to_list() == frame["isic_id"].to_list()
    twin = _write_image_oof(tmp_path, "run_b", frame, folds, pred)
    with pytest.raises(ValueError, match="two image models are named 'img_vit_tiny'"):
        join_image_oofs(frame, [good, twin])
    bare = tmp_path / "bare"
    write_oof(pl.read_csv(good / "oof.csv"), bare / "oof.csv")
    with pytest.raises(FileNotFoundError, match="config.json of its run"):
        join_image_oofs(frame, [bare])

    other = _write_image_oof(tmp_path, "other_folds", frame, [1, 0, 0, 1, 2], pred)
    with pytest.raises(ValueError, match="folds disagree"):
        join_image_oofs(frame, [other])
    short = _write_image_oof(tmp_path, "short", frame.head(4), folds[:4], pred[:4])
    with pytest.raises(ValueError, match="missing"):
        join_image_oofs(frame, [short])
    with pytest.raises(FileNotFoundError):
        join_image_oofs(frame, [tmp_path / "nowhere"])
