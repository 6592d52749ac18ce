"""Image model, training loop, resume, rerun, fold hygiene and prediction, tiny images on CPU."""

import dataclasses
import json

import h5py
import numpy as np
import polars as pl
import pytest
import torch

import utils.image.fold_training as fold_training
import utils.image.run_files as run_files
import utils.image.train as train
from utils.folds import assign_folds
from utils.image.fold_training import lr_factor
from utils.image.models import BACKBONES, ImageModel
from utils.image.predict import (
    build_model,
    load_config,
    load_fold_models,
    predict,
    predict_with_models,
)
from utils.image.train import fold_scores, train_image_model
from utils.io import DataDir, HDF5Images
from utils.labels import suspicious_label
from utils.layout import HISTORY_FILE
from utils.manifest import verify_manifest
from utils.oof import read_oof
from utils.settings import ImageConfig, image_config

SIZE = 32


def tiny_config(**overrides) -> ImageConfig:
    base = image_config(
        "vit_tiny", "demo", n_folds=2, epochs=2, image_size=SIZE, batch_size=16, num_workers=0
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="module")
def small_set(synthetic_dir):
    """60 synthetic rows (positives from several patients) and their hdf5 file."""
    meta = DataDir(synthetic_dir).train_metadata()
    positives = meta.filter(pl.col("target") == 1).head(8)
    negatives = meta.filter(pl.col("target") == 0).head(52)
    return pl.concat([positives, negatives]), HDF5Images(synthetic_dir / "train-image.hdf5")


