"""The reference's CV filter rule (utils.labels.reference_filtered)."""

import polars as pl
import pytest

from utils.io import read_metadata
from utils.labels import reference_filtered, suspicious_label


def test_reference_filter_each_rule():
    """target 0 and (Indeterminate or any iddx_2): filtered; a malignant lesion never is."""
    df = pl.DataFrame(
        {
            "target": [0, 1, 0, 0, 0, 0, 1],
            "iddx_1": ["Benign", "Malignant", "Indeterminate", "Benign", None, "Benign", "x"],
            "iddx_2": [None, "x", None, "Benign melanocytic proliferations", None, "", None],
        }
    )
    assert reference_filtered(df).to_list() == [False, False, True, True, False, False, False]
    assert reference_filtered(df).dtype == pl.Boolean
    # the filtered rows are exactly the suspicious label's extra positives
    extra = (suspicious_label(df) == 1) & (df["target"] == 0) & (df["iddx_2"] != "").fill_null(True)
    assert reference_filtered(df).to_list() == extra.to_list()
    with pytest.raises(KeyError, match="iddx_1"):
        reference_filtered(df.drop("iddx_1"))
    with pytest.raises(ValueError, match="no target"):
        reference_filtered(df.with_columns(pl.lit(None, pl.Int64).alias("target")))


def test_reference_filter_on_real_rows(fixtures_dir):
    meta = read_metadata(fixtures_dir / "train-metadata-sample5.csv", "train")
    expected = [
        t == 0 and (i1 == "Indeterminate" or i2 is not None)
        for t, i1, i2 in meta.select("target", "iddx_1", "iddx_2").rows()
    ]
    assert reference_filtered(meta).to_list() == expected
