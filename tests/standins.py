"""Stand-in stage outputs for tests that need another stage's artifacts without running it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import polars as pl

from utils.manifest import config_hash, write_json, write_manifest
from utils.oof import write_oof
from utils.settings import image_config


def write_image_run(
    run_dir: Path,
    oof: pl.DataFrame,
    model_name: str = "vit_tiny",
    seed: int = 42,
    n_folds: int | None = None,
) -> Path:
    """A finished-looking stage 1 run dir without checkpoints: oof.csv, config.json (with the
    model name and config hash stage 1 records) and manifest.json; `model_name` may be any name."""
    cfg = dataclasses.replace(image_config("vit_tiny", "demo"), model_name=model_name, seed=seed)
    cfg = cfg if n_folds is None else dataclasses.replace(cfg, n_folds=n_folds)
    record = {"config": dataclasses.asdict(cfg), "data": {"rows": oof.height}}
    record["config_hash"] = config_hash(record)
    write_oof(oof, run_dir / "oof.csv")
    write_json(run_dir / "config.json", record)
    write_manifest(run_dir, record, {"stage": "image", "model": model_name})
    return run_dir


def write_external_data(root: Path, ph2_rows: int = 60, ham_rows: int = 400, seed: int = 0) -> Path:
    """A small PH2 + HAM10000 data dir in the real files' layout (ph2/ph2_labels.csv + images,
    ham10000/HAM10000_metadata.csv), with melanoma tied to the dermoscopic criteria and to a
    darker image, so stage 5 runs on it without the real data."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    ph2 = root / "ph2"
    (ph2 / "images").mkdir(parents=True)
    melanoma = np.arange(ph2_rows) % 4 == 0

    def sign(p_mel: float, p_nev: float) -> np.ndarray:
        return rng.random(ph2_rows) < np.where(melanoma, p_mel, p_nev)

    names = [f"IMD{i:03d}" for i in range(1, ph2_rows + 1)]
    colours = {c: sign(0.6, 0.2).astype(int) for c in ("white", "red", "blue_gray", "black")}
    labels = pl.DataFrame(
        {
            "image_name": names,
            "clinical_diagnosis": np.where(
                melanoma, "melanoma", np.where(sign(0, 0.5), "atypical_nevus", "common_nevus")
            ),
            "asymmetry": np.where(sign(0.8, 0.2), 2, 0),
            "pigment_network": np.where(sign(0.8, 0.2), "AT", "T"),
            "dots_globules": np.where(sign(0.7, 0.2), "AT", np.where(sign(0, 0.5), "T", "A")),
            "streaks": np.where(sign(0.6, 0.1), "P", "A"),
            "regression_areas": np.where(sign(0.6, 0.1), "P", "A"),
            "blue_whitish_veil": np.where(sign(0.7, 0.05), "P", "A"),
            **colours,
            "light_brown": np.ones(ph2_rows, dtype=int),
            "dark_brown": sign(0.8, 0.4).astype(int),
        }
    )
    labels.write_csv(ph2 / "ph2_labels.csv")
    for name, mel in zip(names, melanoma, strict=True):
        level = 60 if mel else 160
        image = np.clip(rng.normal(level, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(ph2 / "images" / f"{name}.jpg"), image)

    ham = root / "ham10000"
    ham.mkdir()
    lesions = rng.integers(0, ham_rows * 2 // 3, ham_rows)
    mel_lesion = rng.random(ham_rows * 2 // 3) < 0.15
    sites = np.array(["back", "face", "lower extremity", "trunk", "unknown"])
    pl.DataFrame(
        {
            "lesion_id": [f"HAM_{i:07d}" for i in lesions],
            "image_id": [f"ISIC_{i:07d}" for i in range(ham_rows)],
            "dx": np.where(mel_lesion[lesions], "mel", rng.choice(["nv", "bkl"], ham_rows)),
            "dx_type": "histo",
            "age": np.where(
                rng.random(ham_rows) < 0.02, np.nan, rng.integers(1, 18, ham_rows) * 5.0
            ),
            "sex": rng.choice(["male", "female", "unknown"], ham_rows, p=[0.5, 0.45, 0.05]),
            "localization": rng.choice(sites, ham_rows),
        }
    ).with_columns(pl.col("age").fill_nan(None)).write_csv(ham / "HAM10000_metadata.csv")
    return root
