"""utils.pipeline: stage plan, resume, provenance of outputs, failure reporting, streamed output
and the results block (stand-in notebooks), and the real notebooks: a demo run, a rerun on new
data (--seed 4), a forced rerun and a resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from notebook_checks import write_standin_notebook

from utils import pipeline
from utils.folds import assign_folds
from utils.manifest import file_sha256, read_manifest, verify_manifest
from utils.oof import read_oof
from utils.pipeline import make_run, results_block, run_pipeline
from utils.pipeline_runner import (
    StageOutput,
    heartbeat,
    output_hashes,
    plan,
    run_stage,
    stamp_path,
    why_incomplete,
)
from utils.pipeline_stages import DATA_FILES, STAGES, PipelineError, Run
from utils.run_guard import LOCK_FILE, WorkDirBusy, work_dir_lock
from utils.settings import DEMO_FOLDS, IMAGE_MODELS, resolve
from utils.submission_file import validate_submission
from utils.tabular.gbdt import FEATURE_GROUPS

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_STAGES = [s for s in STAGES if s.notebook]
PARAM_NAMES = [
    "data_dir", "output_dir", "preset", "recipe", "image_oof_dirs", "params_path", "artifacts_dir",
]  # fmt: skip
LOG_ENV = "FUSIONNETX_TEST_LOG"


def _notebook(path: Path, body: str) -> None:
    write_standin_notebook(path, PARAM_NAMES, body)


def _body(notebook: str, writes: list[str]) -> str:
    """Stand-in body: log the parameters it got, then write `writes` (paths relative to params)."""
    return (
        "import json, os\n"
        "from pathlib import Path\n"
        f"got = {{k: globals()[k] for k in {PARAM_NAMES!r} if globals()[k] is not None}}\n"
        f"print('stand-in {notebook} ran', flush=True)\n"
        f"with open(os.environ[{LOG_ENV!r}], 'a') as f:\n"
        f"    f.write(json.dumps({{'notebook': {notebook!r}, 'params': got}}) + '\\n')\n"
        f"for rel in {writes!r}:\n"
        "    path = Path(rel.format(**got))\n"
        "    path.parent.mkdir(parents=True, exist_ok=True)\n"
        "    path.write_text('x')\n"
    )


def _writes(notebook: str) -> list[str]:
    """What the real notebook writes, as templates over its parameters."""
    for model in IMAGE_MODELS:
        if notebook == f"01_image_{model}.ipynb":
            names = ("oof.csv", "config.json", "fold0.pt", "manifest.json")
            return [f"{{output_dir}}/{model}/{n}" for n in names]
    return {
        "02_tune_gbdt.ipynb": [
            "{output_dir}/tuning/best_params.json",
            "{output_dir}/tuning/manifest.json",
        ],
        "03_gbdt.ipynb": [
            f"{{output_dir}}/gbdt/{n}" for n in ("oof.csv", "cv_report.json", "manifest.json")
        ],
        "04_inference.ipynb": ["{output_dir}/submission.csv"],
    }[notebook]


@pytest.fixture
def standins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A notebooks dir of stand-ins for every stage; each logs its call to $FUSIONNETX_TEST_LOG."""
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    for stage in NOTEBOOK_STAGES:
        _notebook(nb_dir / stage.notebook, _body(stage.notebook, _writes(stage.notebook)))
    monkeypatch.setenv(LOG_ENV, str(tmp_path / "calls.jsonl"))
    return nb_dir


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir holding the four Kaggle files (empty: stand-ins never read them)."""
    root = tmp_path / "data"
    root.mkdir()
    for name in DATA_FILES:
        (root / name).write_text("")
    return root


def _calls(tmp_path: Path) -> list[dict]:
    """Stand-in calls in order."""
    log = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _mark_done(run: Run) -> None:
    """Write every enabled stage's outputs and stamp, as a finished run would."""
    for stage, _ in plan(run):
        for path in stage.outputs(run):
            path = path.with_name(path.name.replace("*", "0"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        stamp_path(stage, run).parent.mkdir(parents=True, exist_ok=True)
        record = {"parameters": stage.parameters(run), "outputs": output_hashes(stage, run)}
        stamp_path(stage, run).write_text(json.dumps(record))


def test_plan_orders_stages_and_resumes_from_first_incomplete(tmp_path: Path, data_dir: Path):
    run = make_run(data_dir, tmp_path / "work", "demo")
    assert [s.name for s, will in plan(run)] == [
        *(f"image_{m}" for m in IMAGE_MODELS), "gbdt", "inference",
    ]  # fmt: skip
    assert all(will for _, will in plan(run))
    _mark_done(run)
    assert not any(will for _, will in plan(run))
    assert all(will for _, will in plan(run, force=True))
    (run.artifacts / "vit_tiny" / "oof.csv").unlink()
    assert [s.name for s, will in plan(run) if will] == [
        "image_vit_tiny", "image_vit_tiny_suspicious", "image_vit_small_suspicious", "gbdt",
        "inference",
    ]  # fmt: skip


def test_changed_parameters_or_corrupt_stamp_rerun_the_stage(tmp_path: Path, data_dir: Path):
    run = make_run(data_dir, tmp_path / "work", "demo")
    _mark_done(run)
    other = dataclasses.replace(run, preset="full")
    assert [s.name for s, will in plan(other) if will][0] == "image_convnextv2_nano"
    gbdt = next(s for s in STAGES if s.name == "gbdt")
    stamp_path(gbdt, run).write_text("{not json")
    assert why_incomplete(gbdt, run) is not None
    assert [s.name for s, will in plan(run) if will] == ["gbdt", "inference"]


def test_another_recipe_reruns_stages_2_to_4_and_never_an_image_model(tmp_path, data_dir):
    run = make_run(data_dir, tmp_path / "work", "demo", tune=True)
    _mark_done(run)
    plus = dataclasses.replace(run, recipe="plus")
    assert [s.name for s, will in plan(plus) if will] == ["tune_gbdt", "gbdt", "inference"]
    for stage in STAGES:
        assert ("recipe" in stage.parameters(plus)) == (stage.name in ("tune_gbdt", "gbdt"))


def test_tune_adds_the_tuning_stage_and_feeds_its_params_to_gbdt(tmp_path: Path, data_dir: Path):
    """Stage 3 reads what the earlier stages write: the tuning stage's best params file and the
    folders of every image stage's OOF."""
    run = make_run(data_dir, tmp_path / "work", "demo", tune=True)
    steps = {s.name: s for s, _ in plan(run)}
    names = list(steps)
    assert names.index("tune_gbdt") == names.index("gbdt") - 1
    gbdt, tune = steps["gbdt"], steps["tune_gbdt"]
    params = gbdt.parameters(run)
    assert Path(params["params_path"]).name == "best_params.json"
    assert Path(params["params_path"]) in tune.outputs(run)
    oof_folders = [
        str(path.parent)
        for name, stage in steps.items()
        if name.startswith("image_")
        for path in stage.outputs(run)
        if path.name == "oof.csv"
    ]
    assert params["image_oof_dirs"] == oof_folders and len(oof_folders) == len(IMAGE_MODELS)
    assert "params_path" not in gbdt.parameters(dataclasses.replace(run, tune=False))


def test_run_executes_in_order_then_skips_everything(tmp_path, standins, data_dir, capsys):
    run = make_run(data_dir, tmp_path / "work", "demo", tune=True)
    ran = run_pipeline(run, notebooks_dir=standins)
    assert ran == [s.name for s, _ in plan(run, force=True)]
    calls = _calls(tmp_path)
    assert [c["notebook"] for c in calls] == [s.notebook for s, _ in plan(run, force=True)]
    image = calls[0]["params"]
    assert image["data_dir"] == str(data_dir) and image["output_dir"] == str(run.artifacts)
    assert image == {**image, "preset": "demo"} and len(image) == 3  # no recipe: see below
    assert [c["params"]["recipe"] for c in calls[4:-1]] == ["paper", "paper"]  # tuning, GBDT
    inference = calls[-1]["params"]
    assert "recipe" not in inference  # read from the GBDT artifacts
    assert inference["artifacts_dir"] == str(run.artifacts)
    assert inference["output_dir"] == str(run.work_dir)
    assert (run.work_dir / "submission.csv").is_file()
    assert sorted(p.name for p in run.executed.glob("*.ipynb")) == sorted(
        s.notebook for s in NOTEBOOK_STAGES
    )
    out = capsys.readouterr().out
    assert "[1/7] image_convnextv2_nano: running" in out and "done in" in out
    # the kernel's printed lines reach a stdout that is not a terminal, behind the stage name
    assert "  gbdt | stand-in 03_gbdt.ipynb ran" in out
    assert "RESULTS" in out and "0 to 0.2" in out

    assert run_pipeline(run, notebooks_dir=standins) == []
    assert len(_calls(tmp_path)) == len(calls)
    assert capsys.readouterr().out.count("skipped (outputs complete") == 7


def test_force_moves_every_stage_output_aside_before_it_reruns(tmp_path, standins, data_dir):
    run = make_run(data_dir, tmp_path / "work", "demo")
    run_pipeline(run, notebooks_dir=standins)
    stale = run.artifacts / "vit_tiny" / "fold4.pt"
    stale.write_text("left over from an earlier run")
    assert run_pipeline(run, notebooks_dir=standins, force=True) == [s.name for s, _ in plan(run)]
    assert not stale.exists()
    assert (run.artifacts / ".previous" / "vit_tiny" / "fold4.pt").is_file()
    assert (run.artifacts / "vit_tiny" / "fold0.pt").is_file()
    assert (run.work_dir / "submission.csv").is_file()


def test_failure_stops_with_error_and_executed_notebook_then_resumes(tmp_path, standins, data_dir):
    _notebook(standins / "03_gbdt.ipynb", "raise ValueError('planted failure in gbdt')")
    run = make_run(data_dir, tmp_path / "work", "demo")
    with pytest.raises(PipelineError) as err:
        run_pipeline(run, notebooks_dir=standins)
    message = str(err.value)
    executed = run.executed / "03_gbdt.ipynb"
    assert "stage gbdt failed: ValueError: planted failure in gbdt" in message
    assert str(executed) in message and executed.is_file()
    assert "04_inference.ipynb" not in [c["notebook"] for c in _calls(tmp_path)]
    assert not stamp_path(next(s for s in STAGES if s.name == "gbdt"), run).exists()

    _notebook(standins / "03_gbdt.ipynb", _body("03_gbdt.ipynb", _writes("03_gbdt.ipynb")))
    assert run_pipeline(run, notebooks_dir=standins) == ["gbdt", "inference"]


def test_stage_that_does_not_write_its_outputs_fails(tmp_path, standins, data_dir):
    _notebook(standins / "01_image_vit_tiny.ipynb", "print('forgot to save')")
    run = make_run(data_dir, tmp_path / "work", "demo")
    stage = next(s for s in STAGES if s.name == "image_vit_tiny")
    with pytest.raises(PipelineError, match=r"image_vit_tiny finished without writing .*oof\.csv"):
        run_stage(stage, run, standins)


def test_cli_missing_notebook_fails_before_any_work(tmp_path, data_dir, capsys):
    empty = tmp_path / "no_notebooks"
    empty.mkdir()
    argv = ["--data-dir", str(data_dir), "--work-dir", str(tmp_path / "w"), "--notebooks-dir"]
    assert pipeline.main([*argv, str(empty)]) == 1
    err = capsys.readouterr().err
    assert "notebook(s) not found" in err and "01_image_convnextv2_nano.ipynb" in err
    assert "04_inference.ipynb (stage inference)" in err
    assert not (tmp_path / "w" / "executed").exists()


def test_bad_options_are_rejected(tmp_path: Path, data_dir: Path):
    (data_dir / "test-image.hdf5").unlink()
    with pytest.raises(PipelineError, match=r"lacks \['test-image.hdf5'\]"):
        make_run(data_dir, tmp_path, "demo")
    with pytest.raises(PipelineError, match="--rows sizes generated data"):
        make_run(data_dir, tmp_path, "demo", rows=100)
    with pytest.raises(PipelineError, match="unknown preset 'huge'"):
        make_run(None, tmp_path, "huge")


def test_synthetic_data_stage_generates_once(tmp_path: Path):
    run = make_run(None, tmp_path / "work", "demo", rows=200, seed=3)
    run = dataclasses.replace(
        run, sizes=dataclasses.replace(run.sizes, test_rows=5, patients=20, image_size=32)
    )
    data_stage = STAGES[0]
    assert plan(run)[0] == (data_stage, True)
    run_stage(data_stage, run)
    assert all((run.data_dir / name).is_file() for name in DATA_FILES)
    assert pl.read_csv(run.data_dir / "train-metadata.csv").height == 200
    assert plan(run)[0] == (data_stage, False)
    assert plan(dataclasses.replace(run, seed=4))[0] == (data_stage, True)
    assert (tmp_path / "work" / "data-truth.csv").is_file()  # README: <data dir>-truth.csv


def test_synthetic_data_stage_refuses_fewer_positive_patients_than_folds(tmp_path: Path):
    run = make_run(None, tmp_path / "work", "demo", rows=200, seed=3)
    run = dataclasses.replace(run, sizes=dataclasses.replace(run.sizes, patients=3, test_rows=5))
    with pytest.raises(ValueError, match="fewer than the 5 cross-validation folds"):
        run_stage(STAGES[0], run)
    assert not (run.data_dir / "train-metadata.csv").exists()


def test_stage_run_by_hand_into_the_work_dir_is_detected_and_rerun(tmp_path, data_dir):
    """README's papermill example pointed at the pipeline's own folder rewrites gbdt/: the stamp's
    hashes no longer match, so the stage and every later one run again."""
    run = make_run(data_dir, tmp_path / "work", "demo")
    _mark_done(run)
    gbdt = next(s for s in STAGES if s.name == "gbdt")
    (run.artifacts / "gbdt" / "manifest.json").write_text('{"run_id": "by hand"}')
    assert "changed since the pipeline wrote them" in why_incomplete(gbdt, run)
    assert [s.name for s, will in plan(run) if will] == ["gbdt", "inference"]
    legacy = json.loads(stamp_path(gbdt, run).read_text())["parameters"]
    stamp_path(gbdt, run).write_text(json.dumps({"parameters": legacy}))  # no hashes recorded
    assert why_incomplete(gbdt, run) is not None


def test_weights_dir_gives_each_image_stage_its_backbone_file(tmp_path: Path, data_dir: Path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "vit_tiny.pth").write_text("")
    with pytest.raises(PipelineError, match=r"lacks \['convnextv2_nano.pth', 'vit_small.pth'\]"):
        make_run(data_dir, tmp_path / "work", "full", weights_dir=weights)
    (weights / "convnextv2_nano.pth").write_text("")
    (weights / "vit_small.pth").write_text("")
    run = make_run(data_dir, tmp_path / "work", "full", weights_dir=weights)
    got = {s.name: s.parameters(run).get("weights_path") for s, _ in plan(run)}
    assert got == {
        "image_convnextv2_nano": str(weights / "convnextv2_nano.pth"),
        "image_vit_tiny": str(weights / "vit_tiny.pth"),
        "image_vit_tiny_suspicious": str(weights / "vit_tiny.pth"),
        "image_vit_small_suspicious": str(weights / "vit_small.pth"),
        "gbdt": None,
        "inference": None,
    }
    no_weights = make_run(data_dir, tmp_path / "work", "full")
    assert "weights_path" not in plan(no_weights)[0][0].parameters(no_weights)


def test_stage_output_passes_whole_lines_and_heartbeat_fills_silence():
    lines: list[str] = []
    output = StageOutput(lines.append, "  gbdt |")
    output.write("fold 0: pAUC 0.12")
    assert lines == []  # a partial line waits for its end
    output.write("\nfold 1\r")
    assert lines == ["  gbdt | fold 0: pAUC 0.12", "  gbdt | fold 1"]
    beats: list[str] = []
    with heartbeat(beats.append, "[3/7] gbdt", StageOutput(beats.append, ""), 90.0, every_s=0.1):
        import time

        time.sleep(0.5)
    assert beats and beats[0].startswith("[3/7] gbdt: still running, 0 s elapsed")
    assert "(last run took 1 min 30 s)" in beats[0]


def test_results_block_reports_scores_scale_best_and_where(tmp_path: Path):
    run = make_run(None, tmp_path / "work", "demo")
    gbdt = run.artifacts / "gbdt"
    gbdt.mkdir(parents=True)
    report = {
        "scores": {"lgb_meta": {"overall": 0.101}, "ensemble": {"overall": 0.123}},
        "filtered": {
            "available": True,
            "rows_left_out": 7,
            "training": "on every row",
            "scores": {"ensemble": {"overall": 0.117}},
        },
        "ablation": [
            {"setting": "image-only: img_vit_tiny", "pauc": 0.021},
            {"setting": "metadata-only: lgb_meta", "pauc": 0.101},
            {"setting": "full: soft vote of members", "pauc": 0.123},
        ],
    }
    (gbdt / "cv_report.json").write_text(json.dumps(report))
    (gbdt / "roc.png").write_text("")
    (run.work_dir / "submission.csv").write_text("isic_id,target\n")
    pl.DataFrame(
        {
            "split": ["train"] * 6,
            "target": [1, 0, 0, 1, 0, 0],
            "prob": [0.9, 0.1, 0.2, 0.8, 0.3, 0.4],
        }
    ).write_csv(tmp_path / "work" / "data-truth.csv")
    text = results_block(run)
    words = " ".join(text.split())  # long lines are wrapped
    assert "0 to 0.2" in words and "about 0.02" in words
    assert "best achievable on this synthetic data (its true probabilities): 0.2000" in text
    assert "lgb_meta" in text and "0.1230" in text
    assert "ensemble, filtered 0.1170" in words and "without the 7 target-0 rows" in words
    assert "image-only: img_vit_tiny" in text and "metadata-only: lgb_meta" in text
    assert "full: soft vote" not in text  # the ensemble row is already listed above
    assert "score near random (about 0.02) on purpose" in words
    assert f"submission: {run.work_dir / 'submission.csv'}" in text
    assert f"plots: {gbdt / '*.png'}" in text
    assert "submission report" not in text  # absent files are not pointed to
    assert "best achievable" not in results_block(dataclasses.replace(run, generate=False))


def test_cli_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: work)" in out and "(default: demo)" in out and "--weights-dir" in out


def _pipeline(work: Path, *options: str) -> subprocess.CompletedProcess:
    """The README's main command at demo size (300 rows to keep CI short), checked to exit 0."""
    cmd = [sys.executable, "-m", "utils.pipeline", "--work-dir", str(work), "--preset", "demo"]
    done = subprocess.run(
        [*cmd, "--rows", "300", *options], cwd=REPO, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, f"pipeline failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _artifact_folders(work: Path) -> list[Path]:
    return [work / "artifacts" / m for m in IMAGE_MODELS] + [work / "artifacts" / "gbdt"]


def _check_outputs_of_this_data(work: Path) -> dict[str, dict]:
    """Every artifact folder matches its manifest and was made from the data dir as it is now;
    the GBDT records the image runs that are there; the submission fits the test file. Returns
    each folder's manifest."""
    data = work / "data"
    train = pl.read_csv(data / "train-metadata.csv", infer_schema_length=None)
    folds = dict(zip(train["isic_id"], assign_folds(train, DEMO_FOLDS), strict=True))
    manifests = {}
    for folder in _artifact_folders(work):
        assert verify_manifest(folder) == [], folder
        manifests[folder.name] = read_manifest(folder)
    for model, spec in IMAGE_MODELS.items():
        record = manifests[model]["config"]
        assert record["config"]["label"] == spec.label and record["config"]["preset"] == "demo"
        assert record["data"]["rows"] == train.height
        oof = read_oof(work / "artifacts" / model / "oof.csv")
        assert all(folds[i] == f for i, f in oof.select("isic_id", "fold").rows())
    gbdt = manifests["gbdt"]["config"]
    assert gbdt["data"]["rows"] == train.height
    assert {s["image_model"]: s["config_hash"] for s in gbdt["image_sources"].values()} == {
        m: manifests[m]["config"]["config_hash"] for m in IMAGE_MODELS
    }
    test_ids = pl.read_csv(data / "test-metadata.csv")["isic_id"].to_list()
    validate_submission(pl.read_csv(work / "submission.csv"), test_ids)
    return manifests


@pytest.mark.slow
def test_real_notebooks_demo_then_new_seed_then_force_then_resume(tmp_path: Path):
    """README promises on the real notebooks: a changed seed reruns every stage on the new data
    (earlier outputs moved aside, never mixed in), --force retrains everything from scratch, and
    a run with nothing changed skips every stage."""
    work = tmp_path / "work"
    done = _pipeline(work)
    first = _check_outputs_of_this_data(work)
    data_hash = file_sha256(work / "data" / "train-metadata.csv")
    assert {p.name for p in (work / "executed").glob("*.ipynb")} == {
        s.notebook for s in NOTEBOOK_STAGES if s.name != "tune_gbdt"
    }

    done = _pipeline(work, "--seed", "4")
    assert "skipped (outputs complete" not in done.stdout
    assert file_sha256(work / "data" / "train-metadata.csv") != data_hash
    second = _check_outputs_of_this_data(work)
    for name, manifest in second.items():
        assert manifest["config_hash"] != first[name]["config_hash"], name  # new data
    assert (work / "artifacts" / ".previous" / "vit_tiny" / "manifest.json").is_file()

    done = _pipeline(work, "--seed", "4", "--force")
    assert "skipped (outputs complete" not in done.stdout
    third = _check_outputs_of_this_data(work)
    for name, manifest in third.items():
        assert manifest["config_hash"] == second[name]["config_hash"], name  # same run ...
        assert manifest["run_id"] != second[name]["run_id"], name  # ... made again
    executed = (work / "executed" / "01_image_vit_tiny.ipynb").read_text()
    assert "finished earlier, skipped" not in executed  # no fold was kept from before

    done = _pipeline(work, "--seed", "4")
    assert done.stdout.count("skipped (outputs complete") == 7
    assert "RESULTS" in done.stdout and "best achievable on this synthetic data" in done.stdout
    assert "image-only: img_vit_tiny" in done.stdout and "metadata-only: lgb_meta" in done.stdout

    # README's example of a stage run by hand: its own output_dir, a list as a JSON string (-p
    # passes text); the pipeline's state is left as it was
    oof_dirs = json.dumps([str(work / "artifacts" / m) for m in ("convnextv2_nano", "vit_tiny")])
    by_hand = subprocess.run(
        [sys.executable, "-m", "papermill", "notebooks/03_gbdt.ipynb"]
        + [str(work / "03_gbdt.by-hand.ipynb"), "-p", "data_dir", str(work / "data")]
        + ["-p", "output_dir", str(work / "by-hand"), "-p", "image_oof_dirs", oof_dirs],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    assert read_manifest(work / "by-hand" / "gbdt")["config"]["image_sources"].keys() == {
        "img_convnextv2_nano", "img_vit_tiny",
    }  # fmt: skip
    done = _pipeline(work, "--seed", "4")
    assert done.stdout.count("skipped (outputs complete") == 7


def _image_files(work: Path) -> dict[str, str]:
    """sha256 of every file under the image models' artifact folders."""
    folders = [work / "artifacts" / m for m in IMAGE_MODELS]
    return {str(p): file_sha256(p) for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_real_notebooks_paper_then_plus_reuse_every_image_run(tmp_path: Path):
    """`--recipe plus` after a `paper` run: every image stage is skipped and its folder is the
    same files byte for byte (no image model retrained); the GBDT builds and records plus's
    feature groups and blend, and the submission kernel reads the recipe from its artifacts."""
    work = tmp_path / "work"
    _pipeline(work)
    paper = _check_outputs_of_this_data(work)
    image_files = _image_files(work)
    assert len(image_files) >= 4 * (DEMO_FOLDS + 3)  # folds, oof, config, history, manifest

    done = _pipeline(work, "--recipe", "plus")
    for model in IMAGE_MODELS:
        assert f"image_{model}: skipped (outputs complete" in done.stdout, model
    assert _image_files(work) == image_files  # reused byte for byte, nothing retrained
    manifests = _check_outputs_of_this_data(work)
    for model in IMAGE_MODELS:
        assert manifests[model]["run_id"] == paper[model]["run_id"]
    gbdt = work / "artifacts" / "gbdt"
    plus = resolve("demo", "plus").gbdt
    assert manifests["gbdt"]["config"]["gbdt"]["recipe"] == "plus"
    features = json.loads((gbdt / "features.json").read_text())
    assert features["recipe"] == "plus"
    groups = features["feature_groups"]
    assert groups == {g: getattr(plus, g) for g in FEATURE_GROUPS}
    report = json.loads((gbdt / "cv_report.json").read_text())
    assert report["blend"]["kind"] == plus.blend and report["recipe"] == "plus"
    assert report["filtered"]["available"] and report["filtered"]["training"] == "on every row"
    submission_report = json.loads((work / "submission_report.json").read_text())
    assert submission_report["recipe"] == "plus"
    assert "RESULTS" in done.stdout and "ensemble" in done.stdout


# ---------------------------------------------------------------------------------- signals, lock


def _slow_gbdt(standins: Path, pid_file: Path) -> None:
    """A gbdt stand-in that records its kernel's pid and then runs for a minute."""
    body = _body("03_gbdt.ipynb", [])
    body += f"import time\nPath({str(pid_file)!r}).write_text(str(os.getpid()))\ntime.sleep(60)\n"
    _notebook(standins / "03_gbdt.ipynb", body)


def _start_pipeline(data_dir: Path, work: Path, standins: Path) -> subprocess.Popen:
    """`python -m utils.pipeline` in its own process group, as a terminal starts a job."""
    cmd = [sys.executable, "-m", "utils.pipeline", "--data-dir", str(data_dir)]
    cmd += ["--work-dir", str(work), "--notebooks-dir", str(standins)]
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file() or not path.read_text():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "to_group", "code"), [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)]
)
def test_signal_stops_the_running_stage_unstamped_then_rerun_resumes(
    tmp_path, standins, data_dir, sig, to_group, code
):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM to the pid stops
    the pipeline within seconds: the stage's kernel is gone, the stage is not stamped done, no
    later stage runs, one line says which stage and how to resume; the rerun resumes there."""
    work, pid_file = tmp_path / "work", tmp_path / "kernel.pid"
    _slow_gbdt(standins, pid_file)
    process = _start_pipeline(data_dir, work, standins)
    _wait_for(pid_file, process)
    kernel = int(pid_file.read_text())
    sent = time.monotonic()
    os.killpg(process.pid, sig) if to_group else process.send_signal(sig)
    out, err = process.communicate(timeout=60)
    stopped_in = time.monotonic() - sent
    assert process.returncode == code, (out, err)
    assert stopped_in < 15, stopped_in
    print(f"stopped {stopped_in:.1f} s after {sig.name}")
    line = f"STOPPED by {sig.name}: stage gbdt stopped and not marked done"
    assert line in err and "python -m utils.pipeline --data-dir" in err, err
    assert "RESULTS" not in out and "inference: running" not in out
    run = make_run(data_dir, work, "demo")
    gbdt = next(s for s in STAGES if s.name == "gbdt")
    assert not stamp_path(gbdt, run).exists()
    assert not _alive(kernel), f"kernel {kernel} still running"
    images = {p: p.read_bytes() for p in run.executed.glob("image_*.done.json")}
    assert len(images) == len(IMAGE_MODELS)

    _notebook(standins / "03_gbdt.ipynb", _body("03_gbdt.ipynb", _writes("03_gbdt.ipynb")))
    resumed = _start_pipeline(data_dir, work, standins)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert out.count("skipped (outputs complete") == len(IMAGE_MODELS)
    assert "] gbdt: running 03_gbdt.ipynb" in out and "] gbdt: skipped" not in out
    assert {p: p.read_bytes() for p in images} == images  # earlier stages kept as they were
    assert stamp_path(gbdt, run).is_file() and (work / "submission.csv").is_file()


@pytest.mark.slow
def test_second_run_on_a_work_dir_stops_at_once_naming_the_holder(tmp_path, standins, data_dir):
    """While one pipeline runs, a second on the same work dir stops at once naming the first's
    pid and start time; after the first is killed (SIGKILL: no clean-up), its lock is free."""
    work, pid_file = tmp_path / "work", tmp_path / "kernel.pid"
    _slow_gbdt(standins, pid_file)
    first = _start_pipeline(data_dir, work, standins)
    _wait_for(pid_file, first)
    holder = json.loads((work / LOCK_FILE).read_text())
    assert holder["pid"] == first.pid
    start = time.monotonic()
    second = _start_pipeline(data_dir, work, standins)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 1 and time.monotonic() - start < 15
    assert f"in use by another pipeline run (pid {first.pid}, started {holder['started']})" in err
    assert "running" not in out  # nothing of the work dir was touched

    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    with work_dir_lock(work):  # a dead holder's lock is taken over
        assert json.loads((work / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_lock_is_exclusive_and_released_on_any_exit(tmp_path: Path):
    busy = pytest.raises(WorkDirBusy, match=rf"pid {os.getpid()}, started 20")
    with work_dir_lock(tmp_path) as path, busy, work_dir_lock(tmp_path):
        pass
    with pytest.raises(ValueError), work_dir_lock(tmp_path):
        raise ValueError("a failure inside the block")
    with work_dir_lock(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_kernel_interrupt_noise_is_filtered(tmp_path: Path, data_dir: Path, capfd):
    """The kernel's 'KeyboardInterrupt caught in kernel.' ERROR line (jupyter_client interrupts
    a kernel before shutting it down) never reaches the pipeline's output; other errors do."""
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    body = (
        "log = get_ipython().kernel.log\n"
        "log.error('KeyboardInterrupt caught in kernel.')\n"
        "log.error('a real kernel error')\n"
    )
    _notebook(nb_dir / "03_gbdt.ipynb", body)
    run = make_run(data_dir, tmp_path / "work", "demo")
    gbdt = next(s for s in STAGES if s.name == "gbdt")
    with pytest.raises(PipelineError):  # the stand-in writes no outputs
        run_stage(gbdt, run, nb_dir)
    err = capfd.readouterr().err
    assert "a real kernel error" in err and "KeyboardInterrupt caught" not in err
