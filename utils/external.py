"""Adapters that turn external dermoscopy datasets (PH2, HAM10000) into the pipeline's layout.

An external data dir holds `metadata.csv` (isic_id, patient_id, target, then the dataset's own
metadata columns) and, when images are available, `images.hdf5` with one JPEG byte string per
isic_id, exactly like the competition's hdf5. The same image and GBDT code then runs on it.

- PH2 (Mendonça et al., 2013): 200 dermoscopic images; target = melanoma (40) vs. common or
  atypical nevus (160). Its dermoscopic annotations become the metadata. Each image is its own
  lesion and patient, so the grouped folds reduce to stratified folds.
- HAM10000 (Tschandl et al., 2018): target = dx == "mel"; age, sex and localization are the
  metadata; `lesion_id` is the group, so one lesion's images never fall in two folds. Images are
  looked up as `<image_id>.jpg` anywhere under the image folder (the release splits them in two).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import polars as pl
from tqdm.auto import tqdm

EXTERNAL_METADATA = "metadata.csv"
EXTERNAL_IMAGES = "images.hdf5"
ID_COLUMNS = ("isic_id", "patient_id", "target")

PH2_LABELS = "ph2_labels.csv"
PH2_PRESENT = {"A": 0, "P": 1}  # absent / present
PH2_NETWORK = {"T": 0, "AT": 1}  # typical / atypical pigment network
PH2_DOTS = {"A": 0, "T": 1, "AT": 2}  # absent / typical / atypical dots and globules
PH2_COLOURS = ("white", "red", "light_brown", "dark_brown", "blue_gray", "black")
PH2_DIAGNOSES = {"common_nevus": 0, "atypical_nevus": 0, "melanoma": 1}
HAM_COLUMNS = ("lesion_id", "image_id", "dx", "age", "sex", "localization")
HAM_DIAGNOSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


@dataclass(frozen=True)
class ExternalDataset:
    """An external dataset in pipeline form: ids, target, metadata features and image files."""

    name: str
    frame: pl.DataFrame
    numeric_columns: tuple[str, ...]
    categorical_columns: tuple[str, ...]
    image_paths: dict[str, Path]
    fold_scheme: str  # how folds are grouped; the fold count and seed are the caller's

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return self.numeric_columns + self.categorical_columns


def _read_csv(source: Path, what: str, required: tuple[str, ...]) -> pl.DataFrame:
    """`source` as text; FileNotFoundError naming `what` when absent, ValueError naming the
    `required` columns it lacks."""
    if not source.is_file():
        raise FileNotFoundError(f"{what} not found: {source}")
    raw = pl.read_csv(source, infer_schema=False)
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}")
    return raw


def _map_codes(df: pl.DataFrame, column: str, codes: dict, source: Path) -> pl.Expr:
    bad = df.filter(~pl.col(column).is_in(list(codes)))
    if bad.height:
        raise ValueError(
            f"{source}: column {column!r} has unknown value(s) {bad[column].unique().to_list()} "
            f"(expected {list(codes)}), e.g. row {bad['image_name'].head(1).to_list()}"
        )
    return pl.col(column).replace_strict(codes, return_dtype=pl.Int8)


def load_ph2(root: str | Path) -> ExternalDataset:
    """PH2 from `root` (ph2_labels.csv + images/IMDxxx.jpg): melanoma vs. nevus."""
    root = Path(root)
    source = root / PH2_LABELS
    required = ("image_name", "clinical_diagnosis", "asymmetry", "pigment_network")
    required += ("dots_globules", "streaks", "regression_areas", "blue_whitish_veil", *PH2_COLOURS)
    raw = _read_csv(source, "PH2 labels", required)
    frame = raw.select(
        pl.col("image_name").alias("isic_id"),
        pl.col("image_name").alias("patient_id"),
        _map_codes(raw, "clinical_diagnosis", PH2_DIAGNOSES, source).alias("target"),
        pl.col("asymmetry").cast(pl.Int8).alias("asymmetry"),
        _map_codes(raw, "pigment_network", PH2_NETWORK, source).alias("atypical_network"),
        _map_codes(raw, "dots_globules", PH2_DOTS, source).alias("dots_globules"),
        *[
            _map_codes(raw, c, PH2_PRESENT, source).alias(c)
            for c in ("streaks", "regression_areas", "blue_whitish_veil")
        ],
        *[pl.col(c).cast(pl.Int8) for c in PH2_COLOURS],
    ).with_columns(pl.sum_horizontal(PH2_COLOURS).cast(pl.Int8).alias("n_colours"))
    numeric = tuple(c for c in frame.columns if c not in ID_COLUMNS)
    paths = {i: root / "images" / f"{i}.jpg" for i in frame["isic_id"]}
    missing = [i for i, p in paths.items() if not p.is_file()]
    if 0 < len(missing) < len(paths):  # all missing: metadata only
        raise FileNotFoundError(f"{source}: {len(missing)} image(s) missing, e.g. {missing[:3]}")
    return ExternalDataset(
        name="PH2",
        frame=frame,
        numeric_columns=numeric,
        categorical_columns=(),
        image_paths={} if missing else paths,
        fold_scheme="StratifiedGroupKFold, one image per patient (= stratified k-fold)",
    )


def load_ham10000(metadata_csv: str | Path, image_dir: str | Path | None = None) -> ExternalDataset:
    """HAM10000 from its metadata CSV (and, when given, a folder holding <image_id>.jpg files)."""
    source = Path(metadata_csv)
    raw = _read_csv(source, "HAM10000 metadata", HAM_COLUMNS)
    unknown = raw.filter(~pl.col("dx").is_in(HAM_DIAGNOSES))
    if unknown.height:
        raise ValueError(
            f"{source}: column 'dx' has unknown value(s) {unknown['dx'].unique().to_list()}, "
            f"e.g. image_id {unknown['image_id'].head(1).to_list()}"
        )
    dupes = raw.filter(pl.col("image_id").is_duplicated())["image_id"].unique()
    if dupes.len():
        raise ValueError(f"{source}: duplicate image_id(s) {dupes.head(3).to_list()}")
    frame = raw.select(
        pl.col("image_id").alias("isic_id"),
        pl.col("lesion_id").alias("patient_id"),
        (pl.col("dx") == "mel").cast(pl.Int8).alias("target"),
        pl.col("age").replace("", None).cast(pl.Float64).alias("age"),
        pl.col("sex").replace({"unknown": None, "": None}).alias("sex"),
        pl.col("localization").replace({"unknown": None, "": None}).alias("localization"),
    )
    paths: dict[str, Path] = {}
    if image_dir is not None:
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"HAM10000 image folder not found: {image_dir}")
        found = {p.stem: p for p in image_dir.rglob("*.jpg")}
        if absent := [i for i in frame["isic_id"] if i not in found]:
            raise FileNotFoundError(
                f"{image_dir}: {len(absent)} of {frame.height} HAM10000 images missing, "
                f"e.g. {absent[:3]}"
            )
        paths = {i: found[i] for i in frame["isic_id"]}
    return ExternalDataset(
        name="HAM10000",
        frame=frame,
        numeric_columns=("age",),
        categorical_columns=("sex", "localization"),
        image_paths=paths,
        fold_scheme="StratifiedGroupKFold grouped by lesion_id",
    )


def _jpeg_bytes(path: Path) -> bytes:
    """The file's bytes when it is a JPEG, else the image re-encoded as JPEG (quality 95)."""
    data = path.read_bytes()
    if data[:2] == b"\xff\xd8":
        return data
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _shrunk_jpeg(data: bytes, max_side: int, path: Path) -> bytes:
    """`data` re-encoded (quality 95) with its long side cut to `max_side`; as is when smaller."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    scale = max_side / max(image.shape[:2])
    if scale >= 1:
        return data
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def write_layout(
    dataset: ExternalDataset, out_dir: str | Path, max_side: int | None = None
) -> Path:
    """Write `metadata.csv` and (with images) `images.hdf5` for `dataset` into `out_dir`.

    `max_side` shrinks larger images to that long side first (CPU demos decode 512 px images
    every epoch otherwise); None keeps the files byte for byte.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset.frame.write_csv(out_dir / EXTERNAL_METADATA)
    if dataset.image_paths:
        with h5py.File(out_dir / EXTERNAL_IMAGES, "w") as h5:
            for isic_id in tqdm(dataset.frame["isic_id"], desc=f"{dataset.name} images"):
                path = dataset.image_paths[isic_id]
                data = _jpeg_bytes(path)
                if max_side is not None:
                    data = _shrunk_jpeg(data, max_side, path)
                h5.create_dataset(isic_id, data=np.bytes_(data))
    return out_dir
