"""The dataset doctor: look at a set of training photos the way DreamBooth practice does, and say what to fix.

`diagnose(source, kind="object")` reads the photos (through `data.read_images`) and returns a
`DoctorReport` with structured `Finding`s: severity, file, what is wrong and what to do. Checks:

- count (within the kind's recommended_photos, subject.py), resolution (below the training size means the
  model learns upscaling blur), transparency (the fill colour becomes part of the subject);
- blur: variance of the Laplacian of a grey copy (sharp photos score in the hundreds);
- exposure of the subject (the salient region, else the whole photo): too dark, too bright, or large
  areas clipped to black or white;
- near-duplicates: a DCT perceptual hash (pHash), robust to resizing and small edits;
- subject too small, off-centre, or cut by the centre crop: a saliency map from colour contrast with
  the photo's border (the border is usually background);
- style sets: one object repeating across photos (the model would learn the object as "the style"),
  by hashing the salient region of each photo.

Everything is numpy on thumbnails: a 20-photo set is checked in well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .data import DatasetReport, ImageRecord, read_images
from .errors import ConfigError
from .subject import DEFAULT_KIND, SUBJECT_KINDS, recipe

SEVERITIES = ("error", "warning", "info")  # error: training cannot use this; warning: hurts results; info: FYI

BLUR_THRESHOLD = 60.0  # variance of the Laplacian on a <=512 px grey copy
DARK_MEAN, BRIGHT_MEAN = 50.0, 210.0  # mean luminance (0-255) outside which a photo is badly exposed
CLIPPED_FRACTION = 0.25  # share of pixels at pure black or pure white that means lost detail
PHASH_DUPLICATE_BITS = 8  # of 64: photos this close are the same shot
SUBJECT_MIN_AREA = 0.06  # salient bounding box below this share of the frame: subject too small
SUBJECT_MAX_OFFSET = 0.22  # salient centre further than this (fraction of width/height) from the middle
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


# ---------------------------------------------------------------------------- measurements


def _grey(image: Image.Image, size: int = 512) -> np.ndarray:
    grey = image.convert("L")
    grey.thumbnail((size, size))
    return np.asarray(grey, dtype=np.float64)


def laplacian_variance(image: Image.Image) -> float:
    """Sharpness: variance of the Laplacian of a grey copy at most 512 px wide. Low means blurry."""
    a = _grey(image)
    if min(a.shape) < 3:
        return 0.0
    lap = a[1:-1, :-2] + a[1:-1, 2:] + a[:-2, 1:-1] + a[2:, 1:-1] - 4 * a[1:-1, 1:-1]
    return float(lap.var())


def exposure(image: Image.Image, box: tuple[float, float, float, float] | None = None) -> dict[str, float]:
    """Mean luminance (0-255) and the share of pixels clipped to black (<=3) or white (>=252).

    With `box` (left, top, right, bottom in 0..1), only that region counts: the subject's exposure is what
    matters, and a plain white or black backdrop is not a badly exposed photo.
    """
    a = _grey(image, 256)
    if box is not None:
        h, w = a.shape
        region = a[int(box[1] * h):max(int(box[3] * h), int(box[1] * h) + 1),
                   int(box[0] * w):max(int(box[2] * w), int(box[0] * w) + 1)]
        a = region if region.size else a
    return {"brightness": float(a.mean()), "black_clipped": float((a <= 3).mean()),
            "white_clipped": float((a >= 252).mean())}


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> int:
    """pHash: 64 bits saying whether each of the 8x8 lowest DCT frequencies of a 32x32 grey copy is above
    their median. Low frequencies survive resizing, recompression and small colour changes."""
    small = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ small @ _DCT32.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term (overall brightness) would dominate the median
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def near_duplicate_groups(records: Sequence[ImageRecord], max_bits: int = PHASH_DUPLICATE_BITS) -> list[list[str]]:
    """Groups of file names whose pHashes are within `max_bits` of each other (linked pairs merged)."""
    hashes = [perceptual_hash(r.image) for r in records]
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(records)):
        for j in range(i + 1, len(records)):
            if hamming(hashes[i], hashes[j]) <= max_bits:
                parent[root(j)] = root(i)
    groups: dict[int, list[str]] = {}
    for i, record in enumerate(records):
        groups.setdefault(root(i), []).append(record.name)
    return [names for names in groups.values() if len(names) > 1]


@dataclass
class Subject:
    """Where the salient region of a photo is, in fractions of the frame."""

    box: tuple[float, float, float, float]  # left, top, right, bottom in 0..1
    centre: tuple[float, float]
    area: float  # box area as a share of the frame
    outside_centre_crop: float  # share of the salient mass a centre square crop would cut off


def find_subject(image: Image.Image, size: int = 64) -> Subject | None:
    """Saliency by contrast with the border: the border of a photo is usually background, so pixels whose
    colour is far from the border's median colour are the subject. Returns None when nothing stands out
    (a busy background or a close-up filling the frame), since then size and position cannot be judged."""
    rgb = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    ring = max(2, size // 16)
    border = np.concatenate([rgb[:ring].reshape(-1, 3), rgb[-ring:].reshape(-1, 3),
                             rgb[:, :ring].reshape(-1, 3), rgb[:, -ring:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    border_spread = np.median(np.linalg.norm(border - background, axis=1))
    distance = np.linalg.norm(rgb - background, axis=2)
    # A 3x3 box blur so single noisy pixels do not count as subject.
    padded = np.pad(distance, 1, mode="edge")
    saliency = sum(padded[dy:dy + size, dx:dx + size] for dy in range(3) for dx in range(3)) / 9.0
    threshold = max(40.0, 3.0 * border_spread)  # colour distance; 40 of ~441 is a clearly visible difference
    mask = saliency > threshold
    share = mask.mean()
    if share < 0.002 or share > 0.9:
        return None
    ys, xs = np.nonzero(mask)
    # 2nd-98th percentiles instead of min/max: a few stray salient pixels should not stretch the box.
    left, right = np.percentile(xs, [2, 98]) / size
    top, bottom = np.percentile(ys, [2, 98]) / size
    right, bottom = right + 1 / size, bottom + 1 / size
    weights = saliency[mask]
    centre = (float((xs * weights).sum() / weights.sum() + 0.5) / size,
              float((ys * weights).sum() / weights.sum() + 0.5) / size)
    # The centre square crop of a w x h photo keeps the middle min(w, h) of its longer side.
    w, h = image.size
    keep = min(w, h) / max(w, h)
    along = xs if w >= h else ys
    lo, hi = (1 - keep) / 2 * size, (1 + keep) / 2 * size
    outside = float(((along < lo) | (along >= hi)).mean())
    return Subject((float(left), float(top), float(right), float(bottom)), centre,
                   float((right - left) * (bottom - top)), outside)


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
    sharpness = laplacian_variance(record.image)
    if sharpness < BLUR_THRESHOLD:
        add(Finding("warning", "blur", f"Looks blurry (sharpness {sharpness:.0f}, sharp photos score over "
                    f"{BLUR_THRESHOLD:.0f}).", "Blur is learned too: replace it with a sharp, in-focus photo.", name))
    subject = find_subject(record.image)
    light = exposure(record.image, subject.box if subject else None)
    if light["brightness"] < DARK_MEAN:
        add(Finding("warning", "exposure", f"Too dark (mean brightness {light['brightness']:.0f}/255).",
                    "Retake it in better light or brighten it; dark photos teach a dark, noisy subject.", name))
    elif light["brightness"] > BRIGHT_MEAN:
        add(Finding("warning", "exposure", f"Too bright (mean brightness {light['brightness']:.0f}/255).",
                    "Retake it with less light or lower exposure; washed-out colours are learned as the subject's.",
                    name))
    clipped = max(light["black_clipped"], light["white_clipped"])
    if clipped > CLIPPED_FRACTION:
        tone = "pure black" if light["black_clipped"] >= light["white_clipped"] else "pure white"
        add(Finding("info", "exposure", f"{clipped:.0%} of the subject's pixels are {tone}: detail is lost there.",
                    "Use a better-exposed photo if that part matters.", name))
    report.measurements[name] = {"sharpness": round(sharpness, 1), **{k: round(v, 3) for k, v in light.items()},
                                 "subject": asdict(subject) if subject else None}
    if subject is None or report.kind == "style":
        return
    if subject.area < SUBJECT_MIN_AREA:
        add(Finding("warning", "subject-size", f"The subject seems small (about {subject.area:.0%} of the frame).",
                    "Crop closer so it fills a good part of the picture; at 512 px a small subject has few pixels "
                    "and the model learns the background instead.", name))
    dx, dy = subject.centre[0] - 0.5, subject.centre[1] - 0.5
    if max(abs(dx), abs(dy)) > SUBJECT_MAX_OFFSET:
        side = ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("top" if dy < 0 else "bottom")
        add(Finding("info", "subject-position", f"The subject seems off-centre (towards the {side}).",
                    "Crop so it sits near the middle: training crops to the centre square.", name))
    if subject.outside_centre_crop > CROP_CUT_FRACTION:
        add(Finding("warning", "subject-crop", f"The centre square crop would cut off about "
                    f"{subject.outside_centre_crop:.0%} of the subject.",
                    "Crop it to a square around the subject yourself, or train with --crop pad.", name))


def _check_duplicates(report: DoctorReport) -> None:
    for group in near_duplicate_groups(report.dataset.images):
        report.findings.append(Finding(
            "warning", "duplicates", f"{', '.join(group)} are near-duplicates (same shot).",
            "Keep one: copies add no new view and push the model to reproduce that photo exactly."))


def _check_style_repeats(report: DoctorReport) -> None:
    """In a style set, the same object in many pictures becomes part of "the style"."""
    regions = []
    for record in report.dataset.images:
        subject = find_subject(record.image)
        if subject is not None:
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
