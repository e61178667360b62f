"""Near-duplicates: the same *shot*, not the same subject (the dataset doctor's `duplicates` check, doctor.py).

Two steps:
1. Candidates, by perceptual hashes (pHash) of the whole photo and of 11 crops of it and of its mirror image, so a
   mirrored copy (exactly what training's flip augmentation makes), a reframed burst shot and a zoomed copy are
   found. pHash sees only the coarse layout, so on a plain backdrop two poses of one cartoon character (the arms
   and the face differ, the silhouette hardly) hash alike: a candidate is not yet a duplicate.
2. The content, aligned: the two matching crops are brought onto each other (scale searched, then refined to 1%;
   shift by phase correlation, to a fraction of a pixel), the second one's brightness and contrast fitted to the
   first, and compared over the part both show at 128 px, in 6x6 blocks at every position, each pixel against the
   closest of the other's 3x3 neighbours, both ways, so resampling does not count. The same shot matches
   everywhere (re-encoded, reframed, mirrored: every block within SAME_CONTENT_DIFFERENCE of the photo's contrast);
   another pose differs somewhere (an arm, an open mouth, a closed eye), and one such block is enough.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from .data import ImageRecord

# pHash distances (of 64 bits) that make a candidate: between the whole photos, and between crops or mirror images
# (stricter, since many pairs are compared). Loose enough for a copy reframed by 10% on a white backdrop (8 bits),
# since the aligned content decides.
PHASH_DUPLICATE_BITS = 12
CROP_DUPLICATE_BITS = 10
CROP_COLOUR_DIFFERENCE = 8.0  # mean difference (0-255) of 4x4 colour thumbnails of two crops that match
# The largest block difference (mean over 6x6 px at 128 px, over the contrast of the photo between its 1st and 99th
# percentiles) of the same shot. Copies of the regression set (mirrored, re-encoded, reframed by up to 10% with new
# sensor grain, zoomed to 80%) measure 0-0.08; another pose of one character, even one eye closed, 0.19 and more.
SAME_CONTENT_DIFFERENCE = 0.12
ALIGN_SIZE = 128  # px: the aligned crops are compared at this size
_BLOCK, _MARGIN = 6, 6  # px at ALIGN_SIZE: the blocks compared, and the margin left out (content moves in and out)
_SCALES = np.exp(np.linspace(np.log(0.85), np.log(1 / 0.85), 7))  # the crops' scale mismatch searched, then
_REFINE = np.exp(np.array([-0.5, -0.25, 0.25, 0.5]) * np.log(1 / 0.85) / 3)  # within a step of the best
_PAD = 80  # px around the 256 px copy, so a scaled and shifted crop box stays inside
_SEARCH = 64  # px: the size of the copies the scale and shift are searched at


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> int:
    """pHash: 64 bits saying whether each of the 8x8 lowest DCT frequencies of a 32x32 grey copy is above
    their median. Low frequencies survive resizing, recompression and small colour changes."""
    return _bits_to_int(_phash_bits(np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS),
                                               dtype=np.float64)))


def _phash_bits(small: np.ndarray) -> np.ndarray:
    low = (_DCT32 @ small @ _DCT32.T)[:8, :8].flatten()
    return low > np.median(low[1:])  # the DC term (overall brightness) would dominate the median


def _bits_to_int(bits: np.ndarray) -> int:
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


# Crops hashed besides the whole photo, as (left, top, size) fractions: 85% of the frame at nine places, and the
# middle 70%. A burst shot reframed by up to ~10%, or a photo cropped from another, matches one of them.
_CROPS = [(0.0, 0.0, 1.0)] + [(x, y, 0.85) for y in (0.0, 0.075, 0.15) for x in (0.0, 0.075, 0.15)] \
    + [(0.15, 0.15, 0.7)]


def _crop_box(size: tuple[int, int], index: int) -> tuple[float, float, float, float]:
    left, top, side = _CROPS[index]
    w, h = size
    return left * w, top * h, (left + side) * w, (top + side) * h


def _crop(image: Image.Image, index: int) -> Image.Image:
    return image.crop(tuple(round(v) for v in _crop_box(image.size, index)))


def crop_hashes(image: Image.Image) -> np.ndarray:
    """pHash bits (len(_CROPS), 64) of the photo's crops; the first row is the whole photo."""
    grey = image.convert("L")  # a copy, so thumbnail() leaves `image` alone
    grey.thumbnail((256, 256), Image.Resampling.BOX)
    return np.array([_phash_bits(np.asarray(_crop(grey, k).resize((32, 32), Image.Resampling.LANCZOS),
                                            dtype=np.float64)) for k in range(len(_CROPS))])


