"""The submission kernel never loses a submission to a damaged artifact or a harmless input
quirk.

The real notebook (notebooks/04_inference.ipynb, papermill) runs once per case on a copy of the
shared demo artifacts (tests/inference_artifacts.py) and a 30-row test set, damaged for that
case; each case checks that the kernel ends normally where a fallback exists, that the
submission is complete and valid, that exactly the affected model changed (the expected scores
are computed apart from the kernel: inference_artifacts.member_scores), and that the message
names the file. Unit tests
cover the readers and checks behind them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from inference_artifacts import (
    FAST,
    IMAGE_MODEL,
    edit_metadata,
    member_scores,
    run_kernel,
    submission_of,
)

from utils.image.predict import CheckpointError, load_checkpoint
from utils.inference import predict_submission
from utils.io import TEST_IMAGES, TEST_METADATA, read_metadata, read_test_metadata
from utils.layout import MANIFEST_FILE, REPORT_FILE
from utils.manifest import atomic_output, check_folder, write_manifest
from utils.schema import FEATURE_INPUT_COLUMNS, SchemaError
from utils.submission_checks import check_image_model
from utils.tabular.ensemble import ArtifactError, GBDTEnsemble, lightgbm_text_problem
from utils.tabular.features import build_features
from utils.tabular.libraries import ENSEMBLE


@pytest.fixture(scope="module")
def expected(artifacts, test_data, intact_scores) -> dict:
    """Scores of the intact artifacts, and of vit_tiny on fold 1 alone."""
    return {"all": intact_scores, "fold1": member_scores(artifacts, test_data, [1])}


# ---------------------------------------------------------------------------------- damage


def member_file(art: Path, member: str) -> Path:
    """The first model file of GBDT member `member` (ensemble.json order)."""
    listed = json.loads((art / "gbdt" / "ensemble.json").read_text())["members"]
    return art / "gbdt" / listed[member]["models"][0]


def cut_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def cut_at_tree_boundary(path: Path) -> Path:
    """A LightGBM text model cut just before its second tree: every line whole."""
    text = path.read_text()
    path.write_text(text[: text.index("Tree=1\n")])
    return path


def empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def remove(path: Path) -> Path:
    path.unlink()
    return path


def variants(df: pl.DataFrame) -> pl.DataFrame:
    """Upper-case sex on even rows, a trailing space on every anatom_site_general."""
    even = pl.int_range(pl.len()) % 2 == 0
    return df.with_columns(
        pl.when(even).then(pl.col("sex").str.to_uppercase()).otherwise(pl.col("sex")),
        (pl.col("anatom_site_general") + " ").alias("anatom_site_general"),
    )


# case -> (damage(art, data) -> the file named, expected kind, what the kernel must print)
ARTIFACT_CASES = {
    "lgb_cut_in_half": (lambda art: cut_half(member_file(art, "lgb")), "member:lgb"),
    "lgb_cut_at_tree": (lambda art: cut_at_tree_boundary(member_file(art, "lgb")), "member:lgb"),
    "cat_truncated": (lambda art: cut_half(member_file(art, "cat")), "member:cat"),
    "xgb_truncated": (lambda art: cut_half(member_file(art, "xgb")), "member:xgb"),
    "fold_truncated": (lambda art: cut_half(art / IMAGE_MODEL / "fold0.pt"), "fold"),
    "fold_empty": (lambda art: empty(art / IMAGE_MODEL / "fold0.pt"), "fold"),
    "fold_missing": (lambda art: remove(art / IMAGE_MODEL / "fold0.pt"), "fold"),
}
METADATA_CASES = {
    "extra_column": (lambda d: d.with_columns(pl.lit("x").alias("scanner_note")), "scanner_note"),
    "missing_non_feature_column": (lambda d: d.drop("copyright_license"), "copyright_license"),
    "category_variants": (variants, "matched a known category"),
}


@pytest.mark.parametrize("case", list(ARTIFACT_CASES))
def test_kernel_survives_damaged_artifact(
    case, artifacts, test_data, expected, tmp_path, monkeypatch
):
    art = tmp_path / "art"
    shutil.copytree(artifacts, art)
    damage, kind = ARTIFACT_CASES[case]
    damaged = damage(art)
    out = tmp_path / "out"
    text = run_kernel(test_data, art, out, tmp_path, monkeypatch)
    target = submission_of(out, test_data)
    report = json.loads((out / REPORT_FILE).read_text())
    assert str(damaged) in text and "SUBMISSION SUMMARY" in text
    assert any(str(damaged) in d for d in report["decisions"])
    if kind.startswith("member:"):
        member = kind.split(":")[1]
        others = [m for m in expected["all"] if m not in (member, ENSEMBLE)]
        assert list(report["gbdt_members"]["left_out"]) == [member]
        assert sorted(report["gbdt_members"]["voting"]) == sorted(others)
        vote = np.mean([expected["all"][m] for m in others], axis=0)
        np.testing.assert_allclose(target, vote, rtol=1e-5)
    else:
        assert report["image_models"]["folds_used"] == {IMAGE_MODEL: [1]}
        assert list(report["image_models"]["folds_left_out"][IMAGE_MODEL]) == ["fold0.pt"]
        np.testing.assert_allclose(target, expected["fold1"][ENSEMBLE], rtol=1e-5)
    assert not np.allclose(target, expected["all"][ENSEMBLE], rtol=1e-5)


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_kernel_takes_harmless_metadata_quirk(
    case, artifacts, test_data, expected, tmp_path, monkeypatch
):
    data = tmp_path / "data"
    shutil.copytree(test_data, data)
    change, shown = METADATA_CASES[case]
    edit_metadata(data, change)
    out = tmp_path / "out"
    text = run_kernel(data, artifacts, out, tmp_path, monkeypatch)
    np.testing.assert_allclose(submission_of(out, data), expected["all"][ENSEMBLE], rtol=1e-5)
    report = json.loads((out / REPORT_FILE).read_text())
    assert shown in text and report["decisions"] == []
    notes = report["test_metadata"]
    if case == "category_variants":
        original = pl.read_csv(test_data / TEST_METADATA, infer_schema=False)
        even = original.filter(pl.int_range(pl.len()) % 2 == 0)
        assert notes["respelled"] == {
            "sex": even["sex"].is_not_null().sum(),
            "anatom_site_general": original["anatom_site_general"].is_not_null().sum(),
        }
        assert notes["unseen"] == {} and notes["respelled"]["sex"] > 0


def test_kernel_stops_on_empty_test_file_naming_it(artifacts, test_data, tmp_path, monkeypatch):
    import papermill as pm

    data = tmp_path / "data"
    shutil.copytree(test_data, data)
    path = edit_metadata(data, lambda d: d.head(0))
    with pytest.raises(pm.PapermillExecutionError) as err:
        run_kernel(data, artifacts, tmp_path / "out", tmp_path, monkeypatch)
    assert str(path) in str(err.value) and "no rows" in str(err.value)
    assert not (tmp_path / "out" / "submission.csv").exists()


# ---------------------------------------------------------------------------------- metadata


def _write(tmp_path: Path, df: pl.DataFrame) -> Path:
    path = tmp_path / TEST_METADATA
    df.write_csv(path)
    return path


def test_only_feature_columns_are_required(fixtures_dir, tmp_path):
    test = pl.read_csv(fixtures_dir / TEST_METADATA, infer_schema=False)
    optional = [c for c in test.columns if c not in FEATURE_INPUT_COLUMNS]
    assert optional == ["image_type", "copyright_license"]
    df, notes = read_test_metadata(_write(tmp_path, test.drop(optional)))
    assert notes.absent_columns == tuple(optional) and df["copyright_license"].null_count() == 3
    build_features(df)  # every column the features read is there
    with pytest.raises(SchemaError, match=r"test-metadata.csv.*\['tbp_lv_H'\].*features read"):
        read_test_metadata(_write(tmp_path, test.drop("tbp_lv_H")))


def test_unseen_categories_and_empty_columns_are_counted(fixtures_dir, tmp_path):
    test = pl.read_csv(fixtures_dir / TEST_METADATA, infer_schema=False)
    quirky = test.with_columns(
        pl.lit("elbow").alias("anatom_site_general"), pl.lit(None).alias("tbp_lv_A")
    )
    _, notes = read_test_metadata(_write(tmp_path, quirky))
    assert notes.unseen == {"anatom_site_general": {"elbow": 3}}
    assert notes.empty_columns == ("tbp_lv_A",)
    lines = " ".join(notes.lines())
    assert "3 row(s) with unseen categories" in lines and "anatom_site_general__other" in lines
    assert "empty in every row: ['tbp_lv_A']" in lines


def test_category_variants_give_the_same_features(fixtures_dir, tmp_path):
    test = pl.read_csv(fixtures_dir / TEST_METADATA, infer_schema=False)
    clean, _ = read_test_metadata(_write(tmp_path, test))
    shouty = test.with_columns(
        pl.col("sex").str.to_uppercase(),
        ("  " + pl.col("tbp_lv_location").str.to_lowercase() + " ").alias("tbp_lv_location"),
    )
    varied, notes = read_test_metadata(_write(tmp_path, shouty))
    assert notes.respelled == {"sex": 3, "tbp_lv_location": 3} and notes.unseen == {}
    assert build_features(varied)[0].equals(build_features(clean)[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.with_columns(pl.lit("12,5").alias("tbp_lv_B")), r"'tbp_lv_B'.*12,5.*ISIC_"),
        (lambda d: pl.concat([d, d.head(1)]), r"duplicate isic_id.*ISIC_0015657"),
        (lambda d: d.head(0), "header but no rows"),
    ],
)
def test_bad_test_file_is_named_with_column_and_ids(fixtures_dir, tmp_path, change, message):
    test = pl.read_csv(fixtures_dir / TEST_METADATA, infer_schema=False)
    path = _write(tmp_path, change(test))
    with pytest.raises(SchemaError, match=message) as err:
        read_test_metadata(path)
    assert str(path) in str(err.value)


def test_empty_file_and_unparsable_train_number_are_named(fixtures_dir, tmp_path):
    path = tmp_path / TEST_METADATA
    path.write_bytes(b"")
    with pytest.raises(SchemaError, match="empty file"):
        read_test_metadata(path)
    train = pl.read_csv(fixtures_dir / "train-metadata-sample5.csv", infer_schema=False)
    bad = train.with_columns(
        pl.when(pl.int_range(pl.len()) == 2)
        .then(pl.lit("n/a"))
        .otherwise(pl.col("age_approx"))
        .alias("age_approx")
    )
    bad.write_csv(tmp_path / "train.csv")
    wanted = train["isic_id"][2]
    with pytest.raises(SchemaError, match=rf"'age_approx'.*'n/a'.*{wanted}"):
        read_metadata(tmp_path / "train.csv", "train")


# ---------------------------------------------------------------------------------- artifacts


def test_gbdt_artifacts_are_written_whole_with_manifest_last(artifacts):
    gbdt = artifacts / "gbdt"
    check = check_folder(gbdt)
    assert check.has_manifest and check.problems == {} and check.unlisted == ()
    assert not [p for p in gbdt.rglob("*") if ".tmp" in p.name]
    assert {"oof.csv", "ensemble.json", "features.json"} <= set(check.listed)
    manifest_time = (gbdt / MANIFEST_FILE).stat().st_mtime_ns
    assert all((gbdt / rel).stat().st_mtime_ns <= manifest_time for rel in check.listed)


def test_atomic_output_leaves_nothing_when_the_writer_fails(tmp_path):
    path = tmp_path / "models" / "m.ubj"
    path.parent.mkdir()
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(path) as tmp:
        assert tmp.suffix == ".ubj" and tmp.parent == path.parent
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["m.ubj"]


def test_folder_without_manifest_is_checked_by_content(artifacts, tmp_path):
    """Artifacts made before manifests: loaded with a note; a cut LightGBM file is still caught
    before LightGBM reads it, and a cut checkpoint before torch does."""
    art = tmp_path / "art"
    shutil.copytree(artifacts, art)
    for folder in (art / "gbdt", art / IMAGE_MODEL):
        (folder / MANIFEST_FILE).unlink()
    ensemble = GBDTEnsemble.load(art / "gbdt")
    assert ensemble.dropped == {} and "no usable manifest.json" in ensemble.notes[0]
    lgb_file = cut_at_tree_boundary(member_file(art, "lgb"))
    assert "incomplete LightGBM model" in lightgbm_text_problem(lgb_file)
    assert str(lgb_file) in GBDTEnsemble.load(art / "gbdt").dropped["lgb"]
    cut_half(art / IMAGE_MODEL / "fold1.pt")
    check = check_image_model(art / IMAGE_MODEL)
    assert (
        check.folds == (0,)
        and "fold1.pt: not a complete torch checkpoint" in check.damaged["fold1.pt"]
    )
    with pytest.raises(CheckpointError, match="fold1.pt"):
        load_checkpoint(art / IMAGE_MODEL / "fold1.pt")


def test_unusable_gbdt_has_no_fallback_and_names_the_file(artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifacts, art)
    features = cut_half(art / "gbdt" / "features.json")
    with pytest.raises(ArtifactError, match=rf"{features}: unreadable.*size"):
        GBDTEnsemble.load(art / "gbdt")
    shutil.copy2(artifacts / "gbdt" / "features.json", features)
    for member in ("lgb_meta", "lgb", "cat", "xgb"):
        cut_half(member_file(art, member))
    with pytest.raises(ArtifactError, match="no GBDT member can be used.*lgb_meta.*size"):
        GBDTEnsemble.load(art / "gbdt")


def test_file_of_another_run_is_not_used(artifacts, tmp_path):
    """A fold checkpoint replaced after the manifest (another run's file, same name) is left out."""
    art = tmp_path / "art"
    shutil.copytree(artifacts, art)
    other = art / IMAGE_MODEL / "fold0.pt"
    other.write_bytes(other.read_bytes() + b"\0")
    check = check_image_model(art / IMAGE_MODEL)
    assert check.folds == (1,) and "manifest says" in check.damaged["fold0.pt"]
    write_manifest(art / IMAGE_MODEL, {})  # re-recorded: used again
    assert check_image_model(art / IMAGE_MODEL).folds == (0, 1)


def test_damaged_lgb_meta_leaves_image_rows_to_the_others(artifacts, synthetic_dir, tmp_path):
    """With lgb_meta left out, the vote is the other members' mean; the kernel says that rows
    without an image feature have no metadata-only member to fall back to."""
    art = tmp_path / "art"
    shutil.copytree(artifacts, art)
    cut_half(member_file(art, "lgb_meta"))
    data = tmp_path / "data"
    data.mkdir()
    for name in (TEST_METADATA, TEST_IMAGES):
        shutil.copy2(synthetic_dir / name, data / name)
    sub, report = predict_submission(data, art, FAST)
    assert "lgb_meta" in report.dropped_members and report.members == ("lgb", "cat", "xgb")
    assert any("no usable lgb_meta member" in w for w in report.warnings)
    assert sub["target"].is_between(0, 1).all()
