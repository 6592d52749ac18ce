"""Stage 4: the submission kernel (utils.inference and notebooks/04_inference.ipynb).

One session-scoped artifacts dir (the `artifacts` fixture of tests/conftest.py, built by
tests/inference_artifacts.py and shared with the test_submission_* modules) holds a tiny
vit_tiny (32 px, 1 epoch, 2 folds, trained by the stage 1 entry) and the GBDT stage's artifacts
built on its OOF by the stage 3 entry, both on the synthetic data dir.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import nbformat
import numpy as np
import polars as pl
import pytest
from inference_artifacts import FAST, IMAGE_MODEL, train_gbdt
from notebook_checks import assert_thin_and_clean, run_notebook

from utils import submission_time
from utils.inference import predict_submission, run_submission
from utils.io import TEST_IMAGES, TEST_METADATA, DataDir
from utils.kaggle.build import KAGGLE_PARAMETERS, SUBMISSION_KERNEL
from utils.manifest import write_manifest
from utils.pipeline import make_run
from utils.pipeline_stages import STAGES
from utils.submission_file import (
    SubmissionError,
    read_test_ids,
    validate_submission,
    write_submission,
)
from utils.submission_time import KAGGLE_LIMIT_S, TimeEstimate, measure_images_per_s
from utils.tabular.ensemble import GBDTEnsemble
from utils.tabular.features import build_features
from utils.tabular.libraries import ENSEMBLE, GBDT_MODELS, META_MEMBER

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "04_inference.ipynb"
PARAMETERS = {
    "data_dir",
    "output_dir",
    "preset",
    "artifacts_dir",
    "batch_size",
    "num_workers",
}


def copy_test_files(source: Path, dest: Path) -> Path:
    """A data dir holding only the test files of `source`."""
    dest.mkdir(parents=True)
    for name in (TEST_METADATA, TEST_IMAGES):
        shutil.copy2(source / name, dest / name)
    return dest


def linked_artifacts(artifacts: Path, dest: Path, names: list[str]) -> Path:
    """An artifacts dir with symlinks to some of `artifacts`'s subfolders (as link_inputs makes)."""
    dest.mkdir(parents=True)
    for name in names:
        (dest / name).symlink_to(artifacts / name, target_is_directory=True)
    return dest


def meta_only_scores(artifacts: Path, data_dir: Path) -> np.ndarray:
    """lgb_meta's score of every test row, computed apart from predict_submission."""
    ensemble = GBDTEnsemble.load(artifacts / "gbdt")
    frame, _ = build_features(DataDir(data_dir).test_metadata())
    frame = frame.with_columns(pl.lit(0.5, dtype=pl.Float32).alias(f"img_{IMAGE_MODEL}"))
    return ensemble.predict(frame, threads=1)[META_MEMBER]


# ---------------------------------------------------------------------------------- notebook


def test_notebook_is_thin_clean_and_takes_what_pipeline_and_kaggle_pass(tmp_path):
    assert_thin_and_clean(NOTEBOOK, PARAMETERS)
    stage = next(s for s in STAGES if s.notebook == NOTEBOOK.name)
    assert set(stage.parameters(make_run(None, tmp_path, "demo"))) <= PARAMETERS
    assert set(KAGGLE_PARAMETERS[SUBMISSION_KERNEL]) <= PARAMETERS


