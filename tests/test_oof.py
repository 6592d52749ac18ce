import polars as pl
import pytest

from utils.oof import OOFError, read_oof, write_oof


def _oof() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "isic_id": ["ISIC_3", "ISIC_1", "ISIC_2"],
            "patient_id": ["IP_1", "IP_1", "IP_2"],
            "fold": [0, 0, 1],
            "target": [0, 1, 0],
            "pred": [0.1, 0.9, 0.2],
        }
    )


def test_round_trip_sorted_by_id_with_stable_dtypes(tmp_path):
    path = write_oof(_oof(), tmp_path / "m" / "oof.csv")
    back = read_oof(path)
    assert back["isic_id"].to_list() == ["ISIC_1", "ISIC_2", "ISIC_3"]
    assert back.schema["fold"] == pl.Int8 and back.schema["pred"] == pl.Float64
    assert back.filter(pl.col("isic_id") == "ISIC_1")["pred"].item() == 0.9


def test_duplicate_ids_are_rejected(tmp_path):
    df = pl.concat([_oof(), _oof().head(1)])
    with pytest.raises(OOFError, match="duplicate.*ISIC_3"):
        write_oof(df, tmp_path / "oof.csv")


def test_nan_and_missing_predictions_are_rejected(tmp_path):
    nan = _oof().with_columns(pl.Series("pred", [0.1, float("nan"), 0.2]))
    with pytest.raises(OOFError, match="NaN.*ISIC_1"):
        write_oof(nan, tmp_path / "oof.csv")
    null = _oof().with_columns(pl.Series("pred", [0.1, None, 0.2]))
    with pytest.raises(OOFError, match="'pred' has 1 empty"):
        write_oof(null, tmp_path / "oof.csv")


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "oof.csv"
    _oof().drop("fold").write_csv(path)
    with pytest.raises(OOFError, match=r"oof.csv.*\['fold'\]"):
        read_oof(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        read_oof(tmp_path / "nothing.csv")
