"""The dataset doctor: look at a set of training photos the way DreamBooth practice does, and say what to fix.

`diagnose(source, kind="object")` reads the photos (through `data.read_images`) and returns a
`DoctorReport` with structured `Finding`s: severity, file, what is wrong and what to do. Precision comes
first: a warning on a good photo teaches the user to ignore the doctor, so each check speaks only when its
measurement is clear, and the subject checks only when the subject was found with confidence. Checks:

- count (within the kind's recommended_photos, subject.py), resolution (below the training size means the
  model learns upscaling blur), transparency (the fill colour becomes part of the subject);
- blur: fine detail relative to coarser detail in the most detailed parts of the photo, at the size training
  will see it. A ratio, so darkening a photo does not change it; the sharpest region counts, so a subject in
  focus before a soft background is sharp;
- exposure of the whole frame, leaving out a plain backdrop (a studio's white or black is not bad exposure);
- letterbox/pillarbox bars that the centre crop would keep (`data.find_bars`);
- near-duplicates: perceptual hashes of several crops of each photo and of its mirror image, so a mirrored copy
  (exactly what training's flip augmentation makes) and a slightly reframed burst shot are caught;
- subject too small, or cut by the centre crop: a saliency map from colour contrast with the photo's border,
  trusted only when the border is a plain background and the salient pixels form one blob (`Subject.confidence`);
- style sets: one object repeating across photos (the model would learn the object as "the style");
- one subject: photos that stand apart from a tight majority in colour and edge directions (photo_likeness.py),
  e.g. an astronaut, a cat and a cup among five photos of a toy robot.

Thresholds and their measured false-positive and miss rates on real photos: docs/doctor.md.
Everything is numpy on one copy of each photo at the training size: 20 phone photos are checked in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .data import DatasetReport, ImageRecord, find_bars, read_images
from .errors import ConfigError
from .subject import DEFAULT_KIND, SUBJECT_KINDS, recipe

SEVERITIES = ("error", "warning", "info")  # error: training cannot use this; warning: hurts results; info: FYI

# Fine-to-coarse detail ratio (sharpness()) below which a photo is soft at the training size. The real photos of
# the regression set measure 1.0-2.0 (also mirrored, re-encoded, +-0.5 EV, downscaled from 2048 px); blurred by
# radius 2 at that size they measure 0.45-0.55, and a 2048 px photo blurred by radius 3 measures 0.6-0.75 at 512.
BLUR_THRESHOLD = 0.85
# Too dark: mean luminance AND the brightest 1% both below these (0-255). Good photos, night shots included, have
# highlights over 150; 2 EV less light brings the set's photos to 120-135.
DARK_MEAN, DARK_HIGHLIGHT = 80.0, 145.0
# Too bright: mean luminance above BRIGHT_MEAN, or BLOWN_FRACTION of the pixels burnt to pure white, or
# COLOUR_CLIPPED_FRACTION with a colour channel at its maximum (a blown-out colour subject is not white). Good photos
# reach 0.38 of the latter with a bright sky; 2 EV too much light gives 0.5-0.75.
BRIGHT_MEAN, BLOWN_FRACTION, COLOUR_CLIPPED_FRACTION = 185.0, 0.3, 0.5
PLAIN_BACKDROP_BORDER = 0.8  # share of the border within BACKDROP_TOLERANCE of one colour: a plain backdrop
BACKDROP_TOLERANCE = 30.0  # RGB distance: the noise and light falloff of a plain wall or paper backdrop
MIN_BAR_SHARE = 0.03  # bars covering this share of the training square are learned as part of the subject
PHASH_DUPLICATE_BITS = 8  # of 64, between the whole photos: the same shot
CROP_DUPLICATE_BITS = 6  # of 64, between crops or mirror images: stricter, since many pairs are compared
SUBJECT_MIN_CONFIDENCE = 0.7  # below this the subject checks say nothing
SUBJECT_MIN_AREA = 0.06  # subject's bounding box below this share of the frame: too small
CROP_CUT_FRACTION = 0.15  # share of the subject outside the centre square: the crop cuts it
STYLE_REPEAT_BITS = 12  # pHash distance between salient regions that counts as "the same object"
STYLE_REPEAT_SHARE = 0.3  # an object in this share of a style set (and at least 3 photos) is a repeat


@dataclass
class Finding:
    """One thing the doctor noticed: how bad, which file (None for the whole set), what, and what to do."""

    severity: str
    check: str
    message: str
    advice: str
    file: str | None = None

    def format(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"[{self.severity}] {where}{self.message} {self.advice}"


@dataclass
class DoctorReport:
    """The photos as read (`dataset`), and the findings, worst first."""

    dataset: DatasetReport
    kind: str
    resolution: int
    findings: list[Finding] = field(default_factory=list)
    measurements: dict[str, dict[str, Any]] = field(default_factory=dict)  # per file: sharpness, brightness, ...

    @property
    def usable(self) -> bool:
        return self.dataset.usable and not any(f.severity == "error" for f in self.findings)

    def by_severity(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    def format(self) -> str:
        lines = [self.dataset.format().split("\nWarnings:")[0]]
        if self.findings:
            lines.append(f"Doctor ({self.kind} set, checked for {self.resolution} px training):")
            lines.extend(f"  - {f.format()}" for f in self.findings)
        else:
            lines.append(f"Doctor ({self.kind} set): no problems found.")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**self.dataset.to_dict(), "kind": self.kind, "resolution": self.resolution, "usable": self.usable,
                "findings": [asdict(f) for f in self.findings], "measurements": self.measurements}


# ---------------------------------------------------------------------------- sharpness


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur of a 2-D array, edges repeated (numpy only: no SciPy at runtime)."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(a.dtype)
    rows = np.pad(a, ((radius, radius), (0, 0)), mode="edge")
    a = sum(t * rows[k:k + a.shape[0]] for k, t in enumerate(taps))
    columns = np.pad(a, ((0, 0), (radius, radius)), mode="edge")
    return sum(t * columns[:, k:k + a.shape[1]] for k, t in enumerate(taps))


def _tile_means(a: np.ndarray, tile: int) -> np.ndarray:
    rows, cols = a.shape[0] // tile, a.shape[1] // tile
    return a[:rows * tile, :cols * tile].reshape(rows, tile, cols, tile).mean(axis=(1, 3)).ravel()


def sharpness(image: Image.Image, resolution: int = 512) -> float:
    """How much of the finest detail survives, at the size training sees the photo (its short side at
    `resolution`; a smaller photo at its own size, where the resolution check speaks for it).

    The energy of the finest band (the photo minus a radius-1 blur) over the next band (radius 1 minus radius 2),
    in the quarter of 32 px tiles with the most detail: in focus, edges carry both bands; blurred, the finest is
    gone. Being a ratio, it does not change when the photo is darkened or has low contrast, and looking at the
    most detailed tiles only, a soft background behind a sharp subject does not count. 0 for a featureless image.
    """
    grey = image.convert("L")
    scale = resolution / min(grey.size)
    if scale < 0.999:
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))),
                           Image.Resampling.LANCZOS)
    a = np.asarray(grey, dtype=np.float32)
    if min(a.shape) < 32:
        return 0.0
    once = _gaussian_blur(a, 1.0)
    twice = _gaussian_blur(once, 3 ** 0.5)  # blurs add in quadrature: 1 then sqrt(3) is a blur of 2
    fine, coarse = _tile_means((a - once) ** 2, 32), _tile_means((once - twice) ** 2, 32)
    detailed = coarse >= np.quantile(coarse, 0.75)
    if coarse[detailed].sum() < 1e-3:
        return 0.0
    return float(np.sqrt(fine[detailed].sum() / coarse[detailed].sum()))


# ---------------------------------------------------------------------------- backdrop and exposure


def _rgb_thumbnail(image: Image.Image, size: int) -> np.ndarray:
    small = image.convert("RGB")
    small.thumbnail((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64)


def _border(rgb: np.ndarray, ring: int) -> np.ndarray:
    return np.concatenate([rgb[:ring].reshape(-1, 3), rgb[-ring:].reshape(-1, 3),
                           rgb[ring:-ring, :ring].reshape(-1, 3), rgb[ring:-ring, -ring:].reshape(-1, 3)])


def plain_backdrop(rgb: np.ndarray) -> np.ndarray | None:
    """The colour of a plain backdrop (a wall, paper, a sheet) around the subject, or None when the border of
    the photo is not one plain colour."""
    border = _border(rgb, max(2, min(rgb.shape[:2]) // 24))
    colour = np.median(border, axis=0)
    agree = (np.linalg.norm(border - colour, axis=1) < BACKDROP_TOLERANCE).mean()
    return colour if agree >= PLAIN_BACKDROP_BORDER else None


def exposure(image: Image.Image) -> dict[str, float]:
    """Brightness of the whole frame (0-255): mean luminance, the brightest 1% (`highlight`), the share of pixels
    burnt to pure white (>= 250) and of pixels with a colour channel burnt out (>= 252), counted without a plain
    backdrop: a studio's white or black backdrop (or a yellow wall) is a choice, and judging it would call every
    such photo badly exposed. The frame is judged whole otherwise, never a guessed subject box."""
    rgb = _rgb_thumbnail(image, 256)
    luminance = rgb @ np.array([0.299, 0.587, 0.114])
    judged = np.ones(luminance.shape, dtype=bool)
    backdrop = plain_backdrop(rgb)
    backdrop_share = 0.0
    if backdrop is not None:
        # Twice the tolerance: a lit backdrop darkens towards its edges, and near-backdrop pixels say little.
        judged = np.linalg.norm(rgb - backdrop, axis=2) >= 2 * BACKDROP_TOLERANCE
        backdrop_share = float(1 - judged.mean())
        if judged.mean() < 0.005:  # nothing but backdrop: judge it all
            judged[:] = True
    values = luminance[judged]
    return {"brightness": float(values.mean()), "highlight": float(np.percentile(values, 99)),
            "white_clipped": float((values >= 250).mean()),
            "colour_clipped": float((rgb.max(axis=2)[judged] >= 252).mean()), "backdrop": round(backdrop_share, 3)}


# ---------------------------------------------------------------------------- duplicates


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
CROP_COLOUR_DIFFERENCE = 8.0  # mean difference (0-255) of 4x4 colour thumbnails of two crops that match


def _crop(image: Image.Image, index: int) -> Image.Image:
    left, top, size = _CROPS[index]
    w, h = image.size
    return image.crop((round(left * w), round(top * h), round((left + size) * w), round((top + size) * h)))


def crop_hashes(image: Image.Image) -> np.ndarray:
    """pHash bits (len(_CROPS), 64) of the photo's crops; the first row is the whole photo."""
    grey = image.convert("L")  # a copy, so thumbnail() leaves `image` alone
    grey.thumbnail((256, 256), Image.Resampling.BOX)
    return np.array([_phash_bits(np.asarray(_crop(grey, k).resize((32, 32), Image.Resampling.LANCZOS),
                                            dtype=np.float64)) for k in range(len(_CROPS))])