def test_kernel_writes_valid_submission_for_real_test_files(
    artifacts, fixtures_dir, tmp_path, monkeypatch
):
    data = copy_test_files(fixtures_dir, tmp_path / "data")
    out = tmp_path / "out"
    executed = run_notebook(
        str(NOTEBOOK),
        {
            "data_dir": str(data),
            "output_dir": str(out),
            "preset": "demo",
            "artifacts_dir": str(artifacts),
            "batch_size": 2,
            "num_workers": 0,
        },
        tmp_path,
        monkeypatch,
    )
    sub = pl.read_csv(out / "submission.csv")
    expected = pl.read_csv(fixtures_dir / TEST_METADATA)["isic_id"].to_list()
    assert sub.columns == ["isic_id", "target"]
    assert sub["isic_id"].to_list() == expected and len(expected) == 3
    assert sub["target"].is_between(0, 1).all() and not sub["target"].is_nan().any()
    cells = nbformat.read(executed, as_version=4).cells
    outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    on_cpu = "test rows; device cpu" in text
    estimate = "PROJECTED for one Kaggle T4" if on_cpu else f"measured: {IMAGE_MODEL}"
    assert estimate in text and "hidden test: 500,000 rows" in text
    assert "rows scored by lgb_meta (fallback)" in text and "0 row(s) scored by" in text
    assert f"full: image models ['{IMAGE_MODEL}']" in text
    # the recipe is the GBDT's (features.json), not a parameter of the kernel
    assert "recipe: paper" in text
    assert json.loads((out / "submission_report.json").read_text())["recipe"] == "paper"
    with pytest.raises(TypeError, match="takes no recipe.*features.json"):
        run_submission(data, artifacts, out, "demo", recipe="plus")


# ---------------------------------------------------------------------------------- fallbacks


def test_corrupt_jpeg_and_missing_key_fall_back_to_meta_member(
    artifacts, synthetic_dir, tmp_path, capsys
):
    intact = copy_test_files(synthetic_dir, tmp_path / "intact")
    damaged = copy_test_files(synthetic_dir, tmp_path / "damaged")
    ids = read_test_ids(intact)
    corrupt_id, missing_id = ids[3], ids[7]
    with h5py.File(damaged / TEST_IMAGES, "a") as h5:
        del h5[corrupt_id], h5[missing_id]
        h5.create_dataset(corrupt_id, data=np.bytes_(b"\xff\xd8\xff\xe0 truncated"))

    good, good_report = predict_submission(intact, artifacts, FAST)
    sub, report = predict_submission(damaged, artifacts, FAST)

    assert good_report.n_fallback == 0 and good_report.absent_ids == ()
    assert report.n_fallback == 2 and set(report.fallback_ids) == {corrupt_id, missing_id}
    assert report.absent_ids == (missing_id,)
    assert any("2 row(s) fell back to lgb_meta" in w for w in report.warnings)
    assert "WARNING: 2 row(s) fell back" in capsys.readouterr().out
    rows = [ids.index(corrupt_id), ids.index(missing_id)]
    kept = np.setdiff1d(np.arange(len(ids)), rows)
    target = sub["target"].to_numpy()
    np.testing.assert_allclose(target[rows], meta_only_scores(artifacts, intact)[rows], rtol=1e-9)
    np.testing.assert_allclose(target[kept], good["target"].to_numpy()[kept], rtol=1e-5)
    assert not np.allclose(target[kept], meta_only_scores(artifacts, intact)[kept])
    validate_submission(sub, ids)


@pytest.mark.parametrize("case", ["absent", "no_usable_fold"])
def test_missing_image_model_gives_metadata_only_loudly(
    case, artifacts, synthetic_dir, tmp_path, capsys
):
    art = linked_artifacts(artifacts, tmp_path / "art", ["gbdt"])
    if case == "no_usable_fold":  # an unfinished run: fold0.pt cut to nothing, fold1.pt not yet
        (art / IMAGE_MODEL).mkdir()
        shutil.copy2(artifacts / IMAGE_MODEL / "config.json", art / IMAGE_MODEL / "config.json")
        (art / IMAGE_MODEL / "fold0.pt").write_bytes(b"")
    data = copy_test_files(synthetic_dir, tmp_path / "data")
    sub, report = predict_submission(data, art, FAST)
    out = capsys.readouterr().out
    assert list(report.plan.missing) == [IMAGE_MODEL] and report.plan.run == ()
    assert report.mode.startswith("metadata-only") and report.n_fallback == sub.height
    assert "METADATA-ONLY SUBMISSION" in out and f"image model {IMAGE_MODEL} is needed" in out
    if case == "no_usable_fold":
        damaged = report.plan.checks[IMAGE_MODEL].damaged
        assert "fold0.pt: empty file (0 bytes)" in damaged["fold0.pt"]
        assert "fold1.pt: missing" in damaged["fold1.pt"] and "fold1.pt: missing" in out
    assert any(f"image model {IMAGE_MODEL} unusable" in d for d in report.decisions())
    np.testing.assert_allclose(sub["target"].to_numpy(), meta_only_scores(artifacts, data))