@dataclass
class _View:
    """One orientation of a photo: a 256 px colour copy, its crops' hashes, and a padded grey copy for alignment."""

    small: Image.Image
    hashes: np.ndarray
    _padded: Image.Image | None = field(default=None, repr=False)

    @property
    def padded(self) -> Image.Image:
        if self._padded is None:
            self._padded = Image.fromarray(np.pad(np.asarray(self.small.convert("L")), _PAD, mode="edge"))
        return self._padded

    def grey(self, box: Sequence[float], size: int) -> np.ndarray:
        """The region `box` (pixels of `small`, may reach _PAD outside it) as a size x size grey array."""
        shifted = tuple(float(v) + _PAD for v in box)
        return np.asarray(self.padded.resize((size, size), Image.Resampling.BILINEAR, box=shifted),
                          dtype=np.float64)


@dataclass
class _Shot:
    """What duplicate search needs of one photo: the photo as is and mirrored."""

    name: str
    view: _View
    mirror: _View

    @classmethod
    def of(cls, record: ImageRecord) -> _Shot:
        small = record.image.convert("RGB")
        small.thumbnail((256, 256), Image.Resampling.BOX)
        mirrored = ImageOps.mirror(small)
        return cls(record.name, _View(small, crop_hashes(small)), _View(mirrored, crop_hashes(mirrored)))

    # The names of the previous version, for code that looks at a shot's parts.
    small = property(lambda self: self.view.small)
    mirrored = property(lambda self: self.mirror.small)
    hashes = property(lambda self: self.view.hashes)
    mirrored_hashes = property(lambda self: self.mirror.hashes)


def _same_colours(a: Image.Image, b: Image.Image, a_crop: int, b_crop: int) -> bool:
    """Whether two matching crops also have the same colours: pHash sees only grey shapes, so two different
    photos laid out alike (a centred object on a plain backdrop) can match in shape but not in colour."""
    def colours(image: Image.Image, index: int) -> np.ndarray:
        return np.asarray(_crop(image, index).resize((4, 4), Image.Resampling.BOX), dtype=np.float64)
    return float(np.abs(colours(a, a_crop) - colours(b, b_crop)).mean()) <= CROP_COLOUR_DIFFERENCE


_WINDOW = np.outer(np.hanning(_SEARCH), np.hanning(_SEARCH))


def _spectrum(a: np.ndarray) -> np.ndarray:
    return np.fft.fft2((a - a.mean()) * _WINDOW)


