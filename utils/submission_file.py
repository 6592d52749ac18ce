"""The submission file: `validate_submission` checks a frame against the test ids (exactly the
test ids in test-metadata order, targets finite and in [0, 1]) and `write_submission` refuses to
write a bad one; an I/O failure names the file it could not write (naming_the_file)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from utils.io import TEST_METADATA, read_test_metadata
from utils.layout import SUBMISSION_FILE
from utils.manifest import atomic_output, write_json
from utils.submission_checks import SHOW_IDS

SUBMISSION_COLUMNS = ("isic_id", "target")


class SubmissionError(ValueError):
    """A submission frame that Kaggle would reject or score wrongly (message lists why)."""


def read_test_ids(data_dir: str | Path) -> list[str]:
    """isic_ids of `<data_dir>/test-metadata.csv` in file order (what the submission must hold)."""
    return read_test_metadata(Path(data_dir) / TEST_METADATA)[0]["isic_id"].to_list()


def submission_problems(sub: pl.DataFrame, test_ids: Sequence[str]) -> list[str]:
    """Every reason `sub` is not a valid submission for `test_ids` (empty when valid)."""
    if tuple(sub.columns) != SUBMISSION_COLUMNS:
        return [f"columns must be {list(SUBMISSION_COLUMNS)}, got {sub.columns}"]
    if not sub.schema["target"].is_numeric():
        return [f"target must be numeric, got {sub.schema['target']}"]
    problems = []
    ids = sub["isic_id"].to_list()
    expected = list(test_ids)
    dupes = sub.filter(pl.col("isic_id").is_duplicated())["isic_id"].unique(maintain_order=True)
    if len(dupes):
        problems.append(f"{len(dupes)} duplicate isic_id(s): {dupes.head(SHOW_IDS).to_list()}")
    given, wanted = set(ids), set(expected)
    missing = [i for i in expected if i not in given]
    if missing:
        problems.append(f"{len(missing)} test id(s) missing: {missing[:SHOW_IDS]}")
    extra = [i for i in ids if i not in wanted]
    if extra:
        problems.append(f"{len(extra)} id(s) not in the test set: {extra[:SHOW_IDS]}")
    if not (missing or extra or len(dupes)) and ids != expected:
        first = next(k for k, (a, b) in enumerate(zip(ids, expected, strict=True)) if a != b)
        problems.append(f"ids not in test-metadata order: row {first} is {ids[first]!r}")
    if len(ids) != len(expected):
        problems.append(f"{len(ids)} rows, the test set has {len(expected)}")
    target = sub["target"].cast(pl.Float64)
    unscored = sub.filter(target.is_null() | target.is_nan())["isic_id"]
    if len(unscored):
        problems.append(f"{len(unscored)} null/NaN target(s): {unscored.head(SHOW_IDS).to_list()}")
    outside = sub.filter(~target.is_between(0.0, 1.0) & ~target.is_nan())["isic_id"]
    if len(outside):
        shown = outside.head(SHOW_IDS).to_list()
        problems.append(f"{len(outside)} target(s) outside [0, 1]: {shown}")
    return problems


def validate_submission(sub: pl.DataFrame, test_ids: Sequence[str]) -> None:
    """Raise SubmissionError listing every problem unless `sub` is exactly right for `test_ids`."""
    problems = submission_problems(sub, test_ids)
    if problems:
        raise SubmissionError("invalid submission:\n  " + "\n  ".join(problems))


def write_submission(sub: pl.DataFrame, output_dir: str | Path, test_ids: Sequence[str]) -> Path:
    """Validate, then write `<output_dir>/submission.csv` atomically; its path."""
    validate_submission(sub, test_ids)
    path = Path(output_dir) / SUBMISSION_FILE
    with naming_the_file(path), atomic_output(path) as tmp:
        sub.write_csv(tmp)
    return path


@contextmanager
def naming_the_file(path: Path) -> Iterator[None]:
    """An I/O failure inside the block (disk full, no permission) re-raised as OSError whose
    message names `path` (a library's own message may name only its temporary file, or none)."""
    try:
        yield
    except (OSError, pl.exceptions.PolarsError) as err:
        why = getattr(err, "strerror", None) or str(err)
        raise OSError(getattr(err, "errno", None), f"cannot write {path}: {why}") from err


def check_writable(output_dir: Path) -> None:
    """Fail before any work, naming the folder, when `output_dir` cannot take a file."""
    probe = output_dir / f".{SUBMISSION_FILE}.probe"
    with naming_the_file(probe):
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(probe, {})
    probe.unlink()
