"""Do the photos show one subject? Which ones stand apart from the rest (the dataset doctor's `one-subject` check).

Five photos of a toy robot with an astronaut, a cat and a coffee cup among them train a model of a robot-ish
astronaut-cat: DreamBooth learns whatever the photos share. This is a cheap, offline look at that, with no model to
download: each photo becomes a small descriptor, photos are compared pairwise, and a photo is named only when it is
far from a tight majority.

The descriptor (`describe`), from a 64 px copy:
- where the subject is: on a plain backdrop (doctor.plain_backdrop: a studio wall, a sheet of paper) the pixels
  unlike the backdrop, so the same toy on a blue, a yellow and a black backdrop compares as the same toy; on a
  busy photo the whole frame, weighted towards its centre (Gaussian, sigma 0.3 of the frame), where subjects sit;
- colour (70% of the distance): a hue x saturation histogram (12 x 3 bins) plus 3 bins of grey level for
  colourless pixels, brightness scaled to the photo's own 98th percentile first (a photo 1 EV darker or brighter
  is not another subject), pixels shared linearly between neighbouring bins (no jumps at bin edges);
- shape (30%): a histogram of edge directions (8 unsigned orientations, weighted by edge strength).
Distance: total variation (half the L1 difference), 0 to 1, of each part.

The rule (`outlying_photos`), for 4 or more photos: each photo's median distance to the others ranks it; the
more typical half (at least 3) is the core, and its spread is the median distance between core photos. Another
photo stands apart when its median distance to the core is over OUTLIER_RATIO times the spread AND over the
spread by OUTLIER_MARGIN. Both are needed: a set of near-copies has a tiny spread, where a brighter copy is many
times the spread but not far; a set of unrelated photos has no tight core, and nothing stands apart from it.
Thresholds and their measured rates on real photos: docs/doctor.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .doctor import BACKDROP_TOLERANCE, plain_backdrop

SIZE = 64  # px: the copy the descriptor is made from (colours and layout, not texture)
CENTRE_SIGMA = 0.3  # of the frame: the centre weighting on busy photos
HUE_BINS, SATURATION_BINS, GREY_BINS = 12, 3, 3
GREY_SATURATION, GREY_DARK = 0.2, 0.15  # below this saturation, or this brightness, a pixel has no hue to speak of
ORIENTATION_BINS = 8
COLOUR_WEIGHT = 0.7  # of the distance; the rest is the edge directions
OUTLIER_RATIO = 2.75  # median distance to the core over the core's spread...
OUTLIER_MARGIN = 0.15  # ...and above the spread by this much (distances are 0-1)
MIN_PHOTOS = 4

_y, _x = (np.mgrid[0:SIZE, 0:SIZE] + 0.5) / SIZE
_CENTRE_WEIGHTS = np.exp(-((_x - 0.5) ** 2 + (_y - 0.5) ** 2) / (2 * CENTRE_SIGMA**2))


@dataclass
class Descriptor:
    colour: np.ndarray
    edges: np.ndarray
    on_backdrop: bool  # the subject was cut out from a plain backdrop (else: the centre-weighted frame)


@dataclass
class Likeness:
    """The outcome for one set: who stands apart, and the numbers behind it (for docs/doctor.md and debugging)."""

    outliers: list[str]
    spread: float  # median distance between the core's photos
    distances: dict[str, float]  # each photo outside the core: its median distance to the core


def _subject_weights(rgb: np.ndarray) -> tuple[np.ndarray, bool]:
    backdrop = plain_backdrop(rgb)
    if backdrop is not None:
        subject = np.linalg.norm(rgb - backdrop, axis=2) >= 2 * BACKDROP_TOLERANCE
        if 0.01 <= subject.mean() <= 0.95:
            return subject.astype(np.float64), True
    return _CENTRE_WEIGHTS, False


def _shared(position: np.ndarray, bins: int, circular: bool = False):
    """Each value's two nearest bins and its share of the upper one (positions in bin units, centres at k)."""
    if circular:
        lower = np.floor(position).astype(int)
        return lower % bins, (lower + 1) % bins, position - lower
    position = np.clip(position, 0, bins - 1)
    lower = np.minimum(np.floor(position).astype(int), bins - 1)
    return lower, np.minimum(lower + 1, bins - 1), position - lower


