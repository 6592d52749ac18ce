"""notebooks/06_ablation.ipynb and utils.tabular.ablation_stage: the ablation on real image OOFs,
its table written as ablation.json and ablation.md."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from notebook_checks import assert_thin_and_clean, run_notebook

from utils.layout import ABLATION_FILE, ABLATION_TABLE_FILE
from utils.tabular import ablation_stage as stage
from utils.tabular.ablation import ablation

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "06_ablation.ipynb"
PARAMETERS = {
    "data_dir",
    "output_dir",
    "preset",
    "image_oof_dirs",
    "seeds",
    "candidates",
    "members",
    "threads",
}
CANDIDATES = ["ugly_duckling", "blend", "rank_blend"]
MEMBERS = ["lgb_meta", "lgb"]  # the LightGBM members: a few seconds a CV at demo size


def rule_kept(rows: list[dict]) -> list[str]:
    """The keep rule written out on a table's rows, independently of utils: mean gain above 0
    and above its std; of the blends the one with the largest mean gain."""
    passed = [
        (r["row"].removeprefix("paper + "), r["gain_mean"])
        for r in rows
        if r["row"].startswith("paper + ") and r["gain_mean"] > max(0.0, r["gain_std"])
    ]
    blends = [(gain, name) for name, gain in passed if name in stage.BLENDS]
    best = max(blends)[1] if blends else None
    return [name for name, _ in passed if name not in stage.BLENDS or name == best]


def check_table(record: dict, candidates: list[str], seeds: list[int]) -> None:
    """ablation.json: a row for paper and each candidate over every seed, a kept set the rule
    gives on those rows, and the plus row (phase 2) exactly when something was kept."""
    rows = {r["row"]: r for r in record["rows"]}
    phase1 = ["paper"] + [f"paper + {c}" for c in candidates]
    assert list(rows)[: len(phase1)] == phase1
    assert all(rows[name]["seeds"] == len(seeds) for name in phase1)
    assert rows["paper"]["gain_mean"] == 0.0 and rows["paper"]["kept"] is None
    assert record["kept"] == rule_kept([rows[name] for name in phase1])
    for name in candidates:
        row = rows[f"paper + {name}"]
        assert row["candidate"] == name and row["kept"] == (name in record["kept"])
        assert row["verdict"].startswith("kept" if row["kept"] else "not kept: ")
        assert 0.0 <= row["pauc_min"] <= row["pauc_mean"] <= row["pauc_max"] <= 0.2
    plus = [name for name in rows if name.startswith("plus (kept: ")]
    assert plus == ([record["plus_row"]] if record["kept"] else [])
    assert {(r["row"], r["seed"]) for r in record["per_seed"]} == {
        (name, s) for name in rows for s in seeds
    }


def test_notebook_is_thin_and_clean():
    assert_thin_and_clean(NOTEBOOK, PARAMETERS)


def test_verdicts_name_why_the_rule_kept_or_left_a_candidate():
    results = pl.DataFrame(
        {
            "row": ["paper", "paper + a", "paper + b", "paper + blend", "paper + rank_blend"] * 2,
            "seed": [0] * 5 + [1] * 5,
            "pauc": [0.10, 0.12, 0.09, 0.13, 0.115, 0.11, 0.13, 0.10, 0.14, 0.125],
            "wall_s": [1.0] * 10,
        }
    )
    # gains: a +0.02 +- 0, b -0.01, blend +0.03, rank_blend +0.015: the weaker blend is left
    table = stage.summary_table(results, ["a", "blend"])
    verdicts = dict(zip(table["row"], table["verdict"], strict=True))
    assert verdicts == {
        "paper": "",
        "paper + a": "kept",
        "paper + b": "not kept: a loss",
        "paper + blend": "kept",
        "paper + rank_blend": "not kept: a better blend is kept",
    }
    assert table["kept"].to_list() == [None, True, False, True, False]
    noisy = results.with_columns(
        pauc=pl.when((pl.col("row") == "paper + a") & (pl.col("seed") == 1))
        .then(0.105)
        .otherwise(pl.col("pauc"))
    )  # a: +0.02 then -0.005: mean 0.0075 below its std
    row = stage.summary_table(noisy, []).filter(pl.col("row") == "paper + a").row(0, named=True)
    assert row["verdict"] == "not kept: within the spread"
    one_seed = stage.summary_table(results.filter(pl.col("seed") == 0), [])
    assert set(one_seed["verdict"].to_list()[1:]) == {"not kept: one seed gives no spread"}
    md = stage.markdown(
        table, ["a", "blend"], {"preset": "demo", "seeds": [0, 1], "bag_seeds": 2,
                                "members": ["lgb"], "image_models": ["vit_tiny"]},
    )  # fmt: skip
    assert "| paper + a | 0.1250 ± 0.0071 | 0.1200-0.1300 | +0.0200 ± 0.0000 | 1.0 | kept |" in md
    assert "| paper | 0.1050 ± 0.0071 | 0.1000-0.1100 | — | 1.0 |  |" in md
    assert md.rstrip().endswith("Kept: a, blend.")


def test_the_stage_needs_image_oof_dirs(synthetic_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no image OOF dirs and no truth file"):
        ablation(synthetic_dir, seeds=[0, 1], preset="demo", verbose=False)  # no truth_path
    with pytest.raises(ValueError, match="image_oof_dirs is empty"):
        stage.run_ablation_stage(synthetic_dir, tmp_path, [])
    with pytest.raises(FileNotFoundError, match=r"image OOF dir\(s\) without an oof.csv"):
        stage.run_ablation_stage(synthetic_dir, tmp_path, [tmp_path / "vit_tiny"], seeds=[0, 1])


def test_notebook_writes_the_ablation_table(synthetic_dir, image_oof_dir, tmp_path, monkeypatch):
    """Demo size: 1,500 rows, the demo preset's rounds, 2 seeds, 3 candidates (2 CVs a seed:
    the blends reuse paper's), the two LightGBM members."""
    out = tmp_path / "out"
    executed = run_notebook(
        NOTEBOOK,
        {
            "data_dir": str(synthetic_dir),
            "output_dir": str(out),
            "preset": "demo",
            "image_oof_dirs": json.dumps([str(image_oof_dir)]),  # as `-p` delivers a list
            "seeds": "[0, 1]",
            "candidates": json.dumps(CANDIDATES),
            "members": MEMBERS,
            "threads": 1,
        },
        tmp_path,
        monkeypatch,
    )
    record = json.loads((out / ABLATION_FILE).read_text())
    assert record["preset"] == "demo" and record["seeds"] == [0, 1]
    assert record["candidates"] == CANDIDATES and record["image_models"] == ["vit_tiny"]
    assert record["members"] == MEMBERS
    check_table(record, CANDIDATES, [0, 1])
    md = (out / ABLATION_TABLE_FILE).read_text()
    assert all(f"| {r['row']} | {r['pauc_mean']:.4f} ± " in md for r in record["rows"])
    assert f"Kept: {', '.join(record['kept']) or 'none'}." in md
    assert f"kept: {record['kept'] or 'none'}" in executed.read_text()
