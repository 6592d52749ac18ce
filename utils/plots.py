"""Plots every stage shows: ROC with the pAUC region, top-N feature importance, per-fold scores."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from matplotlib.axes import Axes
from sklearn.metrics import roc_curve

from utils.metric import pauc


def _axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=size, layout="constrained")[1]


def legend_outside(ax: Axes, **kwargs) -> None:
    """The legend to the right of the axes, off the data (saved with bbox_inches="tight")."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def plot_roc(
    y_true: np.ndarray,
    scores: Mapping[str, np.ndarray],
    min_tpr: float = 0.80,
    ax: Axes | None = None,
) -> Axes:
    """ROC curve per model, the region TPR >= min_tpr shaded, pAUC in the legend (outside)."""
    ax = _axes(ax, (8.5, 5))
    ax.axhspan(
        min_tpr, 1.0, color="tab:orange", alpha=0.12, label=f"pAUC region (TPR >= {min_tpr:.0%})"
    )
    for name, score in scores.items():
        fpr, tpr, _ = roc_curve(y_true, score)
        ax.plot(fpr, tpr, label=f"{name}: pAUC {pauc(y_true, score, min_tpr):.4f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("ROC (pAUC above 80% TPR)")
    legend_outside(ax, fontsize="small")
    return ax


def plot_importance(importance: pl.DataFrame, top_n: int = 30, ax: Axes | None = None) -> Axes:
    """Horizontal bars of the top_n features by mean importance (columns feature, importance)."""
    top = (
        importance.group_by("feature")
        .agg(pl.col("importance").mean())
        .sort("importance", descending=True)
        .head(top_n)
        .reverse()
    )
    ax = _axes(ax, (7, max(3.0, 0.25 * top.height)))
    ax.barh(top["feature"].to_list(), top["importance"].to_list(), color="tab:blue")
    ax.set(xlabel="mean normalised gain", title=f"Top {top.height} features")
    return ax


def plot_fold_scores(scores: pl.DataFrame, ax: Axes | None = None) -> Axes:
    """Grouped bars of pAUC per fold (columns model, fold, pauc), one colour per model."""
    models = scores["model"].unique(maintain_order=True).to_list()
    folds = sorted(scores["fold"].unique().to_list())
    ax = _axes(ax, (9, 4))
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        rows = scores.filter(pl.col("model") == model).sort("fold")
        ax.bar(rows["fold"].to_numpy() + i * width, rows["pauc"].to_numpy(), width, label=model)
    ax.set_xticks(np.array(folds) + width * (len(models) - 1) / 2, [f"fold {f}" for f in folds])
    ax.set(ylabel="pAUC", title="pAUC per fold")
    legend_outside(ax, fontsize="small")
    return ax


def plot_training_history(history: pl.DataFrame) -> plt.Figure:
    """Stage 1: validation pAUC and training loss per epoch, one line per fold."""
    fig, (ax_pauc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    for (fold,), part in history.group_by("fold", maintain_order=True):
        ax_pauc.plot(part["epoch"], part["val_pauc"], marker="o", label=f"fold {fold}")
        ax_loss.plot(part["epoch"], part["train_loss"], marker="o", label=f"fold {fold}")
    ax_pauc.set(xlabel="epoch", ylabel="validation pAUC", title="Held-out fold pAUC")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    legend_outside(ax_loss, fontsize="small")
    return fig