def _phase_shift(spectrum_a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """The shift (dy, dx), in pixels, that moves `b` onto the image whose spectrum is given, with sub-pixel
    precision, and the height of the phase correlation's peak (1: the same content)."""
    cross = spectrum_a * np.conj(_spectrum(b))
    correlation = np.fft.ifft2(cross / np.maximum(np.abs(cross), 1e-9)).real
    n = correlation.shape[0]
    y, x = np.unravel_index(int(np.argmax(correlation)), correlation.shape)

    def vertex(before: float, at: float, after: float) -> float:
        curve = before - 2 * at + after
        return 0.0 if abs(curve) < 1e-12 else 0.5 * (before - after) / curve

    dy = y + vertex(correlation[(y - 1) % n, x], correlation[y, x], correlation[(y + 1) % n, x])
    dx = x + vertex(correlation[y, (x - 1) % n], correlation[y, x], correlation[y, (x + 1) % n])
    return (dy - n if dy > n / 2 else dy), (dx - n if dx > n / 2 else dx), float(correlation[y, x])


def _aligned_box(a: _View, a_box, b: _View, b_box) -> list[float] | None:
    """`b_box` moved and scaled so that its content lies on `a_box`'s, or None when no alignment is found."""
    spectrum = _spectrum(a.grey(a_box, _SEARCH))
    cx, cy = (b_box[0] + b_box[2]) / 2, (b_box[1] + b_box[3]) / 2
    half_w, half_h = (b_box[2] - b_box[0]) / 2, (b_box[3] - b_box[1]) / 2
    best, best_peak, best_scale = None, 0.0, 1.0

    def attempt(scale: float) -> None:
        nonlocal best, best_peak, best_scale
        box = [cx - half_w * scale, cy - half_h * scale, cx + half_w * scale, cy + half_h * scale]
        dy, dx, peak = _phase_shift(spectrum, b.grey(box, _SEARCH))
        if abs(dy) <= _SEARCH / 6 and abs(dx) <= _SEARCH / 6 and peak > best_peak:
            step_x, step_y = (box[2] - box[0]) / _SEARCH, (box[3] - box[1]) / _SEARCH
            best, best_peak, best_scale = [box[0] - dx * step_x, box[1] - dy * step_y, box[2] - dx * step_x,
                                           box[3] - dy * step_y], peak, scale

    for scale in _SCALES:
        attempt(scale)
    for factor in _REFINE * best_scale if best is not None else ():  # a 1% scale error is a pixel at the edge
        attempt(factor)
    return best


def _inside(box: Sequence[float], size: tuple[int, int], n: int) -> tuple[slice, slice]:
    """The rows and columns of an n x n copy of `box` that show the photo itself (not the padding around it)."""
    def span(lo: float, hi: float, length: int) -> slice:
        step = (hi - lo) / n
        first = int(np.ceil((0 - lo) / step - 0.5)) if lo < 0 else 0
        last = int(np.floor((length - lo) / step - 0.5)) + 1 if hi > length else n
        return slice(max(0, first), min(n, last))
    return span(box[1], box[3], size[1]), span(box[0], box[2], size[0])


def content_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The largest block difference between two aligned grey arrays, relative to `a`'s contrast (see the
    module's docstring): `b`'s brightness and contrast are fitted to `a` first, and each pixel is compared with
    the closest of its 3x3 neighbours in `b` and the other way round, so half a pixel of resampling or
    misalignment does not count."""
    m = _MARGIN
    if min(a.shape) <= 2 * m + _BLOCK:
        return float("inf")
    a, b = a[m:-m, m:-m], b[m:-m, m:-m]
    gain, offset = np.linalg.lstsq(np.stack([b.ravel(), np.ones(b.size)], axis=1), a.ravel(), rcond=None)[0]
    b = gain * b + offset
    h, w = a.shape

    def closest(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # each pixel of x against y's 3x3 around it
        padded = np.pad(y, 1, mode="edge")
        return np.min([np.abs(x - padded[dy:dy + h, dx:dx + w]) for dy in range(3) for dx in range(3)], axis=0)

    # Both ways: next to a detailed patch in one, anything in the other finds a close pixel.
    difference = np.maximum(closest(a, b), closest(b, a))
    sums = np.pad(difference.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))  # every block position, not a grid
    k = _BLOCK
    blocks = (sums[k:, k:] - sums[:-k, k:] - sums[k:, :-k] + sums[:-k, :-k]) / (k * k)
    contrast = max(float(np.percentile(a, 99) - np.percentile(a, 1)), 16.0)
    return float(blocks.max() / contrast)


def aligned_difference(a: _View, a_crop: int, b: _View, b_crop: int) -> float:
    """`content_difference` of `a`'s crop and `b`'s matching crop, aligned, over the part both photos show (a
    reframed copy lacks some of the other's edges); infinite when they cannot be aligned."""
    a_box = _crop_box(a.small.size, a_crop)
    b_box = _aligned_box(a, a_box, b, _crop_box(b.small.size, b_crop))
    if b_box is None:
        return float("inf")
    rows, cols = _inside(b_box, b.small.size, ALIGN_SIZE)
    if rows.stop - rows.start < ALIGN_SIZE // 2 or cols.stop - cols.start < ALIGN_SIZE // 2:
        return float("inf")
    return content_difference(a.grey(a_box, ALIGN_SIZE)[rows, cols], b.grey(b_box, ALIGN_SIZE)[rows, cols])


def same_shot(a: _Shot, b: _Shot, max_bits: int = PHASH_DUPLICATE_BITS, max_crop_bits: int = CROP_DUPLICATE_BITS
              ) -> bool:
    """Whether `a` and `b` are the same shot: a candidate (whole-photo pHashes within `max_bits`, or a crop of `a`
    within `max_crop_bits` of a crop of `b` or of its mirror image, with the same colours there) whose aligned
    content matches everywhere."""
    candidates = []
    if int((a.view.hashes[0] != b.view.hashes[0]).sum()) <= max_bits:
        candidates.append((b.view, 0, 0))
    for other in (b.view, b.mirror):
        distances = (a.view.hashes[:, None] != other.hashes[None]).sum(axis=2)
        a_crop, b_crop = (int(i) for i in np.unravel_index(int(np.argmin(distances)), distances.shape))
        if distances[a_crop, b_crop] <= max_crop_bits and _same_colours(a.view.small, other.small, a_crop, b_crop):
            candidates.append((other, a_crop, b_crop))
    seen = set()
    for other, a_crop, b_crop in candidates:
        key = (id(other), a_crop, b_crop)
        if key not in seen:
            seen.add(key)
            if aligned_difference(a.view, a_crop, other, b_crop) <= SAME_CONTENT_DIFFERENCE:
                return True
    return False


def near_duplicate_groups(records: Sequence[ImageRecord], max_bits: int = PHASH_DUPLICATE_BITS,
                          max_crop_bits: int = CROP_DUPLICATE_BITS) -> list[list[str]]:
    """Groups of file names that are the same shot (`same_shot`), linked pairs merged."""
    shots = [_Shot.of(record) for record in records]
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(shots)):
        for j in range(i + 1, len(shots)):
            if root(i) != root(j) and same_shot(shots[i], shots[j], max_bits, max_crop_bits):
                parent[root(j)] = root(i)
    groups: dict[int, list[str]] = {}
    for i, record in enumerate(records):
        groups.setdefault(root(i), []).append(record.name)
    return [names for names in groups.values() if len(names) > 1]
