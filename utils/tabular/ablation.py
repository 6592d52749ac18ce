"""Ablation of the `plus` recipe's candidates: 5-fold CV of the metadata + image GBDT ensemble
for `paper`, `paper` + each candidate alone and all kept candidates together, over seeds.
`ablation(data_dir, seeds, candidates, ...)` is the core of bench/ablation.py (the command line)
and utils.tabular.ablation_stage (notebooks/06_ablation, the Kaggle kernel).

Data: a data dir with `image_oof_dirs` (real stage 1 runs, their folds kept for every seed; a
seed then varies the GBDT seeds and resampling only), or a synthetic data dir with its truth file
(`truth_path`, utils.synthetic). Synthetic: the image models trained here cannot learn the
images, so the image columns are STAND-IN OOFs, one per registered image model
(utils.settings.IMAGE_MODELS): sigmoid(logit(true prob) + noise), noise sd `STANDIN_NOISE[model]`,
drawn anew per seed; each column's pAUC alone is printed. Data generated with `--structure
image_patient` add the truth's `image_patient_part` to every column's logit (the same
patient-level part for every model, as a shared bias would be). The structures a data dir holds
(utils.synthetic_structure) are printed first: a candidate that gains nothing on data without
the structure it targets is "not measured" there, not rejected.

Seeds: seed s sets the fold assignment (FOLD_SEED + s; real image OOFs keep theirs), the GBDT
seed (s; with seed bagging s, s + 1, ..., each drawing its own over/under-sample) and the
stand-in noise. The data stay the same.

Candidates (under utils/): `patient_image` (tabular.plus_features.patient_image_features, seen by
the image members), `ugly_duckling` (tabular.plus_features, every member, lgb_meta included),
`site_features` (tabular.features, GBDTConfig.site_features, every member), `patient_lof` (the
LOF alone), `location_norm` and `location_outliers` (tabular.location_features, every member),
`blend` (tabular.blend.nested_blend of the members' OOF instead of equal weights, on the CV of
the row without it: no extra CV), `blend_floor` (the same with `lgb_meta` kept at weight >=
BLEND_FLOOR), `rank_blend` (tabular.blend.rank_average_blend), `seed_bagging` (`bag_seeds` GBDT
seeds per member).

Phase 1: `paper` and `paper` + each candidate alone, over every seed; the rule keeps a candidate
when its mean paired gain over `paper` exceeds the std of that gain over seeds (of the blends,
the best one). Phase 2: `plus (kept: ...)`, all kept candidates together, over the same seeds (a
single kept candidate reuses its CV). The summary gives, per row, mean and spread (std, min-max)
of the ensemble's OOF pAUC over seeds, the mean paired gain over `paper` and its std, and wall
seconds (the row's features and CV; a blend row adds its fitting time to the CV it blends).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from utils.folds import assign_folds
from utils.io import DataDir
from utils.layout import OOF_FILE
from utils.metric import pauc
from utils.settings import FOLD_SEED, IMAGE_MODELS, N_FOLDS, resolve
from utils.synthetic_structure import STRUCTURES
from utils.tabular.blend import member_floors, nested_blend, rank_average_blend
from utils.tabular.cv import CVResult, cross_validate
from utils.tabular.features import IMAGE_PREFIX
from utils.tabular.gbdt import load_training_frame
from utils.tabular.libraries import ENSEMBLE, GBDT_MODELS, META_MEMBER, make_members, resolve_params
from utils.tabular.plus_features import (
    add_optional_features,
    join_new,
    patient_image_feature_names,
    patient_image_features,
)

# the feature groups built by the registry (tabular.plus_features.OPTIONAL_GROUPS) besides the
# image-derived one, which needs the per-seed stand-ins
REGISTRY_GROUPS = ("ugly_duckling", "patient_lof", "location_norm", "location_outliers")
BLENDS = ("blend", "blend_floor", "rank_blend")  # blend the OOF of a CV; rank_blend not in plus
CANDIDATES = ("patient_image", *REGISTRY_GROUPS, "site_features", *BLENDS, "seed_bagging")
BLEND_FLOOR = 0.1  # lgb_meta's least weight in the `blend_floor` candidate
PATIENT_PART = "image_patient_part"  # truth column of the image_patient structure
STRUCTURE_COLUMNS = {
    "site_outlier": "site_score",
    "site_rates": "site_rate",
    "image_patient": PATIENT_PART,
}
# logit-scale noise sd of each stand-in image OOF (the true logit's sd is about 2.4 at full scale)
STANDIN_NOISE: dict[str, float] = {
    "convnextv2_nano": 2.0,
    "vit_tiny": 2.5,
    "vit_tiny_suspicious": 3.0,
    "vit_small_suspicious": 2.5,
}


def standin_image_oofs(
    truth: pl.DataFrame, ids: pl.Series, seed: int, noise: Mapping[str, float] = STANDIN_NOISE
) -> pl.DataFrame:
    """isic_id plus one img_<model> column per image model: sigmoid(logit(prob) + N(0, sd)), plus
    the truth's `image_patient_part` when it has one."""
    prob = ids.to_frame("isic_id").join(truth, on="isic_id", how="left", maintain_order="left")
    missing = prob["prob"].null_count()
    if missing:
        raise ValueError(f"standin_image_oofs: {missing} isic_id(s) missing from the truth file")
    p = np.clip(prob["prob"].to_numpy(), 1e-9, 1 - 1e-9)
    logit = np.log(p / (1 - p))
    if PATIENT_PART in prob.columns:
        logit = logit + prob[PATIENT_PART].fill_null(0.0).to_numpy()
    rng = np.random.default_rng(seed)
    columns = {
        f"{IMAGE_PREFIX}{model}": 1 / (1 + np.exp(-(logit + rng.normal(0.0, sd, p.size))))
        for model, sd in noise.items()
    }
    return pl.DataFrame({"isic_id": ids, **columns}).with_columns(
        pl.col(name).cast(pl.Float32) for name in columns
    )


