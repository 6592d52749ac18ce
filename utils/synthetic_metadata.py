"""Synthetic metadata (utils.synthetic): patients, their lesions' 44 test columns with the latent
parts of the malignancy logit, and the train-only diagnosis columns.

Every function draws from the generator it is given, in a fixed order: the same seed gives the
same data only while the order of the draws stays as it is.
"""

from __future__ import annotations

import math

import numpy as np

from utils.schema import CATEGORIES

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
    CATEGORIES["attribution"][4]: (0.13, "CC-BY"),  # Frazer Institute, Univ. of Queensland
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
BENIGN_BIOPSIES = {  # iddx_2 -> iddx_3 of a biopsied benign lesion
    "Benign melanocytic proliferations": "Nevus",
    "Benign epidermal proliferations": "Seborrheic keratosis",
}


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def draw_patients(rng: np.random.Generator, n: int, attributions: dict) -> dict[str, np.ndarray]:
    """Per-patient traits: demographics, skin colour, typical lesion size and darkness."""
    names = list(attributions)
    shares = np.array([attributions[a][0] for a in names])
    attribution = rng.choice(len(names), n, p=shares / shares.sum())
    ages = np.arange(15, 90, 5)
    age_weights = np.exp(-0.5 * ((ages - 60) / 14.0) ** 2)
    age = rng.choice(ages, n, p=age_weights / age_weights.sum()).astype(float)
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


def lesion_counts(rng: np.random.Generator, rows: int, patients: int) -> np.ndarray:
    """Very unequal lesions per patient (heavy-tailed, every patient at least one)."""
    weights = rng.lognormal(0.0, 1.3, patients)
    return 1 + rng.multinomial(rows - patients, weights / weights.sum())


