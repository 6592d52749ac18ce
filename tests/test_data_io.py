import h5py
import numpy as np
import polars as pl
import pytest

from utils.io import DataDir, HDF5Images, ImageReadError, decode_jpeg, read_metadata
from utils.schema import (
    CATEGORIES,
    TEST_COLUMNS,
    TRAIN_COLUMNS,
    TRAIN_ONLY_COLUMNS,
    SchemaError,
)


def test_schema_sizes_match_the_competition():
    assert len(TRAIN_COLUMNS) == 55 and len(TEST_COLUMNS) == 44 and len(TRAIN_ONLY_COLUMNS) == 11
    assert set(TRAIN_COLUMNS) == set(TEST_COLUMNS) | set(TRAIN_ONLY_COLUMNS)


def test_real_files_load_in_file_order_with_stable_dtypes(fixtures_dir):
    train = read_metadata(fixtures_dir / "train-metadata-sample5.csv", "train")
    test = read_metadata(fixtures_dir / "test-metadata.csv", "test")
    assert train.columns == list(TRAIN_COLUMNS) and test.columns == list(TEST_COLUMNS)
    # age_approx is written as int in the test file and float in train: both read as Float64.
    assert train.schema["age_approx"] == test.schema["age_approx"] == pl.Float64
    assert train["target"].to_list() == [1, 0, 1, 1, 0]
    assert train["iddx_4"].null_count() == 4 and train["mel_thick_mm"].null_count() == 5
    for col, values in CATEGORIES.items():
        seen = set(train[col].drop_nulls()) | set(test[col].drop_nulls())
        assert seen <= set(values), col


def test_real_images_decode(fixtures_dir):
    for meta, images in [
        ("train-metadata-sample5.csv", "train-image-sample5.hdf5"),
        ("test-metadata.csv", "test-image.hdf5"),
    ]:
        ids = pl.read_csv(fixtures_dir / meta)["isic_id"].to_list()
        store = HDF5Images(fixtures_dir / images)
        assert sorted(store) == sorted(ids)
        for isic_id in ids:
            rgb = store.read(isic_id)
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            assert min(rgb.shape[:2]) > 50


def _write(tmp_path, df: pl.DataFrame, name="meta.csv"):
    path = tmp_path / name
    df.write_csv(path)
    return path


def test_missing_and_unexpected_columns_name_the_file(fixtures_dir, tmp_path):
    test = pl.read_csv(fixtures_dir / "test-metadata.csv")
    path = _write(tmp_path, test.drop("tbp_lv_H"))
    with pytest.raises(SchemaError, match=r"meta.csv.*missing column\(s\) \['tbp_lv_H'\]"):
        read_metadata(path, "test")
    path = _write(tmp_path, test.with_columns(pl.lit(1).alias("surprise")))
    with pytest.raises(SchemaError, match=r"unexpected column\(s\) \['surprise'\]"):
        read_metadata(path, "test")
    with pytest.raises(SchemaError, match="missing column"):
        read_metadata(fixtures_dir / "test-metadata.csv", "train")


def test_duplicate_ids_bad_target_and_bad_numbers_are_named(fixtures_dir, tmp_path):
    train = pl.read_csv(fixtures_dir / "train-metadata-sample5.csv", infer_schema=False)
    path = _write(tmp_path, pl.concat([train, train.head(1)]))
    with pytest.raises(SchemaError, match="duplicate isic_id.*ISIC_0082829"):
        read_metadata(path, "train")
    path = _write(tmp_path, train.with_columns(pl.lit("2").alias("target")))
    with pytest.raises(SchemaError, match="'target' must be 0 or 1"):
        read_metadata(path, "train")
    path = _write(tmp_path, train.with_columns(pl.lit("big").alias("tbp_lv_A")))
    with pytest.raises(SchemaError, match="meta.csv"):
        read_metadata(path, "train")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        read_metadata(tmp_path / "absent.csv", "test")


def test_missing_key_and_corrupt_jpeg_name_the_id(fixtures_dir, tmp_path):
    path = tmp_path / "images.hdf5"
    good = HDF5Images(fixtures_dir / "test-image.hdf5").read_bytes("ISIC_0015657").tobytes()
    with h5py.File(path, "w") as h5:
        h5.create_dataset("ISIC_good", data=np.bytes_(good))
        h5.create_dataset("ISIC_broken", data=np.bytes_(b"\xff\xd8 not a jpeg"))
    store = HDF5Images(path)
    assert store.read("ISIC_good").shape == (141, 141, 3)
    with pytest.raises(ImageReadError, match="ISIC_broken.*not a decodable JPEG") as err:
        store.read("ISIC_broken")
    assert err.value.isic_id == "ISIC_broken"
    with pytest.raises(ImageReadError, match="ISIC_absent.*missing"):
        store.read("ISIC_absent")
    with pytest.raises(ImageReadError, match="empty"):
        decode_jpeg(b"", "empty")


def test_hdf5_reader_pickles_without_its_handle(fixtures_dir):
    import pickle

    store = HDF5Images(fixtures_dir / "test-image.hdf5")
    store.read("ISIC_0015657")
    clone = pickle.loads(pickle.dumps(store))
    assert clone._file is None
    assert clone.read("ISIC_0015657").shape == store.read("ISIC_0015657").shape


def test_data_dir_reads_the_synthetic_layout(synthetic_dir):
    data = DataDir(synthetic_dir)
    train, test = data.train_metadata(), data.test_metadata()
    assert len(data.train_images()) == train.height
    assert len(data.test_images()) == test.height
    with pytest.raises(FileNotFoundError, match="data dir"):
        DataDir(synthetic_dir / "nope")


def test_contiguous_and_chunked_layouts_read_the_same_bytes(fixtures_dir, tmp_path):
    good = HDF5Images(fixtures_dir / "test-image.hdf5").read_bytes("ISIC_0015657").tobytes()
    path = tmp_path / "mixed.hdf5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("ISIC_plain", data=np.bytes_(good))
        h5.create_dataset("ISIC_gzip", data=np.frombuffer(good, np.uint8), compression="gzip")
    store = HDF5Images(path)
    assert store.read_bytes("ISIC_plain").tobytes() == good
    assert store.read_bytes("ISIC_gzip").tobytes() == good
    assert store._extents["ISIC_plain"] is not None and store._extents["ISIC_gzip"] is None
    assert np.array_equal(store.read("ISIC_plain"), store.read("ISIC_gzip"))
    store.close()
    assert store.read("ISIC_plain").shape == (141, 141, 3)  # reopens after close


def test_index_finds_absent_ids_and_its_extents_reach_forked_and_pickled_copies(fixtures_dir):
    import pickle

    store = HDF5Images(fixtures_dir / "test-image.hdf5")
    ids = ["ISIC_0015657", "ISIC_absent", "ISIC_0015740"]
    assert store.index(ids) == ["ISIC_absent"]
    assert set(store._extents) == {"ISIC_0015657", "ISIC_0015740"}
    clone = pickle.loads(pickle.dumps(store))
    assert clone._extents == store._extents and clone._file is None
    store._pid = -1  # as in a forked worker: new handles, same extents
    assert store.read("ISIC_0015740").shape == (119, 119, 3)
    assert "ISIC_0015740" in store._extents
