"""A wall-clock budget for image training: start no fold that cannot finish in the time left;
and the images a fold processes, from which a training kernel's time is projected.

Kaggle stops a session after 12 hours and keeps nothing of it; a run that ends on its own, with
its finished folds written and the rest named, is continued in a new session (resume_from).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Kaggle's 12-hour session less an hour for the kernel's start, data loading and the notebook's
# tables and plots after training.
DEFAULT_TIME_BUDGET_H = 11.0
# ISIC 2024's train-metadata.csv: rows and malignant cases. The suspicious label
# (utils.labels.suspicious_label) has about 1,100-1,500 positives there: the upper value.
ISIC_ROWS, ISIC_MALIGNANT, ISIC_SUSPICIOUS = 401_059, 393, 1_500


@dataclass(frozen=True)
class FoldImages:
    """Images one fold processes over a whole run, per phase."""

    train: float
    validation: float
    oof: float


def fold_images(cfg: Any, rows: int, positives: int, validation_positives: int) -> FoldImages:
    """Images per fold of a run of `cfg` (an ImageConfig) on `rows` rows with `positives` of its
    training label: each epoch draws every training positive cfg.pos_repeat times plus
    cfg.neg_ratio as many fresh negatives (utils.image.data.NegativeResampler; all of them when
    None) and validates on every held-out positive of `validation_positives` plus
    cfg.val_neg_per_pos negatives each; then one pass over the held-out fold (the OOF)."""
    share = (cfg.n_folds - 1) / cfg.n_folds
    train_pos, negatives = positives * share, (rows - positives) * share
    shown = cfg.pos_repeat * train_pos
    drawn = negatives if cfg.neg_ratio is None else min(negatives, cfg.neg_ratio * shown)
    validation = validation_positives / cfg.n_folds * (1 + cfg.val_neg_per_pos)
    return FoldImages(cfg.epochs * (shown + drawn), cfg.epochs * validation, rows / cfg.n_folds)


class Budget:
    """Time left until a deadline and the seconds per fold measured in this session."""

    def __init__(self, deadline: float | None, clock: Callable[[], float] | None = None) -> None:
        self.deadline = deadline
        self.clock = clock or (lambda: time.time())  # looked up per call: tests fake the clock
        self.fold_seconds: list[float] = []

    def left(self) -> float:
        """Seconds until the deadline (inf without one)."""
        return float("inf") if self.deadline is None else self.deadline - self.clock()

    def fold_estimate(self) -> float:
        """Seconds a fold takes by the folds measured so far (0 before the first one)."""
        if not self.fold_seconds:
            return 0.0
        return sum(self.fold_seconds) / len(self.fold_seconds)

    def allows(self) -> bool:
        """Whether a fold can finish before the deadline."""
        return self.fold_estimate() <= self.left()

    def record(self, seconds: float) -> None:
        """A fold trained from its first epoch to its OOF took `seconds`."""
        self.fold_seconds.append(seconds)