@dataclass
class _Shot:
    """What duplicate search needs of one photo: a small copy, its mirror image, and both one's crop hashes."""

    name: str
    small: Image.Image
    mirrored: Image.Image
    hashes: np.ndarray
    mirrored_hashes: np.ndarray

    @classmethod
    def of(cls, record: ImageRecord) -> _Shot:
        small = record.image.convert("RGB")
        small.thumbnail((256, 256), Image.Resampling.BOX)
        mirrored = ImageOps.mirror(small)
        return cls(record.name, small, mirrored, crop_hashes(small), crop_hashes(mirrored))


def _same_colours(a: Image.Image, b: Image.Image, a_crop: int, b_crop: int) -> bool:
    """Whether two matching crops also have the same colours: pHash sees only grey shapes, so two different
    photos laid out alike (a centred object on a plain backdrop) can match in shape but not in colour."""
    def colours(image: Image.Image, index: int) -> np.ndarray:
        return np.asarray(_crop(image, index).resize((4, 4), Image.Resampling.BOX), dtype=np.float64)
    return float(np.abs(colours(a, a_crop) - colours(b, b_crop)).mean()) <= CROP_COLOUR_DIFFERENCE


def same_shot(a: _Shot, b: _Shot, max_bits: int = PHASH_DUPLICATE_BITS, max_crop_bits: int = CROP_DUPLICATE_BITS
              ) -> bool:
    """Whether `a` and `b` are the same shot: whole-photo pHashes within `max_bits`, or a crop of `a` within
    `max_crop_bits` of a crop of `b` or of its mirror image, with the same colours there."""
    if int((a.hashes[0] != b.hashes[0]).sum()) <= max_bits:
        return True
    for other, other_hashes in ((b.small, b.hashes), (b.mirrored, b.mirrored_hashes)):
        distances = (a.hashes[:, None] != other_hashes[None]).sum(axis=2)
        a_crop, b_crop = np.unravel_index(int(np.argmin(distances)), distances.shape)
        if distances[a_crop, b_crop] <= max_crop_bits and _same_colours(a.small, other, a_crop, b_crop):
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
            if same_shot(shots[i], shots[j], max_bits, max_crop_bits):
                parent[root(j)] = root(i)
    groups: dict[int, list[str]] = {}
    for i, record in enumerate(records):
        groups.setdefault(root(i), []).append(record.name)
    return [names for names in groups.values() if len(names) > 1]


