"""The fitted GBDT ensemble of a stage 3 artifact dir, loaded for inference (stage 4)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from utils.gbdt_libraries import ENSEMBLE, LIBRARIES, META_MEMBER, Member, member_matrix


@dataclass(frozen=True)
class GBDTEnsemble:
    """Fitted members loaded from a gbdt artifact dir, for inference."""

    features: dict[str, tuple[str, ...]]
    libraries: dict[str, str]
    models: dict[str, list[Any]]
    image_columns: tuple[str, ...]
    image_sources: dict[str, dict[str, str]]  # image column -> image_model, config_hash (stage 3)

    @classmethod
    def load(cls, gbdt_dir: str | Path) -> GBDTEnsemble:
        """Load every fold/seed model listed in `<gbdt_dir>/ensemble.json`."""
        gbdt_dir = Path(gbdt_dir)
        manifest = json.loads((gbdt_dir / "ensemble.json").read_text())["members"]
        info = json.loads((gbdt_dir / "features.json").read_text())
        models = {
            name: [LIBRARIES[m["library"]].load(gbdt_dir / f) for f in m["models"]]
            for name, m in manifest.items()
        }
        return cls(
            features={name: tuple(m["features"]) for name, m in manifest.items()},
            libraries={name: m["library"] for name, m in manifest.items()},
            models=models,
            image_columns=tuple(info["image_columns"]),
            image_sources=dict(info.get("image_sources", {})),
        )

    def image_missing(self, frame: pl.DataFrame) -> np.ndarray:
        """True for rows whose image columns hold a null or NaN (they get the metadata score)."""
        if not self.image_columns:
            return np.zeros(frame.height, dtype=bool)
        x = frame.select(self.image_columns).to_numpy().astype(np.float64)
        return np.isnan(x).any(axis=1)

    def predict(self, frame: pl.DataFrame, threads: int | None = None) -> dict[str, np.ndarray]:
        """Probability per member (mean over fold models) and the soft-vote "ensemble".

        Rows with a missing image column get the lgb_meta score as their ensemble score.
        To score metadata only, add the image columns as nulls.
        """
        threads = threads or os.cpu_count() or 1
        preds = {}
        for name, features in self.features.items():
            library = LIBRARIES[self.libraries[name]]
            member = Member(name, self.libraries[name], {}, features)
            x = member_matrix(frame, member)
            preds[name] = np.mean(
                [library.predict(m, x, threads) for m in self.models[name]], axis=0
            )
        blend = np.mean(list(preds.values()), axis=0)
        if META_MEMBER in preds:
            blend = np.where(self.image_missing(frame), preds[META_MEMBER], blend)
        preds[ENSEMBLE] = blend
        return preds
