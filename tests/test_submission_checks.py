"""The submission kernel's checks before the long pass, in-process (`predict_submission` /
`run_submission`) on a copy of the shared demo artifacts (tests/inference_artifacts.py) and a
30-row test set: a file that fails its manifest is never used (utils.manifest's rule table),
every check runs before the first image is decoded, impossible values become missing and are
counted, and the summary names every warning class. Expected scores are computed apart from the
kernel (inference_artifacts.member_scores)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import polars as pl
import pytest
from inference_artifacts import (
    BATCH,
    FAST,
    IMAGE_MODEL,
    TEST_ROWS,
    edit_metadata,
    member_scores,
    run_kernel,
    submission_of,
)

from utils import io as data_io
from utils.inference import REHEARSAL_ROWS, predict_submission, run_submission
from utils.io import (
    TEST_IMAGES,
    TEST_METADATA,
    coerced_values,
    read_metadata,
    read_test_metadata,
)
from utils.layout import MANIFEST_FILE, REPORT_FILE
from utils.manifest import DamagedArtifact, check_folder, damaged_file_rule, write_manifest
from utils.submission_checks import MIN_IMAGE_SIDE, rehearsal_problems
from utils.tabular.ensemble import ArtifactError
from utils.tabular.libraries import ENSEMBLE


@pytest.fixture
def art(artifacts, tmp_path) -> Path:
    """A copy of the demo artifacts a test may damage."""
    shutil.copytree(artifacts, tmp_path / "art")
    return tmp_path / "art"


def edit_json(path: Path, change) -> Path:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record, indent=2))
    return path


def no_image_read(monkeypatch) -> None:
    """Any read of an image from the hdf5 file fails the test."""

    def refuse(self, isic_id):
        raise AssertionError(f"image {isic_id} was read")

    monkeypatch.setattr(data_io.HDF5Images, "read_bytes", refuse)


# ---------------------------------------------------------------------------------- manifest


def test_rule_table_covers_every_artifact_file(artifacts):
    actions = {
        rel: damaged_file_rule(rel)[0]
        for folder in (artifacts / IMAGE_MODEL, artifacts / "gbdt")
        for rel in check_folder(folder).listed
    }
    assert actions["config.json"] == "recorded" and actions["fold0.pt"] == "leave out"
    assert actions["ensemble.json"] == actions["features.json"] == "stop"
    assert {a for r, a in actions.items() if r.startswith("models/")} == {"leave out"}


@pytest.mark.parametrize(("key", "value"), [("n_folds", 1), ("image_size", 33)])
def test_edited_config_json_is_not_used(art, test_data, intact_scores, key, value):
    """An image model's config.json edited after its manifest: the configuration the manifest
    records is used, so every score is the intact run's; the report names the file."""
    config = art / IMAGE_MODEL / "config.json"
    edit_json(config, lambda r: r["config"].update({key: value}))
    sub, report = predict_submission(test_data, art, FAST)
    np.testing.assert_allclose(sub["target"].to_numpy(), intact_scores[ENSEMBLE], rtol=1e-5)
    assert report.plan.folds == {IMAGE_MODEL: (0, 1)}
    assert any(str(config) in n and "manifest records is used" in n for n in report.artifact_notes)
    assert str(config) in report.text()


def test_edited_config_json_without_a_recorded_one_falls_back(art, test_data, intact_scores):
    """Nothing recorded to fall back on: the model is unusable, lgb_meta scores every row."""
    edit_json(art / IMAGE_MODEL / "config.json", lambda r: r["config"].update({"n_folds": 1}))
    edit_json(art / IMAGE_MODEL / MANIFEST_FILE, lambda r: r.pop("config"))
    sub, report = predict_submission(test_data, art, FAST)
    assert report.plan.missing and report.mode.startswith("metadata-only")
    np.testing.assert_allclose(sub["target"].to_numpy(), intact_scores["lgb_meta"], rtol=1e-5)


@pytest.mark.parametrize("name", ["ensemble.json", "features.json"])
def test_gbdt_description_failing_its_manifest_stops_before_any_image(
    art, test_data, tmp_path, monkeypatch, name
):
    """One byte changed inside a feature name: the kernel stops at once, naming the file, and
    writes no submission."""
    path = art / "gbdt" / name
    text = path.read_text()
    path.write_text(text.replace('"age_approx', '"age_apprax', 1))
    assert path.read_text() != text
    no_image_read(monkeypatch)
    with pytest.raises(DamagedArtifact, match=rf"{path}: content differs .* kernel stops"):
        run_submission(test_data, art, tmp_path / "out", "demo", batch_size=BATCH, num_workers=0)
    assert not (tmp_path / "out" / "submission.csv").exists()
    assert not (tmp_path / "out" / REPORT_FILE).exists()


