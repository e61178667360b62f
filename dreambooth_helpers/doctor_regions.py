"""Where the subject is, for the dataset doctor (doctor.py): a plain backdrop, the subject cut out of its set,
the centre of interest.

Two detectors, for two kinds of verdict:
- `find_subject`: the salient blob against a *plain* border (contrast with the border's median colour), with its
  box, centre and a confidence; the size and position verdicts rest on it, so it is strict.
- `subject_region`: the pixels whose colours are rare in the photo's border, as one blob with its holes filled.
  The border does not need to be one colour: white bed sheets with grey folds, a wall lit in the middle and dark
  at its corners, a dark garden, all have their own palette, and a subject of other colours stands out from any
  of them. Exposure is judged on this region when it is one confident blob, since the set around a subject (a
  white sheet, a black velvet) is a choice and says nothing about how the subject itself is exposed.
Where neither finds a subject, `centre_weights` gives the frame's centre of interest (where subjects sit).
Everything is numpy on small copies (64 px for masks); no SciPy at runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

PLAIN_BACKDROP_BORDER = 0.8  # share of the border within BACKDROP_TOLERANCE of one colour: a plain backdrop
BACKDROP_TOLERANCE = 30.0  # RGB distance: the noise and light falloff of a plain wall or paper backdrop
MASK_SIZE = 64  # px: the copy the subject masks are made from
PALETTE_LEVELS = 8  # per channel: colours compared in 8 x 8 x 8 bins of 32 levels
# A colour (its bin or a neighbouring one) seen in fewer than this share of the border's pixels is not the set's.
RARE_IN_BORDER = 0.004
REGION_MIN_CONFIDENCE = 0.6  # subject_region: below this, judge the frame instead
REGION_MIN_AREA = 0.03  # of the frame: a smaller "subject" is more likely a lamp or a sign than the subject
CENTRE_SIGMA = 0.3  # of the frame: the centre-weighted region, as a camera's centre-weighted metering


def _rgb_thumbnail(image: Image.Image, size: int) -> np.ndarray:
    small = image.convert("RGB")
    small.thumbnail((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64)


def _border(a: np.ndarray, ring: int) -> np.ndarray:
    """The pixels of a ring `ring` deep around the frame, one row each (a is h x w or h x w x c)."""
    rest = a.shape[2:]
    return np.concatenate([a[:ring].reshape(-1, *rest), a[-ring:].reshape(-1, *rest),
                           a[ring:-ring, :ring].reshape(-1, *rest), a[ring:-ring, -ring:].reshape(-1, *rest)])


def plain_backdrop(rgb: np.ndarray) -> np.ndarray | None:
    """The colour of a plain backdrop (a wall, paper, a sheet) around the subject, or None when the border of
    the photo is not one plain colour."""
    border = _border(rgb, max(2, min(rgb.shape[:2]) // 24))
    colour = np.median(border, axis=0)
    agree = (np.linalg.norm(border - colour, axis=1) < BACKDROP_TOLERANCE).mean()
    return colour if agree >= PLAIN_BACKDROP_BORDER else None


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask`."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    sizes = [0]
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        sizes.append(0)
        label, stack = len(sizes) - 1, [(y0, x0)]
        labels[y0, x0] = label
        while stack:
            y, x = stack.pop()
            sizes[label] += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
    return labels == int(np.argmax(sizes))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with the regions it encloses (not reachable from the frame's edge outside it) added."""
    outside = ~mask
    reached = np.zeros_like(mask)
    reached[0], reached[-1], reached[:, 0], reached[:, -1] = outside[0], outside[-1], outside[:, 0], outside[:, -1]
    while True:
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= outside
        if np.array_equal(grown, reached):
            return ~reached
        reached = grown


def _box3(a: np.ndarray) -> np.ndarray:
    padded = np.pad(a, 1, mode="edge")
    h, w = a.shape
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _edge_share(blob: np.ndarray) -> float:
    edge = np.zeros(blob.shape, dtype=bool)
    edge[:2], edge[-2:], edge[:, :2], edge[:, -2:] = True, True, True, True
    return float(blob[edge].mean())


def centre_weights(shape: tuple[int, int], sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """Weights falling off from the frame's centre (a Gaussian, `sigma` of each side): the centre of interest."""
    h, w = shape
    y = (np.arange(h) + 0.5) / h - 0.5
    x = (np.arange(w) + 0.5) / w - 0.5
    return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))


# ---------------------------------------------------------------------------- the subject cut out of its set


