"""The ablation as a notebook stage (notebooks/06_ablation, the Kaggle kernel 06_ablation).

`run_ablation_stage(data_dir, output_dir, image_oof_dirs, preset, seeds, candidates)` runs
utils.tabular.ablation's two phases on a data dir (the competition's) and the image runs' OOF
dirs, and writes the table to `<output_dir>/`:
- `ablation.json`: the settings, one entry per row (`paper`, `paper + <candidate>`, and the
  `plus (kept: ...)` row of phase 2 when the rule kept any) with the mean, std, min and max of
  the ensemble's OOF pAUC over the seeds, the mean paired gain over `paper` and its std, wall
  seconds and, for a candidate row, whether the rule kept it and why; the kept set; every
  (row, seed) result;
- `ablation.md`: the same table in Markdown, with the kept set.

Settings: the GBDT hyper-parameters are the preset's (utils.settings.resolve); `seed_bagging`
bags as many GBDT seeds as the `plus` recipe ships (PLUS_GBDT's seeds), so its row measures what
`plus` would switch on. None keeps DEFAULT_SEEDS, every candidate and every GBDT member.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from utils.layout import ABLATION_FILE, ABLATION_TABLE_FILE
from utils.manifest import write_atomic, write_json
from utils.settings import resolve
from utils.tabular.ablation import BLENDS, CANDIDATES, ablation, plus_row_name, summarise
from utils.tabular.features import image_source
from utils.tabular.libraries import GBDT_MODELS

DEFAULT_SEEDS = (0, 1, 2)
PAPER_ROW = "paper"
CANDIDATE_PREFIX = "paper + "
RULE = (
    "a candidate is kept when its mean paired gain over paper exceeds the std of that gain over "
    "the seeds; of the blends (" + ", ".join(BLENDS) + ") only the best one"
)


@dataclass(frozen=True)
class AblationRun:
    """What an ablation stage produced, for the notebook to show."""

    summary: pl.DataFrame  # one row per table row, with `candidate`, `kept` and `verdict`
    results: pl.DataFrame  # one row per (table row, seed)
    kept: list[str]
    record: dict[str, Any]  # what ablation.json holds
    json_path: Path
    md_path: Path


def candidate_of(row: str) -> str | None:
    """The candidate a phase 1 row measures (`paper + <candidate>`), or None."""
    return row.removeprefix(CANDIDATE_PREFIX) if row.startswith(CANDIDATE_PREFIX) else None


def verdict(row: dict[str, Any], kept: Sequence[str]) -> str:
    """Why the rule kept a candidate row or not ("" for paper and the plus row)."""
    name = candidate_of(row["row"])
    if name is None:
        return ""
    if name in kept:
        return "kept"
    gain, spread = row["gain_mean"], row["gain_std"]
    if spread is None or math.isnan(spread):
        return "not kept: one seed gives no spread"
    if gain <= 0:
        return "not kept: a loss"
    if gain <= spread:
        return "not kept: within the spread"
    return "not kept: a better blend is kept"


def summary_table(results: pl.DataFrame, kept: Sequence[str]) -> pl.DataFrame:
    """summarise(results) with each row's candidate, whether it was kept and the verdict."""
    summary = summarise(results)
    rows = summary.to_dicts()
    names = [candidate_of(r["row"]) for r in rows]
    return summary.with_columns(
        candidate=pl.Series(names, dtype=pl.String),
        kept=pl.Series([None if n is None else n in kept for n in names], dtype=pl.Boolean),
        verdict=pl.Series([verdict(r, kept) for r in rows], dtype=pl.String),
    )


def _number(value: float | None, digits: int = 4, signed: bool = False) -> str:
    """A table cell: the value rounded, or an em dash when there is none."""
    if value is None or math.isnan(value):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(summary: pl.DataFrame, kept: Sequence[str], settings: dict[str, Any]) -> str:
    """ablation.md: the settings, the table (mean ± std over seeds, gain over paper) and the
    kept set."""
    lines = [
        "# Ablation of the plus candidates",
        "",
        f"Preset {settings['preset']}, seeds {settings['seeds']}, seed_bagging "
        f"{settings['bag_seeds']} GBDT seeds, members {', '.join(settings['members'])}; "
        f"image models: {', '.join(settings['image_models']) or 'none'}.",
        f"Rule: {RULE}.",
        "",
        "| row | pAUC mean ± std | min-max | gain over paper ± std | wall s | kept |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in summary.iter_rows(named=True):
        gain = (
            "—"
            if r["row"] == PAPER_ROW
            else (f"{_number(r['gain_mean'], signed=True)} ± {_number(r['gain_std'])}")
        )
        lines.append(
            f"| {r['row']} | {_number(r['pauc_mean'])} ± {_number(r['pauc_std'])} | "
            f"{_number(r['pauc_min'])}-{_number(r['pauc_max'])} | {gain} | "
            f"{_number(r['wall_s'], 1)} | {r['verdict']} |"
        )
    lines += ["", f"Kept: {', '.join(kept) if kept else 'none'}.", ""]
    return "\n".join(lines)


def run_ablation_stage(
    data_dir: str | Path,
    output_dir: str | Path,
    image_oof_dirs: Sequence[str | Path],
    preset: str = "demo",
    seeds: Sequence[int] | None = None,
    candidates: Sequence[str] | None = None,
    threads: int | None = None,
    members: Sequence[str] | None = None,
) -> AblationRun:
    """Both phases of the ablation on `data_dir` with the real image OOFs of `image_oof_dirs`;
    ablation.json and ablation.md written to `output_dir`."""
    if not image_oof_dirs:
        raise ValueError(
            "run_ablation_stage: image_oof_dirs is empty; the ablation on real data needs the "
            "image runs' OOF dirs (stage 1 outputs), whose folds it keeps"
        )
    seeds = [int(s) for s in (DEFAULT_SEEDS if seeds is None else seeds)]
    candidates = list(CANDIDATES if candidates is None else candidates)
    members = list(GBDT_MODELS if members is None else members)
    unknown = sorted(set(members) - set(GBDT_MODELS))
    if unknown:
        known = list(GBDT_MODELS)
        raise ValueError(f"run_ablation_stage: unknown member(s) {unknown}; known: {known}")
    bag_seeds = len(resolve(preset, "plus").gbdt.seeds)
    start = time.perf_counter()
    results, kept = ablation(
        data_dir,
        seeds,
        candidates,
        bag_seeds,
        preset,
        threads,
        members,
        image_oof_dirs=image_oof_dirs,
    )
    summary = summary_table(results, kept)
    settings = {
        "preset": preset,
        "seeds": seeds,
        "candidates": candidates,
        "bag_seeds": bag_seeds,
        "members": members,
        "image_models": [image_source(d)["image_model"] for d in image_oof_dirs],
        "data_dir": str(data_dir),
        "image_oof_dirs": [str(d) for d in image_oof_dirs],
    }
    record = {
        **settings,
        "rule": RULE,
        "kept": kept,
        "plus_row": plus_row_name(kept) if kept else None,
        "rows": summary.to_dicts(),
        "per_seed": results.to_dicts(),
        "wall_s": time.perf_counter() - start,
    }
    out = Path(output_dir)
    json_path = write_json(out / ABLATION_FILE, record)
    md_path = write_atomic(out / ABLATION_TABLE_FILE, markdown(summary, kept, settings))
    return AblationRun(summary, results, kept, record, json_path, md_path)