def test_intact_run_reports_no_manifest_difference(artifacts, test_data, intact_scores, tmp_path):
    sub, report, _ = run_submission(
        test_data, artifacts, tmp_path, "demo", batch_size=BATCH, num_workers=0, threads=1,
        estimate_batches=0,
    )  # fmt: skip
    np.testing.assert_allclose(sub["target"].to_numpy(), intact_scores[ENSEMBLE], rtol=1e-5)
    assert report.artifact_notes == ()


# ---------------------------------------------------------------------------------- before the pass


def test_member_missing_a_column_stops_within_seconds_before_any_image(
    art, test_data, tmp_path, monkeypatch
):
    """A GBDT whose member reads a column the test features lack (artifacts made by other code,
    consistent with their manifest): the kernel stops before reading any image, naming
    ensemble.json, the member and the column, instead of failing after the image pass."""
    path = art / "gbdt" / "ensemble.json"
    edit_json(path, lambda r: r["members"]["cat"]["features"].append("age_apprax"))
    manifest = json.loads((art / "gbdt" / MANIFEST_FILE).read_text())
    write_manifest(art / "gbdt", manifest["config"])
    no_image_read(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ArtifactError, match=rf"{path}.*\n  member 'cat'.*\['age_apprax'\]"):
        run_submission(test_data, art, tmp_path / "out", "demo", batch_size=BATCH, num_workers=0)
    elapsed = time.perf_counter() - start
    print(f"stopped {elapsed:.1f} s after the kernel started")
    assert elapsed < 30
    assert not (tmp_path / "out" / "submission.csv").exists()


def test_whole_chain_runs_on_a_few_rows_before_the_image_pass(artifacts, test_data):
    lines: list[str] = []
    predict_submission(test_data, artifacts, FAST, log=lines.append)
    checked = next(i for i, line in enumerate(lines) if line.startswith("checks passed"))
    image_pass = next(i for i, line in enumerate(lines) if line.startswith(f"{IMAGE_MODEL}: "))
    assert checked < image_pass and f"{TEST_ROWS} images" in lines[image_pass]
    assert f"scored {REHEARSAL_ROWS} test rows" in lines[checked]


def test_rehearsal_problems_name_the_member_and_rows():
    scores = {"lgb": np.array([0.1, np.nan, 0.2]), "cat": np.array([0.1, 0.2, 1.5])}
    problems = rehearsal_problems(scores, ["a", "b", "c"])
    assert problems == [
        "lgb: 1 score(s) not in [0, 1] for ['b']",
        "cat: 1 score(s) not in [0, 1] for ['c']",
    ]
    assert rehearsal_problems({"lgb": np.array([0.0, 1.0])}, ["a", "b"]) == []


