"""Shared fixtures: the real sample files and one small synthetic data dir per test session."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SHARED_DATA = REPO.parent / "shared" / "data"

SYNTHETIC = dict(rows=1500, patients=60, positive_rate=0.03, image_size=64, test_rows=100, seed=7)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: 5 real train rows and the 3 real test rows with their crops."""
    return FIXTURES


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic data dir in the Kaggle layout (see SYNTHETIC), made once per session."""
    from utils.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    summary = generate(root / "data", workers=1, **SYNTHETIC)
    return summary.out_dir


def _standin_image_run(synthetic_dir: Path, root: Path, n_folds: int) -> Path:
    """A stand-in image model dir (`vit_tiny/`: oof.csv, config.json, manifest.json) for
    `synthetic_dir`: a noisy score that leans towards the target, on `n_folds` folds."""
    import numpy as np
    import polars as pl
    from standins import write_image_run

    from utils.folds import with_folds
    from utils.io import DataDir

    train = with_folds(DataDir(synthetic_dir).train_metadata(), n_folds)
    rng = np.random.default_rng(1)
    pred = np.clip(0.3 * train["target"].to_numpy() + 0.7 * rng.random(train.height), 0, 1)
    oof = train.select("isic_id", "patient_id", "fold", "target").with_columns(pred=pl.Series(pred))
    return write_image_run(root / "vit_tiny", oof, n_folds=n_folds)


@pytest.fixture(scope="session")
def image_oof_dir(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in image OOF dir on the standard (paper, full preset) 5 folds."""
    from utils.settings import N_FOLDS

    return _standin_image_run(synthetic_dir, tmp_path_factory.mktemp("image_oof"), N_FOLDS)


@pytest.fixture(scope="session")
def demo_image_oof_dir(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in image OOF dir on the demo preset's folds (what a demo stage 3 expects)."""
    from utils.settings import DEMO_FOLDS

    return _standin_image_run(synthetic_dir, tmp_path_factory.mktemp("demo_oof"), DEMO_FOLDS)


@pytest.fixture(scope="session")
def artifacts(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo submission artifacts (tests/inference_artifacts.py): <dir>/vit_tiny (2 fold
    checkpoints) and <dir>/gbdt trained with img_vit_tiny, built once per session."""
    from inference_artifacts import build_artifacts

    return build_artifacts(synthetic_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def test_data(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first TEST_ROWS rows of the synthetic test set with their images; a test that
    changes them works on a copy."""
    from inference_artifacts import small_test_set

    return small_test_set(synthetic_dir, tmp_path_factory.mktemp("test_data"))


@pytest.fixture(scope="session")
def intact_scores(artifacts: Path, test_data: Path) -> dict:
    """Every GBDT member's score and the vote on `test_data` with the intact artifacts,
    computed apart from the kernel."""
    from inference_artifacts import member_scores

    return member_scores(artifacts, test_data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real PH2 and HAM10000); tests that need it skip, saying why, without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real external data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def external_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated PH2 + HAM10000 data dir in the real layout (tests/standins.py), so the
    stage 5 tests run in a clean clone; the real files are tested by test_external.py."""
    from standins import write_external_data

    return write_external_data(tmp_path_factory.mktemp("external"))


# ------------------------------------------------------------------ the inner loop: -m "not slow"

# A test that runs a notebook, the pipeline, a built kernel or any other child process (directly,
# through a helper under tests/, or through a fixture) is `slow`: `pytest -m "not slow"` is the
# inner loop, and CI runs everything. Marking by this rule keeps a new notebook test out of the
# inner loop without anyone remembering to mark it; the few tests that train models for minutes
# in-process are marked by hand.
PROCESS_CALLS = ("run_notebook(", "execute_notebook(", "subprocess.run(", "subprocess.Popen(")


def _runs_a_process(fn, seen: set) -> bool:
    """True if `fn`, or a function of its own module that it calls (transitively), starts one."""
    if fn in seen:
        return False
    seen.add(fn)
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    if any(call in source for call in PROCESS_CALLS):
        return True
    module = inspect.getmodule(fn)
    called = (getattr(module, name, None) for name in set(re.findall(r"\b(\w+)\(", source)))
    return any(
        inspect.isfunction(obj) and _is_test_code(obj) and _runs_a_process(obj, seen)
        for obj in called
    )


def _is_test_code(fn) -> bool:
    """A function defined under tests/ (a test module's helper, or one another test imports)."""
    path = inspect.getsourcefile(fn)
    return path is not None and Path(path).resolve().is_relative_to(REPO / "tests")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") or not isinstance(item, pytest.Function):
            continue
        seen: set = set()
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if any(_runs_a_process(fn, seen) for fn in [item.function, *fixtures]):
            item.add_marker(pytest.mark.slow)