def _location_columns(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Body site (with nulls), location, simple location and 3D coordinates of `n` lesions."""
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
    for torso in ("Torso Back", "Torso Front"):  # "Torso Back Top Third" -> "Torso Back"
        simple = np.where(np.char.startswith(location.astype(str), torso), torso, simple)
    xyz = _coordinates(rng, location)
    return {
        "anatom_site_general": site,
        "tbp_lv_location": location,
        "tbp_lv_location_simple": simple,
        "tbp_lv_x": xyz[:, 0],
        "tbp_lv_y": xyz[:, 1],
        "tbp_lv_z": xyz[:, 2],
    }


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


def draw_lesions(
    rng: np.random.Generator, pat: dict, counts: np.ndarray, first_id: int
) -> tuple[dict, dict]:
    """Metadata columns (44 test columns) and latent parts for the lesions of `pat`, `counts`
    lesions per patient, isic_ids numbered from `first_id`."""
    p = np.repeat(np.arange(counts.size), counts)  # each lesion's patient
    n = p.size
    m = rng.standard_normal(n)  # lesion-level risk seen in the metadata
    c = rng.standard_normal(n)  # "ugly duckling": stands out from the patient's own lesions
    raggedness = rng.beta(2.0, 5.0, n)
    variegation = rng.beta(2.0, 5.0, n)
    shape = _shape_columns(rng, pat["log_size"][p], m, c, raggedness)
    colour = _colour_columns(rng, pat, p, m, c)
    location = _location_columns(rng, n)
    descriptors = _descriptor_columns(rng, m, c, raggedness, variegation, colour["tbp_lv_deltaLB"])
    meta = _patient_columns(pat, p, first_id) | shape | colour | location | descriptors
    return meta, _latent(m, c, raggedness, variegation, pat["age"][p])


def _patient_columns(pat: dict, p: np.ndarray, first_id: int) -> dict[str, np.ndarray]:
    """Ids and the patient-level columns of lesions whose patients are `p` (nothing drawn)."""
    n = p.size
    return {
        "isic_id": np.array([f"ISIC_{i:07d}" for i in range(first_id, first_id + n)], dtype=object),
        "patient_id": pat["patient_id"][p],
        "age_approx": pat["age"][p],
        "sex": np.where(pat["sex_null"][p], None, pat["sex"][p]),
        "image_type": np.full(n, "TBP tile: close-up", dtype=object),
        "tbp_tile_type": pat["tile"][p],
        "attribution": pat["attribution"][p],
        "copyright_license": pat["license"][p],
    }


def _shape_columns(
    rng: np.random.Generator,
    log_size: np.ndarray,
    m: np.ndarray,
    c: np.ndarray,
    raggedness: np.ndarray,
) -> dict[str, np.ndarray]:
    """Diameter, axes, area and perimeter around the patient's typical size; larger with the
    risk latents, the perimeter longer with a ragged border."""
    n = m.size
    size = np.exp(log_size + 0.30 * rng.standard_normal(n) + 0.18 * m + 0.20 * c)
    size = np.clip(size, 1.0, 28.4).round(2)
    ecc = np.clip(rng.beta(6.0, 2.2, n) + 0.03 * m, 0.2, 0.99)
    minor = np.clip(size * np.sqrt(1 - ecc**2) * rng.uniform(0.9, 1.2, n), 0.3, size)
    area = math.pi / 4 * size * minor * rng.normal(1.0, 0.05, n)
    a_ax, b_ax = size / 2, minor / 2
    ellipse_perimeter = math.pi * (
        3 * (a_ax + b_ax) - np.sqrt((3 * a_ax + b_ax) * (a_ax + 3 * b_ax))
    )
    perimeter = ellipse_perimeter * (1 + 0.35 * raggedness) * rng.normal(1.0, 0.04, n)
    return {
        "clin_size_long_diam_mm": size,
        "tbp_lv_areaMM2": area,
        "tbp_lv_area_perim_ratio": perimeter**2 / area,
        "tbp_lv_eccentricity": ecc,
        "tbp_lv_minorAxisMM": minor,
        "tbp_lv_perimeterMM": perimeter,
    }


def _colour_columns(
    rng: np.random.Generator, pat: dict, p: np.ndarray, m: np.ndarray, c: np.ndarray
) -> dict[str, np.ndarray]:
    """LAB colour of the lesion and the skin around it, and their differences: the lesion
    darker and redder with the risk latents, never lighter than its skin."""
    n = p.size
    skin_l = pat["skin_l"][p] + rng.normal(0, 2.0, n)
    skin_a = pat["skin_a"][p] + rng.normal(0, 1.0, n)
    skin_b = pat["skin_b"][p] + rng.normal(0, 1.5, n)
    lesion_l = np.minimum(
        pat["lesion_l"][p] - 5.0 * c - 1.5 * m + rng.normal(0, 3.0, n), skin_l - 1.0
    )
    lesion_a = skin_a + pat["lesion_da"][p] + 1.2 * m + 1.5 * c + rng.normal(0, 1.0, n)
    lesion_b = skin_b + 1.0 + rng.normal(0, 2.0, n)
    d_l, d_a, d_b = lesion_l - skin_l, lesion_a - skin_a, lesion_b - skin_b
    return {
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
        "tbp_lv_deltaA": d_a,
        "tbp_lv_deltaB": d_b,
        "tbp_lv_deltaL": d_l,
        "tbp_lv_deltaLB": np.hypot(d_l, d_b),
    }


def _descriptor_columns(
    rng: np.random.Generator,
    m: np.ndarray,
    c: np.ndarray,
    raggedness: np.ndarray,
    variegation: np.ndarray,
    delta_lb: np.ndarray,
) -> dict[str, np.ndarray]:
    """The TBP descriptors, each with its own noise: they hint at the risk latents and at the
    image's raggedness and variegation (drawn in the order of the dict)."""
    n = m.size
    return {
        "tbp_lv_color_std_mean": np.clip(
            0.2 + 1.6 * variegation + 0.15 * m + rng.gamma(1.0, 0.35, n), 0, None
        ),
        "tbp_lv_deltaLBnorm": np.clip(delta_lb * rng.normal(1.0, 0.1, n) + 0.4 * m, 0.5, None),
        "tbp_lv_nevi_confidence": 100
        / (1 + np.exp(-(2.5 - 1.4 * m - 0.6 * c + rng.normal(0, 2.0, n)))),
        "tbp_lv_norm_border": np.clip(
            2.0 + 5.0 * raggedness + 0.4 * m + rng.normal(0, 1.6, n), 0, 10
        ),
        "tbp_lv_norm_color": np.clip(
            0.8 + 3.0 * variegation + 0.4 * m + rng.normal(0, 1.5, n), 0, 10
        ),
        "tbp_lv_radial_color_std_max": np.clip(
            0.1 + 1.5 * variegation + rng.gamma(1.0, 0.4, n), 0, None
        ),
        "tbp_lv_stdL": np.clip(0.8 + 2.0 * variegation + rng.gamma(1.5, 0.4, n), 0, None),
        "tbp_lv_stdLExt": np.clip(rng.normal(2.2, 0.6, n), 0.3, None),
        "tbp_lv_symm_2axis": np.clip(0.25 + 0.35 * raggedness + rng.beta(2, 6, n), 0.05, 0.98),
        "tbp_lv_symm_2axis_angle": 5.0 * rng.integers(0, 36, n),
    }


def _latent(
    m: np.ndarray, c: np.ndarray, raggedness: np.ndarray, variegation: np.ndarray, age: np.ndarray
) -> dict[str, np.ndarray]:
    """The standardised parts of the malignancy logit, and what the image draws from."""
    age_z = np.where(np.isnan(age), 0.0, (np.nan_to_num(age) - 58.0) / 14.0)
    image_part = _z(raggedness) + _z(variegation)
    return {
        "meta_score": (m + 0.4 * age_z) / math.sqrt(1.16),
        "context_score": c,
        "image_score": image_part / image_part.std(),
        "raggedness": raggedness,
        "variegation": variegation,
    }


def draw_diagnoses(
    rng: np.random.Generator, target: np.ndarray, risk: np.ndarray
) -> dict[str, np.ndarray]:
    """The 10 train-only columns besides target, filled only where the real data fills them."""
    n = target.size
    cols = {
        k: np.full(n, None, dtype=object)
        for k in ("lesion_id", "iddx_2", "iddx_3", "iddx_4", "iddx_5", "mel_mitotic_index")
    }
    cols["iddx_1"] = np.full(n, "Benign", dtype=object)
    cols["mel_thick_mm"] = np.full(n, np.nan)
    suspicious = _suspicious_benign(rng, target, risk, cols)
    _malignant(rng, target, cols)
    tracked = (target == 1) | suspicious | (rng.random(n) < 0.05)
    cols["lesion_id"][tracked] = [
        f"IL_{k:07d}" for k in rng.choice(10**7, tracked.sum(), replace=False)
    ]
    parts = [cols[f"iddx_{level}"] for level in range(1, 6)]
    cols["iddx_full"] = np.array(
        ["::".join(v for v in row if v) for row in zip(*parts, strict=True)], dtype=object
    )
    cols["tbp_lv_dnn_lesion_confidence"] = 100 / (1 + np.exp(-rng.normal(3.0, 2.0, n)))
    return cols


def _suspicious_benign(
    rng: np.random.Generator, target: np.ndarray, risk: np.ndarray, cols: dict[str, np.ndarray]
) -> np.ndarray:
    """Diagnose the suspicious benign lesions (biopsied or indeterminate), more frequent at
    higher risk, in `cols`; which lesions they are."""
    n = target.size
    odds = np.exp(risk - risk.max())
    suspicious = (target == 0) & (rng.random(n) < 0.008 * odds / odds.mean())
    indeterminate = suspicious & (rng.random(n) < 0.35)
    cols["iddx_1"][indeterminate] = "Indeterminate"
    cols["iddx_2"][indeterminate] = "Indeterminate melanocytic proliferations"
    cols["iddx_3"][indeterminate] = "Atypical melanocytic neoplasm"
    benign_biopsy = suspicious & ~indeterminate
    iddx_2 = rng.choice(np.array(list(BENIGN_BIOPSIES), dtype=object), benign_biopsy.sum())
    cols["iddx_2"][benign_biopsy] = iddx_2
    cols["iddx_3"][benign_biopsy] = [BENIGN_BIOPSIES[value] for value in iddx_2]
    return suspicious


def _malignant(rng: np.random.Generator, target: np.ndarray, cols: dict[str, np.ndarray]) -> None:
    """Diagnose each positive in `cols` along one of MALIGNANT_PATHS; an invasive melanoma gets
    a thickness and a mitotic index."""
    share = np.array([path[0] for path in MALIGNANT_PATHS])
    for i in np.flatnonzero(target == 1):
        cols["iddx_1"][i] = "Malignant"
        _, level2, level3, level4 = MALIGNANT_PATHS[rng.choice(len(MALIGNANT_PATHS), p=share)]
        cols["iddx_2"][i], cols["iddx_3"][i] = level2, level3
        cols["iddx_4"][i] = level4[rng.integers(len(level4))]
        if level3 == "Melanoma Invasive":
            cols["mel_thick_mm"][i] = round(float(rng.gamma(2.0, 0.3)), 2)
            cols["mel_mitotic_index"][i] = MITOTIC_INDEX[rng.integers(len(MITOTIC_INDEX))]
