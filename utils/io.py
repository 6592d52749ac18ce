"""Reading the Kaggle-layout data dir: metadata CSVs with Polars and JPEG crops from hdf5.

Metadata is read as text and then cast column by column, so a value that is not a number is
reported with its file, column and the row's isic_id; category values are respelled
canonically (utils.schema.normalise_categories). `read_test_metadata` is the submission
kernel's reader: it needs only the columns the features read, ignores extra columns and says
what it found (`MetadataNotes`: ignored and absent columns, respelled and unseen categories,
empty feature columns, values made missing); an empty file, duplicate ids or a bad number stop
it, named. Both readers make missing every numeric value no lesion can have (NaN/inf, or
outside utils.schema.VALUE_RANGES), so train and test see the same missing values.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import h5py
import numpy as np
import polars as pl
from tqdm.auto import tqdm

from utils.schema import (
    FEATURE_INPUT_COLUMNS,
    SCHEMAS,
    TEST_COLUMNS,
    SchemaError,
    coerce_impossible,
    normalise_categories,
    unseen_categories,
    validate_columns,
    validate_frame,
)

TRAIN_METADATA = "train-metadata.csv"
TRAIN_IMAGES = "train-image.hdf5"
TEST_METADATA = "test-metadata.csv"
TEST_IMAGES = "test-image.hdf5"
SAMPLE_SUBMISSION = "sample_submission.csv"

cv2.setNumThreads(1)  # one decode per DataLoader worker; OpenCV's own pool would oversubscribe


class ImageReadError(KeyError):
    """An image is missing from the hdf5 file or cannot be decoded; carries the isic_id."""

    def __init__(self, isic_id: str, source: str | Path, reason: str):
        super().__init__(isic_id)
        self.isic_id = isic_id
        self.message = f"{source}: image {isic_id!r} {reason}"

    def __str__(self) -> str:
        return self.message


def _read_text(path: Path, kind: str) -> pl.DataFrame:
    """Every column of a metadata CSV as text; errors name the file (absent, empty, no rows)."""
    if not path.is_file():
        raise FileNotFoundError(f"{kind} metadata file not found: {path}")
    try:
        df = pl.read_csv(path, infer_schema=False)
    except pl.exceptions.NoDataError as err:
        raise SchemaError(f"{path}: empty file (no header, no rows)") from err
    except pl.exceptions.ComputeError as err:
        raise SchemaError(f"{path}: not a readable CSV ({err})") from err
    if df.height == 0:
        raise SchemaError(f"{path}: {kind} metadata has a header but no rows")
    return df


def cast_columns(df: pl.DataFrame, schema: dict, source: str | Path) -> pl.DataFrame:
    """Text columns cast to the schema's dtypes (numbers trimmed first); SchemaError naming the
    file, the column, the bad values and their rows' isic_id for a value that does not parse."""
    casts = []
    for col, dtype in schema.items():
        if col not in df.columns or dtype == pl.String:
            continue
        text = pl.col(col).str.strip_chars()
        value = pl.when(text != "").then(text).cast(dtype, strict=False)
        bad = df.filter(value.is_null() & text.is_not_null() & (text != ""))
        if len(bad):
            ids = bad["isic_id"].head(5).to_list() if "isic_id" in bad.columns else "?"
            raise SchemaError(
                f"{source}: column {col!r} holds {len(bad)} value(s) that are not {dtype}, "
                f"e.g. {bad[col].head(3).to_list()} for isic_id {ids}"
            )
        casts.append(value.alias(col))
    return df.with_columns(casts)


def read_metadata(path: str | Path, kind: str) -> pl.DataFrame:
    """Read a train or test metadata CSV into the schema's dtypes (columns in file order); a
    missing or unexpected column raises SchemaError naming the file."""
    path = Path(path)
    df = _read_text(path, kind)
    validate_columns(df.columns, kind, path)
    df, _ = normalise_categories(cast_columns(df, SCHEMAS[kind], path))
    df, _ = coerce_impossible(df)
    validate_frame(df, kind, path)
    return df