@dataclass
class Region:
    """The subject's pixels on a MASK_SIZE square copy of the photo, and how far to trust them."""

    mask: np.ndarray  # bool, MASK_SIZE x MASK_SIZE
    area: float  # share of the frame
    confidence: float  # one blob (share of the rare pixels in it) x not running into the frame's edge

    @property
    def trusted(self) -> bool:
        return self.confidence >= REGION_MIN_CONFIDENCE and self.area >= REGION_MIN_AREA

    def extent(self, shape: tuple[int, int]) -> np.ndarray:
        """All the frame the subject spans: each row of the mask filled between its first and last pixel, and each
        column likewise, both (so a panda's white belly between its black arms, or a white cup's rim, count as the
        subject although their colours are the set's), without its outermost ring, at another size (h, w)."""
        rows = np.maximum.accumulate(self.mask, axis=1) & np.maximum.accumulate(self.mask[:, ::-1], axis=1)[:, ::-1]
        cols = np.maximum.accumulate(self.mask, axis=0) & np.maximum.accumulate(self.mask[::-1], axis=0)[::-1]
        return _resized(_inner(rows & cols), shape)

    def interior(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask without its outermost ring (see `_inner`), at another size (h, w)."""
        return _resized(_inner(self.mask), shape)


def _inner(mask: np.ndarray) -> np.ndarray:
    """`mask` without its outermost ring of MASK_SIZE pixels, which holds some of the set around the subject (a
    white sheet's pixels there would count as the subject's highlights); a thin subject is kept whole."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner if inner.sum() >= 0.5 * mask.sum() else mask


def _resized(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    big = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(big) >= 128


def _border_palette_share(rgb: np.ndarray, ring: int) -> np.ndarray:
    """For each pixel, the share of the border's pixels in its colour bin or a neighbouring one."""
    levels = PALETTE_LEVELS
    q = np.clip((rgb * (levels / 256.0)).astype(np.int64), 0, levels - 1)
    bins = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
    border = _border(bins, ring)
    counts = np.bincount(border, minlength=levels**3).reshape(levels, levels, levels).astype(np.float64)
    padded = np.pad(counts, 1)
    near = np.zeros_like(counts)  # a colour one bin from a border colour is the border's (light falls off)
    for dz in range(3):
        for dy in range(3):
            for dx in range(3):
                near = np.maximum(near, padded[dz:dz + levels, dy:dy + levels, dx:dx + levels])
    return near.ravel()[bins] / border.size


def subject_region(image: Image.Image) -> Region | None:
    """The pixels whose colours are rare in the photo's border, as its largest blob with the holes filled (the
    white of an eye, a white cup's inside on a white set), or None when nothing or nearly everything stands out.
    `confidence` is the share of the rare pixels in that blob (scattered pixels are texture, not one subject),
    reduced when the blob runs into the frame's edge (then it is more likely a part of the set)."""
    rgb = np.asarray(image.convert("RGB").resize((MASK_SIZE, MASK_SIZE), Image.Resampling.BOX), dtype=np.float64)
    rare = _border_palette_share(rgb, max(2, MASK_SIZE // 16)) < RARE_IN_BORDER
    rare = _box3(rare.astype(np.float64)) > 0.5  # a majority of each 3x3: single pixels are noise, not a subject
    if not 0.005 <= rare.mean() <= 0.8:
        return None
    blob = _largest_blob(rare)
    blob_share = float(blob.sum() / rare.sum())
    blob = _fill_holes(blob)
    confidence = blob_share * max(0.0, 1.0 - 5.0 * _edge_share(blob))
    return Region(blob, float(blob.mean()), round(confidence, 3))


# ---------------------------------------------------------------------------- the subject against a plain border


@dataclass
class Subject:
    """Where the salient region of a photo is, in fractions of the frame, and how sure the finding is."""

    box: tuple[float, float, float, float]  # left, top, right, bottom in 0..1
    centre: tuple[float, float]
    area: float  # box area as a share of the frame
    outside_centre_crop: float  # share of the subject a centre square crop would cut off
    confidence: float  # 0..1: plain border x one blob x not cut by the frame; the checks need SUBJECT_MIN_CONFIDENCE


def find_subject(image: Image.Image, size: int = 64) -> Subject | None:
    """Saliency by contrast with the border: where the border of a photo is one plain background, the pixels
    whose colour is far from it are the subject. Returns None when nothing stands out.

    `confidence` says how far to trust it: the share of the border that is one plain colour (a busy border
    means the background is not plain and "different from the border" is not "the subject"), times the share of
    salient pixels in the largest blob (scattered pixels are texture, not one subject), reduced when the blob
    runs into the frame's edge (then its size and position are unknown)."""
    rgb = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    ring = max(2, size // 16)
    border = _border(rgb, ring)
    background = np.median(border, axis=0)
    border_distance = np.linalg.norm(border - background, axis=1)
    plain_share = float((border_distance < BACKDROP_TOLERANCE).mean())
    distance = np.linalg.norm(rgb - background, axis=2)
    saliency = _box3(distance)  # single noisy pixels are not a subject
    threshold = max(40.0, 3.0 * float(np.median(border_distance)))  # 40 of ~441: a clearly visible difference
    mask = saliency > threshold
    if not 0.002 <= mask.mean() <= 0.9:
        return None
    blob = _largest_blob(mask)
    blob_share = float(blob.sum() / mask.sum())
    confidence = plain_share * blob_share * max(0.0, 1.0 - 5.0 * _edge_share(blob))
    ys, xs = np.nonzero(blob)
    left, right = xs.min() / size, (xs.max() + 1) / size
    top, bottom = ys.min() / size, (ys.max() + 1) / size
    weights = saliency[blob]
    centre = (float((xs * weights).sum() / weights.sum() + 0.5) / size,
              float((ys * weights).sum() / weights.sum() + 0.5) / size)
    # The centre square crop of a w x h photo keeps the middle min(w, h) of its longer side.
    w, h = image.size
    keep = min(w, h) / max(w, h)
    along = xs if w >= h else ys
    lo, hi = (1 - keep) / 2 * size, (1 + keep) / 2 * size
    outside = float(((along < lo) | (along >= hi)).mean())
    return Subject((float(left), float(top), float(right), float(bottom)), centre,
                   float((right - left) * (bottom - top)), outside, round(confidence, 3))
