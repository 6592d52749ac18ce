"""The stage configs (frozen dataclasses), the image-model registry and the fold constants of
utils.settings: what each field means and which values it accepts. Their values per preset and
recipe are in utils.settings.presets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from utils.settings.recipes import PAPER_GBDT_PARAMS

BLENDS = ("equal", "nested")  # GBDTConfig.blend: soft vote, or weights fitted on the OOF
LABELS = ("target", "suspicious")
OOF_EPOCHS = ("best", "last")  # ImageConfig.oof_epoch
VALIDATE_ON = ("label", "target")  # ImageConfig.validate_on
POOLINGS = ("multiscale_gem", "token")

# The one fold assignment (utils.folds): StratifiedGroupKFold by patient, this many splits, seed.
N_FOLDS = 5
FOLD_SEED = 42


@dataclass(frozen=True)
class ImageModelSpec:
    """One image model of the method: backbone (image.models.BACKBONES), label, pooling head."""

    backbone: str
    label: str  # training label (and, with ImageConfig.validate_on "label", the validation's)
    pooling: str  # must be the head utils.image.models gives this backbone (a test checks it)

    def __post_init__(self):
        if self.label not in LABELS or self.pooling not in POOLINGS:
            raise ValueError(f"ImageModelSpec: label {self.label!r} or pooling {self.pooling!r}")


# The four image models of the method; a kernel's weight file is `<backbone>.pth`.
IMAGE_MODELS: dict[str, ImageModelSpec] = {
    "convnextv2_nano": ImageModelSpec("convnextv2_nano", "target", "multiscale_gem"),
    "vit_tiny": ImageModelSpec("vit_tiny", "target", "token"),
    "vit_tiny_suspicious": ImageModelSpec("vit_tiny", "suspicious", "token"),
    "vit_small_suspicious": ImageModelSpec("vit_small", "suspicious", "token"),
}
BACKBONE_NAMES = tuple(sorted({spec.backbone for spec in IMAGE_MODELS.values()}))


@dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic data dir the pipeline generates without --data-dir (utils.synthetic.generate)."""

    rows: int
    patients: int | None
    positive_rate: float
    test_rows: int | None
    image_size: int  # JPEG side stored in the hdf5 file


@dataclass(frozen=True)
class ImageConfig:
    """Everything that fixes one image-model run (stage 1); saved in its config.json."""

    model_name: str = "convnextv2_nano"
    backbone: str = "convnextv2_nano"
    label: str = "target"
    preset: str = "full"
    recipe: str = "paper"
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 30
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup: float = 0.05  # fraction of all steps with linear warm-up
    # The reference recipe (3rd-place code, train_*.py), point by point:
    # AdamW weight decay; None = the backbone's (image.models.BACKBONES): ConvNeXt 1e-2 on every
    # parameter, ViT 1e-3 with none on biases and norm weights, cls_token/pos_embed frozen.
    weight_decay: float | None = None
    max_grad_norm: float | None = None  # the reference clips no gradient; a value clips to it
    # Per epoch every positive `pos_repeat` times plus `neg_ratio` fresh negatives per positive
    # image (after repetition): 2P + 2P = about 4P images; None = every negative.
    neg_ratio: float | None = 1.0
    pos_repeat: int = 2
    # Per-epoch validation (checkpoint choice): every held-out positive plus this many negatives
    # per positive, drawn once per fold among those with tbp_lv_dnn_lesion_confidence >
    # `val_min_confidence` (the reference's filter; None, or no such column: any negative).
    val_neg_per_pos: float = 10.0
    val_min_confidence: float | None = 80.0
    # Head: pool None = the backbone's (ConvNeXt: the paper's multi-scale GeM, "avg" is the
    # reference's own pooling; ViT: class token). head_norm False: the reference removes timm's
    # head including ConvNeXt's post-pool norm (the validated code has none). One dropout mask,
    # p 0.5, as the reference's MLP head.
    pool: str | None = None
    head_norm: bool = False
    dropout: float = 0.5
    dropout_samples: int = 1  # > 1: multi-sample dropout (mean over masks while training)
    n_folds: int = N_FOLDS
    seed: int = FOLD_SEED  # fold assignment and training seed
    # The epoch whose weights a fold keeps and predicts its OOF with: "best" validation pAUC (the
    # reference) or "last" ("best" lifts the OOF score on the very labels it is scored on);
    # utils.image.train.epoch_choice reports both per fold from history.csv.
    oof_epoch: str = "best"
    # What the per-epoch validation subsample is drawn on and scored against: "label" (the
    # reference: train_*.py relabels before the split, so a suspicious-label model's validation
    # positives, eligible negatives and checkpoint-choosing pAUC are all on the suspicious label)
    # or "target" (the real target). The OOF always records the real target: stage 3 scores and
    # fits on it.
    validate_on: str = "label"
    num_workers: int = 4
    eval_batch_size: int = 128
    weights_path: str | None = None
    # Augmentations: the reference's, fixed in utils.image.data.train_transforms (no setting).

    def __post_init__(self):
        if self.backbone not in BACKBONE_NAMES:
            raise ValueError(f"ImageConfig: unknown backbone {self.backbone!r}")
        if self.n_folds < 2:
            raise ValueError(f"ImageConfig: n_folds must be >= 2, got {self.n_folds}")
        if self.pool not in (None, *POOLINGS, "avg"):
            raise ValueError(f"ImageConfig: unknown pool {self.pool!r}")
        if self.pos_repeat < 1:
            raise ValueError(f"ImageConfig: pos_repeat must be >= 1, got {self.pos_repeat}")
        choices = {"label": LABELS, "validate_on": VALIDATE_ON, "oof_epoch": OOF_EPOCHS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"ImageConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}"
                )