# ---------------------------------------------------------------------------- the subject


@dataclass
class Subject:
    """Where the salient region of a photo is, in fractions of the frame, and how sure the finding is."""

    box: tuple[float, float, float, float]  # left, top, right, bottom in 0..1
    centre: tuple[float, float]
    area: float  # box area as a share of the frame
    outside_centre_crop: float  # share of the subject a centre square crop would cut off
    confidence: float  # 0..1: plain border x one blob x not cut by the frame; the checks need SUBJECT_MIN_CONFIDENCE


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
    padded = np.pad(distance, 1, mode="edge")  # a 3x3 box blur: single noisy pixels are not a subject
    saliency = sum(padded[dy:dy + size, dx:dx + size] for dy in range(3) for dx in range(3)) / 9.0
    threshold = max(40.0, 3.0 * float(np.median(border_distance)))  # 40 of ~441: a clearly visible difference
    mask = saliency > threshold
    if not 0.002 <= mask.mean() <= 0.9:
        return None
    blob = _largest_blob(mask)
    blob_share = float(blob.sum() / mask.sum())
    edge = np.zeros(mask.shape, dtype=bool)
    edge[:2], edge[-2:], edge[:, :2], edge[:, -2:] = True, True, True, True
    edge_share = float(blob[edge].mean())
    confidence = plain_share * blob_share * max(0.0, 1.0 - 5.0 * edge_share)
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


