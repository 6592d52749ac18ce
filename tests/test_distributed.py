"""DDP on CPU: 2 gloo processes draw, train, predict and write what one process does; a failing
rank stops the run with its error.

The spawned ranks import this module (spawn passes sys.path) to run its module-level functions,
so it imports at the top only what every rank needs (torch, utils.image.distributed: 2 s a process)
and utils.image.train & co. (timm, albumentations: 6 s) in the functions that use them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from utils.image import distributed
from utils.image.distributed import Group, RankBatches, RankFailed, gather_predictions, launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 7 positives, neg_ratio 0.8: 14 + 11 = 25 images an epoch; batch 4 over 2 ranks gives 6 full
# batches and a last one of 1 image, which leaves rank 0 a padding piece
LABELS = np.array([1.0] * 7 + [0.0] * 30, dtype=np.float32)
NEG_RATIO, BATCH = 0.8, 4
IDS = [f"ISIC_{i:03d}" for i in range(11)]
TRAIN_SETTINGS = dict(
    n_folds=2,
    epochs=1,
    image_size=32,
    batch_size=16,
    num_workers=0,
    dropout=0.0,
    eval_batch_size=32,
)


class Tiny(nn.Module):
    """A deterministic model with ImageModel's forward contract (logits, mean BCE loss)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 1)

    def forward(self, images, targets=None):
        out = {"logits": self.fc(images.flatten(1)).squeeze(1)}
        if targets is not None:
            out["loss"] = nn.functional.binary_cross_entropy_with_logits(out["logits"], targets)
        return out


def sampler():
    from utils.image.data import NegativeResampler

    return NegativeResampler(LABELS, NEG_RATIO, pos_repeat=2, seed=3, fold=1)


def tiny_start() -> tuple[torch.Tensor, torch.Tensor, Tiny]:
    """Inputs, targets and the initial model, from seed 0."""
    torch.manual_seed(0)
    features = torch.randn(2 * len(LABELS), 3, 2, 2)  # index i + len: a positive's 2nd copy
    return features, torch.from_numpy(np.tile(LABELS, 2)), Tiny()


