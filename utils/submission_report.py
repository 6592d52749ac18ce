"""What the submission kernel did, for `submission_report.json` and the kernel's last block.

`InferenceReport.sections()` lists every warning class (runs that do not belong together,
fallback decisions, coerced values, degenerate images, manifest differences, test-metadata
notes, other warnings) with its lines; the summary block says "none" for a class only when it
has no line, and the JSON report holds the same lines under "summary".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import polars as pl

from utils.io import MetadataNotes
from utils.submission_checks import MIN_IMAGE_SIDE, SHOW_IDS, ImagePlan
from utils.tabular.libraries import META_MEMBER

if TYPE_CHECKING:
    from utils.submission_time import TimeEstimate


@dataclass(frozen=True)
class InferenceReport:
    """What the kernel did: plan, fallbacks, timings and every warning it printed."""

    rows: int
    device: str
    plan: ImagePlan
    absent_ids: tuple[str, ...]  # test ids with no key in test-image.hdf5 (counted up front)
    fallback_ids: tuple[str, ...]  # rows scored by lgb_meta: an image feature is missing
    estimate: TimeEstimate | None
    images_per_s: dict[str, float]  # measured on the full pass, per image model
    member_means: dict[str, float]  # mean score per GBDT member and the ensemble
    warnings: tuple[str, ...] = field(default=())
    members: tuple[str, ...] = ()  # GBDT members in the soft vote
    dropped_members: dict[str, str] = field(default_factory=dict)  # left out -> why
    metadata: MetadataNotes | None = None  # what reading test-metadata.csv found
    artifact_notes: tuple[str, ...] = ()  # manifest findings that stopped nothing
    degenerate: dict[str, str] = field(default_factory=dict)  # isic_id -> its size in words
    other_warnings: tuple[str, ...] = ()  # warnings of no class below (time, no lgb_meta, ...)

    @property
    def n_fallback(self) -> int:
        return len(self.fallback_ids)

    @property
    def mode(self) -> str:
        """How the rows were scored, in words."""
        if not self.plan.needed:
            return "metadata-only: the GBDT was trained without image columns"
        if self.plan.missing:
            missing = sorted(self.plan.missing)
            return f"metadata-only: {META_MEMBER} for every row (missing {missing})"
        mode = f"full: image models {list(self.plan.run)} + GBDT soft vote"
        partial = [
            f"{n} on folds {list(c.folds)} of {c.n_folds}"
            for n, c in self.plan.checks.items()
            if n in self.plan.run and len(c.folds) < c.n_folds
        ]
        if partial:
            mode += f"; {', '.join(partial)}"
        if self.dropped_members:
            mode += f"; members left out: {sorted(self.dropped_members)}"
        return mode

    def decisions(self) -> list[str]:
        """Every fallback decision, one line each, naming the file or rows behind it."""
        lines = []
        for name, damaged in self.plan.damaged_folds.items():
            check = self.plan.checks[name]
            effect = (
                f"averages folds {list(check.folds)} of {check.n_folds}"
                if check.folds
                else "has no usable fold"
            )
            for why in damaged.values():
                lines.append(f"image model {name} {effect}: left out {why}")
        for name, why in self.plan.missing.items():
            lines.append(f"image model {name} unusable ({why}): {META_MEMBER} scores every row")
        for name, why in self.dropped_members.items():
            lines.append(f"GBDT member {name} left out of the vote: {why}")
        if self.fallback_ids and not self.plan.missing:
            lines.append(
                f"{self.n_fallback:,} row(s) without a readable image scored by {META_MEMBER}: "
                f"{_count_ids(self.fallback_ids)}"
            )
        return lines

    def to_dict(self) -> dict:
        """The JSON of submission_report.json."""
        return {
            "rows": self.rows,
            "device": self.device,
            "mode": self.mode,
            "decisions": self.decisions(),
            "image_models": {
                "needed": list(self.plan.needed),
                "run": list(self.plan.run),
                "folds_used": {n: list(f) for n, f in self.plan.folds.items()},
                "folds_left_out": self.plan.damaged_folds,
                "unusable": self.plan.missing,
                "unused": list(self.plan.unused),
                "another_run": self.plan.mismatched,
            },
            "gbdt_members": {"voting": list(self.members), "left_out": self.dropped_members},
            "fallback_rows": {"count": self.n_fallback, "first_ids": list(self.fallback_ids[:20])},
            "absent_from_hdf5": {
                "count": len(self.absent_ids),
                "first_ids": list(self.absent_ids[:20]),
            },
            "test_metadata": asdict(self.metadata) if self.metadata else None,
            "artifact_notes": list(self.artifact_notes),
            "warnings": list(self.warnings),
            "degenerate_images": {
                "count": len(self.degenerate),
                "min_side_px": MIN_IMAGE_SIDE,
                "first": dict(list(self.degenerate.items())[:20]),
            },
            "summary": self.sections(),
            "images_per_s": self.images_per_s,
            "estimate_s": None if self.estimate is None else self.estimate.seconds(),
            "member_means": self.member_means,
        }

    def sections(self) -> dict[str, list[str]]:
        """Every warning class and its lines (empty: none of that class), in the block's order."""
        meta = self.metadata or MetadataNotes(self.rows)
        coerced = meta.coerced_lines()
        degenerate = [  # images too small to hold a lesion (still scored)
            f"{len(self.degenerate):,} test image(s) smaller than {MIN_IMAGE_SIDE} px a side, "
            f"scored as they are: {dict(list(self.degenerate.items())[:SHOW_IDS])}"
        ]
        return {
            "runs that do not belong together": list(self.plan.mismatched.values()),
            "fallback decisions": self.decisions(),
            "coerced values (made missing)": coerced,
            "degenerate images": degenerate if self.degenerate else [],
            "manifest differences": list(self.artifact_notes),
            "test-metadata.csv notes": [n for n in meta.lines() if n not in coerced],
            "other warnings": list(self.other_warnings),
        }

    def text(self) -> str:
        """The summary block the kernel prints last: mode, then every warning class ("none"
        only for a class with nothing to report)."""
        lines = ["=" * 30 + " SUBMISSION SUMMARY " + "=" * 30, f"rows: {self.rows:,}"]
        lines.append(f"mode: {self.mode}")
        for title, items in self.sections().items():
            lines.append(f"{title}: {len(items) if items else 'none'}")
            lines += [f"  - {item}" for item in items]
        return "\n".join(lines + ["=" * 80])

    def summary(self) -> pl.DataFrame:
        """One row per fact, for the notebook."""
        facts = {
            "rows": f"{self.rows:,}",
            "device": self.device,
            "mode": self.mode,
            "image models run": ", ".join(self.plan.run) or "none",
            "image models unused by the GBDT": ", ".join(self.plan.unused) or "none",
            "image models of another run than the GBDT's": ", ".join(self.plan.mismatched)
            or "none",
            "GBDT members voting": ", ".join(self.members) or "none",
            "test ids absent from the hdf5": _count_ids(self.absent_ids),
            f"rows scored by {META_MEMBER} (fallback)": _count_ids(self.fallback_ids),
            **{f"{m} img/s (full pass)": f"{r:,.1f}" for m, r in self.images_per_s.items()},
            **{f"mean score {m}": f"{s:.5f}" for m, s in self.member_means.items()},
            **{f"{title}": str(len(items)) for title, items in self.sections().items()},
            **{f"decision {i + 1}": d for i, d in enumerate(self.decisions())},
            **{f"warning {i + 1}": w for i, w in enumerate(self.warnings)},
        }
        return pl.DataFrame({"item": list(facts), "value": list(facts.values())})


def _count_ids(ids: Sequence[str]) -> str:
    """'n' or 'n (first ids ...)'."""
    shown = f" (e.g. {list(ids[:SHOW_IDS])})" if len(ids) else ""
    return f"{len(ids):,}{shown}"
