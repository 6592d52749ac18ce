"""Cross-validation of GBDT members: sampling inside folds, fold fits, OOF, soft vote, reports.

The ensemble score is the mean of the members' probabilities, each member's being the mean over
its fold models and seeds (soft voting).

Sampling: RandomOverSampler(0.003) then RandomUnderSampler(0.01) on the training rows of each
fold only (utils.settings.Sampling). A step whose ratio (positives / negatives) is already
reached is skipped, and the fold's note in `CVResult.sampling` says so (tiny or test data with
many positives).

Reports: `cv_report` scores every row (the plain score); `filtered_report` scores the same OOF
without the rows the reference's CV leaves out (utils.labels.reference_filtered), its "filtered"
score, named as such in cv_report.json.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from imblearn.over_sampling import RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler
from tqdm.auto import tqdm

from utils.metric import pauc
from utils.settings import Sampling
from utils.tabular.libraries import (
    ENSEMBLE,
    LIBRARIES,
    META_MEMBER,
    THREAD_PARAM,
    Member,
    member_matrix,
)

DEFAULT_SAMPLING = Sampling()


def sample_indices(
    rows: np.ndarray, y: np.ndarray, seed: int, sampling: Sampling = DEFAULT_SAMPLING
) -> tuple[np.ndarray, str]:
    """Over- then under-sample the row indices `rows` (labels y[rows]); returns rows and a note."""
    labels = y[rows]
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError(f"sample_indices: training rows hold one class only ({n_pos} positives)")
    notes = []
    steps = (
        ("over", sampling.over, RandomOverSampler),
        ("under", sampling.under, RandomUnderSampler),
    )
    for step, ratio, sampler in steps:
        if ratio is None:
            continue
        n_pos = int(labels.sum())
        n_neg = labels.size - n_pos
        # imbalanced-learn raises when the ratio is already reached (after its int rounding)
        reached = int(n_neg * ratio) <= n_pos if step == "over" else int(n_pos / ratio) >= n_neg
        if reached:
            notes.append(f"{step}-sampling skipped (ratio {n_pos / n_neg:.4f} >= {ratio})")
            continue
        rows, labels = sampler(sampling_strategy=ratio, random_state=seed).fit_resample(
            rows[:, None], labels
        )
        rows = rows[:, 0]
    n_pos = int(labels.sum())
    notes.append(f"{n_pos} pos / {labels.size - n_pos} neg")
    return rows, "; ".join(notes)


@dataclass(frozen=True)
class FoldResult:
    """One fitted fold model with its validation predictions and pAUC."""

    member: str
    fold: int
    seed: int
    valid_rows: np.ndarray
    pred: np.ndarray
    score: float
    model: Any
    note: str


def _fold_pauc(y: np.ndarray, pred: np.ndarray) -> float:
    """pAUC, or NaN when the fold holds one class only."""
    return pauc(y, pred) if 0 < y.sum() < y.size else float("nan")


def bin_member(x: np.ndarray, y: np.ndarray, member: Member, threads: int | None = None) -> Any:
    """The library's binned data of every row of `x`, shared by all folds; None if it has none.

    Binning looks at feature values only (never at labels), so binning the validation rows
    with the training rows leaks no target; it saves re-binning the training rows per fold.
    """
    library = LIBRARIES[member.library]
    if library.bin_all is None or library.fit_rows is None:
        return None
    threads = threads or os.cpu_count() or 1
    return library.bin_all(x, y, {**member.params, THREAD_PARAM[member.library]: threads})


def train_fold(
    x: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    fold: int,
    member: Member,
    seed: int = 0,
    sampling: Sampling = DEFAULT_SAMPLING,
    threads: int | None = None,
    binned: Any = None,
    trainable: np.ndarray | None = None,
) -> FoldResult:
    """Fit `member` on the sampled rows outside `fold` and score it on the rows of `fold`.

    `binned` (from `bin_member(x, y, member)`) fits on those rows of the shared binned data;
    `trainable` (one bool per row) keeps the other rows out of training, never out of the OOF.
    """
    library = LIBRARIES[member.library]
    threads = threads or os.cpu_count() or 1
    outside = folds != fold if trainable is None else (folds != fold) & trainable
    train_rows, note = sample_indices(np.flatnonzero(outside), y, seed, sampling)
    valid_rows = np.flatnonzero(folds == fold)
    params = {**member.params, "random_state": seed, THREAD_PARAM[member.library]: threads}
    if binned is not None:
        model = library.fit_rows(binned, train_rows, params)
    else:
        model = library.fit(x[train_rows], y[train_rows], params)
    pred = np.asarray(library.predict(model, x[valid_rows], threads), dtype=np.float64)
    score = _fold_pauc(y[valid_rows], pred)
    return FoldResult(member.name, fold, seed, valid_rows, pred, score, model, note)


def iter_cv(
    frame: pl.DataFrame,
    y: np.ndarray,
    folds: np.ndarray,
    members: Mapping[str, Member],
    seeds: Sequence[int] = (0,),
    sampling: Sampling = DEFAULT_SAMPLING,
    threads: int | None = None,
    bin_once: bool = True,
    trainable: np.ndarray | None = None,
) -> Iterator[FoldResult]:
    """Yield one FoldResult per member x seed x fold (for pruning, report each score).

    `bin_once` bins each member's rows once for all its folds where the library can
    (`bin_member`); False bins every fold's training rows anew. `trainable`: see train_fold.
    """
    y = np.asarray(y, dtype=np.int8)
    folds = np.asarray(folds)
    for member in members.values():
        x = member_matrix(frame, member)
        binned = bin_member(x, y, member, threads) if bin_once else None
        for seed in seeds:
            for fold in np.unique(folds):
                yield train_fold(
                    x, y, folds, int(fold), member, seed, sampling, threads, binned, trainable
                )
        del x, binned


@dataclass
class CVResult:
    """OOF predictions, per-fold scores and fitted models of a cross-validation."""

    y: np.ndarray
    folds: np.ndarray
    members: dict[str, Member]
    seeds: tuple[int, ...]
    oof: dict[str, np.ndarray] = field(default_factory=dict)
    models: dict[str, list[Any]] = field(default_factory=dict)
    model_keys: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    sampling: list[str] = field(default_factory=list)

    def fold_scores(self) -> pl.DataFrame:
        """pAUC per member (and ensemble) and fold, of the seed-averaged predictions."""
        rows = []
        for name, pred in self.oof.items():
            for fold in np.unique(self.folds):
                mask = self.folds == fold
                rows.append(
                    {"model": name, "fold": int(fold), "pauc": _fold_pauc(self.y[mask], pred[mask])}
                )
        return pl.DataFrame(rows)

    def overall_scores(self) -> dict[str, float]:
        """pAUC of each member's and the ensemble's OOF over all rows."""
        return {name: pauc(self.y, pred) for name, pred in self.oof.items()}


def cross_validate(
    frame: pl.DataFrame,
    y: np.ndarray,
    folds: np.ndarray,
    members: Mapping[str, Member],
    seeds: Sequence[int] = (0,),
    sampling: Sampling = DEFAULT_SAMPLING,
    threads: int | None = None,
    bin_once: bool = True,
    trainable: np.ndarray | None = None,
) -> CVResult:
    """Fit every member x seed x fold; OOF per member (seed mean) and the soft-vote ensemble.
    `trainable` (one bool per row, e.g. not labels.reference_filtered) limits the training rows;
    every row still gets its OOF prediction."""
    y = np.asarray(y, dtype=np.int8)
    folds = np.asarray(folds)
    result = CVResult(y, folds, dict(members), tuple(seeds))
    sums = {name: np.zeros(len(y)) for name in members}
    total = len(members) * len(seeds) * len(np.unique(folds))
    for fr in tqdm(
        iter_cv(frame, y, folds, members, seeds, sampling, threads, bin_once, trainable),
        total=total,
        desc="GBDT CV",
    ):
        sums[fr.member][fr.valid_rows] += fr.pred
        result.models.setdefault(fr.member, []).append(fr.model)
        result.model_keys.setdefault(fr.member, []).append((fr.fold, fr.seed))
        result.sampling.append(f"{fr.member} fold {fr.fold} seed {fr.seed}: {fr.note}")
    result.oof = {name: s / len(seeds) for name, s in sums.items()}
    result.oof[ENSEMBLE] = np.mean([result.oof[name] for name in members], axis=0)
    return result


def feature_importance(result: CVResult) -> pl.DataFrame:
    """Gain importance per member and feature, normalised to sum 1 and averaged over fold models."""
    frames = []
    for name, member in result.members.items():
        library = LIBRARIES[member.library]
        imps = [library.importance(m, len(member.features)) for m in result.models[name]]
        imps = [np.asarray(i, dtype=float) / max(float(np.sum(i)), 1e-12) for i in imps]
        mean = np.mean(imps, axis=0)
        frames.append(
            pl.DataFrame({"member": name, "feature": member.features, "importance": mean})
        )
    return pl.concat(frames)


def ablation_table(result: CVResult, image_scores: Mapping[str, np.ndarray]) -> pl.DataFrame:
    """Paper Table 4: image-only (mean of image OOFs), metadata-only (lgb_meta), full ensemble."""
    preds = {f"image-only: {k}": v for k, v in image_scores.items()}
    if image_scores:
        preds["image-only: mean of image models"] = np.mean(list(image_scores.values()), axis=0)
    if META_MEMBER in result.oof:
        preds[f"metadata-only: {META_MEMBER}"] = result.oof[META_MEMBER]
    full = "full: soft vote of members" if image_scores else "metadata-only: soft vote of members"
    preds[full] = result.oof[ENSEMBLE]
    return pl.DataFrame([{"setting": k, "pauc": pauc(result.y, v)} for k, v in preds.items()])


def _scores(result: CVResult) -> dict[str, dict[str, Any]]:
    """Overall and per-fold pAUC of each member's and the ensemble's OOF."""
    folds, overall = result.fold_scores(), result.overall_scores()
    return {
        name: {
            "overall": overall[name],
            "folds": folds.filter(pl.col("model") == name)["pauc"].to_list(),
        }
        for name in result.oof
    }


def cv_report(result: CVResult, ablation: pl.DataFrame, image_columns: Sequence[str]) -> dict:
    """JSON-ready report: per-fold and overall pAUC per member and ensemble, ablation, sampling."""
    return {
        "metadata_only": not image_columns,
        "image_columns": list(image_columns),
        "seeds": list(result.seeds),
        "rows": int(result.y.size),
        "positives": int(result.y.sum()),
        "scores": _scores(result),
        "ablation": ablation.to_dicts(),
        "sampling": result.sampling,
    }


FILTER_RULE = (
    "the reference's filtered CV (3rd-place tabular notebook): without the target-0 rows with "
    'iddx_1 == "Indeterminate" or a non-null iddx_2 (utils.labels.reference_filtered)'
)


def filtered_report(
    result: CVResult, filtered: np.ndarray | None, left_out_of_training: bool
) -> dict[str, Any]:
    """The CV scores without the `filtered` rows (one bool per row), beside the plain scores of
    cv_report: per member and ensemble, overall and per fold. `left_out_of_training` says whether
    the fold models also trained without them (the reference's CV exactly) or with them (as the
    reference's final refit, the models the submission uses). None: the data has no iddx
    columns, so no filtered score (said so, never a copy of the plain one)."""
    if filtered is None:
        return {"rule": FILTER_RULE, "available": False, "why": "no iddx_1 / iddx_2 columns"}
    keep = ~np.asarray(filtered, dtype=bool)
    kept = CVResult(result.y[keep], result.folds[keep], result.members, result.seeds)
    kept.oof = {name: pred[keep] for name, pred in result.oof.items()}
    return {
        "rule": FILTER_RULE,
        "available": True,
        "training": "without the filtered rows" if left_out_of_training else "on every row",
        "rows_left_out": int((~keep).sum()),
        "rows": int(keep.sum()),
        "positives": int(kept.y.sum()),
        "scores": _scores(kept),
    }
