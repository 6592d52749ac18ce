"""The ablation on Kaggle: the built 06_ablation kernel run off the repository against emulated,
read-only inputs, and `kaggle_run --ablation` through the fake Kaggle of test_kaggle_run."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import polars as pl
import test_kaggle_run as fake_kaggle
from standins import write_image_run
from test_kaggle import code_sources
from test_kaggle_kernels import _run_off_repo
from test_notebook_ablation import check_table

from utils.folds import with_folds
from utils.io import DataDir
from utils.kaggle import build as kb, embed as ke, metadata as km, run as kr
from utils.layout import ABLATION_FILE, ABLATION_TABLE_FILE
from utils.settings import N_FOLDS
from utils.tabular import ablation_stage as stage

KERNEL = kb.ABLATION_KERNEL
OWNER, FakeKaggle = fake_kaggle.OWNER, fake_kaggle.FakeKaggle
run, state_of = fake_kaggle.run, fake_kaggle.state_of
# test_kaggle_run's fixtures: the real kernel builds, built once; the local weights folder
build_once, weights_dir = fake_kaggle.build_once, fake_kaggle.weights_dir


def _set_writable(root: Path, writable: bool) -> None:
    """Every folder and file under `root` (and root) read-only, as Kaggle mounts its inputs, or
    writable again (so pytest can remove the tmp dir)."""
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        bits = stat.S_IWUSR if writable else 0
        path.chmod((mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) | bits)


def _standin_image_dataset(data_dir: Path, dataset: Path) -> list[str]:
    """The image-model dataset as 01_image_* kernels leave it: one run dir per registered image
    model (oof.csv, config.json, manifest.json) on the standard folds, each a different noisy
    score leaning towards the target."""
    train = with_folds(DataDir(data_dir).train_metadata(), N_FOLDS)
    base = train.select("isic_id", "patient_id", "fold", "target")
    models = list(kb.DATASET_CONTENTS[kb.IMAGE_DATASET])
    for k, model in enumerate(models):
        rng = np.random.default_rng(10 + k)
        noise = rng.random(train.height)
        pred = np.clip(0.3 * train["target"].to_numpy() + 0.7 * noise, 0, 1)
        oof = base.with_columns(pred=pl.Series(pred))
        write_image_run(dataset / model, oof, model_name=model, n_folds=N_FOLDS)
    return models


def test_built_ablation_kernel_runs_off_repo_on_read_only_inputs(tmp_path, synthetic_dir):
    """The registered 06_ablation kernel, built with its Kaggle parameters (the competition and
    the four image runs of the image dataset) at demo size, runs with the repository off
    sys.path against a read-only input tree without a truth file, and writes the table."""
    inputs = tmp_path / "input"
    competition = inputs / "competitions" / kb.COMPETITION
    shutil.copytree(synthetic_dir, competition)
    models = _standin_image_dataset(synthetic_dir, inputs / kb.IMAGE_DATASET)
    candidates = ["ugly_duckling", "patient_image", "blend"]
    params = {
        **kb.KAGGLE_PARAMETERS[KERNEL],
        "preset": "demo",
        "output_dir": ".",
        "seeds": [0, 1],
        "candidates": candidates,
        "members": ["lgb_meta", "lgb"],
        "threads": 1,
    }
    repo_ids = frozenset(kb.defined_datasets().values())
    folder = kb.KERNELS_DIR / KERNEL
    built = kb.build_kernel(folder, tmp_path / "build", OWNER, params, kb.NOTEBOOKS_DIR, repo_ids)
    meta = kb.read_json(built / kb.KERNEL_METADATA)
    assert km._built_problems(built, meta) == []
    assert meta["enable_gpu"] is False and meta["enable_internet"] is False
    assert meta["dataset_sources"] == [f"{OWNER}/{kb.IMAGE_DATASET}"]
    assert meta["competition_sources"] == [kb.COMPETITION]

    _set_writable(inputs, False)  # as Kaggle mounts them (a root run writes anyway: the
    try:  # helper also checks that every input file comes out unchanged)
        ran = _run_off_repo(built, inputs).cwd
    finally:
        _set_writable(inputs, True)
    record = json.loads((ran / ABLATION_FILE).read_text())
    assert record["preset"] == "demo" and record["image_models"] == models
    assert all(Path(d).is_relative_to(inputs / kb.IMAGE_DATASET) for d in record["image_oof_dirs"])
    assert Path(record["data_dir"]) == competition
    check_table(record, candidates, [0, 1])
    assert (
        f"Kept: {', '.join(record['kept']) or 'none'}." in (ran / ABLATION_TABLE_FILE).read_text()
    )
    executed = (ran / "executed.ipynb").read_text()
    assert "unpacked to" in executed and "real image OOF pAUC alone" in executed
    assert not list(inputs.rglob("*-truth.csv"))  # real data: no truth file to draw from


def test_the_ablation_kernel_embeds_no_generator_and_no_torch_code():
    """The CPU kernel carries the ablation core, not the synthetic generator (the stand-ins'
    truth file is the command line's business) nor any image-model code."""
    code = code_sources(kb.NOTEBOOKS_DIR / f"{KERNEL}.ipynb")
    code.append(km.injected_source(kb.KAGGLE_PARAMETERS[KERNEL]))
    modules = ke.kernel_modules(code)
    files = {p.relative_to(kb.REPO_ROOT).as_posix() for p in modules}
    assert {"utils/tabular/ablation.py", "utils/tabular/ablation_stage.py"} <= files
    assert not files & {"utils/synthetic.py", "utils/image/models.py", "utils/pipeline.py"}
    libraries = ke.kernel_libraries(ke.utils_archive(modules), code)
    assert "torch" not in libraries and {"lightgbm", "polars"} <= set(libraries)


# ------------------------------------------------------------------ kaggle_run --ablation

RESULTS = pl.DataFrame(
    {
        "row": ["paper", "paper + ugly_duckling", "paper + site_features", "paper + blend"] * 2
        + ["plus (kept: ugly_duckling, blend)"] * 2,
        "seed": [0, 0, 0, 0, 1, 1, 1, 1, 0, 1],
        "pauc": [0.150, 0.153, 0.149, 0.152, 0.151, 0.154, 0.150, 0.1525, 0.155, 0.156],
        "wall_s": [100.0] * 10,
    }
)
KEPT = ["ugly_duckling", "blend"]


class AblationKaggle(FakeKaggle):
    """FakeKaggle whose 06_ablation version writes what utils.tabular.ablation_stage writes."""

    def kernel_output(self, ref: str, version: int, path: Path) -> list[str]:
        if self.kernel_of[ref] != KERNEL:
            return super().kernel_output(ref, version, path)
        self.calls.append(("output", KERNEL, version))
        summary = stage.summary_table(RESULTS, KEPT)
        record = {"kept": KEPT, "rows": summary.to_dicts(), "per_seed": RESULTS.to_dicts()}
        (path / ABLATION_FILE).write_text(json.dumps(record))
        settings = {"preset": "full", "seeds": [0, 1], "bag_seeds": 2, "members": ["lgb"]}
        table = stage.markdown(summary, KEPT, {**settings, "image_models": ["vit_tiny"]})
        (path / ABLATION_TABLE_FILE).write_text(table)
        return [str(path / ABLATION_FILE), str(path / ABLATION_TABLE_FILE)]


def test_ablation_step_runs_the_kernel_once_the_image_dataset_is_ready(tmp_path, weights_dir):
    fake = AblationKaggle()
    stopped, lines = run(tmp_path, fake, weights_dir, ablation=True)
    assert stopped is None, stopped
    pushes = [c[1] for c in fake.actions(("push", "create"))]
    image_dataset = pushes.index(kb.IMAGE_DATASET)
    assert pushes[image_dataset + 1 : image_dataset + 3] == [KERNEL, "03_gbdt"]
    state = state_of(tmp_path)
    record = state["kernels"][KERNEL]
    assert record["status"] == "complete" and record["against"] == {kb.IMAGE_DATASET: 1}
    assert set(record["outputs"]) == {ABLATION_FILE}
    assert fake.mounted[(record["ref"], 1)] == {f"{OWNER}/{kb.IMAGE_DATASET}": 1}
    downloaded = tmp_path / "work" / "outputs" / KERNEL
    assert json.loads((downloaded / ABLATION_FILE).read_text())["kept"] == KEPT
    assert (downloaded / ABLATION_TABLE_FILE).is_file()
    assert state["ablation"] == {"kept": KEPT, "version": 1}
    said = [line for line in lines if line.startswith("ablation")]
    assert any("kept: ugly_duckling, blend (table: " in line for line in said)
    site = next(line for line in said if "paper + site_features" in line)
    assert "gain -0.0010 ± 0.0000" in site and site.endswith("not kept: a loss")
    assert "steps" in state and "ablation" in state["steps"]

    before = len(fake.calls)  # a rerun pushes nothing and prints the kept set again
    stopped, lines = run(tmp_path, fake, weights_dir, ablation=True)
    assert stopped is None, stopped
    assert not [c for c in fake.calls[before:] if c[0] == "push"]
    assert any("kept: ugly_duckling, blend" in line for line in lines)

    fake.bump(kb.IMAGE_DATASET)  # new image runs: the ablation runs again on them
    before = len(fake.calls)
    stopped, _ = run(tmp_path, fake, weights_dir, ablation=True)
    assert stopped is None, stopped
    assert [c[1] for c in fake.calls[before:] if c[0] == "push"][0] == KERNEL
    assert state_of(tmp_path)["kernels"][KERNEL]["against"] == {kb.IMAGE_DATASET: 2}


def test_without_the_flag_the_ablation_kernel_is_built_but_never_pushed(tmp_path, weights_dir):
    fake = AblationKaggle()
    stopped, _ = run(tmp_path, fake, weights_dir)
    assert stopped is None, stopped
    assert (tmp_path / "build" / KERNEL / f"{KERNEL}.ipynb").is_file()
    assert KERNEL not in [c[1] for c in fake.calls]
    assert "ablation" not in state_of(tmp_path)["steps"]
    stopped, _ = run(tmp_path, fake, weights_dir, only="ablation")
    assert "step 'ablation' is not part of this run" in stopped and "--ablation" in stopped


def test_the_flag_is_kept_in_the_resume_command_and_shown_in_the_plan(tmp_path, capsys):
    args = kr.parse_args(["--owner", OWNER, "--ablation", "--work-dir", str(tmp_path)])
    assert "--ablation" in kr.options_from(args).resume_command().split()
    assert kr.main(["--owner", OWNER, "--work-dir", str(tmp_path), "--ablation", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert f"push {OWNER}/fusionnetx-isic2024-ablation -> v1" in plan
    assert "print its table and the kept set" in plan