def test_lr_schedule_warmup_then_cosine_to_min():
    lrs = [1e-4 * lr_factor(s, 100, 10, 1e-4, 1e-6) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[100] == pytest.approx(1e-6)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_model_forward_returns_logits_and_loss(backbone):
    model = ImageModel(backbone, SIZE, dropout=0.5, dropout_samples=3)
    x, y = torch.randn(2, 3, SIZE, SIZE), torch.tensor([0.0, 1.0])
    out = model(x, y)
    assert out["logits"].shape == (2,) and out["loss"].ndim == 0
    out["loss"].backward()
    assert model.fc.weight.grad is not None
    model.eval()
    assert set(model(x)) == {"logits"}
    pixels = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    normalised = (pixels / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(model(pixels)["logits"], model(normalised)["logits"], atol=1e-4)
    assert torch.equal(model(x)["logits"], model(x)["logits"])  # no dropout at eval


def test_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = tiny_config(lr=1e-3, warmup=0.0, dropout=0.0)
    model = ImageModel(cfg.backbone, SIZE)
    batch = {"image": torch.randn(8, 3, SIZE, SIZE), "target": torch.tensor([1.0, 0.0] * 4)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.eval()
    before = model(batch["image"], batch["target"])["loss"].item()
    cpu = torch.device("cpu")
    fold_training.train_one_epoch(model, [batch] * 8, optimizer, scheduler, scaler, cfg, cpu, "t")
    model.eval()
    after = model(batch["image"], batch["target"])["loss"].item()
    assert after < 0.5 * before


class Interrupted(Exception):
    pass


def counting(monkeypatch, fail_at: int | None = None) -> list:
    """Patch train_one_epoch to count calls and optionally raise on call number `fail_at`."""
    calls = []
    real = fold_training.train_one_epoch

    def wrapper(*args, **kwargs):
        calls.append(args[-1])
        if fail_at is not None and len(calls) == fail_at:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(fold_training, "train_one_epoch", wrapper)
    return calls


@pytest.mark.slow  # trains models for minutes on 2 cores: CI, not the inner loop
def test_train_resume_oof_and_predict(small_set, tmp_path, monkeypatch):
    meta, images = small_set
    cfg = tiny_config(label="suspicious")
    out = tmp_path / "run"
    run_dir = out / cfg.model_name
    calls = counting(monkeypatch, fail_at=4)  # interrupt fold 1 epoch 1, the 4th epoch overall
    with pytest.raises(Interrupted):
        train_image_model(cfg, meta, images, out, torch.device("cpu"))
    assert (run_dir / "fold0.pt").is_file() and (run_dir / "fold1.last.pt").is_file()
    assert not (run_dir / "fold1.pt").exists()
    stamp = (run_dir / "fold0.pt").stat().st_mtime_ns

    monkeypatch.undo()
    calls = counting(monkeypatch)
    oof = train_image_model(dataclasses.replace(cfg, num_workers=1), meta, images, out)
    assert calls == [f"{cfg.model_name} fold 1 epoch 1"]  # fold 0 skipped, fold 1 continued
    assert (run_dir / "fold0.pt").stat().st_mtime_ns == stamp
    assert not list(run_dir.glob("*.last.pt")) and not list(run_dir.glob("*.best.pt"))

    written = read_oof(run_dir / "oof.csv")
    assert sorted(written["isic_id"]) == sorted(meta["isic_id"])
    assert written["pred"].is_between(0, 1).all()
    expected_folds = dict(zip(meta["isic_id"], assign_folds(meta, 2, cfg.seed), strict=True))
    assert all(expected_folds[i] == f for i, f in written.select("isic_id", "fold").rows())
    record = json.loads((run_dir / "config.json").read_text())
    assert record["folds"] == {"n_folds": 2, "seed": cfg.seed, "source": "assign_folds"}
    assert load_config(run_dir) == dataclasses.replace(cfg, num_workers=1)  # latest run's
    history = pl.read_csv(run_dir / "history.csv")
    assert history.select("fold", "epoch").rows() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert fold_scores(oof)["rows"].to_list() == [
        (oof["fold"] == 0).sum(),
        (oof["fold"] == 1).sum(),
        len(meta),
    ]

    # the resumed run equals an uninterrupted one
    monkeypatch.undo()
    again = train_image_model(cfg, meta, images, tmp_path / "straight", torch.device("cpu"))
    assert np.allclose(again.sort("isic_id")["pred"], oof.sort("isic_id")["pred"], atol=1e-5)

    assert verify_manifest(run_dir) == []

    # other settings in the same run dir: the old run is moved aside, the new one starts clean
    calls = counting(monkeypatch)
    shorter = dataclasses.replace(cfg, epochs=1)
    train_image_model(shorter, meta, images, out, torch.device("cpu"))
    assert len(calls) == 2  # both folds trained again, nothing resumed
    assert load_config(run_dir) == shorter and verify_manifest(run_dir) == []
    assert load_config(out / ".previous" / cfg.model_name) == dataclasses.replace(
        cfg, num_workers=1
    )
    monkeypatch.undo()

    # predict: one pass over the images with both fold models; unreadable images are NaN
    bad = tmp_path / "bad.hdf5"
    ids = meta["isic_id"].head(3).to_list()
    with h5py.File(bad, "w") as f:
        f[ids[0]] = np.void(images.read_bytes(ids[0]).tobytes())
        f[ids[1]] = np.void(b"not a jpeg")
    pred = predict(run_dir, bad, ids, batch_size=2, num_workers=0)
    assert pred["isic_id"].to_list() == ids
    assert pred["image_ok"].to_list() == [True, False, False]
    assert 0 < pred["pred"][0] < 1 and pred["pred"][1:].is_nan().all()
    fold_preds = [predict_one_fold(run_dir, k, images, ids[:1]) for k in range(2)]
    assert pred["pred"][0] == pytest.approx(np.mean(fold_preds), abs=1e-6)


def predict_one_fold(run_dir, fold, images, ids) -> float:
    cfg = load_config(run_dir)
    model = build_model(cfg)
    model.load_state_dict(torch.load(run_dir / f"fold{fold}.pt", weights_only=True)["state_dict"])
    probs, _ = predict_with_models([model], images, ids, cfg.image_size, 4, 0)
    return float(probs[0, 0])


@pytest.mark.slow  # trains models for minutes on 2 cores: CI, not the inner loop
def test_fold_k_never_trains_on_fold_k_and_its_oof_is_model_k(small_set, tmp_path, monkeypatch):
    """Leakage: the rows a fold model trains on are exactly the rows outside its fold; alignment:
    a fold-k row's OOF is fold model k's prediction for that row, not another model's."""
    meta, images = small_set
    cfg = tiny_config(epochs=1)
    trained_on: list[set] = []
    real = fold_training.ImageDataset

    def recording(images_, ids, *args, **kwargs):
        if args:  # training datasets carry labels; prediction ones do not
            trained_on.append(set(ids))
        return real(images_, ids, *args, **kwargs)

    monkeypatch.setattr(fold_training, "ImageDataset", recording)
    oof = train_image_model(cfg, meta, images, tmp_path, torch.device("cpu"))
    monkeypatch.undo()
    fold_ids = [set(oof.filter(pl.col("fold") == k)["isic_id"]) for k in range(2)]
    assert len(trained_on) == 2 and all(fold_ids)
    for k in range(2):
        assert trained_on[k].isdisjoint(fold_ids[k])
        assert trained_on[k] == set(meta["isic_id"]) - fold_ids[k]
    run_dir = tmp_path / cfg.model_name
    for k in range(2):
        for isic_id in sorted(fold_ids[k])[:2]:
            row = oof.filter(pl.col("isic_id") == isic_id)
            own = predict_one_fold(run_dir, k, images, [isic_id])
            other = predict_one_fold(run_dir, 1 - k, images, [isic_id])
            assert row["pred"][0] == pytest.approx(own, abs=1e-5)
            assert abs(own - other) > 1e-6  # the check can tell the two models apart


@pytest.mark.slow  # trains models for minutes on 2 cores: CI, not the inner loop
def test_oof_epoch_last_keeps_the_last_epoch_and_reports_both(small_set, tmp_path, monkeypatch):
    """oof_epoch (a plus candidate): "best" keeps the epoch of the best validation score,
    "last" the final epoch, from the same training; history.csv reports both choices."""
    meta, images = small_set
    cpu = torch.device("cpu")

    def run(name: str, scores: list[float], **overrides) -> tuple[dict, list[dict]]:
        stream = iter(scores * 2)  # 2 folds x 3 epochs, in training order
        monkeypatch.setattr(fold_training, "safe_score", lambda *args: next(stream))
        cfg = tiny_config(epochs=3, **overrides)
        oof = train_image_model(cfg, meta, images, tmp_path / name, cpu)
        run_dir = tmp_path / name / cfg.model_name
        folds = [torch.load(run_dir / f"fold{k}.pt", weights_only=True) for k in range(2)]
        return {"oof": oof, "history": pl.read_csv(run_dir / HISTORY_FILE)}, folds

    falling, rising = [0.3, 0.2, 0.1], [0.1, 0.2, 0.3]
    best, best_folds = run("best", falling)  # the best epoch is the first
    last, last_folds = run("last", falling, oof_epoch="last")
    best_is_last, reference = run("rising", rising)  # the best epoch is the last
    for k in range(2):
        assert (best_folds[k]["chosen_epoch"], last_folds[k]["chosen_epoch"]) == (0, 2)
        assert best_folds[k]["best_epoch"] == last_folds[k]["best_epoch"] == 0
        assert last_folds[k]["oof_epoch"] == "last" and reference[k]["chosen_epoch"] == 2
        for name, weight in last_folds[k]["state_dict"].items():
            assert torch.equal(weight, reference[k]["state_dict"][name]), name
        assert any(
            not torch.equal(w, best_folds[k]["state_dict"][n])
            for n, w in last_folds[k]["state_dict"].items()
        )
    assert last["oof"]["pred"].to_list() == best_is_last["oof"]["pred"].to_list()
    assert last["oof"]["pred"].to_list() != best["oof"]["pred"].to_list()
    choice = train.epoch_choice(last["history"])
    assert choice["best_epoch"].to_list() == [0, 0] and choice["last_epoch"].to_list() == [2, 2]
    assert choice["best_val_pauc"].to_list() == [0.3, 0.3]
    assert choice["last_val_pauc"].to_list() == [0.1, 0.1]
    with pytest.raises(ValueError, match="oof_epoch must be one of"):
        tiny_config(oof_epoch="middle")


def test_bad_training_input_is_named(small_set, tmp_path):
    meta, images = small_set
    cfg = tiny_config()
    with pytest.raises(KeyError, match="patient_id"):
        train_image_model(cfg, meta.drop("patient_id"), images, tmp_path)
    with pytest.raises(ValueError, match="duplicate isic_id"):
        train_image_model(cfg, pl.concat([meta, meta.head(1)]), images, tmp_path)
    ghost = meta.with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then(pl.lit("ISIC_ghost"))
        .otherwise(pl.col("isic_id"))
        .alias("isic_id")
    )
    with pytest.raises(ValueError, match=r"train-image.hdf5: 1 training image\(s\) missing"):
        train_image_model(cfg, ghost, images, tmp_path)
    with pytest.raises(ValueError, match="fold outside 0..1"):
        train_image_model(cfg, meta.with_columns(pl.lit(3).alias("fold")), images, tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        predict(tmp_path / "nothing", images, ["x"])


def test_external_style_metadata_with_given_folds(small_set, tmp_path):
    """The external-evaluation stage's form: minimal columns, own folds and training label."""
    meta, images = small_set
    minimal = meta.select(
        "isic_id",
        "patient_id",
        "target",
        pl.col("target").alias("suspicious"),
        (pl.int_range(pl.len()) % 2).alias("fold"),
    )
    cfg = tiny_config(label="suspicious", epochs=1)
    oof = train_image_model(cfg, minimal, images.path, tmp_path, torch.device("cpu"))
    given = dict(minimal.select("isic_id", "fold").rows())
    assert all(given[i] == f for i, f in oof.select("isic_id", "fold").rows())
    record = json.loads((tmp_path / cfg.model_name / "config.json").read_text())
    assert record["folds"]["source"] == "metadata"


# ------------------------------------------------------------------- the reference recipe


def test_validation_rows_keep_every_positive_and_eligible_negatives_once_per_fold():
    cfg = tiny_config(val_neg_per_pos=3)
    held_out = pl.DataFrame(
        {
            "isic_id": [f"ISIC_{i}" for i in range(100)],
            "target": [1] * 4 + [0] * 96,
            "label": [1.0] * 4 + [0.0] * 96,
            "eligible": [True] * 4 + [i % 2 == 0 for i in range(96)],
        }
    )
    rows = fold_training.validation_rows(cfg, held_out, fold=0)
    assert rows.filter(pl.col("target") == 1).height == 4
    negatives = rows.filter(pl.col("target") == 0)
    assert negatives.height == 12 and negatives["eligible"].all()
    assert rows.equals(
        fold_training.validation_rows(cfg, held_out, fold=0)
    )  # drawn once, reproducibly
    assert not rows.equals(fold_training.validation_rows(cfg, held_out, fold=1))


def test_validation_is_on_the_models_own_label_unless_switched_to_the_target():
    """The reference relabels before the split: a suspicious model's validation positives and
    negatives are on the suspicious label. validate_on="target" draws them on the real target."""
    held_out = pl.DataFrame(
        {
            "isic_id": [f"ISIC_{i}" for i in range(60)],
            "target": [1] * 2 + [0] * 58,
            "label": [1.0] * 6 + [0.0] * 54,  # 4 suspicious negatives
            "eligible": [True] * 60,
        }
    )
    on_label = fold_training.validation_rows(tiny_config(val_neg_per_pos=2), held_out, fold=0)
    assert on_label.filter(pl.col("target") == 1)["isic_id"].to_list() == [
        f"ISIC_{i}" for i in range(6)
    ]
    assert on_label.height == 6 + 12 and on_label["label"].sum() == 6
    cfg = tiny_config(val_neg_per_pos=2, validate_on="target")
    on_target = fold_training.validation_rows(cfg, held_out, fold=0)
    assert on_target.filter(pl.col("target") == 1).height == 2 and on_target.height == 2 + 4
    with pytest.raises(ValueError, match="validate_on"):
        tiny_config(validate_on="suspicious")


def test_suspicious_model_picks_its_checkpoint_on_its_label_and_its_oof_keeps_the_target(
    small_set, synthetic_dir, tmp_path, monkeypatch
):
    """The per-epoch score sees the suspicious label; oof.csv (what stage 3 reads) the target."""
    meta, images = small_set
    full = DataDir(synthetic_dir).train_metadata()
    full = full.with_columns(suspicious_label(full))
    extra = full.filter((pl.col("target") == 0) & (pl.col("suspicious") == 1)).head(6)
    assert extra.height >= 4  # suspicious negatives that only the suspicious label calls positive
    meta = pl.concat([meta, extra.drop("suspicious")])
    cfg = dataclasses.replace(tiny_config(epochs=1), model_name="vit_tiny_suspicious")
    cfg = dataclasses.replace(cfg, label="suspicious")
    scored, real = [], fold_training.safe_score
    monkeypatch.setattr(
        fold_training, "safe_score", lambda y, p, loss: scored.append(y) or real(y, p, loss)
    )
    oof = train_image_model(cfg, meta, images, tmp_path, torch.device("cpu"))
    frame = train.prepare_frame(cfg, meta)
    for fold, seen in enumerate(scored):
        subset = fold_training.validation_rows(cfg, frame.filter(pl.col("fold") == fold), fold)
        assert np.array_equal(seen, subset["label"].to_numpy())
    assert sum(int(y.sum()) for y in scored) == int(frame["label"].sum()) > frame["target"].sum()
    written = read_oof(tmp_path / cfg.model_name / "oof.csv").sort("isic_id")
    truth = meta.select("isic_id", "target").sort("isic_id")
    assert (
        written["target"].to_list()
        == truth["target"].to_list()
        == oof.sort("isic_id")["target"].to_list()
    )


def test_identity_holds_only_what_changes_stage_1s_output(small_set):
    """Another recipe, preset name or loader setting is the same run (reused, never retrained);
    anything that changes the trained weights is another run."""
    meta, _ = small_set
    cfg = tiny_config()
    frame = train.prepare_frame(cfg, meta)

    def identity(**changes):
        return run_files.run_record(dataclasses.replace(cfg, **changes), frame, "assign_folds")[
            "config_hash"
        ]

    same = identity()
    for free in ({"recipe": "plus"}, {"preset": "full"}, {"num_workers": 3}):
        assert identity(**free) == same, free
    for changed in ({"epochs": 3}, {"validate_on": "target"}, {"lr": 1e-3}, {"seed": 1}):
        assert identity(**changed) != same, changed
    assert image_config("vit_tiny", "demo", "plus") == dataclasses.replace(
        image_config("vit_tiny", "demo", "paper"), recipe="plus"
    )


def test_eligible_negatives_are_the_references_confident_lesions(small_set):
    meta, _ = small_set
    confidence = pl.Series("tbp_lv_dnn_lesion_confidence", [90.0, 80.0, None] * 20)
    frame = train.prepare_frame(tiny_config(), meta.with_columns(confidence))
    assert frame["eligible"].to_list() == [True, False, False] * 20  # > 80; null is not
    anyone = train.prepare_frame(
        tiny_config(val_min_confidence=None), meta.with_columns(confidence)
    )
    assert anyone["eligible"].all()
    assert train.prepare_frame(tiny_config(), meta.drop("tbp_lv_dnn_lesion_confidence"))[
        "eligible"
    ].all()


def test_full_preset_without_weights_stops_unless_asked(tmp_path):
    with pytest.raises(ValueError, match="full preset needs pretrained weights.*allow_random_init"):
        train.run_image_stage("vit_tiny", tmp_path / "no-data", tmp_path, "full")
    train.check_weights(image_config("vit_tiny", "full", weights_path="w.pth"))
    train.check_weights(image_config("vit_tiny", "full"), allow_random_init=True)
    train.check_weights(image_config("vit_tiny", "demo"))


def test_folds_selection_is_checked():
    assert train.chosen_folds(None, 3) == [0, 1, 2]
    assert train.chosen_folds([2, 0], 3) == [2, 0]
    assert train.chosen_folds("[0, 1]", 3) == [0, 1] and train.chosen_folds(2, 3) == [2]
    for bad in ([], [0, 0], [3], [-1], "[a]", "x"):
        with pytest.raises(ValueError, match="folds"):
            train.chosen_folds(bad, 3)


def test_recipe_is_wired_and_folds_continue_from_an_earlier_output(
    small_set, tmp_path, monkeypatch
):
    """One fold per session: the sampler, optimiser groups and validation subsample of the
    recipe; fp16 fold checkpoints; a second session continues from the first one's output."""
    meta, images = small_set
    cfg = tiny_config(epochs=2, val_neg_per_pos=2)
    samplers, groups, predicted = [], [], []
    real_sampler, real_groups, real_predict = (
        fold_training.NegativeResampler,
        fold_training.param_groups,
        fold_training.predict_ids,
    )

    def sampler(*args, **kwargs):
        samplers.append(real_sampler(*args, **kwargs))
        return samplers[-1]

    def param_groups(model, weight_decay):
        groups.append(real_groups(model, weight_decay))
        groups[-1].append(
            {"frozen": [n for n, p in model.named_parameters() if not p.requires_grad]}
        )
        return groups[-1][:-1]

    def predict_ids(model, images_, ids, *args):
        predicted.append(len(ids))
        return real_predict(model, images_, ids, *args)

    monkeypatch.setattr(fold_training, "NegativeResampler", sampler)
    monkeypatch.setattr(fold_training, "param_groups", param_groups)
    monkeypatch.setattr(fold_training, "predict_ids", predict_ids)
    first = tmp_path / "session1"
    partial = train_image_model(cfg, meta, images, first, torch.device("cpu"), folds=[0])
    run_dir = first / cfg.model_name
    frame = train.prepare_frame(cfg, meta)
    fold0 = frame.filter(pl.col("fold") == 0)
    assert sorted(partial["isic_id"]) == sorted(fold0["isic_id"])  # finished folds only
    assert not (run_dir / "oof.csv").exists() and not (run_dir / "manifest.json").exists()
    assert (run_dir / "history.csv").is_file() and not (run_dir / "fold1.pt").exists()

    # sampling: every positive twice plus as many negatives, about 4P images an epoch
    (used,) = samplers
    train_positives = int(frame.filter(pl.col("fold") != 0)["label"].sum())
    assert (used.pos_repeat, used.neg_ratio, used.fold) == (2, 1.0, 0)
    assert len(used) == 4 * train_positives
    # optimiser: ViT decay 1e-3, none on biases and norms, cls_token and pos_embed frozen
    (vit_groups,) = groups
    assert [g["weight_decay"] for g in vit_groups[:-1]] == [1e-3, 0.0]
    assert vit_groups[-1]["frozen"] == ["backbone.cls_token", "backbone.pos_embed"]
    # validation: the subsample each epoch, then the whole held-out fold once
    positives = int(fold0["target"].sum())
    assert predicted == [3 * positives, 3 * positives, fold0.height]

    checkpoint = torch.load(run_dir / "fold0.pt", weights_only=True)
    floats = [v for v in checkpoint["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    _, models = load_fold_models(run_dir, torch.device("cpu"), folds=[0])
    assert all(p.dtype == torch.float32 for p in models[0].parameters())

    # another session: folds=[1] continues from the first session's output
    monkeypatch.undo()
    calls = counting(monkeypatch)
    second = tmp_path / "session2"
    oof = train_image_model(
        cfg, meta, images, second, torch.device("cpu"), folds=[1], resume_from=first
    )
    assert calls == [f"{cfg.model_name} fold 1 epoch {e}" for e in range(2)]
    assert sorted(oof["isic_id"]) == sorted(meta["isic_id"])
    kept = oof.filter(pl.col("fold") == 0).sort("isic_id")["pred"]
    assert np.array_equal(kept, partial.sort("isic_id")["pred"])
    assert verify_manifest(second / cfg.model_name) == []
    with pytest.raises(ValueError, match="another run"):
        train_image_model(
            dataclasses.replace(cfg, epochs=1), meta, images, tmp_path / "s3", resume_from=first
        )


def test_copy_earlier_run_keeps_finished_folds_and_the_unfinished_ones_state(tmp_path):
    earlier, run_dir = tmp_path / "earlier", tmp_path / "run"
    earlier.mkdir()
    run_dir.mkdir()
    (earlier / "config.json").write_text(json.dumps({"config_hash": "h"}))
    for name in ("fold0.pt", "fold0.last.pt", "fold1.last.pt", "fold1.best.pt", "fold2.last.pt"):
        (earlier / name).write_text(f"earlier {name}")
    (run_dir / "fold2.last.pt").write_text("newer")
    record = {"config_hash": "h", "folds": {"n_folds": 3}}
    copied = run_files.copy_earlier_run(earlier, run_dir, record)
    assert copied == ["fold0.pt", "fold1.last.pt", "fold1.best.pt"]
    assert (run_dir / "fold2.last.pt").read_text() == "newer"
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_files.copy_earlier_run(tmp_path / "nothing", run_dir, record)