def _subject_region_hash(image: Image.Image, subject: Subject) -> int:
    left, top, right, bottom = subject.box
    w, h = image.size
    region = image.crop((int(left * w), int(top * h), max(int(right * w), int(left * w) + 1),
                         max(int(bottom * h), int(top * h) + 1)))
    return perceptual_hash(region)


# ---------------------------------------------------------------------------- the checks


def _check_count(report: DoctorReport) -> None:
    count, (fewest, most) = len(report.dataset.images), recipe(report.kind).recommended_photos
    if count == 0:
        where = report.dataset.source or "the folder"
        report.findings.append(Finding("error", "count", f"No usable image in {where}.",
                                       "Add JPEG or PNG photos (skipped files are listed above with the reason)."))
    elif count < fewest:
        advice = {"object": "Add photos from other angles and on other backgrounds, or the model learns one view "
                            "and copies it.",
                  "person": "Add close-ups and half-body shots with different expressions, light and clothes.",
                  "style": "Add more pictures in the style with different subjects, so the style is what they "
                           "share."}[report.kind]
        report.findings.append(Finding("warning", "count", f"Only {count} photo(s); {fewest}-{most} work best "
                                       f"for a {report.kind}.", advice))
    elif count > most:
        report.findings.append(Finding("info", "count", f"{count} photos: more than {most} rarely helps DreamBooth "
                                       "and makes each step see each photo less often.",
                                       "Keep the sharpest, most varied ones, or raise --max-train-steps."))


