"""utils.image.budget and the training time budget: no fold starts that cannot finish in time;
the run ends cleanly naming the remaining folds, and a second session finishes them."""

import json

import pytest
import test_train as base
from test_train import tiny_config

import utils.image.train as train
from utils.image.budget import DEFAULT_TIME_BUDGET_H, Budget
from utils.layout import OOF_FILE, PROGRESS_FILE
from utils.oof import read_oof
from utils.settings import resolve
from utils.tabular import tuning

small_set = base.small_set  # the fixture: 60 synthetic rows and their hdf5 file


def test_budget_estimates_a_fold_by_the_folds_measured():
    now = [0.0]
    budget = Budget(2.5 * 3600, clock=lambda: now[0])
    assert budget.allows() and budget.fold_estimate() == 0.0  # nothing measured: start it
    budget.record(3600.0)
    now[0] = 3600.0
    assert budget.allows() and budget.left() == pytest.approx(1.5 * 3600)
    budget.record(5400.0)
    now[0] = 9000.0 - 3600.0
    assert budget.fold_estimate() == pytest.approx(4500.0)
    assert not budget.allows()
    assert Budget(None).allows() and Budget(None).left() == float("inf")
    assert DEFAULT_TIME_BUDGET_H == 11.0


def test_a_run_out_of_time_ends_cleanly_and_the_next_session_finishes(
    small_set, tmp_path, monkeypatch
):
    """Each fold 'takes' an hour on a fake clock; a 2.5 h budget trains folds 0 and 1 of 3."""
    meta, images = small_set
    cfg = tiny_config(n_folds=3, epochs=1)
    now = [1_000_000.0]
    real_fold = train.train_fold

    def fold_taking_an_hour(*args, **kwargs):
        now[0] += 3600.0
        return real_fold(*args, **kwargs)

    monkeypatch.setattr(train.time, "time", lambda: now[0])
    monkeypatch.setattr(train, "train_fold", fold_taking_an_hour)
    first = tmp_path / "session1"
    oof = train.train_image_model(cfg, meta, images, first, time_budget_h=2.5)
    run_dir = first / cfg.model_name
    progress = json.loads((run_dir / PROGRESS_FILE).read_text())
    assert progress == {"finished": [0, 1], "remaining": [2], "over_budget": [2]}
    assert not (run_dir / OOF_FILE).exists()
    assert sorted(oof["fold"].unique().to_list()) == [0, 1]
    assert not list(run_dir.glob("fold2*"))  # fold 2 never started

    second = tmp_path / "session2"
    oof = train.train_image_model(
        cfg, meta, images, second, folds=[2], resume_from=first, time_budget_h=2.5
    )
    run_dir = second / cfg.model_name
    assert not (run_dir / PROGRESS_FILE).exists()
    written = read_oof(run_dir / OOF_FILE)
    assert written.height == meta.height and set(written["isic_id"]) == set(meta["isic_id"])
    assert (written.sort("isic_id")["pred"] == oof.sort("isic_id")["pred"]).all()


def test_tuning_full_preset_gets_a_time_budget_by_default():
    full = resolve("full", "paper").tuning
    assert full.timeout is None  # the preset itself has none; run_tuning adds it
    assert tuning.with_time_budget(full).timeout == tuning.FULL_TIMEOUT_S
    kinds = len(full.kinds)
    assert kinds * tuning.FULL_TIMEOUT_S <= 9 * 3600  # leaves 3 h of Kaggle's 12
    chosen = resolve("full", "paper", tuning={"timeout": 600.0}).tuning
    assert tuning.with_time_budget(chosen).timeout == 600.0
    demo = resolve("demo", "paper").tuning
    assert tuning.with_time_budget(demo) == demo