def tiny_epoch(group: Group) -> dict:
    """One epoch of fold_training.train_one_epoch on Tiny (under DDP on several ranks): its
    weights and mean loss."""
    from utils.image import fold_training
    from utils.settings import image_config

    features, targets, net = tiny_start()
    batches = RankBatches(sampler(), BATCH, group.rank, group.world_size)
    batches.set_epoch(2)
    loader = [{"image": features[i], "target": targets[i]} for i in batches]
    cfg = image_config("vit_tiny", "demo", max_grad_norm=1.0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = fold_training.train_one_epoch(
        fold_training.with_ddp(net, group),
        loader,
        optimizer,
        scheduler,
        scaler,
        cfg,
        group.device,
        "tiny",
        loss_weights=batches.loss_weights(),
        group=group,
    )
    return {"loss": loss, "weights": {k: v.clone() for k, v in net.state_dict().items()}}


def rank_checks() -> dict:
    """In each of 2 gloo ranks: its batches of the draw, its share of a prediction, one epoch of
    Tiny. Rank 0 returns every rank's results."""
    group = distributed.current()
    batches = RankBatches(sampler(), BATCH, group.rank, group.world_size)
    batches.set_epoch(2)
    predicted = []

    def predict(ids):
        predicted.extend(ids)
        return np.array([int(i[5:]) + 0.5 for i in ids])

    result = {
        "batches": list(batches),
        "weights": batches.loss_weights(),
        "gathered": gather_predictions(group, IDS, predict),
        "predicted": predicted,
        "epoch": tiny_epoch(group),
    }
    return group.all_gather(result)


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return launch(rank_checks, (), world_size=2, device_type="cpu", timeout_s=120)


def test_ranks_split_each_batch_of_the_one_process_draw(ranks):
    one = sampler()
    one.set_epoch(2)
    draw = list(one)
    batches = [draw[s : s + BATCH] for s in range(0, len(draw), BATCH)]
    assert len(draw) == 25 and len(batches[-1]) == 1  # the padding case is exercised
    assert list(RankBatches(one, BATCH)) == batches  # one process: the DataLoader's batches
    for rank in ranks:
        assert len(rank["batches"]) == len(batches)  # the same number of DDP steps
    kept = []
    for step, batch in enumerate(batches):
        pieces = [r["batches"][step] for r in ranks if r["weights"][step] > 0]
        assert sum(pieces, []) == batch  # disjoint pieces that make up the global batch
        kept.extend(sum(pieces, []))
        # weights n_r * 2 / m: their mean over the ranks is 1 (the DDP average)
        assert sum(r["weights"][step] for r in ranks) == pytest.approx(2.0)
    assert kept == draw  # the union is the draw: nothing dropped, nothing repeated
    assert ranks[0]["weights"][-1] == 0.0 and ranks[0]["batches"][-1] == batches[-1]


def test_ranks_predict_disjoint_shares_joined_back_by_id(ranks):
    expected = np.array([int(i[5:]) + 0.5 for i in IDS])
    for rank in ranks:
        np.testing.assert_array_equal(rank["gathered"], expected)
    shares = [r["predicted"] for r in ranks]
    assert all(shares) and sum(shares, []) == IDS


def test_ddp_epoch_equals_one_process_with_the_whole_batch(ranks):
    one = tiny_epoch(Group())
    for rank in ranks:
        assert rank["epoch"]["loss"] == pytest.approx(one["loss"], rel=1e-6)
        for name, value in one["weights"].items():
            torch.testing.assert_close(rank["epoch"]["weights"][name], value, rtol=1e-5, atol=1e-6)
    start = tiny_start()[2].fc.weight.detach()
    assert not torch.allclose(one["weights"]["fc.weight"], start, atol=1e-2)  # the epoch moved them


def fail_on_rank_one() -> None:
    group = distributed.current()
    if group.rank == 1:
        raise ValueError("rank 1 cannot read fold3.pt")
    group.barrier()  # rank 0 waits for a peer that has failed


def outwait_the_timeout() -> None:
    group = distributed.current()
    if group.rank == 1:
        time.sleep(60)  # alive but never at the barrier
    group.barrier()


def test_a_failing_rank_stops_the_run_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailed) as failure:
        launch(fail_on_rank_one, (), world_size=2, device_type="cpu", timeout_s=60)
    message = str(failure.value)
    assert message.startswith("rank 1 of 2 failed:\nTraceback (most recent call last):")
    assert "in fail_on_rank_one" in message
    assert "ValueError: rank 1 cannot read fold3.pt" in message
    assert time.monotonic() - start < 45  # stopped by the launcher, not by the 60 s timeout


def test_a_rank_stuck_past_the_timeout_fails_the_run():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 0 of 2 failed:\nTraceback"):
        launch(outwait_the_timeout, (), world_size=2, device_type="cpu", timeout_s=4)
    assert time.monotonic() - start < 50  # not the 60 s the other rank sleeps


# ---------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def small_data(synthetic_dir, tmp_path_factory):
    """A data dir of 60 synthetic rows (8 positives from several patients)."""
    import polars as pl

    from utils.io import DataDir

    meta = DataDir(synthetic_dir).train_metadata()
    keep = pl.concat(
        [meta.filter(pl.col("target") == 1).head(8), meta.filter(pl.col("target") == 0).head(52)]
    )
    root = tmp_path_factory.mktemp("small")
    keep.write_csv(root / "train-metadata.csv")
    (root / "train-image.hdf5").symlink_to(synthetic_dir / "train-image.hdf5")
    return root


@pytest.fixture(scope="module")
def one_process(small_data, tmp_path_factory):
    """The reference: the run of one process (both folds)."""
    from utils.image.train import run_image_stage

    out = tmp_path_factory.mktemp("one")
    cfg, oof = run_image_stage("vit_tiny", small_data, out, world_size=1, **TRAIN_SETTINGS)
    return cfg, oof, out / cfg.model_name


def copy_files(source, target, names) -> None:
    target.mkdir(parents=True)
    for name in names:
        (target / name).write_bytes((source / name).read_bytes())