def score_row(result: CVResult, blend: str | None) -> tuple[float, float, dict[str, float | str]]:
    """Ensemble OOF pAUC (equal weights, nested blend or rank average), blend seconds, member
    pAUCs (and the nested blend's final weights)."""
    y, members = result.y, list(result.members)
    scores: dict[str, float | str] = {name: pauc(y, result.oof[name]) for name in members}
    if blend is None or len(members) < 2:
        return pauc(y, result.oof[ENSEMBLE]), 0.0, scores
    start = time.perf_counter()
    preds = np.column_stack([result.oof[m] for m in members])
    if blend == "rank_blend":
        score = pauc(y, rank_average_blend(preds))
    else:
        floor = BLEND_FLOOR if blend == "blend_floor" else 0.0
        floors = member_floors(members, META_MEMBER, floor)
        blended = nested_blend(preds, y, result.folds, floors=floors)
        scores["weights"] = " ".join(f"{w:.2f}" for w in blended.weights)
        score = blended.pauc
    return score, time.perf_counter() - start, scores


def row_plan(candidates: Sequence[str]) -> list[tuple[str, set[str]]]:
    """Phase 1: (row name, candidates on) for paper and paper + each candidate alone."""
    return [("paper", set())] + [(f"paper + {c}", {c}) for c in candidates]


def kept_candidates(summary: pl.DataFrame) -> list[str]:
    """The rule on a phase 1 summary: a candidate is kept when its mean gain over paper exceeds
    the spread (std over seeds) of that gain; of the blends only the best one."""
    kept = []
    for row in summary.iter_rows(named=True):
        name = row["row"].removeprefix("paper + ")
        if name == row["row"] or row["gain_std"] is None:
            continue
        if row["gain_mean"] > 0 and row["gain_mean"] > row["gain_std"]:
            kept.append((name, row["gain_mean"]))
    blends = sorted((g, n) for n, g in kept if n in BLENDS)
    drop = {n for _, n in blends[:-1]}
    return [n for n, _ in kept if n not in drop]


def plus_row_name(kept: Sequence[str]) -> str:
    return f"plus (kept: {', '.join(kept) or 'none'})"


def summarise(results: pl.DataFrame) -> pl.DataFrame:
    """Per row: mean, std, min, max of pAUC over seeds, mean paired gain over paper, wall s."""
    paper = results.filter(pl.col("row") == "paper").select("seed", paper_pauc="pauc")
    joined = results.join(paper, on="seed").with_columns(gain=pl.col("pauc") - pl.col("paper_pauc"))
    return joined.group_by("row", maintain_order=True).agg(
        seeds=pl.len(),
        pauc_mean=pl.col("pauc").mean(),
        pauc_std=pl.col("pauc").std(),
        pauc_min=pl.col("pauc").min(),
        pauc_max=pl.col("pauc").max(),
        gain_mean=pl.col("gain").mean(),
        gain_std=pl.col("gain").std(),
        wall_s=pl.col("wall_s").mean(),
    )