def test_gbdt_without_image_columns_skips_image_models_and_hdf5(
    artifacts, synthetic_dir, tmp_path, capsys
):
    art = linked_artifacts(artifacts, tmp_path / "art", [IMAGE_MODEL])
    train_gbdt(synthetic_dir, art, [])
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy2(synthetic_dir / TEST_METADATA, data / TEST_METADATA)  # no hdf5 needed
    sub, report = predict_submission(data, art, FAST)
    out = capsys.readouterr().out
    assert report.plan.needed == () and report.plan.unused == (IMAGE_MODEL,)
    assert report.images_per_s == {} and report.n_fallback == 0
    assert "trained without image columns" in report.mode and "METADATA-ONLY" in out
    scores = GBDTEnsemble.load(art / "gbdt").predict(
        build_features(DataDir(data).test_metadata())[0], threads=1
    )
    assert set(scores) == set(GBDT_MODELS) | {ENSEMBLE}
    np.testing.assert_allclose(sub["target"].to_numpy(), scores[ENSEMBLE])


def test_image_model_of_another_run_is_named_before_predicting(
    artifacts, synthetic_dir, tmp_path, capsys
):
    """The GBDT recorded the config hash of the image run it was trained on; an attached image
    model of another run (other settings, data or seed) is reported before the image pass."""
    art = linked_artifacts(artifacts, tmp_path / "art", ["gbdt"])
    shutil.copytree(artifacts / IMAGE_MODEL, art / IMAGE_MODEL)
    config = art / IMAGE_MODEL / "config.json"
    record = json.loads(config.read_text())
    other = {**record, "config_hash": "another-run"}
    config.write_text(json.dumps(other))
    write_manifest(art / IMAGE_MODEL, other)  # a whole other run: its files match its manifest
    data = copy_test_files(synthetic_dir, tmp_path / "data")
    _, report = predict_submission(data, art, FAST)
    out = capsys.readouterr().out
    assert list(report.plan.mismatched) == [IMAGE_MODEL]
    warning = "GBDT AND IMAGE MODELS DO NOT BELONG TOGETHER"
    assert warning in out and out.index(warning) < out.index(f"{IMAGE_MODEL}: 100 images")
    assert "holds run another-run" in report.plan.mismatched[IMAGE_MODEL]
    # the last block and the report list the mismatch; "none" only for the run that belongs
    assert "runs that do not belong together: 1\n  - the GBDT was trained" in report.text()
    assert report.to_dict()["summary"]["runs that do not belong together"] == [
        report.plan.mismatched[IMAGE_MODEL]
    ]
    _, same = predict_submission(data, artifacts, FAST)
    assert same.plan.mismatched == {} and not any(warning in w for w in same.warnings)
    assert "runs that do not belong together: none" in same.text()


def test_submission_follows_an_unsorted_test_metadata_file(artifacts, synthetic_dir, tmp_path):
    """Rows come out in the file's order, each with its own score, whatever that order is."""
    data = copy_test_files(synthetic_dir, tmp_path / "data")
    ordered, _ = predict_submission(data, artifacts, FAST)
    metadata = pl.read_csv(data / TEST_METADATA, infer_schema_length=None)
    shuffled = metadata.sample(fraction=1.0, shuffle=True, seed=5)
    assert shuffled["isic_id"].to_list() != sorted(shuffled["isic_id"].to_list())
    shuffled.write_csv(data / TEST_METADATA)
    sub, _ = predict_submission(data, artifacts, FAST)
    assert sub["isic_id"].to_list() == shuffled["isic_id"].to_list()
    joined = sub.join(ordered, on="isic_id", suffix="_ordered")
    np.testing.assert_allclose(joined["target"], joined["target_ordered"], rtol=1e-5)
    validate_submission(sub, read_test_ids(data))