def coerced_values(path: str | Path, kind: str = "train") -> dict[str, dict[str, int]]:
    """Per numeric column of a metadata CSV, how many values `read_metadata` makes missing
    because no lesion can have them (utils.schema.coerce_impossible), by reason; for reports."""
    path = Path(path)
    df = cast_columns(_read_text(path, kind), SCHEMAS[kind], path)
    return coerce_impossible(df)[1]


@dataclass(frozen=True)
class MetadataNotes:
    """What reading a test metadata file found that did not stop it (for the kernel's report)."""

    rows: int
    ignored_columns: tuple[str, ...] = ()  # not in the schema: dropped
    absent_columns: tuple[str, ...] = ()  # in the schema, not read by the features: added empty
    # column -> values matched by case/space
    respelled: dict[str, int] = field(default_factory=dict)
    unseen: dict[str, dict[str, int]] = field(default_factory=dict)  # column -> value -> rows
    empty_columns: tuple[str, ...] = ()  # feature columns with no value in any row
    # column -> {why -> values made missing}: text NaN/inf, outside the schema's range
    coerced: dict[str, dict[str, int]] = field(default_factory=dict)

    def coerced_lines(self) -> list[str]:
        """One line per column whose impossible values were made missing, with the counts."""
        lines = []
        for col, reasons in self.coerced.items():
            counts = ", ".join(f"{n} {why}" for why, n in reasons.items())
            lines.append(f"{col}: {sum(reasons.values())} value(s) made missing ({counts})")
        return lines

    def lines(self) -> list[str]:
        """One line per finding (empty when the file was as expected)."""
        lines = self.coerced_lines()
        if self.ignored_columns:
            lines.append(f"extra column(s) ignored: {list(self.ignored_columns)}")
        if self.absent_columns:
            lines.append(
                f"column(s) absent, not read by the features (left empty): "
                f"{list(self.absent_columns)}"
            )
        for col, n in self.respelled.items():
            lines.append(f"{col}: {n} value(s) matched a known category after trimming/case")
        for col, values in self.unseen.items():
            shown = dict(list(values.items())[:5])
            lines.append(
                f"{col}: {sum(values.values())} row(s) with unseen categories "
                f"(encoded as {col}__other): {shown}"
            )
        if self.empty_columns:
            lines.append(f"feature column(s) empty in every row: {list(self.empty_columns)}")
        return lines


def read_test_metadata(path: str | Path) -> tuple[pl.DataFrame, MetadataNotes]:
    """The submission kernel's reader: test metadata in TEST_COLUMNS order and what it found.

    Only FEATURE_INPUT_COLUMNS are required (SchemaError naming the file otherwise); other
    schema columns that are absent are added empty, columns outside the schema are dropped.
    """
    path = Path(path)
    df = _read_text(path, "test")
    if missing := [c for c in FEATURE_INPUT_COLUMNS if c not in df.columns]:
        raise SchemaError(
            f"{path}: test metadata has no column(s) {missing}, which the features read"
        )
    ignored = tuple(c for c in df.columns if c not in TEST_COLUMNS)
    absent = tuple(c for c in TEST_COLUMNS if c not in df.columns)
    df = df.with_columns(pl.lit(None, dtype=pl.String).alias(c) for c in absent)
    df = cast_columns(df.select(list(TEST_COLUMNS)), TEST_COLUMNS, path)
    df, respelled = normalise_categories(df)
    df, coerced = coerce_impossible(df)
    validate_frame(df, "test", path)
    features = [c for c in FEATURE_INPUT_COLUMNS if c not in ("isic_id", "patient_id")]
    empty = tuple(c for c in features if df[c].null_count() == df.height)
    unseen = unseen_categories(df)
    return df, MetadataNotes(df.height, ignored, absent, respelled, unseen, empty, coerced)


