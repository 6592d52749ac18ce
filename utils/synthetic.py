"""Synthetic ISIC 2024 data in the Kaggle layout, with a planted, learnable signal.

`python -m utils.synthetic --out DIR --rows N` writes train-metadata.csv (55 columns),
train-image.hdf5, test-metadata.csv (44 columns, patients disjoint from train),
test-image.hdf5 and sample_submission.csv, shaped like the real files: the same columns,
dtypes, value ranges, categories and NaN patterns, very unequal lesion counts per patient,
~0.1% positives, and the iddx hierarchy / lesion_id / mel_* only where the real data has them.

The malignancy logit has three standardised parts, so each kind of model can be shown to learn:
- `meta_score`: a latent that moves size, colour contrast, eccentricity, nevus confidence, plus age;
- `context_score`: an "ugly duckling" latent that makes a lesion darker and larger than the same
  patient's other lesions; patients differ a lot, so it shows only relative to the patient;
- `image_score`: border raggedness and colour variegation drawn into the JPEG crop; the
  metadata's norm_border / color_std columns only hint at them through heavy noise.
The true probabilities go to a truth CSV outside the data dir (`<out>-truth.csv` by default).

`--structure site_outlier site_rates image_patient` plants, in addition, the structures the top
ISIC 2024 solutions exploit on the real data (utils.synthetic_structure, each with its source);
without it the data are exactly as before.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import cv2
import h5py
import numpy as np
import polars as pl
from tqdm.auto import tqdm

from utils.cli import DefaultsHelpFormatter
from utils.io import (
    SAMPLE_SUBMISSION,
    TEST_IMAGES,
    TEST_METADATA,
    TRAIN_IMAGES,
    TRAIN_METADATA,
)
from utils.schema import CATEGORIES, TEST_COLUMNS, TRAIN_COLUMNS
from utils.settings import N_FOLDS
from utils.synthetic_structure import STRUCTURE_STREAM, STRUCTURES, Structure, plant

REAL_ROWS = 401_059
REAL_PATIENTS = 1_042
FIELD_OF_VIEW_MM = 8.0  # crop side in mm: a typical 3 mm lesion spans about 40% of the crop
SIGNAL_WEIGHT = 1.4  # logit weight of each standardised part (best pAUC ~0.17 at full scale)

SITES = {  # anatom_site_general -> (probability, tbp_lv_location values)
    "posterior torso": (
        0.304,
        ("Torso Back Top Third", "Torso Back Middle Third", "Torso Back Bottom Third"),
    ),
    "lower extremity": (
        0.257,
        ("Left Leg - Upper", "Left Leg - Lower", "Right Leg - Upper", "Right Leg - Lower"),
    ),
    "anterior torso": (0.219, ("Torso Front Top Half", "Torso Front Bottom Half")),
    "upper extremity": (
        0.176,
        ("Left Arm - Upper", "Left Arm - Lower", "Right Arm - Upper", "Right Arm - Lower"),
    ),
    "head/neck": (0.030, ("Head & Neck",)),
}
SITE_NULL_RATE = 0.014
AGE_NULL_RATE = 0.007
SEX_NULL_RATE = 0.029
TRAIN_ATTRIBUTIONS = {  # attribution -> (share of patients, copyright_license)
    "Memorial Sloan Kettering Cancer Center": (0.33, "CC-BY"),
    "Department of Dermatology, Hospital Clínic de Barcelona": (0.26, "CC-BY-NC"),
    "University Hospital of Basel": (0.16, "CC-BY-NC"),
    "Frazer Institute, The University of Queensland, Dermatology Research Centre": (
        0.13,
        "CC-BY",
    ),
    "ACEMID MIA": (0.07, "CC-0"),
    "ViDIR Group, Department of Dermatology, Medical University of Vienna": (0.03, "CC-BY-NC"),
    CATEGORIES["attribution"][2]: (0.02, "CC-BY-NC"),  # Athens, Andreas Syggros Hospital
}
TEST_ONLY_ATTRIBUTION = ("FNQH Cairns", "CC-BY")  # as in the real public test rows
MALIGNANT_PATHS = (  # (share, iddx_2, iddx_3, iddx_4 options)
    (
        0.45,
        "Malignant adnexal epithelial proliferations - Follicular",
        "Basal cell carcinoma",
        ("Basal cell carcinoma, Nodular", "Basal cell carcinoma, Superficial", None),
    ),
    (0.30, "Malignant epidermal proliferations", "Squamous cell carcinoma in situ", (None,)),
    (
        0.15,
        "Malignant melanocytic proliferations (Melanoma)",
        "Melanoma Invasive",
        ("Melanoma Invasive, Superficial spreading", None),
    ),
    (
        0.10,
        "Malignant melanocytic proliferations (Melanoma)",
        "Melanoma in situ",
        ("Melanoma in situ, Superficial spreading", None),
    ),
)
MITOTIC_INDEX = ("<1/mm^2", "1/mm^2", "2/mm^2", "3/mm^2", "4/mm^2")


@dataclass(frozen=True)
class Summary:
    """What `generate` wrote."""

    out_dir: Path
    truth_path: Path
    train_rows: int
    test_rows: int
    train_patients: int
    test_patients: int
    positives: int
    positive_patients: int
    best_pauc: float
    seconds: float
    bytes_on_disk: int

    def __str__(self) -> str:
        return (
            f"{self.out_dir}: train {self.train_rows:,} rows / {self.train_patients:,} patients / "
            f"{self.positives:,} positives ({self.positives / self.train_rows:.3%}) in "
            f"{self.positive_patients:,} patients; "
            f"test {self.test_rows:,} rows / {self.test_patients:,} patients; "
            f"best achievable pAUC {self.best_pauc:.4f}; "
            f"{self.bytes_on_disk / 2**20:.1f} MiB in {self.seconds:.1f} s; "
            f"truth: {self.truth_path}"
        )


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def _patients(rng: np.random.Generator, n: int, attributions: dict) -> dict[str, np.ndarray]:
    """Per-patient traits: demographics, skin colour, typical lesion size and darkness."""
    names = list(attributions)
    shares = np.array([attributions[a][0] for a in names])
    attribution = rng.choice(len(names), n, p=shares / shares.sum())
    age = rng.choice(np.arange(15, 90, 5), n, p=_age_weights()).astype(float)
    age[rng.random(n) < AGE_NULL_RATE] = np.nan
    return {
        "attribution": np.array(names, dtype=object)[attribution],
        "license": np.array([attributions[a][1] for a in names], dtype=object)[attribution],
        "age": age,
        "sex": np.where(rng.random(n) < 0.52, "male", "female").astype(object),
        "sex_null": rng.random(n) < SEX_NULL_RATE,
        "tile": np.where(rng.random(n) < 0.71, "3D: XP", "3D: white").astype(object),
        "log_size": rng.normal(math.log(3.0), 0.22, n),
        "lesion_l": rng.normal(42.0, 7.0, n),
        "skin_l": rng.normal(56.0, 7.0, n),
        "skin_a": rng.normal(15.0, 3.0, n),
        "skin_b": rng.normal(27.0, 4.0, n),
        # how much redder than the skin this patient's lesions are; hides the "ugly duckling"
        # shift of deltaA unless it is read relative to the patient
        "lesion_da": rng.normal(4.0, 3.0, n),
    }


def _age_weights() -> np.ndarray:
    ages = np.arange(15, 90, 5)
    w = np.exp(-0.5 * ((ages - 60) / 14.0) ** 2)
    return w / w.sum()


def _lesion_counts(rng: np.random.Generator, rows: int, patients: int) -> np.ndarray:
    """Very unequal lesions per patient (heavy-tailed, every patient at least one)."""
    weights = rng.lognormal(0.0, 1.3, patients)
    return 1 + rng.multinomial(rows - patients, weights / weights.sum())


def _sites(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """anatom_site_general (with nulls), tbp_lv_location and tbp_lv_location_simple."""
    names = list(SITES)
    p = np.array([SITES[s][0] for s in names])
    idx = rng.choice(len(names), n, p=p / p.sum())
    site = np.array(names, dtype=object)[idx]
    location = np.empty(n, dtype=object)
    for k, name in enumerate(names):
        rows = np.flatnonzero(idx == k)
        location[rows] = rng.choice(np.array(SITES[name][1], dtype=object), rows.size)
    missing = rng.random(n) < SITE_NULL_RATE
    site[missing] = None
    location[missing] = "Unknown"
    simple = np.array([loc.split(" - ")[0] for loc in location], dtype=object)
    simple = np.where(np.char.startswith(location.astype(str), "Torso Back"), "Torso Back", simple)
    simple = np.where(
        np.char.startswith(location.astype(str), "Torso Front"), "Torso Front", simple
    )
    return site, location, simple


def _coordinates(rng: np.random.Generator, location: np.ndarray) -> np.ndarray:
    """3D body coordinates (x left-right, y height, z front-back) consistent with the location."""
    loc = location.astype(str)
    n = loc.size
    y = np.select(
        [
            np.char.startswith(loc, "Head"),
            np.char.find(loc, "Leg") >= 0,
            np.char.find(loc, "Arm") >= 0,
        ],
        [rng.uniform(1450, 1750, n), rng.uniform(80, 900, n), rng.uniform(850, 1400, n)],
        rng.uniform(950, 1450, n),
    )
    side = np.where(
        np.char.startswith(loc, "Left"), 1.0, np.where(np.char.startswith(loc, "Right"), -1.0, 0.0)
    )
    x = side * rng.uniform(80, 450, n) + (side == 0) * rng.normal(0, 120, n)
    front = np.where(
        np.char.find(loc, "Front") >= 0, 1.0, np.where(np.char.find(loc, "Back") >= 0, -1.0, 0.0)
    )
    z = front * rng.uniform(40, 160, n) + (front == 0) * rng.normal(0, 80, n)
    return np.stack([x, y, z], axis=1)


def _lesions(
    rng: np.random.Generator, pat: dict, counts: np.ndarray, first_id: int
) -> tuple[dict, dict]:
    """Metadata columns (44 test columns) and latent parts for the lesions of `pat`."""
    p = np.repeat(np.arange(counts.size), counts)
    n = p.size
    m = rng.standard_normal(n)  # lesion-level risk seen in the metadata
    c = rng.standard_normal(n)  # "ugly duckling": stands out from the patient's own lesions
    raggedness = rng.beta(2.0, 5.0, n)
    variegation = rng.beta(2.0, 5.0, n)
    age = pat["age"][p]
    age_z = np.where(np.isnan(age), 0.0, (np.nan_to_num(age) - 58.0) / 14.0)

    size = np.exp(pat["log_size"][p] + 0.30 * rng.standard_normal(n) + 0.18 * m + 0.20 * c)
    size = np.clip(size, 1.0, 28.4).round(2)
    ecc = np.clip(rng.beta(6.0, 2.2, n) + 0.03 * m, 0.2, 0.99)
    minor = np.clip(size * np.sqrt(1 - ecc**2) * rng.uniform(0.9, 1.2, n), 0.3, size)
    area = math.pi / 4 * size * minor * rng.normal(1.0, 0.05, n)
    a_ax, b_ax = size / 2, minor / 2
    ellipse_perimeter = math.pi * (
        3 * (a_ax + b_ax) - np.sqrt((3 * a_ax + b_ax) * (a_ax + 3 * b_ax))
    )
    perimeter = ellipse_perimeter * (1 + 0.35 * raggedness) * rng.normal(1.0, 0.04, n)

    skin_l = pat["skin_l"][p] + rng.normal(0, 2.0, n)
    skin_a = pat["skin_a"][p] + rng.normal(0, 1.0, n)
    skin_b = pat["skin_b"][p] + rng.normal(0, 1.5, n)
    lesion_l = np.minimum(
        pat["lesion_l"][p] - 5.0 * c - 1.5 * m + rng.normal(0, 3.0, n), skin_l - 1.0
    )
    lesion_a = skin_a + pat["lesion_da"][p] + 1.2 * m + 1.5 * c + rng.normal(0, 1.0, n)
    lesion_b = skin_b + 1.0 + rng.normal(0, 2.0, n)
    d_l, d_a, d_b = lesion_l - skin_l, lesion_a - skin_a, lesion_b - skin_b
    delta_lb = np.hypot(d_l, d_b)
    site, location, simple = _sites(rng, n)
    xyz = _coordinates(rng, location)

    meta = {
        "isic_id": np.array([f"ISIC_{i:07d}" for i in range(first_id, first_id + n)], dtype=object),
        "patient_id": pat["patient_id"][p],
        "age_approx": age,
        "sex": np.where(pat["sex_null"][p], None, pat["sex"][p]),
        "anatom_site_general": site,
        "clin_size_long_diam_mm": size,
        "image_type": np.full(n, "TBP tile: close-up", dtype=object),
        "tbp_tile_type": pat["tile"][p],
        "tbp_lv_A": lesion_a,
        "tbp_lv_Aext": skin_a,
        "tbp_lv_B": lesion_b,
        "tbp_lv_Bext": skin_b,
        "tbp_lv_C": np.hypot(lesion_a, lesion_b),
        "tbp_lv_Cext": np.hypot(skin_a, skin_b),
        "tbp_lv_H": np.degrees(np.arctan2(lesion_b, lesion_a)),
        "tbp_lv_Hext": np.degrees(np.arctan2(skin_b, skin_a)),
        "tbp_lv_L": lesion_l,
        "tbp_lv_Lext": skin_l,
        "tbp_lv_areaMM2": area,
        "tbp_lv_area_perim_ratio": perimeter**2 / area,
        "tbp_lv_color_std_mean": np.clip(
            0.2 + 1.6 * variegation + 0.15 * m + rng.gamma(1.0, 0.35, n), 0, None
        ),
        "tbp_lv_deltaA": d_a,
        "tbp_lv_deltaB": d_b,
        "tbp_lv_deltaL": d_l,
        "tbp_lv_deltaLB": delta_lb,
        "tbp_lv_deltaLBnorm": np.clip(delta_lb * rng.normal(1.0, 0.1, n) + 0.4 * m, 0.5, None),
        "tbp_lv_eccentricity": ecc,
        "tbp_lv_location": location,
        "tbp_lv_location_simple": simple,
        "tbp_lv_minorAxisMM": minor,
        "tbp_lv_nevi_confidence": 100
        / (1 + np.exp(-(2.5 - 1.4 * m - 0.6 * c + rng.normal(0, 2.0, n)))),
        "tbp_lv_norm_border": np.clip(
            2.0 + 5.0 * raggedness + 0.4 * m + rng.normal(0, 1.6, n), 0, 10
        ),
        "tbp_lv_norm_color": np.clip(
            0.8 + 3.0 * variegation + 0.4 * m + rng.normal(0, 1.5, n), 0, 10
        ),
        "tbp_lv_perimeterMM": perimeter,
        "tbp_lv_radial_color_std_max": np.clip(
            0.1 + 1.5 * variegation + rng.gamma(1.0, 0.4, n), 0, None
        ),
        "tbp_lv_stdL": np.clip(0.8 + 2.0 * variegation + rng.gamma(1.5, 0.4, n), 0, None),
        "tbp_lv_stdLExt": np.clip(rng.normal(2.2, 0.6, n), 0.3, None),
        "tbp_lv_symm_2axis": np.clip(0.25 + 0.35 * raggedness + rng.beta(2, 6, n), 0.05, 0.98),
        "tbp_lv_symm_2axis_angle": 5.0 * rng.integers(0, 36, n),
        "tbp_lv_x": xyz[:, 0],
        "tbp_lv_y": xyz[:, 1],
        "tbp_lv_z": xyz[:, 2],
        "attribution": pat["attribution"][p],
        "copyright_license": pat["license"][p],
    }
    image_part = _z(raggedness) + _z(variegation)
    latent = {
        "meta_score": (m + 0.4 * age_z) / math.sqrt(1.16),
        "context_score": c,
        "image_score": image_part / image_part.std(),
        "raggedness": raggedness,
        "variegation": variegation,
    }
    return meta, latent


def _intercept(score: np.ndarray, rate: float) -> float:
    """Intercept b with mean(sigmoid(b + score)) == rate (bisection)."""
    lo, hi = -40.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        mean = np.mean(1 / (1 + np.exp(-(mid + score))))
        lo, hi = (mid, hi) if mean < rate else (lo, mid)
    return (lo + hi) / 2


def _diagnoses(
    rng: np.random.Generator, target: np.ndarray, risk: np.ndarray
) -> dict[str, np.ndarray]:
    """The 10 train-only columns besides target, filled only where the real data fills them."""
    n = target.size
    cols = {
        k: np.full(n, None, dtype=object)
        for k in ("lesion_id", "iddx_2", "iddx_3", "iddx_4", "iddx_5", "mel_mitotic_index")
    }
    iddx_1 = np.full(n, "Benign", dtype=object)
    thick = np.full(n, np.nan)
    # Suspicious benign lesions (biopsied or indeterminate) are more frequent at higher risk.
    odds = np.exp(risk - risk.max())
    suspicious = (target == 0) & (rng.random(n) < 0.008 * odds / odds.mean())
    indeterminate = suspicious & (rng.random(n) < 0.35)
    iddx_1[indeterminate] = "Indeterminate"
    cols["iddx_2"][indeterminate] = "Indeterminate melanocytic proliferations"
    cols["iddx_3"][indeterminate] = "Atypical melanocytic neoplasm"
    benign_biopsy = suspicious & ~indeterminate
    cols["iddx_2"][benign_biopsy] = rng.choice(
        np.array(
            ["Benign melanocytic proliferations", "Benign epidermal proliferations"], dtype=object
        ),
        benign_biopsy.sum(),
    )
    cols["iddx_3"][benign_biopsy] = np.where(
        cols["iddx_2"][benign_biopsy] == "Benign melanocytic proliferations",
        "Nevus",
        "Seborrheic keratosis",
    )
    for i in np.flatnonzero(target == 1):
        iddx_1[i] = "Malignant"
        share = np.array([path[0] for path in MALIGNANT_PATHS])
        _, level2, level3, level4 = MALIGNANT_PATHS[rng.choice(len(MALIGNANT_PATHS), p=share)]
        cols["iddx_2"][i], cols["iddx_3"][i] = level2, level3
        cols["iddx_4"][i] = level4[rng.integers(len(level4))]
        if level3 == "Melanoma Invasive":
            thick[i] = round(float(rng.gamma(2.0, 0.3)), 2)
            cols["mel_mitotic_index"][i] = MITOTIC_INDEX[rng.integers(len(MITOTIC_INDEX))]
    tracked = (target == 1) | suspicious | (rng.random(n) < 0.05)
    cols["lesion_id"][tracked] = [
        f"IL_{k:07d}" for k in rng.choice(10**7, tracked.sum(), replace=False)
    ]
    parts = [iddx_1, cols["iddx_2"], cols["iddx_3"], cols["iddx_4"], cols["iddx_5"]]
    iddx_full = np.array(
        ["::".join(v for v in row if v) for row in zip(*parts, strict=True)], dtype=object
    )
    return {
        "lesion_id": cols["lesion_id"],
        "iddx_full": iddx_full,
        "iddx_1": iddx_1,
        "iddx_2": cols["iddx_2"],
        "iddx_3": cols["iddx_3"],
        "iddx_4": cols["iddx_4"],
        "iddx_5": cols["iddx_5"],
        "mel_mitotic_index": cols["mel_mitotic_index"],
        "mel_thick_mm": thick,
        "tbp_lv_dnn_lesion_confidence": 100 / (1 + np.exp(-rng.normal(3.0, 2.0, n))),
    }


def _frame(columns: dict[str, np.ndarray], schema: dict) -> pl.DataFrame:
    return pl.DataFrame(
        [
            pl.Series(name, _values(columns[name]), dtype=dtype, strict=False, nan_to_null=True)
            for name, dtype in schema.items()
        ]
    )


def _values(col: np.ndarray) -> np.ndarray | list:
    """Object arrays go to Polars as lists; None and NaN become nulls (empty CSV cells)."""
    return col.tolist() if col.dtype == object else col


def _lab_to_rgb(lightness: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lab = np.stack([lightness, a, b], axis=-1).astype(np.float32).reshape(-1, 1, 3)
    rgb = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB).reshape(-1, 3)
    return np.clip(rgb * 255.0, 0, 255)


def _image_params(
    meta: dict, latent: dict, rng: np.random.Generator, image_size: int
) -> np.ndarray:
    """One row of drawing parameters per lesion, consistent with its metadata."""
    n = meta["isic_id"].size
    side = np.round(image_size * rng.uniform(0.85, 1.15, n))
    px_per_mm = side / FIELD_OF_VIEW_MM
    skin = _lab_to_rgb(meta["tbp_lv_Lext"], meta["tbp_lv_Aext"], meta["tbp_lv_Bext"])
    lesion = _lab_to_rgb(meta["tbp_lv_L"], meta["tbp_lv_A"], meta["tbp_lv_B"])
    return np.column_stack(
        [
            side,
            np.minimum(meta["clin_size_long_diam_mm"] * px_per_mm / 2, side * 0.45),
            np.minimum(meta["tbp_lv_minorAxisMM"] * px_per_mm / 2, side * 0.45),
            rng.uniform(0, math.pi, n),
            latent["raggedness"],
            latent["variegation"],
            skin,
            lesion,
            rng.integers(0, 2**31, n),
        ]
    )


HARMONICS = (3, 5, 7, 11, 13)
TEXTURE_SIDE = 512


@lru_cache(maxsize=64)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel offsets from the centre and the border harmonics cos/sin(k·theta) for one crop size."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) - (side - 1) / 2
    theta = np.arctan2(yy, xx)
    k_theta = np.array(HARMONICS, dtype=np.float32)[:, None, None] * theta
    return xx, yy, np.concatenate([np.cos(k_theta), np.sin(k_theta)])


@lru_cache(maxsize=1)
def _skin_texture() -> np.ndarray:
    """Grey pore-scale noise (mean 16, sd 4) to crop from; added with an offset of -16."""
    noise = np.random.default_rng(0).normal(16.0, 4.0, (TEXTURE_SIDE, TEXTURE_SIDE, 1))
    return np.repeat(np.clip(noise, 0, 32).astype(np.uint8), 3, axis=2)


def _draw(params: np.ndarray) -> np.ndarray:
    """Render one crop: textured skin and an elliptic lesion, ragged border, variegated colour."""
    side, r_long, r_short, angle, ragged, varieg = params[:6]
    skin, lesion = params[6:9], params[9:12]
    rng = np.random.default_rng(int(params[12]))
    s = int(side)
    xx, yy, waves = _grid(s)
    dx, dy = rng.normal(0, s * 0.03, 2)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    u = ((xx - dx) * cos_a + (yy - dy) * sin_a) / max(r_long, 1.0)
    v = ((yy - dy) * cos_a - (xx - dx) * sin_a) / max(r_short, 1.0)
    phase = rng.uniform(0, 2 * math.pi, len(HARMONICS))
    amp = rng.normal(0, 1, len(HARMONICS)) / np.array(HARMONICS)
    coef = np.concatenate([amp * np.cos(phase), -amp * np.sin(phase)]).astype(np.float32)
    radius = 1.0 + 0.7 * ragged * np.tensordot(coef, waves, axes=1)
    inside = np.clip((radius - np.sqrt(u * u + v * v)) * 6.0 + 0.5, 0.0, 1.0).astype(np.float32)
    # Variegation: low-frequency colour blotches and dark (black / blue-grey) clods.
    blotch = rng.normal(0, 1, (5, 5, 4))
    shade = lesion * (1.0 + 0.35 * varieg * blotch[..., :1]) + 20.0 * varieg * blotch[
        ..., 1:3
    ].mean(-1, keepdims=True)
    small = shade - 80.0 * varieg * np.clip(blotch[..., 3:], 0, None) * np.array([1.0, 0.9, 0.6])
    colour = cv2.resize(
        np.clip(small, 0, 255).astype(np.uint8), (s, s), interpolation=cv2.INTER_LINEAR
    )
    background = np.empty((s, s, 3), np.uint8)
    background[:] = skin.astype(np.uint8)
    image = cv2.blendLinear(colour, background, inside, 1.0 - inside)
    ox, oy = rng.integers(0, TEXTURE_SIDE - s, 2)
    return cv2.addWeighted(image, 1.0, _skin_texture()[oy : oy + s, ox : ox + s], 1.0, -16.0)


def _encode_chunk(params: np.ndarray) -> list[bytes]:
    out = []
    for row in params:
        rgb = _draw(row)
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
        )
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        out.append(buf.tobytes())
    return out


# Images per worker below which rendering stays in this process: a worker costs about a second to
# start (spawn imports this module) and renders about 2,000 crops a second.
MIN_IMAGES_PER_WORKER = 2_000


def _write_images(path: Path, ids: np.ndarray, params: np.ndarray, workers: int, desc: str) -> None:
    """Render and JPEG-encode every crop (in up to `workers` processes) into one hdf5 dataset per
    id. Workers are spawned, never forked: the pipeline calls this with a heartbeat thread running,
    and a fork taken while another thread holds a lock left a worker hung for good (seen in CI)."""
    # chunks of at most 1000 images, and at least one per worker so every worker gets work
    chunk = max(1, min(1000, -(-len(params) // max(workers, 1))))
    chunks = [params[i : i + chunk] for i in range(0, len(params), chunk)]
    workers = min(workers, len(params) // MIN_IMAGES_PER_WORKER)
    with h5py.File(path, "w", libver="earliest") as h5:
        bar = tqdm(total=len(ids), desc=desc, unit="img", mininterval=2.0)
        if workers > 1 and len(chunks) > 1:
            with get_context("spawn").Pool(workers) as pool:
                results = pool.imap(_encode_chunk, chunks)
                _store(h5, ids, results, chunk, bar)
        else:
            _store(h5, ids, map(_encode_chunk, chunks), chunk, bar)
        bar.close()


def _store(h5: h5py.File, ids: np.ndarray, results, chunk: int, bar) -> None:
    for k, jpegs in enumerate(results):
        for isic_id, jpeg in zip(ids[k * chunk : k * chunk + len(jpegs)], jpegs, strict=True):
            h5.create_dataset(isic_id, data=np.bytes_(jpeg))
        bar.update(len(jpegs))


def best_pauc(truth: pl.DataFrame) -> float:
    """pAUC of the true probabilities against the drawn train labels (the achievable ceiling)."""
    from utils.metric import pauc

    train = truth.filter(pl.col("split") == "train")
    return pauc(train["target"].to_numpy(), train["prob"].to_numpy())


class FewPositivesWarning(UserWarning):
    """Fewer patients with a positive lesion than cross-validation folds: some folds get none."""


def few_positives_message(positive_patients: int, patients: int, positives: int) -> str:
    """Why such data cannot be cross-validated, and what to change."""
    return (
        f"{positive_patients} of {patients} train patient(s) have a positive lesion "
        f"({positives} positive(s)), fewer than the {N_FOLDS} cross-validation folds: a fold "
        "without positives has no pAUC and stage 1/3 fail on it. Raise --rows, --patients or "
        "--positive-rate (e.g. --rows 600 --patients 30 --positive-rate 0.05, the demo sizes)"
    )


def default_truth_path(out_dir: str | Path) -> Path:
    """`<out_dir>-truth.csv` beside the data dir (the truth must not be readable as data)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}-truth.csv"