def _colour_histogram(small: Image.Image, weights: np.ndarray) -> np.ndarray:
    hsv = np.asarray(small.convert("HSV"), dtype=np.float64) / 255.0
    hue, saturation, value = hsv[..., 0] * (255 / 256), hsv[..., 1], hsv[..., 2]
    value = np.clip(value / max(float(np.percentile(value, 98)), 0.2), 0, 1)  # exposure: the photo's own white
    grey = (saturation < GREY_SATURATION) | (value < GREY_DARK)
    histogram = np.zeros(HUE_BINS * SATURATION_BINS + GREY_BINS)
    h_low, h_high, h_share = _shared(hue * HUE_BINS - 0.5, HUE_BINS, circular=True)
    s_low, s_high, s_share = _shared((saturation - GREY_SATURATION) / (1 - GREY_SATURATION) * SATURATION_BINS - 0.5,
                                     SATURATION_BINS)
    colour = ~grey
    for h_bin, h_weight in ((h_low, 1 - h_share), (h_high, h_share)):
        for s_bin, s_weight in ((s_low, 1 - s_share), (s_high, s_share)):
            np.add.at(histogram, (h_bin * SATURATION_BINS + s_bin)[colour], (weights * h_weight * s_weight)[colour])
    v_low, v_high, v_share = _shared(value * GREY_BINS - 0.5, GREY_BINS)
    for v_bin, v_weight in ((v_low, 1 - v_share), (v_high, v_share)):
        np.add.at(histogram, (HUE_BINS * SATURATION_BINS + v_bin)[grey], (weights * v_weight)[grey])
    return histogram / max(histogram.sum(), 1e-9)


def _edge_histogram(grey: np.ndarray, weights: np.ndarray) -> np.ndarray:
    dy, dx = np.gradient(grey)
    strength = np.hypot(dx, dy) * weights
    direction = (np.arctan2(dy, dx) % np.pi) / np.pi * ORIENTATION_BINS
    low, high, share = _shared(direction, ORIENTATION_BINS, circular=True)
    histogram = np.bincount(low.ravel(), (strength * (1 - share)).ravel(), ORIENTATION_BINS) \
        + np.bincount(high.ravel(), (strength * share).ravel(), ORIENTATION_BINS)
    return histogram / max(histogram.sum(), 1e-9)


def describe(image: Image.Image) -> Descriptor:
    small = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX)
    weights, on_backdrop = _subject_weights(np.asarray(small, dtype=np.float64))
    grey = np.asarray(small.convert("L"), dtype=np.float64)
    return Descriptor(_colour_histogram(small, weights), _edge_histogram(grey, weights), on_backdrop)


def distance(a: Descriptor, b: Descriptor) -> float:
    """0 (alike) to 1: COLOUR_WEIGHT of the colour histograms' total variation, the rest the edge directions'."""
    colour = 0.5 * float(np.abs(a.colour - b.colour).sum())
    edges = 0.5 * float(np.abs(a.edges - b.edges).sum())
    return COLOUR_WEIGHT * colour + (1 - COLOUR_WEIGHT) * edges


def outlying_photos(names: Sequence[str], images: Sequence[Image.Image], ratio: float = OUTLIER_RATIO,
                    margin: float = OUTLIER_MARGIN) -> Likeness:
    """Which of the photos stand apart from a tight majority (see the module's docstring); none under MIN_PHOTOS."""
    n = len(images)
    if n < MIN_PHOTOS:
        return Likeness([], 0.0, {})
    descriptors = [describe(image) for image in images]
    pairwise = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            pairwise[i, j] = pairwise[j, i] = distance(descriptors[i], descriptors[j])
    typical = [float(np.median(np.delete(pairwise[i], i))) for i in range(n)]
    order = sorted(range(n), key=lambda i: typical[i])
    core = order[:max(3, -(-n // 2))]
    spread = float(np.median([pairwise[i, j] for k, i in enumerate(core) for j in core[k + 1:]]))
    distances = {names[i]: float(np.median(pairwise[i, core])) for i in order[len(core):]}
    outliers = [name for name, far in distances.items() if far > ratio * spread and far - spread > margin]
    return Likeness([name for name in names if name in outliers], spread, distances)