def test_unwritable_output_dir_fails_first_naming_it(artifacts, test_data, tmp_path, monkeypatch):
    """An output dir that cannot take a file (here: under a plain file) fails before any image
    is read, naming the path."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    no_image_read(monkeypatch)
    with pytest.raises(OSError, match=rf"cannot write {blocker}/out/"):
        run_submission(test_data, artifacts, blocker / "out", "demo", batch_size=BATCH)


# ---------------------------------------------------------------------------------- values


def impossible(df: pl.DataFrame) -> pl.DataFrame:
    """Text NaN in every row of tbp_lv_deltaA; age -5 and 1e400 (parses to inf), a 1e308 mm
    diameter, a -1e30 mm2 area, an inf coordinate on 5 rows: values no lesion can have."""
    row = pl.int_range(pl.len())
    return df.with_columns(
        pl.lit("NaN").alias("tbp_lv_deltaA"),
        pl.when(row == 0).then(pl.lit("-5")).when(row == 1).then(pl.lit("1e400"))
        .otherwise(pl.col("age_approx")).alias("age_approx"),
        pl.when(row == 2).then(pl.lit("1e308")).otherwise(pl.col("clin_size_long_diam_mm"))
        .alias("clin_size_long_diam_mm"),
        pl.when(row == 3).then(pl.lit("-1e30")).otherwise(pl.col("tbp_lv_areaMM2"))
        .alias("tbp_lv_areaMM2"),
        pl.when(row < 5).then(pl.lit("inf")).otherwise(pl.col("tbp_lv_x")).alias("tbp_lv_x"),
    )  # fmt: skip


def blanked(df: pl.DataFrame) -> pl.DataFrame:
    """The same cells left empty: what the kernel must score."""
    row = pl.int_range(pl.len())
    return df.with_columns(
        pl.lit(None, dtype=pl.String).alias("tbp_lv_deltaA"),
        *[
            pl.when(rows).then(None).otherwise(pl.col(col)).alias(col)
            for col, rows in (
                ("age_approx", row < 2),
                ("clin_size_long_diam_mm", row == 2),
                ("tbp_lv_areaMM2", row == 3),
                ("tbp_lv_x", row < 5),
            )
        ],
    )


def test_values_no_lesion_can_have_become_missing_and_are_counted(test_data, artifacts, tmp_path):
    data, empty = tmp_path / "data", tmp_path / "empty"
    for root, change in ((data, impossible), (empty, blanked)):
        shutil.copytree(test_data, root)
        edit_metadata(root, change)
    expected = member_scores(artifacts, empty)[ENSEMBLE]
    out = tmp_path / "out"
    sub, report, _ = run_submission(data, artifacts, out, "demo", batch_size=BATCH, num_workers=0)
    np.testing.assert_allclose(sub["target"].to_numpy(), expected, rtol=1e-5)
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["test_metadata"]["coerced"] == {
        "age_approx": {"NaN/inf": 1, "outside >= 0 and <= 120": 1},
        "clin_size_long_diam_mm": {"outside > 0 and <= 1000": 1},
        "tbp_lv_areaMM2": {"outside > 0 and <= 1e+06": 1},
        "tbp_lv_deltaA": {"NaN/inf": TEST_ROWS},
        "tbp_lv_x": {"NaN/inf": 5},
    }
    assert "tbp_lv_deltaA" in saved["test_metadata"]["empty_columns"]
    coerced = saved["summary"]["coerced values (made missing)"]
    assert "tbp_lv_x: 5 value(s) made missing (5 NaN/inf)" in coerced and len(coerced) == 5
    assert "coerced values (made missing): 5\n" in report.text()


def test_training_metadata_values_are_coerced_and_counted(fixtures_dir, tmp_path, artifacts):
    """Stage 3 reads train metadata through the same rule; its CV report counts them."""
    path = tmp_path / "train-metadata.csv"
    text = pl.read_csv(fixtures_dir / "train-metadata-sample5.csv", infer_schema=False)
    impossible(text).write_csv(path)
    train = read_metadata(path, "train")
    assert train["age_approx"].head(2).is_null().all() and train["tbp_lv_deltaA"].null_count() == 5
    assert coerced_values(path)["tbp_lv_x"] == {"NaN/inf": 5}
    report = json.loads((artifacts / "gbdt" / "cv_report.json").read_text())
    assert report["coerced_values"] == {}  # the synthetic data has none


# ---------------------------------------------------------------------------------- summary


def one_pixel_jpeg() -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((1, 1, 3), 128, np.uint8))
    assert ok
    return buf.tobytes()


def test_summary_says_none_for_every_class_of_a_clean_run(artifacts, test_data):
    _, report = predict_submission(test_data, artifacts, FAST)
    assert all(lines == [] for lines in report.sections().values()), report.sections()
    text = report.text()
    for title in report.sections():
        assert f"\n{title}: none\n" in text


def test_disk_full_writing_the_submission_names_the_file(
    artifacts, test_data, tmp_path, monkeypatch
):
    def disk_full(self, path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_csv", disk_full)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=rf"cannot write {out / 'submission.csv'}: No space left"):
        run_submission(test_data, artifacts, out, "demo", batch_size=BATCH, num_workers=0)
    assert list(out.iterdir()) == []  # no partial file


def test_real_notebook_summary_names_a_degenerate_image_and_coerced_values(
    artifacts, test_data, tmp_path, monkeypatch
):
    """The real notebook on a test set with a 1x1 JPEG and impossible values: the image is
    scored (no fallback) but counted and named, the values counted, and the last block lists
    both classes while the classes with nothing to report say none."""
    data = tmp_path / "data"
    shutil.copytree(test_data, data)
    edit_metadata(data, impossible)
    tiny = read_test_metadata(data / TEST_METADATA)[0]["isic_id"][6]
    with h5py.File(data / TEST_IMAGES, "a") as h5:
        del h5[tiny]
        h5.create_dataset(tiny, data=np.bytes_(one_pixel_jpeg()))
    out = tmp_path / "out"
    text = run_kernel(data, artifacts, out, tmp_path, monkeypatch)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["degenerate_images"] == {
        "count": 1, "min_side_px": MIN_IMAGE_SIDE, "first": {tiny: "1 x 1 px"},
    }  # fmt: skip
    assert report["fallback_rows"]["count"] == 0 and submission_of(out, data).size == TEST_ROWS
    block = text[text.index("SUBMISSION SUMMARY") :]
    assert f"degenerate images: 1\n  - 1 test image(s) smaller than {MIN_IMAGE_SIDE} px" in block
    assert f"'{tiny}': '1 x 1 px'" in block
    assert "coerced values (made missing): 5\n" in block
    assert "runs that do not belong together: none" in block
    assert "manifest differences: none" in block and "fallback decisions: none" in block
