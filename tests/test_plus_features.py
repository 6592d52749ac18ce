"""The `plus` candidate features (tabular.plus_features) and the ablation (bench.ablation)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.neighbors import LocalOutlierFactor

from bench import ablation
from utils.synthetic import default_truth_path
from utils.tabular.plus_features import (
    LOF_NEUTRAL,
    UGLY_DUCKLING_DESCRIPTORS,
    patient_image_feature_names,
    patient_image_features,
    ugly_duckling_feature_names,
    ugly_duckling_features,
)

IMAGES = ["img_a", "img_b"]


def image_frame() -> pl.DataFrame:
    """Patient p: three lesions; q: one lesion; r: one lesion with a missing score."""
    return pl.DataFrame(
        {
            "isic_id": ["a", "b", "c", "d", "e"],
            "patient_id": ["p", "p", "p", "q", "r"],
            "target": [0, 1, 0, 0, 1],
            "img_a": [0.1, 0.2, 0.3, 0.5, None],
            "img_b": [0.3, 0.2, 0.1, 0.5, 0.2],
        }
    )


def column(frame: pl.DataFrame, name: str) -> list:
    return [None if v is None else round(v, 5) for v in frame[name].to_list()]


def test_patient_image_values_by_hand():
    out = patient_image_features(image_frame(), IMAGES)
    # patient p's img_a: mean 0.2, std (ddof 1) 0.1
    assert column(out, "img_a_patient_z") == [-1.0, 0.0, 1.0, 0.0, None]
    assert column(out, "img_a_patient_ratio") == [0.5, 1.0, 1.5, 1.0, None]
    assert column(out, "img_a_patient_rank") == [0.0, 0.5, 1.0, 0.5, None]
    assert column(out, "img_b_patient_rank") == [1.0, 0.5, 0.0, 0.5, 0.5]
    assert column(out, "image_row_mean") == [0.2, 0.2, 0.2, 0.5, None]
    assert column(out, "image_row_std") == [0.1, 0.0, 0.1, 0.0, None]
    assert column(out, "image_row_min") == [0.1, 0.2, 0.1, 0.5, None]
    assert column(out, "image_row_max") == [0.3, 0.2, 0.3, 0.5, None]
    names = patient_image_feature_names(IMAGES)
    assert out.columns == image_frame().columns + names
    assert all(out[n].dtype == pl.Float32 for n in names)


def test_patient_image_ties_constant_and_zero_mean():
    frame = pl.DataFrame(
        {"patient_id": ["p"] * 4 + ["z"] * 2, "img_a": [0.4, 0.4, 0.4, 0.9, 0.0, 0.0]}
    )
    out = patient_image_features(frame, ["img_a"])
    assert column(out, "img_a_patient_rank") == [0.33333] * 3 + [1.0, 0.5, 0.5]
    # a constant patient: std 0 gives z 0; mean 0 gives a null ratio (never inf)
    assert column(out, "img_a_patient_z")[4:] == [0.0, 0.0]
    assert column(out, "img_a_patient_ratio")[4:] == [None, None]


def test_patient_image_features_use_no_label():
    frame = image_frame()
    shuffled = frame.with_columns(pl.col("target").shuffle(seed=3) * 5)
    names = patient_image_feature_names(IMAGES)
    reference = patient_image_features(frame, IMAGES).select(names)
    assert patient_image_features(shuffled, IMAGES).select(names).equals(reference)
    assert patient_image_features(frame.drop("target"), IMAGES).select(names).equals(reference)


def test_patient_image_features_depend_only_on_the_patients_rows():
    """Test patients are scored with the test rows alone: a subset gives the same rows."""
    rng = np.random.default_rng(0)
    frame = pl.DataFrame(
        {
            "patient_id": rng.choice(["p", "q", "r", "s"], 200),
            "img_a": rng.random(200),
            "img_b": rng.random(200),
        }
    )
    whole = patient_image_features(frame, IMAGES)
    part = patient_image_features(frame.filter(pl.col("patient_id").is_in(["q", "s"])), IMAGES)
    assert part.equals(whole.filter(pl.col("patient_id").is_in(["q", "s"])))


def test_patient_image_names_a_missing_column():
    with pytest.raises(KeyError, match="img_c"):
        patient_image_features(image_frame(), ["img_a", "img_c"])


def outlier_frame(seed: int = 0) -> pl.DataFrame:
    """Patients p (40 lesions), q (25) and r (5, fewer than n_neighbors + 1), two locations."""
    rng = np.random.default_rng(seed)
    n = 70
    values = {d: rng.normal(10.0, 2.0, n) for d in UGLY_DUCKLING_DESCRIPTORS}
    values["tbp_lv_L"][0] = np.nan
    return pl.DataFrame(
        {
            "isic_id": [f"ISIC_{i:07d}" for i in range(n)],
            "patient_id": ["p"] * 40 + ["q"] * 25 + ["r"] * 5,
            "tbp_lv_location": rng.choice(["Left Arm", "Torso", None], n).tolist(),
            "target": (rng.random(n) < 0.2).astype(int),
            **values,
        }
    )


def test_location_absz_and_outlier_count_by_hand():
    n = len(UGLY_DUCKLING_DESCRIPTORS)
    base: dict[str, list] = {d: [1.0] * 12 for d in UGLY_DUCKLING_DESCRIPTORS}
    size = "clin_size_long_diam_mm"
    base[size] = [1.0, 2.0, 3.0] + [0.0] * 9  # lesions 0-2 share a location
    base["tbp_lv_L"] = [0.0] * 11 + [100.0]  # lesion 11: far out among the 10 at "Torso"
    base["tbp_lv_H"] = [0.0] * 11 + [None]
    frame = pl.DataFrame(
        {
            "isic_id": [f"i{k:02d}" for k in range(12)],
            "patient_id": ["p"] * 12,
            "tbp_lv_location": ["Arm"] * 3 + ["Torso"] * 9,
            **base,
        }
    )
    out = ugly_duckling_features(frame, n_neighbors=3, n_jobs=1)
    # Arm: mean 2, std 1 -> |z| 1, 0, 1; Torso: constant 0 -> 0
    assert column(out, f"{size}_loc_absz") == [1.0, 0.0, 1.0] + [0.0] * 9
    # Torso L: eight 0s and one 100: mean 100/9, std 100/3 -> the outlier has |z| = 8/3
    assert column(out, "tbp_lv_L_loc_absz")[11] == round(8 / 3, 5)
    assert column(out, "tbp_lv_H_loc_absz")[11] is None
    assert column(out, "ud_loc_outlier_count") == [0.0] * 11 + [1.0]
    assert out.columns == ["isic_id", *ugly_duckling_feature_names()]
    assert n + 2 == len(ugly_duckling_feature_names())


def test_lof_matches_sklearn_on_the_patients_standardised_rows():
    frame = outlier_frame()
    out = ugly_duckling_features(frame, n_neighbors=5, n_jobs=1)
    p = frame.filter(pl.col("patient_id") == "p").select(UGLY_DUCKLING_DESCRIPTORS).to_numpy()
    p[np.isnan(p[:, 7]), 7] = np.nanmedian(p[:, 7])  # tbp_lv_L: the patient's median
    z = (p - p.mean(axis=0)) / p.std(axis=0, ddof=1)
    expected = -LocalOutlierFactor(n_neighbors=5).fit(z).negative_outlier_factor_
    np.testing.assert_allclose(out["ud_lof"].to_numpy()[:40], expected, rtol=1e-5)
    # r has 5 lesions, fewer than n_neighbors + 1: the neutral value
    assert out["ud_lof"].to_list()[-5:] == [LOF_NEUTRAL] * 5


def test_ugly_duckling_is_label_free_order_free_and_pool_free():
    frame = outlier_frame()
    reference = ugly_duckling_features(frame, n_neighbors=5, n_jobs=1)
    shuffled = frame.with_columns(pl.col("target").shuffle(seed=1))
    assert ugly_duckling_features(shuffled, n_neighbors=5, n_jobs=1).equals(reference)
    assert ugly_duckling_features(frame.drop("target"), n_neighbors=5, n_jobs=1).equals(reference)
    permuted = frame.sample(fraction=1.0, shuffle=True, seed=2)
    pooled = ugly_duckling_features(permuted, n_neighbors=5, n_jobs=2)
    assert pooled["isic_id"].equals(permuted["isic_id"])
    assert pooled.sort("isic_id").equals(reference.sort("isic_id"))


def test_ugly_duckling_depends_only_on_the_patients_rows():
    frame = outlier_frame()
    whole = ugly_duckling_features(frame, n_neighbors=5, n_jobs=1)
    part = ugly_duckling_features(frame.filter(pl.col("patient_id") == "q"), n_neighbors=5)
    assert part.equals(whole.slice(40, 25))


def test_ugly_duckling_names_a_missing_column():
    with pytest.raises(KeyError, match="tbp_lv_location"):
        ugly_duckling_features(outlier_frame().drop("tbp_lv_location"))


def test_standin_image_oofs_are_monotone_in_the_true_probability():
    truth = pl.DataFrame({"isic_id": ["a", "b", "c"], "prob": [0.01, 0.5, 0.2]})
    ids = pl.Series(["c", "a", "b"])
    exact = ablation.standin_image_oofs(truth, ids, seed=0, noise={"m": 0.0})
    assert exact["isic_id"].to_list() == ["c", "a", "b"]
    np.testing.assert_allclose(exact["img_m"].to_numpy(), [0.2, 0.01, 0.5], rtol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        ablation.standin_image_oofs(truth, pl.Series(["a", "x"]), seed=0)


def test_ablation_runs_every_row_at_tiny_size(synthetic_dir, capsys):
    assert default_truth_path(synthetic_dir).is_file()
    results, kept = ablation.ablation(
        synthetic_dir,
        seeds=(0, 1),
        bag_seeds=2,
        preset="demo",
        threads=1,
        member_names=("lgb_meta", "lgb"),
        gbdt_overrides={"rounds": {"lgb": {"n_estimators": 8}}},
    )
    table = ablation.summarise(results)
    expected = [name for name, _ in ablation.row_plan(ablation.CANDIDATES)]
    assert table["row"].to_list()[: len(expected)] == expected
    assert kept == ablation.kept_candidates(table.head(len(expected)))
    if kept:  # phase 2: the kept candidates together, every seed
        assert table["row"].to_list()[-1] == ablation.plus_row_name(kept)
        assert table["seeds"][-1] == 2
    assert table["pauc_mean"].is_between(0.0, 0.2).all()
    assert table.filter(pl.col("row") == "paper")["gain_mean"].item() == 0.0
    assert "stand-in image OOF pAUC alone" in capsys.readouterr().out


def test_the_keep_rule_needs_gain_above_its_spread_and_one_blend():
    summary = pl.DataFrame(
        {
            "row": [
                "paper",
                "paper + ugly_duckling",
                "paper + site_features",
                "paper + patient_image",
                "paper + blend",
                "paper + rank_blend",
            ],
            "gain_mean": [0.0, 0.004, 0.003, -0.001, 0.002, 0.001],
            "gain_std": [0.0, 0.001, 0.005, 0.0001, 0.001, 0.0005],
        }
    )
    # site_features: gain below its spread; patient_image: a loss; rank_blend: the weaker blend
    assert ablation.kept_candidates(summary) == ["ugly_duckling", "blend"]
    assert ablation.plus_row_name([]) == "plus (kept: none)"
