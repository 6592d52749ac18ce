"""Blending the GBDT members' predictions beyond the paper's equal weights (tabular.cv): rank
averaging, and non-negative weights summing to 1 that maximise pAUC (the 2nd place of ISIC 2024
fitted its ensemble weights: uchiyama33/isic-2024-2nd-place,
configs/gbdt_params/*-tuning_weights.yaml, `tuning_ensemble_weights: true`).

A floor keeps chosen members at least at a given weight (`floors`, GBDTConfig.blend_floor for
`lgb_meta`): the metadata-only member is what the submission falls back to for a lesion without
image scores, and a member fitted to weight 0 would leave that fallback untested by the blend.

Optimised weights: greedy hill-climbing from equal weights, each move shifting STEP of weight
from one member to another, taken only while it strictly raises pAUC (a step function of the
weights, so gradient-free and deterministic; a plateau keeps the weights near equal, which
limits over-fitting; at most MAX_MOVES moves); about 12 pAUC evaluations per move for 4
members. The OOF score of optimised weights is honest only when nested: `nested_blend` fits
fold f's weights on the other folds' rows and applies them to fold f; the final weights for test
time are fitted on all rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations

import numpy as np
from scipy.stats import rankdata

from utils.metric import pauc

STEP = 0.05  # weight moved from one member to another per hill-climbing move
MAX_MOVES = 200


@dataclass(frozen=True)
class BlendResult:
    """Nested-CV blend: OOF scores, their pAUC, each fold's weights and the all-rows weights."""

    oof: np.ndarray
    pauc: float
    fold_weights: dict[int, np.ndarray]
    weights: np.ndarray


def _matrix(preds: np.ndarray) -> np.ndarray:
    """`preds` as a float64 (rows x members) matrix; raises on NaN or a wrong shape."""
    x = np.asarray(preds, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"blend: expected a (rows x members) matrix, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError(f"blend: {int(np.isnan(x).sum())} prediction(s) are NaN")
    return x


def rank_average_blend(preds: np.ndarray) -> np.ndarray:
    """Mean of the members' average ranks per row, scaled to (0, 1]."""
    x = _matrix(preds)
    return rankdata(x, axis=0).mean(axis=1) / len(x)


def fast_pauc(y: np.ndarray, score: np.ndarray, min_tpr: float = 0.80) -> float:
    """utils.metric.pauc without its checks and sklearn's overhead (same value; tested), for
    the hundreds of evaluations of a weight search."""
    max_fpr = 1.0 - min_tpr
    order = np.argsort(score, kind="stable")  # ascending score = descending flipped score
    ordered = score[order]
    flipped_pos = 1 - np.asarray(y)[order]
    ends = np.r_[np.flatnonzero(ordered[1:] != ordered[:-1]), len(ordered) - 1]
    tps = np.cumsum(flipped_pos)[ends]
    fps = ends + 1 - tps
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    stop = np.searchsorted(fpr, max_fpr, "right")
    cut = np.interp(max_fpr, fpr[stop - 1 : stop + 1], tpr[stop - 1 : stop + 1])
    x, t = np.r_[fpr[:stop], max_fpr], np.r_[tpr[:stop], cut]
    return float(np.sum((x[1:] - x[:-1]) * (t[1:] + t[:-1])) / 2)


def _transfers(weights: np.ndarray, step: float, floors: np.ndarray) -> np.ndarray:
    """Every weight vector reached by moving `step` (or all it has above its floor) from one
    member to another."""
    moves = []
    for i, j in permutations(range(len(weights)), 2):
        spare = weights[i] - floors[i]
        if spare > 1e-12:
            moved = weights.copy()
            amount = min(step, spare)
            moved[i] -= amount
            moved[j] += amount
            moves.append(moved)
    return np.array(moves).reshape(-1, len(weights))


def _floors(floors: np.ndarray | None, members: int) -> np.ndarray:
    """Per-member least weights (zeros when None); raises unless 0 <= floor and sum <= 1."""
    if floors is None:
        return np.zeros(members)
    f = np.asarray(floors, dtype=np.float64)
    if f.shape != (members,) or (f < 0).any() or f.sum() > 1 + 1e-12:
        raise ValueError(f"blend floors must be {members} values >= 0 summing to <= 1, got {f}")
    return f


def fit_blend_weights(
    preds: np.ndarray, y: np.ndarray, floors: np.ndarray | None = None
) -> np.ndarray:
    """Weights (>= their floors, sum 1) that raise pAUC on these rows: from equal weights (lifted
    to the floors), take the best move of STEP between two members while it strictly improves
    pAUC."""
    x = _matrix(preds)
    y = np.asarray(y)
    low = _floors(floors, x.shape[1])
    weights = np.full(x.shape[1], 1 / x.shape[1])
    if (weights < low).any():  # a floor above 1/members: the rest shared equally
        free = weights >= low
        weights = np.where(free, 0.0, low)
        weights[free] = (1 - weights.sum()) / free.sum()
    best = fast_pauc(y, x @ weights)
    for _ in range(MAX_MOVES if x.shape[1] > 1 else 0):
        moves = _transfers(weights, STEP, low)
        if not len(moves):
            break
        scores = np.array([fast_pauc(y, x @ w) for w in moves])
        if scores.max() <= best + 1e-12:
            break
        weights, best = moves[np.argmax(scores)], float(scores.max())
    return weights


def nested_blend(
    preds: np.ndarray, y: np.ndarray, folds: np.ndarray, floors: np.ndarray | None = None
) -> BlendResult:
    """Weights per fold fitted on the other folds only, their honest OOF pAUC, and final weights."""
    x = _matrix(preds)
    y = np.asarray(y)
    folds = np.asarray(folds)
    if not len(x) == len(y) == len(folds):
        raise ValueError(f"nested_blend: {len(x)} rows, {len(y)} labels, {len(folds)} folds")
    oof = np.empty(len(x))
    fold_weights = {}
    for fold in np.unique(folds):
        valid = folds == fold
        weights = fit_blend_weights(x[~valid], y[~valid], floors)
        oof[valid] = x[valid] @ weights
        fold_weights[int(fold)] = weights
    return BlendResult(oof, pauc(y, oof), fold_weights, fit_blend_weights(x, y, floors))


def member_floors(names: Sequence[str], member: str, floor: float) -> np.ndarray | None:
    """Floors vector giving `member` (when among `names`) the least weight `floor`; None if 0."""
    if floor <= 0 or member not in names:
        return None
    return np.array([floor if n == member else 0.0 for n in names])