def _bar_share(image: Image.Image) -> tuple[float, str]:
    """The share of the training square (centre crop) that letterbox/pillarbox bars fill, and where they are."""
    w, h = image.size
    left, top, right, bottom = find_bars(image)
    side = min(w, h)
    # The centre square keeps the middle `side` pixels of the longer dimension; bars there are cut off in part.
    cut_x, cut_y = (w - side) / 2, (h - side) / 2
    kept_x = max(0.0, left - cut_x) + max(0.0, (w - right) - cut_x)
    kept_y = max(0.0, top - cut_y) + max(0.0, (h - bottom) - cut_y)
    share = 1 - (1 - kept_x / side) * (1 - kept_y / side)
    sides = [side for side, depth in (("top", top), ("bottom", h - bottom), ("left", left), ("right", w - right))
             if depth]
    return share, "at the " + " and ".join(sides) if sides else ""


def _check_image(report: DoctorReport, record: ImageRecord) -> None:
    name, add = record.name, report.findings.append
    w, h = record.original_size
    if min(w, h) < report.resolution:
        how = "much smaller" if min(w, h) < report.resolution // 2 else "smaller"
        add(Finding("warning", "resolution", f"{w}x{h} is {how} than the {report.resolution} px training size, "
                    "so it is upscaled and the model learns the blur.",
                    "Use the original photo (phones shoot 3000+ px) or drop this one.", name))
    if any("transparent" in note for note in record.notes):
        add(Finding("warning", "transparency", "Has transparent areas; they were filled with white, which the model "
                    "learns as part of the subject.", "Use a photo with a real background, or flatten it onto a "
                    "background you want.", name))
    # One copy at the size training sees (short side at the resolution): every measurement below is relative to the
    # frame or made at that size, and a 12 MP photo is not resampled five times.
    working = record.image
    if min(w, h) > report.resolution:
        scale = report.resolution / min(working.size)
        working = working.resize((max(1, round(working.width * scale)), max(1, round(working.height * scale))),
                                 Image.Resampling.LANCZOS)
    bars, where = _bar_share(working)
    if bars >= MIN_BAR_SHARE:
        add(Finding("warning", "bars", f"Has flat bars {where} (about {bars:.0%} of the training square): the model "
                    "learns them as part of the picture.", "Crop them off, or train with --remove-bars.", name))
    sharp = sharpness(working, report.resolution)
    if sharp < BLUR_THRESHOLD:
        add(Finding("warning", "blur", f"Looks soft at {report.resolution} px (detail score {sharp:.2f}; sharp photos "
                    f"score over {BLUR_THRESHOLD:.2f}).",
                    "Blur is learned too: replace it with a sharp, in-focus photo.", name))
    light = exposure(working)
    if light["brightness"] < DARK_MEAN and light["highlight"] < DARK_HIGHLIGHT:
        add(Finding("warning", "exposure", f"Too dark (mean brightness {light['brightness']:.0f}/255, even its "
                    f"brightest parts reach only {light['highlight']:.0f}).",
                    "Retake it in better light or brighten it; dark photos teach a dark, noisy subject.", name))
    elif (light["brightness"] > BRIGHT_MEAN or light["white_clipped"] > BLOWN_FRACTION
          or light["colour_clipped"] > COLOUR_CLIPPED_FRACTION):
        add(Finding("warning", "exposure", f"Too bright (mean brightness {light['brightness']:.0f}/255; "
                    f"{light['colour_clipped']:.0%} of the pixels have a colour burnt out, not counting a plain "
                    "backdrop).",
                    "Retake it with less light or lower exposure; washed-out colours are learned as the subject's.",
                    name))
    subject = find_subject(working)
    report.measurements[name] = {"sharpness": round(sharp, 3), **{k: round(v, 3) for k, v in light.items()},
                                 "bars": round(bars, 3), "subject": asdict(subject) if subject else None}
    if subject is None or subject.confidence < SUBJECT_MIN_CONFIDENCE or report.kind == "style":
        return
    if subject.area < SUBJECT_MIN_AREA:
        add(Finding("warning", "subject-size", f"The subject is small (about {subject.area:.0%} of the frame).",
                    "Crop closer so it fills a good part of the picture; at 512 px a small subject has few pixels "
                    "and the model learns the background instead.", name))
    if max(w, h) > 1.05 * min(w, h) and subject.outside_centre_crop > CROP_CUT_FRACTION:
        dx, dy = subject.centre[0] - 0.5, subject.centre[1] - 0.5
        side = ("left" if dx < 0 else "right") if w >= h else ("top" if dy < 0 else "bottom")
        add(Finding("warning", "subject-crop", f"The subject is towards the {side}: the centre square crop would cut "
                    f"off about {subject.outside_centre_crop:.0%} of it.",
                    "Crop it to a square around the subject yourself, or train with --crop pad.", name))


