"""`build --recipe plus`: the tuning and GBDT kernels run the recipe, the submission kernel reads
it from the GBDT dataset; the built 03 and 04 run off the repository under emulated inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import polars as pl
import pytest

from utils.kaggle import build as kb, input as ki, metadata as km
from utils.settings import DEMO_FOLDS, resolve
from utils.submission_file import validate_submission

RECIPE_KERNELS = ("02_tune_gbdt", "03_gbdt")


def _injected(built: Path) -> str:
    """The injected parameters cell of a built kernel."""
    meta = kb.read_json(built / kb.KERNEL_METADATA)
    cells = nbformat.read(built / meta["code_file"], as_version=4).cells
    return next(c.source for c in cells if km.INJECTED_TAG in c.metadata.get("tags", []))


def test_build_recipe_reaches_the_tuning_and_gbdt_kernels_only(tmp_path: Path):
    built = {p.name: p for p in kb.build_all(tmp_path / "plus", "alice", recipe="plus")}
    for name, folder in built.items():
        cell = _injected(folder)
        if name in RECIPE_KERNELS:
            assert "recipe = 'plus'" in cell, name
        else:  # image kernels: no recipe changes them; submission: read from the GBDT dataset
            assert "recipe" not in cell, name
    paper = kb.build_all(tmp_path / "paper", "alice")
    assert "recipe = 'paper'" in _injected(next(p for p in paper if p.name == "03_gbdt"))
    with pytest.raises(kb.KaggleBuildError, match="unknown recipe"):
        kb.build_all(tmp_path / "bad", "alice", recipe="best")
    cli = ["build", "--owner", "alice", "--out", str(tmp_path / "cli"), "--recipe", "plus"]
    assert kb.main(cli) == 0
    assert "recipe = 'plus'" in _injected(tmp_path / "cli" / "03_gbdt")


def _papermill_off_repo(notebook: Path, inputs: Path) -> subprocess.CompletedProcess:
    """Execute a built notebook in its folder with the repository off sys.path, inputs mounted."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({ki.KAGGLE_INPUT_ENV: str(inputs), "TMPDIR": str(notebook.parent / "tmp")})
    (notebook.parent / "tmp").mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "papermill", notebook.name, "executed.ipynb", "-k", "python3"]
    return subprocess.run(
        cmd, cwd=notebook.parent, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_built_gbdt_and_submission_kernels_run_plus_off_repo(tmp_path: Path, synthetic_dir):
    """03 built with recipe plus trains the plus GBDT (blend, groups, recipe recorded); 04, which
    takes no recipe, reads it from that GBDT dataset and writes a valid submission with it."""
    from utils.image.train import run_image_stage

    inputs = tmp_path / "input"
    shutil.copytree(synthetic_dir, inputs / "competitions" / kb.COMPETITION)
    sizes = {"epochs": 1, "image_size": 32, "batch_size": 32, "num_workers": 0}
    images = inputs / kb.IMAGE_DATASET
    run_image_stage("vit_tiny", synthetic_dir, images, "demo", n_folds=DEMO_FOLDS, **sizes)

    demo = {"preset": "demo", "output_dir": "."}
    gbdt_params = {
        **kb.KAGGLE_PARAMETERS["03_gbdt"],
        **demo,
        "recipe": "plus",
        "image_oof_dirs": [kb.InputPath(kb.IMAGE_DATASET, "vit_tiny")],
        "threads": 1,
    }
    folder = kb.KERNELS_DIR / "03_gbdt"
    gbdt_kernel = kb.build_kernel(folder, tmp_path / "build", "alice", gbdt_params)
    done = _papermill_off_repo(gbdt_kernel / "03_gbdt.ipynb", inputs)
    assert done.returncode == 0, done.stderr[-3000:]
    gbdt = gbdt_kernel / "gbdt"
    plus = resolve("demo", "plus").gbdt
    features = json.loads((gbdt / "features.json").read_text())
    report = json.loads((gbdt / "cv_report.json").read_text())
    assert features["recipe"] == report["recipe"] == "plus"
    assert report["blend"]["kind"] == plus.blend
    assert json.loads((gbdt / "ensemble.json").read_text())["recipe"] == "plus"
    assert report["filtered"]["available"] and report["filtered"]["rows_left_out"] > 0
    shutil.copytree(gbdt, inputs / kb.GBDT_DATASET / "gbdt")

    sources = (("vit_tiny", kb.IMAGE_DATASET), ("gbdt", kb.GBDT_DATASET))
    submit_params = {
        **kb.KAGGLE_PARAMETERS[kb.SUBMISSION_KERNEL],
        **demo,
        "artifacts_dir": km.LinkedInputs(sources),
        "num_workers": 0,
    }
    assert "recipe" not in submit_params
    folder = kb.KERNELS_DIR / kb.SUBMISSION_KERNEL
    submit_kernel = kb.build_kernel(folder, tmp_path / "build", "alice", submit_params)
    meta = kb.read_json(submit_kernel / kb.KERNEL_METADATA)
    done = _papermill_off_repo(submit_kernel / meta["code_file"], inputs)
    assert done.returncode == 0, done.stderr[-3000:]
    test_ids = pl.read_csv(synthetic_dir / "test-metadata.csv")["isic_id"].to_list()
    validate_submission(pl.read_csv(submit_kernel / "submission.csv"), test_ids)
    submission_report = json.loads((submit_kernel / "submission_report.json").read_text())
    assert submission_report["recipe"] == "plus"
    assert submission_report["mode"].startswith("full: image models ['vit_tiny']")
    assert "recipe: plus" in (submit_kernel / "executed.ipynb").read_text()
