"""The training-kernel projection's image counts and hour arithmetic (bench/bench_training.py)."""

import pytest

from bench import bench_training as bt
from utils.settings import image_config


def test_images_per_fold_before_and_after_the_recipe():
    cfg = image_config("vit_tiny", "full")  # 5 folds, 30 epochs, 2x positives + 1:1 negatives
    after = bt.fold_images(cfg, rows=100_000, positives=500, malignant=100, recipe=True)
    assert after.train == pytest.approx(30 * 4 * 400)  # about 4P images an epoch
    assert after.validation == pytest.approx(30 * 20 * 11)  # held-out positives + 10 each
    assert after.oof == pytest.approx(20_000)  # the whole held-out fold, once
    before = bt.fold_images(cfg, rows=100_000, positives=500, malignant=100, recipe=False)
    assert before.train == pytest.approx(30 * 21 * 400)
    assert (before.validation, before.oof) == (30 * 20_000, 0.0)


def test_kernel_hours_take_the_slower_of_gpu_and_loader_per_phase():
    images = bt.Images(train=3600.0, validation=7200.0, oof=0.0)
    # GPU: 1 GFLOP per forward at 1/65,000 of the peak = 1 img/s; training costs 3x
    hours = bt.kernel_hours(images, 1.0, 1 / 65_000, aug_rate=1e9, eval_rate=1.0, folds=2)
    assert hours == pytest.approx({"train": 6.0, "validation": 4.0, "oof": 0.0, "total": 10.0})
    slow_loader = bt.kernel_hours(images, 1e-9, 1.0, aug_rate=0.5, eval_rate=1e9, folds=1)
    assert slow_loader["train"] == pytest.approx(2.0)


def test_projection_table_states_the_goal(capsys):
    args = bt.argparse.Namespace(
        data_dir=None, suspicious=1500, kaggle_workers=4, utilisation=[0.1]
    )
    gflops = {"convnextv2_nano": 4.89, "vit_tiny": 2.15, "vit_small": 8.48}
    table = bt.project(args, gflops, aug=400.0, decode=4000.0)
    assert len(table) == 4 and all(row["after"]["total"] < bt.GOAL_HOURS for row in table)
    assert "under the 4 h goal" in capsys.readouterr().out
