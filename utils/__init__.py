"""FusionNetX: ISIC 2024 skin-cancer detection from 3D-TBP crops and metadata."""

import os
import warnings

# albumentations otherwise checks for updates over the network on import (no internet on Kaggle).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# tqdm.auto (imported by timm's huggingface_hub) warns "IProgress not found" in a notebook kernel
# without ipywidgets; its bars are text bars either way, so the warning is noise to the user.
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"