# JPEG start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC): their segment holds the size
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame header, without decoding; None when the
    bytes are not a JPEG with a readable header."""
    buf = bytes(data) if isinstance(data, np.ndarray) else data
    if buf[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(buf):
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker in SOF_MARKERS:
            return struct.unpack(">HH", buf[i + 5 : i + 9])
        if marker == 0xFF:  # fill byte before a marker
            i += 1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(buf[i + 2 : i + 4], "big")
    return None


def decode_jpeg(
    data: bytes | np.ndarray, isic_id: str = "?", source: str | Path = "?"
) -> np.ndarray:
    """Decode JPEG bytes to an RGB uint8 array of shape (H, W, 3)."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if image is None:
        raise ImageReadError(isic_id, source, "is not a decodable JPEG")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class HDF5Images:
    """Lazy, read-only access to an hdf5 file with one JPEG byte string per isic_id.

    The file is opened on first use and once per process, so one instance can be handed to
    DataLoader workers (each worker opens its own handle after the fork or spawn). The Kaggle
    files store each image as one contiguous dataset, so a read looks up the dataset's byte
    extent once (cached per id) and then takes the bytes with one `pread`: about 40 us for a
    first read and 5 us after, against about 300 us through h5py's high-level indexing.
    Chunked or compressed datasets (no single extent) are read through h5py instead.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"image file not found: {self.path}")
        # byte extents stay valid in every process: filled once (see `index`), they are
        # inherited by forked DataLoader workers and pickled to spawned ones
        self._extents: dict[str, tuple[int, int] | None] = {}
        self._reset()

    def _reset(self) -> None:
        self._file: h5py.File | None = None
        self._fd: int | None = None
        self._pid: int | None = None

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._reset()  # a forked child must not share the parent's handles
            self._file = h5py.File(self.path, "r")
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict:
        return {"path": self.path, "extents": self._extents}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._extents = state["extents"]
        self._reset()

    def __len__(self) -> int:
        return len(self._handle())

    def __iter__(self) -> Iterator[str]:
        return iter(self._handle().keys())

    def _extent(self, isic_id: str) -> tuple[int, int] | None:
        """(offset, size) of the id's bytes in the file, None when not one contiguous block."""
        if isic_id not in self._extents:
            try:
                dataset = h5py.h5d.open(self._handle().id, isic_id.encode())
            except KeyError:
                raise ImageReadError(isic_id, self.path, "is missing from the hdf5 file") from None
            offset, size = dataset.get_offset(), dataset.get_storage_size()
            self._extents[isic_id] = (offset, size) if offset is not None and size else None
        return self._extents[isic_id]

    def index(self, isic_ids: Sequence[str]) -> list[str]:
        """Look up (and cache) the byte extent of every id; return the ids absent from the file.

        Do it once before DataLoader workers start, so each worker only reads bytes.
        """
        self._handle()
        missing = []
        for isic_id in tqdm(isic_ids, desc=f"index {self.path.name}", mininterval=5.0):
            try:
                self._extent(isic_id)
            except ImageReadError:
                missing.append(isic_id)
        return missing

    def read_bytes(self, isic_id: str) -> np.ndarray:
        """The stored JPEG bytes for `isic_id` as a uint8 array."""
        self._handle()
        extent = self._extent(isic_id)
        if extent is not None:
            return np.frombuffer(os.pread(self._fd, extent[1], extent[0]), np.uint8)
        raw = self._handle()[isic_id][()]
        return np.frombuffer(raw.tobytes() if isinstance(raw, np.ndarray) else raw, np.uint8)

    def read(self, isic_id: str) -> np.ndarray:
        """Decoded RGB uint8 image (H, W, 3) for `isic_id`."""
        return decode_jpeg(self.read_bytes(isic_id), isic_id, self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._fd is not None:
            os.close(self._fd)
        self._reset()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def check_ids_match(metadata: pl.DataFrame, images: HDF5Images, source: str) -> list[str]:
    """isic_ids of `metadata` absent from `images` (a later stage decides the fallback)."""
    return images.index(metadata["isic_id"].to_list())


class DataDir:
    """Paths of a Kaggle-layout data dir, with the readers bound to them."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data dir not found: {self.root}")

    def path(self, name: str) -> Path:
        return self.root / name

    def train_metadata(self) -> pl.DataFrame:
        return read_metadata(self.path(TRAIN_METADATA), "train")

    def test_metadata(self) -> pl.DataFrame:
        return read_metadata(self.path(TEST_METADATA), "test")

    def train_images(self) -> HDF5Images:
        return HDF5Images(self.path(TRAIN_IMAGES))

    def test_images(self) -> HDF5Images:
        return HDF5Images(self.path(TEST_IMAGES))