# ImageConfig fields that never change stage 1's output, so they stay out of a run's identity
# (utils.image.run_files.run_record's config_hash, which decides reuse and resume): `recipe` names
# stage 3's choices (switching it never retrains an image model), `preset` names a size table
# whose stage 1 values are the other fields themselves, and the loader settings change speed only.
TRAIN_IDENTITY_FREE = ("preset", "recipe", "num_workers", "eval_batch_size")


@dataclass(frozen=True)
class Sampling:
    """Minority/majority ratios after over- then under-sampling inside a fold; None skips a step."""

    over: float | None = 0.003
    under: float | None = 0.01


@dataclass(frozen=True)
class GBDTConfig:
    """Stage 3: the ensemble's CV settings; `rounds` replaces trees per library (demo: fewer)."""

    preset: str = "full"
    recipe: str = "paper"
    n_folds: int = N_FOLDS
    fold_seed: int = FOLD_SEED
    seeds: tuple[int, ...] = (0,)
    threads: int | None = None  # None: every core
    sampling: Sampling = Sampling()
    rounds: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Optional feature groups and the blend, none in the reference (so all off in `paper`), each
    # a candidate of the `plus` recipe (PLUS_GBDT holds the ones kept):
    # patient x site normalisation and within-patient percentiles (utils.tabular.features),
    site_features: bool = False
    # "ugly duckling" outlier features of the metadata (utils.tabular.plus_features), every member,
    ugly_duckling: bool = False
    # patient-relative image scores (utils.tabular.plus_features), the image members,
    patient_image: bool = False
    # "equal": the reference's soft vote; "nested": weights fitted on the members' OOF
    # (tabular.blend.nested_blend; the reported CV scores each fold with weights fitted without it).
    blend: str = "equal"
    # The report always gives the plain CV score and the reference's "filtered" one (without the
    # target-0 rows with iddx_1 "Indeterminate" or an iddx_2: utils.labels.reference_filtered).
    # True also trains the fold models without those rows, the reference's CV exactly; False
    # (default) trains on every row, as the reference's final refit does, since the fold models
    # are what the submission uses.
    filter_training: bool = False
    # the per-patient LOF alone (utils.tabular.plus_features.patient_lof_features), every member,
    patient_lof: bool = False
    # every numeric feature normalised within patient x location / simple location / site, and
    # |z| within patient x location, within-patient percentiles and outlier counts
    # (utils.tabular.location_features), every member,
    location_norm: bool = False
    location_outliers: bool = False
    # least weight a fitted blend leaves `lgb_meta` (the member every image fallback keeps)
    blend_floor: float = 0.0

    def __post_init__(self):
        if self.blend not in BLENDS:
            raise ValueError(f"GBDTConfig: blend must be one of {BLENDS}, got {self.blend!r}")
        if not 0.0 <= self.blend_floor < 1.0:
            raise ValueError(f"GBDTConfig: blend_floor must be in [0, 1), got {self.blend_floor!r}")


