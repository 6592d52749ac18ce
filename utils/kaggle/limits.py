"""Kaggle's limits as rules the workflow (utils.kaggle.run) follows: the kaggle client version it
needs, the GPU session cap, what a 403 / 404 / 5xx answer means, and the mount race.

Kept apart from run.py so each rule is one small function or pattern; docs/kaggle_run.md lists
which of them are taken from Kaggle's documentation and which are unverified guesses.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from importlib import metadata
from typing import TypeVar

from utils.kaggle.input import release

# kaggle 2.2.5 is the first client whose kernels_status sends the version asked for (older ones
# report the latest version) and whose dataset calls take the arguments run.py passes.
CLIENT_MIN_VERSION = "2.2.5"
DEFAULT_GPU_SESSIONS = 2  # Kaggle's concurrent GPU sessions per account (public reports)
DEFAULT_GPU_HOURS = 30.0  # Kaggle's weekly GPU quota
# How Kaggle words a push refused for the concurrent-session cap: not documented; these words
# are a guess to confirm on a real account (a refusal not matched stops the run instead).
CAP_REFUSAL = re.compile(r"concurrent|too many (running|active)|session limit|maximum number", re.I)
# utils.kaggle.input.input_path's error when a dataset is not mounted (yet): the kernel started
# before Kaggle mounted a version that had just become ready.
MOUNT_RACE = re.compile(r"Kaggle input '[^']+' \((not mounted|mounted at [^)]*)\) has no")
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_RETRIES = 4
TRANSIENT_FIRST_S = 15.0

T = TypeVar("T")


class ClientVersionError(RuntimeError):
    """The installed kaggle client is too old for the workflow."""


class SessionCapReached(RuntimeError):
    """Kaggle refused a push because the account runs as many GPU sessions as it may."""


def check_client_version(version: str | None = None) -> str:
    """The installed kaggle client's version; ClientVersionError naming the one needed."""
    if version is None:
        with contextlib.suppress(metadata.PackageNotFoundError):
            version = metadata.version("kaggle")
    if version is None or release(version) < release(CLIENT_MIN_VERSION):
        found = f"kaggle {version} is installed" if version else "the kaggle client is missing"
        raise ClientVersionError(
            f"{found}; utils.kaggle.run needs kaggle>={CLIENT_MIN_VERSION} (older clients "
            "report the latest kernel version instead of the one asked for, or fail in the "
            f"dataset calls): pip install 'kaggle=={CLIENT_MIN_VERSION}'"
        )
    return version


def http_status(err: BaseException) -> int | None:
    """The HTTP status code of a requests error, None for a dropped connection."""
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def retry_transient(
    call: Callable[[], T],
    what: str,
    sleep: Callable[[float], None],
    say: Callable[[str], None],
    retries: int = TRANSIENT_RETRIES,
) -> T:
    """call(), asked again with doubling pauses after a transient error: a dropped connection
    or a 408 / 429 / 5xx answer (others raise at once)."""
    delay = TRANSIENT_FIRST_S
    for attempt in range(retries + 1):
        try:
            return call()
        except OSError as err:
            status = http_status(err)
            transient = status is None or status in TRANSIENT_HTTP
            if not transient or attempt == retries:
                raise
            say(f"  {what} failed ({err}); retrying in {delay:g} s")
            sleep(delay)
            delay *= 2