def assert_same_run(run_dir, reference_dir):
    """The same files, config_hash, OOF rows and (fp16) fold weights as the reference run."""
    import polars as pl

    from utils.manifest import verify_manifest

    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted(p.name for p in reference_dir.iterdir())
    assert names == [
        "config.json",
        "fold0.pt",
        "fold1.pt",
        "history.csv",
        "manifest.json",
        "oof.csv",
    ]
    assert verify_manifest(run_dir) == []
    dirs = (run_dir, reference_dir)
    record, reference = (json.loads((d / "config.json").read_text()) for d in dirs)
    assert record == reference  # the process count is no setting: the same config_hash
    oof, expected = (pl.read_csv(d / "oof.csv").sort("isic_id") for d in dirs)
    assert oof.drop("pred").equals(expected.drop("pred"))
    np.testing.assert_allclose(oof["pred"], expected["pred"], atol=2e-4)
    for k in range(2):
        ours, theirs = (torch.load(d / f"fold{k}.pt", weights_only=True) for d in dirs)
        assert ours["val_ids"] == theirs["val_ids"] and ours["best_epoch"] == theirs["best_epoch"]
        for name, value in theirs["state_dict"].items():
            torch.testing.assert_close(ours["state_dict"][name], value, rtol=2e-3, atol=2e-3)
    history, expected = (pl.read_csv(d / "history.csv") for d in dirs)
    assert history.select("fold", "epoch").equals(expected.select("fold", "epoch"))
    np.testing.assert_allclose(history["train_loss"], expected["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(history["val_loss"], expected["val_loss"], rtol=1e-3)


@pytest.mark.slow  # trains models for minutes on 2 cores: CI, not the inner loop
def test_two_spawned_gloo_processes_train_a_fold_like_one(one_process, small_data, tmp_path):
    """train_image_model with world_size=2 spawns 2 gloo ranks; they train fold 0 from scratch
    (fold 1 comes from the reference run) and rank 0 writes the same run as one process."""
    from utils.image.train import train_image_model
    from utils.io import DataDir

    cfg, expected, reference_dir = one_process
    copy_files(reference_dir, tmp_path / cfg.model_name, ["config.json", "fold1.pt"])
    metadata = DataDir(small_data).train_metadata()
    images = small_data / "train-image.hdf5"
    cpu = torch.device("cpu")
    oof = train_image_model(cfg, metadata, images, tmp_path, cpu, world_size=2)
    assert oof.drop("pred").equals(expected.drop("pred"))  # rank 0's return reaches the parent
    assert_same_run(tmp_path / cfg.model_name, reference_dir)


def test_torchrun_entry_point_continues_a_one_process_run(one_process, small_data, tmp_path):
    """torchrun's 2 gloo ranks finish a run whose fold 0 one process trained (a run started on
    one GPU continues on two): fold 0 is skipped by rank 0's view, fold 1 trained by DDP."""
    cfg, _, reference_dir = one_process
    run_dir = tmp_path / cfg.model_name
    copy_files(reference_dir, run_dir, ["config.json", "fold0.pt"])
    settings = [f"{k}={v}" for k, v in TRAIN_SETTINGS.items()]
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
        *("-m", "utils.image.train_ddp", "vit_tiny", "--data-dir", str(small_data)),
        *("--output-dir", str(tmp_path), "--preset", "demo", "--backend", "gloo"),
        *("--set", *settings),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vit_tiny: 2 ranks, gloo" in done.stdout
    assert f"fold 0: finished earlier, skipped ({run_dir / 'fold0.pt'})" in done.stdout
    assert_same_run(run_dir, reference_dir)


def test_entry_point_arguments():
    from utils.image.train_ddp import build_parser
    from utils.settings import image_config

    args = build_parser().parse_args(
        ["vit_small_suspicious", "--data-dir", "d", "--output-dir", "o", "--folds", "2", "3"]
        + ["--set", "epochs=3", "lr=0.0002", "weights_path=/w/vit_small.pth", "max_grad_norm=null"]
    )
    assert (args.model, args.preset, args.folds, args.backend) == (
        "vit_small_suspicious",
        "full",
        [2, 3],
        None,
    )
    overrides = dict(args.overrides)
    assert overrides == {
        "epochs": 3,
        "lr": 0.0002,
        "weights_path": "/w/vit_small.pth",
        "max_grad_norm": None,
    }
    cfg = image_config(args.model, args.preset, **overrides)
    assert (cfg.epochs, cfg.weights_path, cfg.label) == (3, "/w/vit_small.pth", "suspicious")
    for bad in (["--set", "epoch=3"], ["--set", "label=target"], ["--set", "epochs"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["vit_tiny", "--data-dir", "d", "--output-dir", "o", *bad])


def test_process_count_follows_the_device_and_world_size():
    cpu = torch.device("cpu")
    assert distributed.training_world(cpu, None) == (1, "cpu")
    assert distributed.training_world(cpu, 3) == (3, "cpu")
    with pytest.raises(ValueError, match="at least 1"):
        distributed.training_world(cpu, 0)
    if not torch.cuda.is_available():
        assert distributed.training_world(None, None) == (1, "cpu")
    with pytest.raises(ValueError, match="global batch"):
        RankBatches(sampler(), batch_size=1, rank=0, world_size=2)
    assert distributed.workers_per_process(4, 2) == 2
    assert distributed.workers_per_process(2, 4) == 1 and distributed.workers_per_process(0, 1) == 0


# ---------------------------------------------------------------------------------- bench


def test_gpu_projection_shares_compute_but_not_the_loader_and_adds_the_all_reduce():
    from bench import bench_training as bt

    assert bt.allreduce_s(250_000_000, 1) == 0.0
    assert bt.allreduce_s(250_000_000, 2, link_gbps=1.0) == pytest.approx(1.0)  # 1 GB each way
    assert bt.allreduce_s(250_000_000, 4, link_gbps=1.0) == pytest.approx(1.5)  # 2 (N-1)/N
    images = bt.Images(train=3600.0, validation=7200.0, oof=3600.0)
    # GPU-bound: 1 GFLOP per forward at 1/65,000 of the peak = 1 img/s on one T4
    one = bt.kernel_hours(images, 1.0, 1 / 65_000, aug_rate=1e9, eval_rate=1e9, folds=1)
    two = bt.kernel_hours(images, 1.0, 1 / 65_000, 1e9, 1e9, folds=1, gpus=2, sync_s=0.5)
    assert one == pytest.approx({"train": 3.0, "validation": 2.0, "oof": 1.0, "total": 6.0})
    assert two == pytest.approx({"train": 1.5 + 0.5, "validation": 1.0, "oof": 0.5, "total": 3.5})
    # loader-bound: the same CPUs feed both GPUs, nothing gained
    slow = bt.kernel_hours(images, 1e-9, 1.0, aug_rate=1.0, eval_rate=1.0, folds=1, gpus=2)
    assert slow["train"] == pytest.approx(1.0) and slow["validation"] == pytest.approx(2.0)
    assert bt.submission_hours(1.0, 1 / 65_000, 1e9, 2) == pytest.approx(
        bt.submission_hours(1.0, 1 / 65_000, 1e9, 1) / 2
    )


def test_gpu_projection_table_and_the_measured_rates_on_cpu(capsys):
    from bench import bench_training as bt

    args = bt.argparse.Namespace(
        data_dir=None, suspicious=1500, kaggle_workers=4, utilisation=[0.1], gpus=2, link_gbps=6.0
    )
    gflops = {"convnextv2_nano": 4.89, "vit_tiny": 2.15, "vit_small": 8.48}
    params = {b: bt.trainable_params(b) for b in gflops}
    assert params["vit_tiny"] < params["convnextv2_nano"] < params["vit_small"]
    table = bt.project_gpus(args, gflops, params, aug=400.0, decode=4000.0)
    assert len(table) == 4
    for row in table:
        assert row["hours"][2]["total"] < row["hours"][1]["total"]
        assert row["submission"][2] == pytest.approx(row["submission"][1] / 2)
    out = capsys.readouterr().out
    assert "| model | all-reduce per step | train x1 → x2 |" in out
    assert "submission kernel, all 4 image models on 500,000 images:" in out
    # the measured path's functions, on the CPU: one process, and two devices in threads
    assert bt.ddp_train_rate("vit_tiny", 32, 2, 1) > 0
    cpu = torch.device("cpu")
    assert bt.infer_rate([cpu, cpu], "vit_tiny", 32, 2, 1) > 0
