"""The Kaggle calls utils.kaggle.run makes: the protocol, the adapter over the installed kaggle
package's KaggleApi, and the offline client the plan (--dry-run) answers with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from utils.kaggle import build as kb, limits as kl

COMPLETE = "complete"


class RunStopped(Exception):
    """The run cannot go on; the message says why and how to resume."""


class KaggleClient(Protocol):
    """The few calls the workflow makes (KaggleApiClient is the real one)."""

    def push_kernel(self, folder: Path) -> int: ...
    def kernel_status(self, ref: str, version: int) -> tuple[str, str]: ...
    def kernel_output(self, ref: str, version: int, path: Path) -> list[str]: ...
    def kernel_log(self, ref: str, version: int) -> str: ...
    def dataset_version(self, ref: str) -> int | None: ...
    def dataset_status(self, ref: str) -> str: ...
    def create_dataset(self, folder: Path) -> None: ...
    def version_dataset(self, folder: Path, notes: str) -> None: ...
    def submit(
        self, competition: str, kernel: str, version: int, file_name: str, message: str
    ) -> str: ...
    def latest_submission(self, competition: str) -> dict[str, Any] | None: ...


# ---------------------------------------------------------------- the real client


class KaggleApiClient:
    """KaggleClient over the installed kaggle package's KaggleApi (the CLI's own calls)."""

    def __init__(self, api: Any | None = None) -> None:
        if api is None:
            api = kb.kaggle_api()
            api.authenticate()
        self.api = api

    def push_kernel(self, folder: Path) -> int:
        """`kaggle kernels push -p folder`: the new version number."""
        response = self.api.kernels_push(str(folder))
        error = getattr(response, "error", "no response") if response is not None else "no reply"
        if response is None or response.error:
            if kl.CAP_REFUSAL.search(str(error)):  # the concurrent GPU session cap
                raise kl.SessionCapReached(f"push {folder}: {error}")
            raise RunStopped(f"push {folder}: {error}")
        invalid = [*response.invalid_dataset_sources, *response.invalid_competition_sources]
        if invalid:
            raise RunStopped(f"push {folder}: Kaggle rejected sources {invalid}")
        return int(response.version_number)

    def kernel_status(self, ref: str, version: int) -> tuple[str, str]:
        """(status, failure message) of one kernel version, e.g. ('running', '')."""
        response = self.api.kernels_status(f"{ref}/{version}")
        return response.status.name.lower(), response.failure_message

    def kernel_output(self, ref: str, version: int, path: Path) -> list[str]:
        """Download one kernel version's output files (and its log) into path."""
        files, _ = self.api.kernels_output(f"{ref}/{version}", str(path), force=True, quiet=True)
        return files

    def kernel_log(self, ref: str, version: int) -> str:
        """The session log of one kernel version."""
        return self.api.kernels_logs(f"{ref}/{version}")

    def dataset_version(self, ref: str) -> int | None:
        """Current version number of a dataset, None when it does not exist (Kaggle answers 403,
        not 404, for a dataset that is not there or not visible yet: the Runner's upload record
        tells a dataset being created from a missing one)."""
        from requests import HTTPError

        try:
            payload = self.api.dataset_status(ref, format="json(current_version_number)")
        except HTTPError as err:
            if kl.http_status(err) in (403, 404):
                return None
            raise
        return int(json.loads(payload)["current_version_number"])

    def dataset_status(self, ref: str) -> str:
        """Processing status of a dataset's latest version ('ready' once kernels can mount it)."""
        return self.api.dataset_status(ref)

    def create_dataset(self, folder: Path) -> None:
        """`kaggle datasets create -p folder --dir-mode zip` (private)."""
        response = self.api.dataset_create_new(
            str(folder), public=False, quiet=True, dir_mode="zip"
        )
        if response.error:
            raise RunStopped(f"create dataset from {folder}: {response.error}")

    def version_dataset(self, folder: Path, notes: str) -> None:
        """`kaggle datasets version -p folder -m notes --dir-mode zip`."""
        response = self.api.dataset_create_version(
            str(folder), version_notes=notes, quiet=True, dir_mode="zip"
        )
        if response.error:
            raise RunStopped(f"version dataset from {folder}: {response.error}")

    def submit(
        self, competition: str, kernel: str, version: int, file_name: str, message: str
    ) -> str:
        """Submit a kernel version to a code competition; Kaggle's reply."""
        response = self.api.competition_submit_code(
            file_name=file_name,
            message=message,
            competition=competition,
            kernel=kernel,
            kernel_version=version,
            quiet=True,
        )
        return response.message

    def latest_submission(self, competition: str) -> dict[str, Any] | None:
        """The newest of this account's submissions: ref, status, score, error, description."""
        listed = self.api.competition_submissions(competition, page_size=1)
        if not listed:
            return None
        newest = listed[0]
        return {
            "ref": newest.ref,
            "status": newest.status.name.lower(),
            "public_score": newest.public_score,
            "error": newest.error_description,
            "description": newest.description,
        }


# ---------------------------------------------------------------- offline plan client


class PlanClient:
    """Answers like a Kaggle where every kernel completes and every upload is ready at once;
    versions are predicted from the state file (Kaggle assigns the real ones)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.owner = state["owner"]
        self.kernels = {k["ref"]: k["version"] for k in state["kernels"].values()}
        self.datasets = {d["ref"]: d["version"] for d in state["datasets"].values()}

    def push_kernel(self, folder: Path) -> int:
        ref = kb.read_json(folder / kb.KERNEL_METADATA)["id"]
        self.kernels[ref] = self.kernels.get(ref, 0) + 1
        return self.kernels[ref]

    def kernel_status(self, ref: str, version: int) -> tuple[str, str]:
        return COMPLETE, ""

    def kernel_output(self, ref: str, version: int, path: Path) -> list[str]:
        return []

    def kernel_log(self, ref: str, version: int) -> str:
        return ""

    def dataset_version(self, ref: str) -> int | None:
        return self.datasets.get(ref)

    def dataset_status(self, ref: str) -> str:
        return "ready"

    def create_dataset(self, folder: Path) -> None:
        self.datasets[f"{self.owner}/{folder.name}"] = 1

    def version_dataset(self, folder: Path, notes: str) -> None:
        self.datasets[f"{self.owner}/{folder.name}"] += 1

    def submit(
        self, competition: str, kernel: str, version: int, file_name: str, message: str
    ) -> str:
        return "planned"

    def latest_submission(self, competition: str) -> dict[str, Any] | None:
        return None
