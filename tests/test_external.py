import polars as pl
import pytest

from utils.external import (
    EXTERNAL_IMAGES,
    EXTERNAL_METADATA,
    load_ham10000,
    load_ph2,
    write_layout,
)
from utils.folds import with_folds
from utils.io import HDF5Images


def test_ph2_adapter_on_the_real_data(shared_data, tmp_path):
    ds = load_ph2(shared_data / "ph2")
    frame = ds.frame
    assert frame.height == 200 and frame["target"].sum() == 40
    assert frame["isic_id"].n_unique() == 200 and len(ds.image_paths) == 200
    mel = frame.filter(pl.col("target") == 1)
    # blue-whitish veil is far more common in melanoma than in nevi (PH2's own annotations)
    assert (
        mel["blue_whitish_veil"].mean()
        > frame.filter(pl.col("target") == 0)["blue_whitish_veil"].mean()
    )
    assert frame["n_colours"].min() >= 1
    out = write_layout(ds, tmp_path / "ph2")
    meta = pl.read_csv(out / EXTERNAL_METADATA)
    images = HDF5Images(out / EXTERNAL_IMAGES)
    assert meta["isic_id"].to_list() == frame["isic_id"].to_list()
    rgb = images.read("IMD002")
    assert rgb.shape[2] == 3 and max(rgb.shape[:2]) == 512


def test_ham10000_adapter_groups_by_lesion(shared_data):
    ds = load_ham10000(shared_data / "ham10000" / "HAM10000_metadata.csv")
    frame = ds.frame
    assert frame.height == 10015 and frame["target"].sum() == 1113
    assert frame["sex"].null_count() == 57 and frame["age"].null_count() == 57
    assert ds.image_paths == {}  # the shared copy has no images: metadata only
    folds = with_folds(frame)
    per_lesion = folds.group_by("patient_id").agg(pl.col("fold").n_unique())
    assert per_lesion["fold"].max() == 1


def test_ham10000_images_are_found_anywhere_under_the_folder(shared_data, tmp_path, fixtures_dir):
    from utils.io import HDF5Images

    rows = pl.read_csv(shared_data / "ham10000" / "HAM10000_metadata.csv").head(3)
    csv = tmp_path / "meta.csv"
    rows.write_csv(csv)
    jpeg = HDF5Images(fixtures_dir / "test-image.hdf5").read_bytes("ISIC_0015657").tobytes()
    (tmp_path / "part_2").mkdir()
    for i, image_id in enumerate(rows["image_id"]):
        folder = tmp_path / ("part_2" if i else "")
        (folder / f"{image_id}.jpg").write_bytes(jpeg)
    ds = load_ham10000(csv, tmp_path)
    assert len(ds.image_paths) == 3
    (tmp_path / f"{rows['image_id'][0]}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"1 of 3.*{rows['image_id'][0]}"):
        load_ham10000(csv, tmp_path)


def test_bad_external_inputs_are_named(tmp_path):
    ph2 = tmp_path / "ph2"
    ph2.mkdir()
    with pytest.raises(FileNotFoundError, match="ph2_labels.csv"):
        load_ph2(ph2)
    pl.DataFrame({"image_name": ["IMD1"], "clinical_diagnosis": ["melanoma"]}).write_csv(
        ph2 / "ph2_labels.csv"
    )
    with pytest.raises(ValueError, match="missing column.*asymmetry"):
        load_ph2(ph2)
    ham = tmp_path / "ham.csv"
    pl.DataFrame(
        {
            "lesion_id": ["L1"],
            "image_id": ["I1"],
            "dx": ["melanoma?"],
            "age": ["50"],
            "sex": ["male"],
            "localization": ["back"],
        }
    ).write_csv(ham)
    with pytest.raises(ValueError, match="'dx' has unknown value.*I1"):
        load_ham10000(ham)
