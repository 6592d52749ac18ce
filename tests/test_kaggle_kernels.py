"""Built kernels run as Kaggle runs them: built for an owner, copied away from the repository
(no PYTHONPATH: only the embedded utils), executed by papermill under this environment's
package set against an emulated /kaggle/input that must come out unchanged (Kaggle mounts it
read-only). At tiny sizes: the tuning kernel and the image kernels other than vit_tiny (which
tests/test_kaggle.py runs in two sessions)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from utils.kaggle import build as kb, input as ki
from utils.layout import BEST_PARAMS_FILE

TINY_IMAGE = {
    "output_dir": ".", "preset": "demo", "n_folds": 2, "epochs": 1, "image_size": 32,
    "batch_size": 16, "num_workers": 0,
}  # fmt: skip


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root: (size, modification time), to tell that nothing wrote there."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run_off_repo(built: Path, inputs: Path) -> subprocess.CompletedProcess:
    """Execute a built kernel in a copy of its folder with the repository off sys.path; the
    inputs must be left as they were."""
    before = _snapshot(inputs)
    elsewhere = built.parent / f"{built.name}-elsewhere"
    shutil.copytree(built, elsewhere)
    (elsewhere / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({ki.KAGGLE_INPUT_ENV: str(inputs), "TMPDIR": str(elsewhere / "tmp")})
    notebook = kb.read_json(elsewhere / kb.KERNEL_METADATA)["code_file"]
    cmd = [sys.executable, "-m", "papermill", notebook, "executed.ipynb", "-k", "python3"]
    done = subprocess.run(
        cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _snapshot(inputs) == before, "the kernel wrote into its read-only inputs"
    done.cwd = elsewhere  # type: ignore[attr-defined]
    return done


@pytest.mark.slow
@pytest.mark.parametrize(
    "model", ["convnextv2_nano", "vit_tiny_suspicious", "vit_small_suspicious"]
)
def test_built_image_kernel_trains_from_the_weights_dataset_off_repo(
    tmp_path, synthetic_dir, model
):
    import timm
    import torch

    from utils.image.models import BACKBONES

    inputs = tmp_path / "input"
    shutil.copytree(synthetic_dir, inputs / "competitions" / kb.COMPETITION)
    backbone = kb.IMAGE_BACKBONES[model]
    weights = inputs / "datasets" / "alice" / kb.WEIGHTS_DATASET / f"{backbone}.pth"
    weights.parent.mkdir(parents=True)
    torch.save(timm.create_model(BACKBONES[backbone].timm_name).state_dict(), weights)
    kernel = f"01_image_{model}"
    params = {**kb.KAGGLE_PARAMETERS[kernel], **TINY_IMAGE, "folds": [0]}  # one fold: time
    built = kb.build_kernel(kb.KERNELS_DIR / kernel, tmp_path / "build", "alice", params)

    ran = _run_off_repo(built, inputs).cwd
    config = json.loads((ran / model / "config.json").read_text())["config"]
    assert config["weights_path"] == str(weights) and config["image_size"] == 32
    assert config["label"] == ("suspicious" if model.endswith("_suspicious") else "target")
    assert [p.name for p in (ran / model).glob("fold*.pt")] == ["fold0.pt"]
    progress = json.loads((ran / model / "progress.json").read_text())
    assert progress["finished"] == [0] and progress["remaining"] == [1]
    executed = (ran / "executed.ipynb").read_text()
    assert "libraries: torch " in executed and "FusionNetX utils" in executed


@pytest.mark.slow
def test_built_tuning_kernel_tunes_off_repo(tmp_path, synthetic_dir, demo_image_oof_dir):
    inputs = tmp_path / "input"
    shutil.copytree(synthetic_dir, inputs / "competitions" / kb.COMPETITION)
    shutil.copytree(
        demo_image_oof_dir, inputs / "datasets" / "alice" / kb.IMAGE_DATASET / "vit_tiny"
    )
    params = {
        **kb.KAGGLE_PARAMETERS["02_tune_gbdt"],
        "output_dir": ".",
        "preset": "demo",
        "image_oof_dirs": [kb.InputPath(kb.IMAGE_DATASET, "vit_tiny")],
        "kinds": ["lgb"],
        "n_trials": 1,
        "timeout": 60,
        "threads": 1,
    }
    built = kb.build_kernel(kb.KERNELS_DIR / "02_tune_gbdt", tmp_path / "build", "alice", params)
    meta = kb.read_json(built / kb.KERNEL_METADATA)
    assert meta["enable_gpu"] is False and meta["enable_internet"] is False

    ran = _run_off_repo(built, inputs).cwd
    best = json.loads((ran / "tuning" / BEST_PARAMS_FILE).read_text())
    assert list(best) == ["lgb"] and best["lgb"]
    summary = (ran / "tuning" / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("kind,") and summary[1].startswith("lgb,")
    assert "img_vit_tiny" in (ran / "executed.ipynb").read_text()
