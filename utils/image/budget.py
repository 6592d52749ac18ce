"""A wall-clock budget for image training: start no fold that cannot finish in the time left.

Kaggle stops a session after 12 hours and keeps nothing of it; a run that ends on its own, with
its finished folds written and the rest named, is continued in a new session (resume_from).
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Kaggle's 12-hour session less an hour for the kernel's start, data loading and the notebook's
# tables and plots after training.
DEFAULT_TIME_BUDGET_H = 11.0


class Budget:
    """Time left until a deadline and the seconds per fold measured in this session."""

    def __init__(self, deadline: float | None, clock: Callable[[], float] | None = None) -> None:
        self.deadline = deadline
        self.clock = clock or (lambda: time.time())  # looked up per call: tests fake the clock
        self.fold_seconds: list[float] = []

    @classmethod
    def hours(cls, hours: float | None, clock: Callable[[], float] | None = None) -> Budget:
        """A budget of `hours` from now (None: no limit)."""
        budget = cls(None, clock)
        if hours is not None:
            budget.deadline = budget.clock() + hours * 3600
        return budget

    def left(self) -> float:
        """Seconds until the deadline (inf without one)."""
        return float("inf") if self.deadline is None else self.deadline - self.clock()

    def fold_estimate(self, share: float = 1.0) -> float:
        """Seconds a fold takes by the folds measured so far (0 before the first one), times
        the share of its epochs still to run."""
        if not self.fold_seconds:
            return 0.0
        return share * sum(self.fold_seconds) / len(self.fold_seconds)

    def allows(self, share: float = 1.0) -> bool:
        """Whether a fold (`share` of its epochs left) can finish before the deadline."""
        return self.fold_estimate(share) <= self.left()

    def record(self, seconds: float) -> None:
        """A fold trained from its first epoch to its OOF took `seconds`."""
        self.fold_seconds.append(seconds)
