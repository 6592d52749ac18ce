"""The pipeline's stages (utils.pipeline): what a run is, and per stage its notebook (or Python
step), its parameters, its outputs and the folder it owns. Every stage reads its settings from
utils.settings (preset x recipe); a stage's parameters are names and paths only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.layout import (
    BEST_PARAMS_FILE,
    CONFIG_FILE,
    CV_REPORT_FILE,
    GBDT_DIR,
    MANIFEST_FILE,
    OOF_FILE,
    SUBMISSION_FILE,
    TUNING_DIR,
    fold_file,
)
from utils.manifest import set_aside
from utils.settings import IMAGE_MODELS, N_FOLDS, SyntheticConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DATA_FILES = ("train-metadata.csv", "train-image.hdf5", "test-metadata.csv", "test-image.hdf5")


class PipelineError(RuntimeError):
    """The pipeline cannot start or a stage failed (message says which and where)."""


@dataclass(frozen=True)
class Run:
    """One pipeline invocation: where data and outputs live, the preset and recipe."""

    data_dir: Path
    work_dir: Path
    preset: str
    sizes: SyntheticConfig  # of the generated data dir
    recipe: str = "paper"
    seed: int = 0
    generate: bool = False
    tune: bool = False
    weights_dir: Path | None = None  # <backbone>.pth files, one per image stage's weights_path

    @property
    def artifacts(self) -> Path:
        """Folder of every stage's artifacts (the submission kernel's artifacts_dir)."""
        return self.work_dir / "artifacts"

    @property
    def executed(self) -> Path:
        """Folder of executed notebooks and stage stamps."""
        return self.work_dir / "executed"


@dataclass(frozen=True)
class Stage:
    """One step: a notebook run with papermill (or `action` for a Python step) and its outputs."""

    name: str
    notebook: str
    parameters: Callable[[Run], dict[str, Any]]
    outputs: Callable[[Run], list[Path]]  # a name may hold a glob pattern (fold*.pt)
    enabled: Callable[[Run], bool] = lambda run: True
    action: Callable[[dict[str, Any]], None] | None = None
    folder: Callable[[Run], Path] | None = None  # what the stage owns; set aside when forced


def _given(**values: Any) -> dict[str, Any]:
    """Parameters without the None ones (None keeps the notebook's default)."""
    return {k: v for k, v in values.items() if v is not None}


def _generate_data(params: dict[str, Any]) -> None:
    """Write the synthetic data dir (utils.synthetic.generate) in place of an earlier one."""
    from utils.synthetic import generate

    set_aside(Path(params["out_dir"]))
    generate(**params, require_positive_patients=N_FOLDS)


def _data_parameters(run: Run) -> dict[str, Any]:
    """Arguments of utils.synthetic.generate for this run."""
    return _given(out_dir=str(run.data_dir), seed=run.seed, **dataclasses.asdict(run.sizes))


def _image_stage(model: str) -> Stage:
    """Stage 1 for one image model: no recipe among its parameters, since no recipe changes
    stage 1 (ImageConfig's identity leaves it out too), so switching it reuses every image run."""
    backbone = IMAGE_MODELS[model].backbone

    def parameters(run: Run) -> dict[str, Any]:  # weights_path None: random init
        weights = None if run.weights_dir is None else str(run.weights_dir / f"{backbone}.pth")
        return _given(**_common(run, run.artifacts, recipe=False), weights_path=weights)

    return Stage(
        name=f"image_{model}",
        notebook=f"01_image_{model}.ipynb",
        parameters=parameters,
        outputs=lambda run: [
            run.artifacts / model / name
            for name in (OOF_FILE, CONFIG_FILE, fold_file("*"), MANIFEST_FILE)
        ],
        folder=lambda run: run.artifacts / model,
    )


def _common(run: Run, output_dir: Path, recipe: bool = True) -> dict[str, Any]:
    """The parameters every stage notebook takes; the recipe only where it changes the output."""
    common = {"data_dir": str(run.data_dir), "output_dir": str(output_dir), "preset": run.preset}
    return {**common, "recipe": run.recipe} if recipe else common


def _image_oof_dirs(run: Run) -> list[str]:
    """The four image models' artifact folders."""
    return [str(run.artifacts / model) for model in IMAGE_MODELS]


def _best_params(run: Run) -> Path:
    """Where stage 2 writes its best parameters."""
    return run.artifacts / TUNING_DIR / BEST_PARAMS_FILE


STAGES: list[Stage] = [
    Stage(
        name="synthetic_data",
        notebook="",
        parameters=_data_parameters,
        outputs=lambda run: [run.data_dir / name for name in DATA_FILES],
        enabled=lambda run: run.generate,
        action=_generate_data,
        folder=lambda run: run.data_dir,
    ),
    *[_image_stage(model) for model in IMAGE_MODELS],
    Stage(
        name="tune_gbdt",
        notebook="02_tune_gbdt.ipynb",
        parameters=lambda run: _given(
            **_common(run, run.artifacts), image_oof_dirs=_image_oof_dirs(run)
        ),
        outputs=lambda run: [_best_params(run), run.artifacts / TUNING_DIR / MANIFEST_FILE],
        enabled=lambda run: run.tune,
        folder=lambda run: run.artifacts / TUNING_DIR,
    ),
    Stage(
        name="gbdt",
        notebook="03_gbdt.ipynb",
        parameters=lambda run: _given(
            **_common(run, run.artifacts),
            image_oof_dirs=_image_oof_dirs(run),
            params_path=str(_best_params(run)) if run.tune else None,
        ),
        outputs=lambda run: [
            run.artifacts / GBDT_DIR / n for n in (OOF_FILE, CV_REPORT_FILE, MANIFEST_FILE)
        ],
        folder=lambda run: run.artifacts / GBDT_DIR,
    ),
    Stage(
        name="inference",
        notebook="04_inference.ipynb",
        # the recipe comes from the GBDT artifacts (gbdt/features.json), never a parameter
        parameters=lambda run: _given(
            **_common(run, run.work_dir, recipe=False), artifacts_dir=str(run.artifacts)
        ),
        outputs=lambda run: [run.work_dir / SUBMISSION_FILE],
    ),
]
