"""FusionNetX: ISIC 2024 skin-cancer detection from 3D-TBP crops and metadata."""

import os

# albumentations otherwise checks for updates over the network on import (no internet on Kaggle).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