def generate(
    out_dir: str | Path,
    rows: int = 20_000,
    seed: int = 0,
    image_size: int = 128,
    patients: int | None = None,
    positive_rate: float = 0.001,
    test_rows: int | None = None,
    truth_path: str | Path | None = None,
    workers: int | None = None,
    require_positive_patients: int | None = None,
    structure: Structure | None = None,
) -> Summary:
    """Write a complete synthetic data dir in the Kaggle layout; see the module docstring.

    Fewer patients with a positive lesion than N_FOLDS gives a FewPositivesWarning; with
    `require_positive_patients` it is a ValueError raised before any file is written.
    """
    start = time.perf_counter()
    if rows < 2:
        raise ValueError("generate: rows must be at least 2")
    if not 0 < positive_rate < 0.5:
        raise ValueError("generate: positive_rate must be in (0, 0.5)")
    out_dir = Path(out_dir)
    truth_path = Path(truth_path) if truth_path else default_truth_path(out_dir)
    if truth_path.resolve().parent == out_dir.resolve():
        raise ValueError(f"generate: keep the truth file outside the data dir ({truth_path})")
    patients = patients or max(2, round(REAL_PATIENTS * rows / REAL_ROWS))
    patients = min(patients, rows)
    test_rows = test_rows if test_rows is not None else max(3, rows // 50)
    test_patients = max(1, min(test_rows, round(patients * test_rows / rows)))
    workers = workers or min(os.cpu_count() or 1, 8)
    rng = np.random.default_rng(seed)

    pat = _patients(rng, patients + test_patients, TRAIN_ATTRIBUTIONS)
    pat["patient_id"] = np.array(
        [f"IP_{k:07d}" for k in rng.choice(10**7, patients + test_patients, replace=False)],
        dtype=object,
    )
    is_test = np.arange(patients + test_patients) >= patients
    cairns = is_test & (rng.random(is_test.size) < 0.3)  # an attribution train never saw
    pat["attribution"][cairns], pat["license"][cairns] = TEST_ONLY_ATTRIBUTION
    train_pat = {k: v[~is_test] for k, v in pat.items()}
    test_pat = {k: v[is_test] for k, v in pat.items()}
    id_base = int(rng.integers(10**5, 10**6))
    train_meta, train_latent = _lesions(
        rng, train_pat, _lesion_counts(rng, rows, patients), id_base
    )
    test_meta, test_latent = _lesions(
        rng, test_pat, _lesion_counts(rng, test_rows, test_patients), id_base + rows
    )

    score = {
        k: np.concatenate([train_latent[k], test_latent[k]])
        for k in ("meta_score", "context_score", "image_score")
    }
    risk = SIGNAL_WEIGHT * (score["meta_score"] + score["context_score"] + score["image_score"])
    structure = structure or Structure()
    if structure.on:  # its own generator: the default draws above and below stay the same
        structure_rng = np.random.default_rng([seed, STRUCTURE_STREAM])
        planted = [plant(m, structure_rng, structure) for m in (train_meta, test_meta)]
        extra = {k: np.concatenate([planted[0][k], planted[1][k]]) for k in planted[0]}
        risk = risk + SIGNAL_WEIGHT * extra.get("site_score", 0.0) + extra.get("site_rate", 0.0)
        score |= extra
    logit = _intercept(risk[:rows], positive_rate) + risk
    prob = 1 / (1 + np.exp(-logit))
    target = (rng.random(prob.size) < prob).astype(np.int8)
    positives = int(target[:rows].sum())
    positive_patients = len(set(train_meta["patient_id"][target[:rows] == 1]))
    if positive_patients < (require_positive_patients or N_FOLDS):
        message = few_positives_message(positive_patients, patients, positives)
        if require_positive_patients:
            raise ValueError(f"generate: {message}")
        warnings.warn(message, FewPositivesWarning, stacklevel=2)
    train_meta["target"] = target[:rows]
    train_meta.update(_diagnoses(rng, target[:rows], risk[:rows]))

    train = _frame(train_meta, TRAIN_COLUMNS)
    test = _frame(test_meta, TEST_COLUMNS)
    out_dir.mkdir(parents=True, exist_ok=True)
    train.write_csv(out_dir / TRAIN_METADATA)
    test.write_csv(out_dir / TEST_METADATA)
    pl.DataFrame({"isic_id": test["isic_id"], "target": 0.3}).write_csv(out_dir / SAMPLE_SUBMISSION)
    truth = pl.DataFrame(
        {
            "isic_id": np.concatenate([train_meta["isic_id"], test_meta["isic_id"]]),
            "split": ["train"] * rows + ["test"] * test["isic_id"].len(),
            "target": np.where(np.arange(prob.size) < rows, target, -1),
            "prob": prob,
            **score,
        }
    )
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    truth.write_csv(truth_path)

    _write_images(
        out_dir / TRAIN_IMAGES,
        train_meta["isic_id"],
        _image_params(train_meta, train_latent, rng, image_size),
        workers,
        "train images",
    )
    _write_images(
        out_dir / TEST_IMAGES,
        test_meta["isic_id"],
        _image_params(test_meta, test_latent, rng, image_size),
        workers,
        "test images",
    )
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    return Summary(
        out_dir=out_dir,
        truth_path=truth_path,
        train_rows=rows,
        test_rows=test.height,
        train_patients=patients,
        test_patients=test_patients,
        positives=positives,
        positive_patients=positive_patients,
        best_pauc=best_pauc(truth) if 0 < positives < rows else float("nan"),
        seconds=time.perf_counter() - start,
        bytes_on_disk=size,
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: refuses (exit 2, nothing written) data with fewer positive
    patients than folds unless --allow-few-positives."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.synthetic",
        description=__doc__.split("\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="data dir to write (Kaggle layout)")
    parser.add_argument("--rows", type=int, default=20_000, help="train rows (real: 401059)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--image-size", type=int, default=128, help="typical crop side in px")
    parser.add_argument(
        "--patients", type=int, default=None, help="train patients; none: 1042 x rows / 401059"
    )
    parser.add_argument("--positive-rate", type=float, default=0.001, help="share of positives")
    parser.add_argument("--test-rows", type=int, default=None, help="none: rows // 50")
    parser.add_argument(
        "--truth", type=Path, default=None, help="none: <out>-truth.csv beside the data dir"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="image-rendering processes; none: CPUs, <= 8"
    )
    parser.add_argument(
        "--allow-few-positives",
        action="store_true",
        help=f"write data with fewer positive patients than the {N_FOLDS} folds anyway",
    )
    parser.add_argument(
        "--structure",
        nargs="*",
        default=[],
        choices=STRUCTURES,
        help="optional structures to plant (utils.synthetic_structure); none: the default data",
    )
    args = parser.parse_args(argv)
    try:
        summary = generate(
            args.out,
            rows=args.rows,
            seed=args.seed,
            image_size=args.image_size,
            patients=args.patients,
            positive_rate=args.positive_rate,
            test_rows=args.test_rows,
            truth_path=args.truth,
            workers=args.workers,
            require_positive_patients=None if args.allow_few_positives else N_FOLDS,
            structure=Structure.of(args.structure),
        )
    except ValueError as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
