"""utils.pipeline: stage plan, resume, failure reporting (stand-in notebooks) and the real demo."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from notebook_checks import write_standin_notebook

from utils import pipeline
from utils.pipeline import (
    DATA_FILES,
    IMAGE_MODELS,
    STAGES,
    PipelineError,
    is_complete,
    make_run,
    plan,
    run_pipeline,
    run_stage,
    stamp_path,
)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_STAGES = [s for s in STAGES if s.notebook]
PARAM_NAMES = [
    "data_dir", "output_dir", "preset", "image_size", "epochs", "batch_size", "num_workers",
    "image_oof_dirs", "params_path", "n_trials", "timeout", "artifacts_dir",
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
            return [f"{{output_dir}}/{model}/{n}" for n in ("oof.csv", "config.json", "fold0.pt")]
    return {
        "02_tune_gbdt.ipynb": ["{output_dir}/tuning/best_params.json"],
        "03_gbdt.ipynb": ["{output_dir}/gbdt/oof.csv", "{output_dir}/gbdt/cv_report.json"],
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


def _mark_done(run: pipeline.Run) -> None:
    """Write every enabled stage's outputs and stamp, as a finished run would."""
    for stage, _ in plan(run):
        for path in stage.outputs(run):
            path = path.with_name(path.name.replace("*", "0"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        stamp_path(stage, run).parent.mkdir(parents=True, exist_ok=True)
        stamp_path(stage, run).write_text(json.dumps({"parameters": stage.parameters(run)}))


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
    smaller = dataclasses.replace(run, sizes=dataclasses.replace(run.sizes, epochs=2))
    assert [s.name for s, will in plan(smaller) if will][0] == "image_convnextv2_nano"
    gbdt = next(s for s in STAGES if s.name == "gbdt")
    stamp_path(gbdt, run).write_text("{not json")
    assert not is_complete(gbdt, run)
    assert [s.name for s, will in plan(run) if will] == ["gbdt", "inference"]


def test_tune_adds_the_tuning_stage_and_feeds_its_params_to_gbdt(tmp_path: Path, data_dir: Path):
    run = make_run(data_dir, tmp_path / "work", "demo", tune=True)
    names = [s.name for s, _ in plan(run)]
    assert names.index("tune_gbdt") == names.index("gbdt") - 1
    gbdt = next(s for s in STAGES if s.name == "gbdt")
    assert gbdt.parameters(run)["params_path"] == str(run.artifacts / "tuning/best_params.json")
    assert gbdt.parameters(run)["image_oof_dirs"] == [str(run.artifacts / m) for m in IMAGE_MODELS]
    assert "params_path" not in gbdt.parameters(dataclasses.replace(run, tune=False))


def test_run_executes_in_order_then_skips_everything(tmp_path, standins, data_dir, capsys):
    run = make_run(data_dir, tmp_path / "work", "demo", tune=True)
    ran = run_pipeline(run, notebooks_dir=standins)
    assert ran == [s.name for s, _ in plan(run, force=True)]
    calls = _calls(tmp_path)
    assert [c["notebook"] for c in calls] == [s.notebook for s, _ in plan(run, force=True)]
    image = calls[0]["params"]
    assert image["data_dir"] == str(data_dir) and image["output_dir"] == str(run.artifacts)
    assert image["epochs"] == pipeline.PRESETS["demo"].epochs and image["preset"] == "demo"
    inference = calls[-1]["params"]
    assert inference["artifacts_dir"] == str(run.artifacts)
    assert inference["output_dir"] == str(run.work_dir)
    assert (run.work_dir / "submission.csv").is_file()
    assert sorted(p.name for p in run.executed.glob("*.ipynb")) == sorted(
        s.notebook for s in NOTEBOOK_STAGES
    )
    out = capsys.readouterr().out
    assert "[1/7] image_convnextv2_nano: running" in out and "done in" in out

    assert run_pipeline(run, notebooks_dir=standins) == []
    assert len(_calls(tmp_path)) == len(calls)
    assert capsys.readouterr().out.count("skipped (outputs complete") == 7


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
    run = make_run(None, tmp_path / "work", "demo", rows=80, seed=3)
    run = dataclasses.replace(
        run, sizes=dataclasses.replace(run.sizes, test_rows=5, patients=8, data_image_size=32)
    )
    data_stage = STAGES[0]
    assert plan(run)[0] == (data_stage, True)
    run_stage(data_stage, run)
    assert all((run.data_dir / name).is_file() for name in DATA_FILES)
    assert pl.read_csv(run.data_dir / "train-metadata.csv").height == 80
    assert plan(run)[0] == (data_stage, False)
    assert plan(dataclasses.replace(run, seed=4))[0] == (data_stage, True)


def test_demo_pipeline_end_to_end(tmp_path: Path):
    """The README's main command on the real notebooks (fails, not skips, if one is missing)."""
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "utils.pipeline", "--work-dir", str(work), "--preset", "demo"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"pipeline failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    submission = pl.read_csv(work / "submission.csv")
    test_ids = pl.read_csv(work / "data" / "test-metadata.csv")["isic_id"]
    assert submission.columns == ["isic_id", "target"]
    assert sorted(submission["isic_id"].to_list()) == sorted(test_ids.to_list())
    assert submission["target"].null_count() == 0
    assert submission["target"].is_between(0, 1).all()
    assert {p.name for p in (work / "executed").glob("*.ipynb")} == {
        s.notebook for s in NOTEBOOK_STAGES if s.name != "tune_gbdt"
    }
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipped (outputs complete") == 7