@dataclass(frozen=True)
class TuneConfig:
    """Stage 2: Optuna settings besides the data; `centres` replace values of the search centre."""

    kinds: tuple[str, ...] = ("lgb", "cat", "xgb")
    preset: str = "full"
    recipe: str = "paper"
    n_trials: int = 50  # new trials per kind in this run
    timeout: float | None = None  # seconds per kind's study; None: no limit
    seed: int = 0  # sampler seed
    model_seeds: tuple[int, ...] = (0,)
    threads: int | None = None
    n_folds: int = N_FOLDS
    n_startup_trials: int = 5  # the pruner waits for this many finished trials
    n_warmup_steps: int = 1  # and never prunes after the first fold alone
    centres: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.kinds, str) or not self.kinds:
            raise ValueError(f"kinds must be a non-empty list of GBDT kinds, got {self.kinds!r}")
        unknown = [k for k in self.kinds if k not in PAPER_GBDT_PARAMS]
        if unknown:
            known = sorted(PAPER_GBDT_PARAMS)
            raise ValueError(f"unknown GBDT kind(s) {unknown}; choose from {known}")
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds lists a GBDT kind twice: {list(self.kinds)}")
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise ValueError(f"n_trials must be a positive integer, got {self.n_trials!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be positive seconds or None, got {self.timeout!r}")


@dataclass(frozen=True)
class InferenceConfig:
    """Stage 4, the submission kernel."""

    preset: str = "full"
    recipe: str = "paper"
    batch_size: int = 128
    num_workers: int = 4
    estimate_batches: int = 3  # batches per image model timed for the run-time estimate; 0 skips
    threads: int | None = None  # GBDT threads; None: every core


@dataclass(frozen=True)
class ExternalEvalConfig:
    """Stage 5; image settings left None take the image preset's."""

    preset: str = "full"
    recipe: str = "paper"
    image_models: tuple[str, ...] = tuple(IMAGE_MODELS)
    n_folds: int = N_FOLDS
    seed: int = FOLD_SEED
    threshold: float = 0.5
    epochs: int | None = None
    image_size: int | None = None
    batch_size: int | None = None
    num_workers: int | None = None
    weights_path: Mapping[str, str] | None = None  # image model -> local timm weights file
    max_image_side: int | None = None  # shrink stored images first (CPU demos)
    gbdt_seeds: tuple[int, ...] = (0,)
    threads: int | None = None  # GBDT threads; None: every core
    torch_threads: int | None = None  # torch intra-op threads while training; None: unchanged

    def __post_init__(self):
        unknown = [m for m in self.image_models if m not in IMAGE_MODELS]
        if unknown:
            raise KeyError(f"unknown image model(s) {unknown}; known: {sorted(IMAGE_MODELS)}")
        extra = sorted(set(self.weights_path or {}) - set(self.image_models))
        if extra:
            raise KeyError(f"weights_path names model(s) {extra} not in image_models")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class Settings:
    """One preset x recipe: every stage's config."""

    preset: str
    recipe: str
    data: SyntheticConfig
    image: ImageConfig  # template; `image_config` fills in the model
    tuning: TuneConfig
    gbdt: GBDTConfig
    inference: InferenceConfig
    external: ExternalEvalConfig


STAGES = ("data", "image", "tuning", "gbdt", "inference", "external")