@dataclass(frozen=True)
class Inputs:
    """What every row draws from: the frame (site features and the registry groups asked for
    joined), labels, feature name lists and the one-off feature seconds per group."""

    frame: pl.DataFrame
    y: np.ndarray
    meta: list[str]  # the paper's metadata features
    groups: dict[str, list[str]]  # metadata features each feature candidate adds
    seconds: dict[str, float]  # what each feature candidate's features cost to build
    images: list[str]  # image columns: real OOFs (in `frame`) or the stand-ins' names
    folds: np.ndarray | None  # the real image OOFs' folds (fixed); None: drawn per seed


def load_inputs(
    data_dir: Path,
    candidates: Sequence[str],
    threads: int | None,
    image_oof_dirs: Sequence[Path] = (),
) -> Inputs:
    """The training frame built once with the optional feature groups the candidates need; each
    registry group is built on its own (its own names, shared ones included) and joined. With
    `image_oof_dirs` (real image runs) their OOF columns are joined and their folds kept."""
    start = time.perf_counter()
    site = "site_features" in candidates
    data = load_training_frame(data_dir, image_oof_dirs, site_features=site)
    base_s = time.perf_counter() - start
    meta = list(data.meta_features)
    groups: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    if "site_features" in candidates:
        start = time.perf_counter()
        paper = load_training_frame(data_dir, site_features=False)
        seconds["site_features"] = max(base_s - (time.perf_counter() - start), 0.0)
        groups["site_features"] = [n for n in meta if n not in set(paper.meta_features)]
        meta = list(paper.meta_features)
        del paper
    frame = data.frame
    base = frame.select("isic_id", "patient_id", *meta)
    metadata = DataDir(data_dir).train_metadata().drop("target")
    for group in (g for g in REGISTRY_GROUPS if g in candidates):
        start = time.perf_counter()
        built, names, _ = add_optional_features(base, metadata, [], threads, **{group: True})
        seconds[group] = time.perf_counter() - start
        groups[group] = names
        frame, _ = join_new(frame, built.select("isic_id", *names))
    if image_oof_dirs:
        return Inputs(frame, data.y, meta, groups, seconds, list(data.image_columns), data.folds)
    images = [f"{IMAGE_PREFIX}{m}" for m in IMAGE_MODELS]
    return Inputs(frame, data.y, meta, groups, seconds, images, None)


def seed_frames(
    inputs: Inputs,
    truth_path: Path | None,
    seeds: Sequence[int],
    candidates: Sequence[str],
    verbose: bool,
) -> dict[int, tuple[pl.DataFrame, float]]:
    """Per seed: the frame with its image columns (fresh stand-ins drawn from `truth_path`, or
    the real OOFs) and the patient-relative image features when asked, and those seconds."""
    truth = None
    if inputs.folds is None:
        planted = data_structures(pl.read_csv(truth_path, n_rows=1).columns)
        if verbose:
            print(f"structures planted in {Path(truth_path).name}: {planted or 'none (default)'}")
        wanted = ["isic_id", "prob"] + ([PATIENT_PART] if "image_patient" in planted else [])
        truth = pl.read_csv(truth_path, columns=wanted)
    per_seed = {}
    for seed in seeds:
        start = time.perf_counter()
        seeded = inputs.frame
        if truth is not None:
            standins = standin_image_oofs(truth, inputs.frame["isic_id"], seed)
            seeded = seeded.join(standins, on="isic_id", how="left", maintain_order="left")
        if "patient_image" in candidates:
            seeded = patient_image_features(seeded, inputs.images)
        per_seed[seed] = (seeded, time.perf_counter() - start)
        if verbose:
            kind = "stand-in" if truth is not None else "real"
            strength = ", ".join(
                f"{c} {pauc(inputs.y, seeded[c].fill_null(0.0).to_numpy()):.4f}"
                for c in inputs.images
            )
            print(f"seed {seed}: {kind} image OOF pAUC alone: {strength}", flush=True)
    return per_seed


def check_image_source(image_oof_dirs: Sequence[str | Path], truth_path: Path | None) -> None:
    """The image columns' source exists: real image runs, or else the synthetic truth file."""
    if image_oof_dirs:
        missing = [str(d) for d in image_oof_dirs if not (Path(d) / OOF_FILE).is_file()]
        if missing:
            raise FileNotFoundError(f"ablation: image OOF dir(s) without an {OOF_FILE}: {missing}")
    elif truth_path is None or not truth_path.is_file():
        raise FileNotFoundError(
            f"ablation: no image OOF dirs and no truth file ({truth_path}): stand-in image OOFs "
            "are drawn from the synthetic data's truth file; real data need the image runs"
        )


def data_structures(truth_columns: Sequence[str]) -> list[str]:
    """The utils.synthetic_structure structures a truth file's columns show were planted."""
    return [s for s in STRUCTURES if STRUCTURE_COLUMNS[s] in truth_columns]


