"""The ISIC 2024 primary metric: partial ROC AUC above a minimum true-positive rate."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import auc, roc_curve


def pauc(y_true, y_score, min_tpr: float = 0.80) -> float:
    """Partial AUC above `min_tpr` (0..1-min_tpr; 0.2 is perfect, ~0.02 is random).

    Follows ISIC-Research/Challenge-2024-Metrics PrimaryMetric-pAUC.py: labels and scores are
    flipped, so the region TPR >= min_tpr becomes FPR <= 1 - min_tpr on the flipped curve, which
    is cut there with linear interpolation and integrated.
    """
    y = np.asarray(y_true, dtype=float).ravel()
    s = np.asarray(y_score, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"pauc: {y.size} labels but {s.size} scores")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("pauc: labels must be 0 or 1")
    if np.unique(y).size < 2:
        raise ValueError("pauc: y_true holds one class only; the metric needs both 0 and 1")
    if np.isnan(s).any():
        raise ValueError(f"pauc: {int(np.isnan(s).sum())} score(s) are NaN")
    max_fpr = abs(1.0 - min_tpr)
    fpr, tpr, _ = roc_curve(np.abs(y - 1.0), -s)
    stop = np.searchsorted(fpr, max_fpr, "right")
    tpr_cut = np.interp(max_fpr, fpr[stop - 1 : stop + 1], tpr[stop - 1 : stop + 1])
    return float(auc(np.append(fpr[:stop], max_fpr), np.append(tpr[:stop], tpr_cut)))
