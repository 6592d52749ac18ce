"""After `--submit`: follow a code-competition submission until Kaggle has scored it or failed.

Kaggle reruns the submission kernel on the hidden test set, which takes about as long as the
kernel's own run; the status goes pending -> complete (with a public score) or error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

POLL_FIRST_S = 60.0
POLL_MAX_S = 600.0
PENDING = "pending"
SCORED = "complete"
FAILED = "error"


class SubmissionNotFound(LookupError):
    """No submission with the expected description is listed."""


def follow_submission(
    latest: Callable[[], dict[str, Any] | None],
    description: str,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
    say: Callable[[str], None],
    timeout_s: float,
) -> dict[str, Any]:
    """Poll `latest()` (the newest submission: ref, status, public_score, error, description)
    with back-off until it is scored or failed; that submission. While it is still pending after
    timeout_s, the last answer (status 'pending': a rerun follows it again)."""
    start, delay, found = clock(), POLL_FIRST_S, None
    while True:
        found = latest()
        seen = (found or {}).get("description")
        if seen != description:
            raise SubmissionNotFound(
                f"the newest submission is {seen!r}, not {description!r}: look it up with "
                "`kaggle competitions submissions`"
            )
        if found["status"] != PENDING:
            return found
        waited = clock() - start
        say(f"  submission {found['ref']}: pending after {waited / 60:.0f} min")
        if waited >= timeout_s:
            return found
        sleep(delay)
        delay = min(2 * delay, POLL_MAX_S)


def outcome(found: dict[str, Any]) -> str:
    """One line for the user: the public score, the error, or still pending."""
    if found["status"] == SCORED:
        return f"scored: public score {found.get('public_score') or '(not shown yet)'}"
    if found["status"] == FAILED:
        return f"failed: {found.get('error') or 'no error description'}"
    return "still pending: rerun the same command to follow it"
