"""The submission kernel's checks before the long pass, in-process (`predict_submission` /
`run_submission`) on a copy of the shared demo artifacts (tests/inference_artifacts.py) and a
30-row test set: a file that fails its manifest is never used (utils.manifest's rule table),
every check runs before the first image is decoded, impossible values become missing and are
counted, and the summary names every warning class. Expected scores are computed apart from the
kernel (test_submission_robustness.member_scores)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from inference_artifacts import IMAGE_MODEL, build_artifacts
from test_submission_robustness import BATCH, FAST, TEST_ROWS, member_scores

from utils import io as data_io
from utils.inference import REPORT_FILE, predict_submission, run_submission
from utils.io import TEST_IMAGES, TEST_METADATA
from utils.manifest import MANIFEST_FILE, DamagedArtifact, check_folder, damaged_file_rule
from utils.tabular.libraries import ENSEMBLE


@pytest.fixture(scope="session")
def artifacts(synthetic_dir, tmp_path_factory) -> Path:
    return build_artifacts(synthetic_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def test_data(synthetic_dir, tmp_path_factory) -> Path:
    """The first TEST_ROWS rows of the synthetic test set with their images."""
    root = tmp_path_factory.mktemp("checks_data")
    text = pl.read_csv(synthetic_dir / TEST_METADATA, infer_schema=False).head(TEST_ROWS)
    text.write_csv(root / TEST_METADATA)
    shutil.copy2(synthetic_dir / TEST_IMAGES, root / TEST_IMAGES)
    return root


@pytest.fixture(scope="module")
def intact(artifacts, test_data) -> dict:
    """Every member's score and the vote on the intact artifacts, computed apart."""
    return member_scores(artifacts, test_data)


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
def test_edited_config_json_is_not_used(art, test_data, intact, key, value):
    """An image model's config.json edited after its manifest: the configuration the manifest
    records is used, so every score is the intact run's; the report names the file."""
    config = art / IMAGE_MODEL / "config.json"
    edit_json(config, lambda r: r["config"].update({key: value}))
    sub, report = predict_submission(test_data, art, FAST)
    np.testing.assert_allclose(sub["target"].to_numpy(), intact[ENSEMBLE], rtol=1e-5)
    assert report.plan.folds == {IMAGE_MODEL: (0, 1)}
    assert any(str(config) in n and "manifest records is used" in n for n in report.artifact_notes)
    assert str(config) in report.text()


def test_edited_config_json_without_a_recorded_one_falls_back(art, test_data, intact):
    """Nothing recorded to fall back on: the model is unusable, lgb_meta scores every row."""
    edit_json(art / IMAGE_MODEL / "config.json", lambda r: r["config"].update({"n_folds": 1}))
    edit_json(art / IMAGE_MODEL / MANIFEST_FILE, lambda r: r.pop("config"))
    sub, report = predict_submission(test_data, art, FAST)
    assert report.plan.missing and report.mode.startswith("metadata-only")
    np.testing.assert_allclose(sub["target"].to_numpy(), intact["lgb_meta"], rtol=1e-5)


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


def test_intact_run_reports_no_manifest_difference(artifacts, test_data, intact, tmp_path):
    sub, report, _ = run_submission(
        test_data, artifacts, tmp_path, "demo", batch_size=BATCH, num_workers=0, threads=1,
        estimate_batches=0,
    )  # fmt: skip
    np.testing.assert_allclose(sub["target"].to_numpy(), intact[ENSEMBLE], rtol=1e-5)
    assert report.artifact_notes == ()