def _check_duplicates(report: DoctorReport) -> None:
    for group in near_duplicate_groups(report.dataset.images):
        report.findings.append(Finding(
            "warning", "duplicates", f"{', '.join(group)} are near-duplicates (the same shot, perhaps mirrored or "
            "slightly reframed).", "Keep one: copies add no new view and push the model to reproduce that photo "
            "exactly (a mirrored copy adds nothing a flip could not; --random-flip makes such copies itself)."))


def _check_style_repeats(report: DoctorReport) -> None:
    """In a style set, the same object in many pictures becomes part of "the style"."""
    regions = []
    for record in report.dataset.images:
        subject = find_subject(record.image)
        if subject is not None and subject.confidence >= SUBJECT_MIN_CONFIDENCE:
            regions.append((record.name, _subject_region_hash(record.image, subject)))
    reported: set[str] = set()
    for name, region_hash in regions:
        if name in reported:
            continue
        same = [other for other, other_hash in regions if hamming(region_hash, other_hash) <= STYLE_REPEAT_BITS]
        if len(same) >= 3 and len(same) >= STYLE_REPEAT_SHARE * len(report.dataset.images):
            reported.update(same)
            report.findings.append(Finding(
                "warning", "style-repeat", f"The same object seems to appear in {len(same)} of "
                f"{len(report.dataset.images)} pictures ({', '.join(same)}).",
                "A style set should show many different subjects; otherwise the model learns that object as part "
                "of the style. Replace most of them with pictures of other things."))


def _check_one_subject(report: DoctorReport) -> None:
    """Photos that do not look like the others: DreamBooth learns what the photos share."""
    from .photo_likeness import outlying_photos

    records = report.dataset.images
    likeness = outlying_photos([r.name for r in records], [r.image for r in records])
    for name, far in likeness.distances.items():
        if name in report.measurements:
            report.measurements[name]["likeness_distance"] = round(far, 3)
    if likeness.outliers:
        others = len(records) - len(likeness.outliers)
        report.findings.append(Finding(
            "warning", "one-subject", f"{', '.join(likeness.outliers)} "
            f"{'does' if len(likeness.outliers) == 1 else 'do'} not look like the other {others} photos (colours "
            "and shapes far from what those share): the set may not show one subject.",
            "DreamBooth learns whatever all the photos share, so a photo of something else blurs the subject into "
            "it: remove photos that show another thing (keep them if they are the same subject in very different "
            "light or surroundings)."))


_ORDER = {severity: i for i, severity in enumerate(SEVERITIES)}


def diagnose(source: Any, *, kind: str = DEFAULT_KIND, resolution: int = 512) -> DoctorReport:
    """Read `source` (folder, paths, uploads, or a DatasetReport) and check it. Findings are sorted worst first."""
    try:
        recipe(kind)
    except ConfigError:
        raise ConfigError(f"--kind {kind!r}: choose one of {', '.join(SUBJECT_KINDS)} (a thing or a pet, a face, "
                          "an art style).") from None
    dataset = source if isinstance(source, DatasetReport) else read_images(source)
    report = DoctorReport(dataset, kind, resolution)
    _check_count(report)
    for record in dataset.images:
        _check_image(report, record)
    _check_duplicates(report)
    if kind == "style":
        _check_style_repeats(report)
    else:  # a style set is meant to show many different things
        _check_one_subject(report)
    report.findings.sort(key=lambda f: _ORDER[f.severity])
    return report


def check_images(source: Any, resolution: int = 512, kind: str = DEFAULT_KIND) -> DatasetReport:
    """Read `source` and add the doctor's findings to the report's warnings (one line each).

    For code that wants the plain `DatasetReport` with advice attached; `diagnose` gives the findings
    as structured `Finding`s.
    """
    report = source if isinstance(source, DatasetReport) else read_images(source)
    report.warnings.extend(f.format() for f in diagnose(report, kind=kind, resolution=resolution).findings)
    return report
