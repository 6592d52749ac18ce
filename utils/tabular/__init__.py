"""Tabular stage: metadata features, the GBDT libraries, CV, blending, the ensemble, tuning."""