def run_row(
    inputs: Inputs,
    seeded: pl.DataFrame,
    folds: np.ndarray,
    on: set[str],
    seed: int,
    params: Mapping[str, Any],
    member_names: Sequence[str],
    bag_seeds: int,
    threads: int | None,
) -> tuple[CVResult, float]:
    """The 5-fold CV of one set of (non-blend) candidates and its wall seconds. The fitted models
    are dropped: a row needs the OOF only, and every CV stays cached for the blends (at full
    size, hundreds of models)."""
    images = inputs.images
    row_meta = list(inputs.meta)
    for group, names in inputs.groups.items():
        if group in on:
            row_meta += [n for n in names if n not in row_meta]
    row_images = images + (patient_image_feature_names(images) if "patient_image" in on else [])
    bag = range(bag_seeds if "seed_bagging" in on else 1)
    members = make_members(row_meta, row_images, params, names=member_names)
    start = time.perf_counter()
    result = cross_validate(
        seeded, inputs.y, folds, members, [seed + k for k in bag], threads=threads
    )
    result.models.clear()
    return result, time.perf_counter() - start


def ablation(
    data_dir: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    candidates: Sequence[str] = CANDIDATES,
    bag_seeds: int = 3,
    preset: str = "full",
    threads: int | None = None,
    member_names: Sequence[str] = tuple(GBDT_MODELS),
    verbose: bool = True,
    gbdt_overrides: Mapping[str, Any] | None = None,
    image_oof_dirs: Sequence[str | Path] = (),
    truth_path: str | Path | None = None,
) -> tuple[pl.DataFrame, list[str]]:
    """One row per (table row, seed): pAUC of the ensemble's OOF and wall seconds; and the
    candidates kept by the rule (phase 1), whose `plus` row phase 2 adds.

    `gbdt_overrides`: GBDTConfig fields over the preset's (e.g. fewer `rounds` for a quick test).
    `image_oof_dirs`: real image runs (stage 1 output dirs) instead of stand-ins, e.g. on the
    competition data: their folds are kept for every seed (another split would leak their OOF).
    `truth_path`: without image OOF dirs, the synthetic truth file the stand-ins are drawn from.
    """
    data_dir, truth = Path(data_dir), None if truth_path is None else Path(truth_path)
    unknown = sorted(set(candidates) - set(CANDIDATES))
    if unknown:
        raise ValueError(f"unknown candidate(s) {unknown}; known: {list(CANDIDATES)}")
    if not seeds:
        raise ValueError("ablation: no seeds given (the rule needs at least two)")
    check_image_source(image_oof_dirs, truth)
    inputs = load_inputs(data_dir, candidates, threads, [Path(d) for d in image_oof_dirs])
    params = resolve_params(resolve(preset, gbdt=gbdt_overrides).gbdt)
    per_seed = seed_frames(inputs, truth, seeds, candidates, verbose)

    records = []
    cvs: dict[tuple[int, frozenset[str]], tuple[CVResult, float]] = {}  # blends reuse a CV

    def measure(name: str, on: set[str], seed: int) -> None:
        seeded, patient_s = per_seed[seed]
        folds = inputs.folds
        if folds is None:
            folds = assign_folds(seeded, N_FOLDS, FOLD_SEED + seed)
        key = (seed, frozenset(on - set(BLENDS)))
        if key not in cvs:
            cvs[key] = run_row(
                inputs, seeded, folds, set(key[1]), seed, params, member_names, bag_seeds, threads
            )
        result, wall = cvs[key]
        score, blend_s, members_pauc = score_row(result, next((b for b in BLENDS if b in on), None))
        wall += blend_s + patient_s * ("patient_image" in on)
        wall += sum(t for g, t in inputs.seconds.items() if g in on)
        records.append({"row": name, "seed": seed, "pauc": score, "wall_s": wall})
        if verbose:
            detail = ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in members_pauc.items()
            )
            print(
                f"  seed {seed} {name:<34} pAUC {score:.4f}  {wall:6.1f} s  ({detail})", flush=True
            )

    for seed in seeds:
        for name, on in row_plan(candidates):
            measure(name, on, seed)
    kept = kept_candidates(summarise(pl.DataFrame(records))) if len(seeds) > 1 else []
    if verbose:
        print(f"kept by the rule (mean gain > its std over seeds): {kept or 'none'}", flush=True)
    if kept:
        for seed in seeds:
            measure(plus_row_name(kept), set(kept), seed)
    return pl.DataFrame(records), kept