def test_missing_gbdt_artifacts_raise_naming_the_dir(synthetic_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no GBDT artifacts at .*gbdt"):
        predict_submission(synthetic_dir, tmp_path, FAST)


# ---------------------------------------------------------------------------------- validation

IDS = ["ISIC_1", "ISIC_2", "ISIC_3"]


def _sub(ids=IDS, target=(0.1, 0.5, 0.9)) -> pl.DataFrame:
    return pl.DataFrame({"isic_id": ids, "target": list(target)})


@pytest.mark.parametrize(
    ("sub", "message"),
    [
        (_sub(target=(0.1, float("nan"), 0.9)), "1 null/NaN target(s): ['ISIC_2']"),
        (_sub(target=(0.1, None, 0.9)), "1 null/NaN target(s): ['ISIC_2']"),
        (_sub(target=(1.2, 0.5, -0.1)), "2 target(s) outside [0, 1]: ['ISIC_1', 'ISIC_3']"),
        (_sub(target=(float("inf"), 0.5, 0.9)), "1 target(s) outside [0, 1]: ['ISIC_1']"),
        (_sub(ids=["ISIC_1", "ISIC_3", "ISIC_2"]), "not in test-metadata order: row 1"),
        (_sub(ids=["ISIC_1", "ISIC_2", "ISIC_9"]), "1 test id(s) missing: ['ISIC_3']"),
        (_sub(ids=["ISIC_1", "ISIC_2", "ISIC_9"]), "1 id(s) not in the test set: ['ISIC_9']"),
        (_sub(ids=["ISIC_1", "ISIC_2", "ISIC_2"]), "1 duplicate isic_id(s): ['ISIC_2']"),
        (_sub(IDS[:2], (0.1, 0.2)), "2 rows, the test set has 3"),
        (_sub().rename({"target": "pred"}), "columns must be ['isic_id', 'target']"),
        (_sub().select("target", "isic_id"), "columns must be ['isic_id', 'target']"),
        (_sub(target=("a", "b", "c")), "target must be numeric"),
    ],
)
def test_validate_submission_names_the_problem(sub, message, tmp_path):
    with pytest.raises(SubmissionError) as err:
        validate_submission(sub, IDS)
    assert message in str(err.value)
    with pytest.raises(SubmissionError):
        write_submission(sub, tmp_path, IDS)
    assert not (tmp_path / "submission.csv").exists()


def test_write_submission_writes_a_valid_frame(tmp_path):
    path = write_submission(_sub(), tmp_path / "out", IDS)
    assert path == tmp_path / "out" / "submission.csv"
    assert pl.read_csv(path).equals(_sub())
    assert path.read_text().splitlines()[0] == "isic_id,target"


# ---------------------------------------------------------------------------------- timing


def test_measured_rate_excludes_fixed_start_up_cost(monkeypatch):
    clock = [0.0]
    calls = []

    def fake_predict(ids):  # 2 s start-up, then 100 images/s
        calls.append(list(ids))
        clock[0] += 2.0 + len(ids) / 100

    monkeypatch.setattr(submission_time.time, "perf_counter", lambda: clock[0])
    ids = [f"ISIC_{i}" for i in range(1000)]
    assert measure_images_per_s(fake_predict, ids, batch_size=50, batches=3) == pytest.approx(100)
    assert [len(c) for c in calls] == [50, 150, 300] and calls[2] == ids[:300]
    calls.clear()
    few = ids[:3]  # the public test set: cycled to the same sizes
    assert measure_images_per_s(fake_predict, few, batch_size=50, batches=3) == pytest.approx(100)
    assert [len(c) for c in calls] == [50, 150, 300] and set(calls[2]) == set(few)
    with pytest.raises(ValueError, match="no ids"):
        measure_images_per_s(fake_predict, [], batch_size=50, batches=3)


def test_time_estimate_projects_rows_over_every_image_model():
    estimate = TimeEstimate(rows=1000, images_per_s={"a": 100.0, "b": 50.0})
    assert estimate.seconds() == pytest.approx(1000 / 100 + 1000 / 50)
    assert estimate.seconds(500_000) == pytest.approx(15_000) and estimate.fits(500_000)
    slow = TimeEstimate(rows=500_000, images_per_s={"a": 10.0})
    assert slow.seconds() > KAGGLE_LIMIT_S and not slow.fits()
    assert "DOES NOT FIT" in str(slow) and "DOES NOT FIT" not in str(estimate)
