import numpy as np
import polars as pl
import pytest

from utils import synthetic, synthetic_images
from utils.io import DataDir, read_metadata
from utils.metric import pauc
from utils.schema import CATEGORIES, TEST_COLUMNS, TRAIN_COLUMNS
from utils.synthetic import default_truth_path, generate


def test_layout_and_schema_match_the_real_files(synthetic_dir, fixtures_dir):
    names = {p.name for p in synthetic_dir.iterdir()}
    assert names == {
        "train-metadata.csv",
        "train-image.hdf5",
        "test-metadata.csv",
        "test-image.hdf5",
        "sample_submission.csv",
    }
    real_train = read_metadata(fixtures_dir / "train-metadata-sample5.csv", "train")
    data = DataDir(synthetic_dir)
    train, test = data.train_metadata(), data.test_metadata()
    assert train.columns == real_train.columns == list(TRAIN_COLUMNS)
    assert train.schema == real_train.schema
    assert test.columns == list(TEST_COLUMNS)
    submission = pl.read_csv(synthetic_dir / "sample_submission.csv")
    assert submission.columns == pl.read_csv(fixtures_dir / "sample_submission.csv").columns
    assert submission["isic_id"].to_list() == test["isic_id"].to_list()


def test_values_look_like_the_real_data(synthetic_dir):
    train = DataDir(synthetic_dir).train_metadata()
    for col, values in CATEGORIES.items():
        assert set(train[col].drop_nulls()) <= set(values), col
    assert train["clin_size_long_diam_mm"].is_between(1.0, 28.4).all()
    assert train["tbp_lv_eccentricity"].is_between(0, 1).all()
    assert (train["tbp_lv_areaMM2"] > 0).all()
    # delta columns are lesion minus surrounding skin, as in the real data
    diff = (train["tbp_lv_A"] - train["tbp_lv_Aext"] - train["tbp_lv_deltaA"]).abs()
    assert diff.max() < 1e-9
    # nulls where the real data has them, and nowhere in lesion measurements
    assert train["iddx_1"].null_count() == 0 and train["tbp_lv_H"].null_count() == 0
    unknown = train.filter(pl.col("anatom_site_general").is_null())
    assert (unknown["tbp_lv_location"] == "Unknown").all()
    # missing values are empty cells, never the text "NaN"
    assert "NaN" not in (synthetic_dir / "train-metadata.csv").read_text()
    assert train["anatom_site_general"].null_count() > 0
    counts = train.group_by("patient_id").len()["len"]
    assert counts.max() > 5 * counts.median()


def test_train_only_columns_follow_the_label(synthetic_dir):
    train = DataDir(synthetic_dir).train_metadata()
    pos = train.filter(pl.col("target") == 1)
    neg = train.filter(pl.col("target") == 0)
    assert (pos["iddx_1"] == "Malignant").all() and pos["lesion_id"].null_count() == 0
    assert (neg["iddx_1"] != "Malignant").all()
    assert neg["mel_thick_mm"].null_count() == neg.height
    full = train["iddx_full"].str.split("::").list.first()
    assert (full == train["iddx_1"]).all()


def test_test_patients_are_disjoint_and_ids_unique(synthetic_dir):
    data = DataDir(synthetic_dir)
    train, test = data.train_metadata(), data.test_metadata()
    assert not set(train["patient_id"]) & set(test["patient_id"])
    assert not set(train["isic_id"]) & set(test["isic_id"])


def test_images_decode_and_show_the_lesion_size(synthetic_dir):
    data = DataDir(synthetic_dir)
    train = data.train_metadata().sort("clin_size_long_diam_mm")
    images = data.train_images()

    def dark_fraction(isic_id: str) -> float:
        rgb = images.read(isic_id).astype(float)
        grey = rgb.mean(axis=2)
        return float((grey < grey.max() - 25).mean())

    small = np.mean([dark_fraction(i) for i in train["isic_id"].head(40)])
    large = np.mean([dark_fraction(i) for i in train["isic_id"].tail(40)])
    assert large > 2 * small


def test_truth_file_lies_outside_and_holds_a_learnable_signal(synthetic_dir):
    truth = pl.read_csv(default_truth_path(synthetic_dir))
    train = truth.filter(pl.col("split") == "train")
    assert train.height == 1500
    assert pauc(train["target"], train["prob"]) > 0.08
    # each planted part alone ranks positives above random (0.02)
    for part in ("meta_score", "context_score", "image_score"):
        assert pauc(train["target"], train[part]) > 0.03, part


def test_same_seed_same_data_with_one_or_two_workers(tmp_path, monkeypatch):
    pools = []
    real = synthetic_images.get_context

    def recording(method):
        pools.append(method)
        return real(method)

    monkeypatch.setattr(synthetic_images, "get_context", recording)
    rows = 2 * synthetic_images.MIN_IMAGES_PER_WORKER  # enough train images for two workers
    sizes = dict(rows=rows, patients=40, seed=3, image_size=32, positive_rate=0.01)
    a = generate(tmp_path / "a", workers=1, **sizes)
    assert pools == []
    b = generate(tmp_path / "b", workers=2, **sizes)
    # train images by a pool of two spawned workers (a fork beside the pipeline's heartbeat thread
    # once hung for good); the 80 test images stay in this process
    assert pools == ["spawn"]
    for name in ("train-metadata.csv", "test-metadata.csv"):
        assert (a.out_dir / name).read_bytes() == (b.out_dir / name).read_bytes()
    ia, ib = DataDir(a.out_dir).train_images(), DataDir(b.out_dir).train_images()
    assert sorted(ia) == sorted(ib)
    assert all(np.array_equal(ia.read_bytes(i), ib.read_bytes(i)) for i in sorted(ia))


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="positive_rate"):
        generate(tmp_path / "x", rows=100, positive_rate=0.0)
    with pytest.raises(ValueError, match="outside the data dir"):
        generate(tmp_path / "y", rows=100, truth_path=tmp_path / "y" / "truth.csv")


def test_fewer_positive_patients_than_folds_warns_or_is_refused(tmp_path, capsys):
    """The issue's case: 600 rows at the defaults give 2 patients and hardly any positive."""
    with pytest.warns(synthetic.FewPositivesWarning, match="fewer than the 5 cross-validation"):
        summary = generate(tmp_path / "lib", rows=300, seed=1, image_size=32, workers=1)
    assert summary.positive_patients < 5
    with pytest.raises(ValueError, match="Raise --rows, --patients or --positive-rate"):
        generate(tmp_path / "strict", rows=300, image_size=32, require_positive_patients=5)
    assert not (tmp_path / "strict").exists() and not (tmp_path / "strict-truth.csv").exists()

    argv = ["--out", str(tmp_path / "cli"), "--rows", "600", "--image-size", "32"]
    assert synthetic.main(argv) == 2
    assert "2 train patient(s)" in capsys.readouterr().err and not (tmp_path / "cli").exists()
    with pytest.warns(synthetic.FewPositivesWarning):
        assert synthetic.main([*argv, "--workers", "1", "--allow-few-positives"]) == 0
    assert (tmp_path / "cli" / "train-metadata.csv").is_file()
    ok = ["--out", str(tmp_path / "ok"), "--rows", "600", "--patients", "30"]
    assert synthetic.main([*ok, "--positive-rate", "0.05", "--image-size", "32"]) == 0
    assert "positives (" in capsys.readouterr().out


def test_cli_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: 20000)" in out and "(default: 0.001)" in out
