import numpy as np
import polars as pl
import pytest

from utils.folds import assign_folds, check_folds_agree, with_folds


def _frame(seed: int = 0, rows: int = 3000, patients: int = 120) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    pid = rng.integers(0, patients, rows)
    return pl.DataFrame(
        {
            "isic_id": [f"ISIC_{i:07d}" for i in range(rows)],
            "patient_id": [f"IP_{p:07d}" for p in pid],
            "target": (rng.random(rows) < 0.02).astype(np.int8),
        }
    )


def test_no_patient_in_two_folds_and_every_fold_has_positives():
    df = with_folds(_frame())
    per_patient = df.group_by("patient_id").agg(pl.col("fold").n_unique())
    assert per_patient["fold"].max() == 1
    positives = df.filter(pl.col("target") == 1).group_by("fold").len()
    assert sorted(positives["fold"].to_list()) == [0, 1, 2, 3, 4]


def test_same_seed_same_folds_other_seed_other_folds():
    df = _frame()
    assert np.array_equal(assign_folds(df, seed=3), assign_folds(df, seed=3))
    assert not np.array_equal(assign_folds(df, seed=3), assign_folds(df, seed=4))


def test_row_order_does_not_change_a_rows_fold():
    df = with_folds(_frame())
    shuffled = with_folds(df.drop("fold").sample(fraction=1.0, shuffle=True, seed=1))
    check_folds_agree(df, shuffled, "shuffled copy")


def test_too_few_positive_patients_is_a_clear_error():
    df = _frame().with_columns(pl.lit(0, dtype=pl.Int8).alias("target"))
    with pytest.raises(ValueError, match="patient"):
        assign_folds(df)


def test_missing_column_is_named():
    with pytest.raises(KeyError, match="patient_id"):
        assign_folds(_frame().drop("patient_id"))


def test_check_folds_agree_names_the_disagreement():
    df = with_folds(_frame())
    other = df.with_columns(
        pl.when(pl.col("isic_id") == "ISIC_0000000")
        .then((pl.col("fold") + 1) % 5)
        .otherwise(pl.col("fold"))
        .alias("fold")
    )
    with pytest.raises(ValueError, match="disagree.*ISIC_0000000"):
        check_folds_agree(df, other, "image OOF")
    with pytest.raises(ValueError, match="missing"):
        check_folds_agree(df, df.slice(1), "image OOF")
