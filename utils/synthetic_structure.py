"""Optional structures of the synthetic data (utils.synthetic `--structure`), each a switch, off by
default (the default data stay as they were): what the top ISIC 2024 solutions exploit on the
real data, planted so that an ablation can judge the candidates built for it.

- `site_outlier`: a malignant lesion differs from the same patient's other lesions *at the same
  body location*, not only from the patient's average. Every (patient, tbp_lv_location) gets its
  own offsets of the colour-irregularity / border descriptors (`SITE_OUTLIER_COLUMNS`), which
  hide a lesion-level latent `site_score` (part of the malignancy logit) from a patient-wide
  normalisation; within patient x location it shows. What the 2nd place's within patient x
  location normalisation and |z| features target (uchiyama33/isic-2024-2nd-place,
  src/isic_utils/feature_engineering.py: `_patient_loc_norm`, `ugly_duckling_processing`).
- `site_rates`: the base rate and the scale of the risk-carrying descriptors depend on
  anatom_site_general (`SITE_EFFECTS`): a raw value means something else on the
  head than on a leg. What the 2nd place's within patient x site normalisation
  (`_patient_site_general_norm`) and every solution's site one-hots can use.
- `image_patient`: the image scores have a patient-level part: every lesion of a patient is
  scored higher or lower together (skin type, imaging conditions), label-free. Written to the
  truth file as `image_patient_part` (logit scale) for stand-in image OOFs (bench/ablation.py);
  the JPEGs do not carry it. What the 1st place's patient-relative image score removes
  (ilyanovo/isic-2024, notebooks/top-model.ipynb: each OOF divided by the patient's mean).

Draws come from their own generator (seeded from the data seed), so switching a structure on
leaves every default draw, and so the rest of the data, as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import numpy as np

STRUCTURE_STREAM = 1  # second entropy word of the structures' generator: apart from the data's
SITE_OUTLIER_COLUMNS = (  # log-scale offsets (positive descriptors)
    "tbp_lv_color_std_mean",
    "tbp_lv_radial_color_std_max",
    "tbp_lv_stdL",
    "tbp_lv_area_perim_ratio",
)
SITE_OUTLIER_LOCATION_SD = 0.6  # log-scale sd of a (patient, location) offset
SITE_OUTLIER_SHIFT = 0.35  # log-scale shift per unit of site_score
# per site: additive logit (head/neck lesions the most often malignant) and factor on the
# risk-carrying descriptors; a null site gets NO_SITE_EFFECT
SITE_EFFECTS: dict[str | None, tuple[float, float]] = {
    "head/neck": (1.0, 1.5),
    "posterior torso": (0.2, 1.0),
    "anterior torso": (0.1, 1.1),
    "upper extremity": (-0.2, 0.8),
    "lower extremity": (-0.4, 0.7),
}
NO_SITE_EFFECT = (0.0, 1.0)
SITE_SCALED_COLUMNS = ("tbp_lv_deltaLBnorm", "tbp_lv_norm_border", "tbp_lv_norm_color")
CLIPPED_0_10 = ("tbp_lv_norm_border", "tbp_lv_norm_color")
IMAGE_PATIENT_SD = 1.5  # logit-scale sd of a patient's image-score offset


@dataclass(frozen=True)
class Structure:
    """Which optional structures `utils.synthetic.generate` plants (see the module docstring)."""

    site_outlier: bool = False
    site_rates: bool = False
    image_patient: bool = False

    @classmethod
    def of(cls, names: Iterable[str]) -> Structure:
        """Structure with `names` switched on; raises ValueError naming an unknown one."""
        names = list(names)
        if unknown := sorted(set(names) - set(STRUCTURES)):
            raise ValueError(f"unknown synthetic structure(s) {unknown}; known: {list(STRUCTURES)}")
        return cls(**{n: True for n in names})

    @property
    def on(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]


STRUCTURES = tuple(f.name for f in fields(Structure))


def _site_outlier(meta: dict, rng: np.random.Generator) -> np.ndarray:
    """Plant the within patient x location latent into `meta`; returns site_score."""
    n = len(meta["isic_id"])
    score = rng.standard_normal(n)
    keys = zip(meta["patient_id"], meta["tbp_lv_location"], strict=True)  # a null is a value
    groups = np.unique(
        [f"{patient}\x1f{location}" for patient, location in keys], return_inverse=True
    )[1]
    offsets = rng.normal(
        0.0, SITE_OUTLIER_LOCATION_SD, (groups.max() + 1, len(SITE_OUTLIER_COLUMNS))
    )
    for k, col in enumerate(SITE_OUTLIER_COLUMNS):
        factor = np.exp(offsets[groups, k] + SITE_OUTLIER_SHIFT * score)
        meta[col] = np.asarray(meta[col], dtype=np.float64) * factor
    return score


def _site_rates(meta: dict) -> np.ndarray:
    """Scale the risk-carrying descriptors by site in `meta`; returns the site's logit offset."""
    site = meta["anatom_site_general"]
    scale = np.array([SITE_EFFECTS.get(s, NO_SITE_EFFECT)[1] for s in site])
    for col in SITE_SCALED_COLUMNS:
        value = np.asarray(meta[col], dtype=np.float64) * scale
        meta[col] = np.clip(value, 0, 10) if col in CLIPPED_0_10 else value
    return np.array([SITE_EFFECTS.get(s, NO_SITE_EFFECT)[0] for s in site])


def plant(meta: dict, rng: np.random.Generator, structure: Structure) -> dict[str, np.ndarray]:
    """Plant `structure` into the metadata columns `meta` (in place) of one split; the truth
    columns it adds: site_score (standardised part of the logit), site_rate (logit offset) and
    image_patient_part (logit offset of the image scores), each only when switched on."""
    parts: dict[str, np.ndarray] = {}
    if structure.site_outlier:
        parts["site_score"] = _site_outlier(meta, rng)
    if structure.site_rates:
        parts["site_rate"] = _site_rates(meta)
    if structure.image_patient:
        patients, index = np.unique(meta["patient_id"].astype(str), return_inverse=True)
        parts["image_patient_part"] = rng.normal(0.0, IMAGE_PATIENT_SD, patients.size)[index]
    return parts
