"""Synthetic lesion crops (utils.synthetic): textured skin and an elliptic lesion whose size,
colours, border raggedness and colour variegation follow the lesion's metadata and latent parts,
JPEG-encoded into one hdf5 dataset per isic_id, as in the Kaggle image files.

Each crop is drawn from its own seed (one column of `image_params`), so a crop is the same
whichever process renders it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import cv2
import h5py
import numpy as np
from tqdm.auto import tqdm

FIELD_OF_VIEW_MM = 8.0  # crop side in mm: a typical 3 mm lesion spans about 40% of the crop


def _lab_to_rgb(lightness: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lab = np.stack([lightness, a, b], axis=-1).astype(np.float32).reshape(-1, 1, 3)
    rgb = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB).reshape(-1, 3)
    return np.clip(rgb * 255.0, 0, 255)


def image_params(meta: dict, latent: dict, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """One row of drawing parameters per lesion, consistent with its metadata."""
    n = meta["isic_id"].size
    side = np.round(image_size * rng.uniform(0.85, 1.15, n))
    px_per_mm = side / FIELD_OF_VIEW_MM
    skin = _lab_to_rgb(meta["tbp_lv_Lext"], meta["tbp_lv_Aext"], meta["tbp_lv_Bext"])
    lesion = _lab_to_rgb(meta["tbp_lv_L"], meta["tbp_lv_A"], meta["tbp_lv_B"])
    return np.column_stack(
        [
            side,
            np.minimum(meta["clin_size_long_diam_mm"] * px_per_mm / 2, side * 0.45),
            np.minimum(meta["tbp_lv_minorAxisMM"] * px_per_mm / 2, side * 0.45),
            rng.uniform(0, math.pi, n),
            latent["raggedness"],
            latent["variegation"],
            skin,
            lesion,
            rng.integers(0, 2**31, n),
        ]
    )


HARMONICS = (3, 5, 7, 11, 13)
TEXTURE_SIDE = 512


@lru_cache(maxsize=64)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel offsets from the centre and the border harmonics cos/sin(k·theta) for one crop size."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) - (side - 1) / 2
    theta = np.arctan2(yy, xx)
    k_theta = np.array(HARMONICS, dtype=np.float32)[:, None, None] * theta
    return xx, yy, np.concatenate([np.cos(k_theta), np.sin(k_theta)])


@lru_cache(maxsize=1)
def _skin_texture() -> np.ndarray:
    """Grey pore-scale noise (mean 16, sd 4) to crop from; added with an offset of -16."""
    noise = np.random.default_rng(0).normal(16.0, 4.0, (TEXTURE_SIDE, TEXTURE_SIDE, 1))
    return np.repeat(np.clip(noise, 0, 32).astype(np.uint8), 3, axis=2)


def _draw(params: np.ndarray) -> np.ndarray:
    """Render one crop: textured skin and an elliptic lesion, ragged border, variegated colour."""
    side, r_long, r_short, angle, ragged, varieg = params[:6]
    skin, lesion = params[6:9], params[9:12]
    rng = np.random.default_rng(int(params[12]))
    s = int(side)
    xx, yy, waves = _grid(s)
    dx, dy = rng.normal(0, s * 0.03, 2)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    u = ((xx - dx) * cos_a + (yy - dy) * sin_a) / max(r_long, 1.0)
    v = ((yy - dy) * cos_a - (xx - dx) * sin_a) / max(r_short, 1.0)
    phase = rng.uniform(0, 2 * math.pi, len(HARMONICS))
    amp = rng.normal(0, 1, len(HARMONICS)) / np.array(HARMONICS)
    coef = np.concatenate([amp * np.cos(phase), -amp * np.sin(phase)]).astype(np.float32)
    radius = 1.0 + 0.7 * ragged * np.tensordot(coef, waves, axes=1)
    inside = np.clip((radius - np.sqrt(u * u + v * v)) * 6.0 + 0.5, 0.0, 1.0).astype(np.float32)
    # Variegation: low-frequency colour blotches and dark (black / blue-grey) clods.
    blotch = rng.normal(0, 1, (5, 5, 4))
    warm = blotch[..., 1:3].mean(-1, keepdims=True)
    shade = lesion * (1.0 + 0.35 * varieg * blotch[..., :1]) + 20.0 * varieg * warm
    small = shade - 80.0 * varieg * np.clip(blotch[..., 3:], 0, None) * np.array([1.0, 0.9, 0.6])
    colour = cv2.resize(
        np.clip(small, 0, 255).astype(np.uint8), (s, s), interpolation=cv2.INTER_LINEAR
    )
    background = np.empty((s, s, 3), np.uint8)
    background[:] = skin.astype(np.uint8)
    image = cv2.blendLinear(colour, background, inside, 1.0 - inside)
    ox, oy = rng.integers(0, TEXTURE_SIDE - s, 2)
    return cv2.addWeighted(image, 1.0, _skin_texture()[oy : oy + s, ox : ox + s], 1.0, -16.0)


def _encode_chunk(params: np.ndarray) -> list[bytes]:
    out = []
    for row in params:
        rgb = _draw(row)
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
        )
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        out.append(buf.tobytes())
    return out


# Images per worker below which rendering stays in this process: a worker costs about a second to
# start (spawn imports this module) and renders about 2,000 crops a second.
MIN_IMAGES_PER_WORKER = 2_000


def write_images(path: Path, ids: np.ndarray, params: np.ndarray, workers: int, desc: str) -> None:
    """Render and JPEG-encode every crop (in up to `workers` processes) into one hdf5 dataset per
    id. Workers are spawned, never forked: the pipeline calls this with a heartbeat thread running,
    and a fork taken while another thread holds a lock left a worker hung for good (seen in CI)."""
    # chunks of at most 1000 images, and at least one per worker so every worker gets work
    chunk = max(1, min(1000, -(-len(params) // max(workers, 1))))
    chunks = [params[i : i + chunk] for i in range(0, len(params), chunk)]
    workers = min(workers, len(params) // MIN_IMAGES_PER_WORKER)
    parallel = workers > 1 and len(chunks) > 1
    pool = get_context("spawn").Pool(workers) if parallel else nullcontext()
    with pool, h5py.File(path, "w", libver="earliest") as h5:
        results = pool.imap(_encode_chunk, chunks) if parallel else map(_encode_chunk, chunks)
        bar = tqdm(total=len(ids), desc=desc, unit="img", mininterval=2.0)
        for k, jpegs in enumerate(results):
            for isic_id, jpeg in zip(ids[k * chunk : k * chunk + len(jpegs)], jpegs, strict=True):
                h5.create_dataset(isic_id, data=np.bytes_(jpeg))
            bar.update(len(jpegs))
        bar.close()
