"""The dataset doctor: look at a set of training photos the way DreamBooth practice does, and say what to fix.

`diagnose(source, kind="object")` reads the photos (through `data.read_images`) and returns a
`DoctorReport` with structured `Finding`s: severity, file, what is wrong and what to do. Precision comes
first: a warning on a good photo teaches the user to ignore the doctor, so each check speaks only when its
measurement is clear, and the subject checks only when the subject was found with confidence. Checks:

- count (within the kind's recommended_photos, subject.py), resolution (below the training size means the
  model learns upscaling blur), transparency (the fill colour becomes part of the subject);
- blur: fine detail relative to coarser detail in the sharpest region of the photo, at the size training will
  see it (doctor_sharpness.py). A ratio, so darkening a photo does not change it; the sharpest region counts, so
  a subject in focus before a soft background is sharp (bokeh is a feature);
- exposure where it matters (doctor_exposure.py): on the subject when it stands out of its set (a white sheet, a
  dark garden, a grey backdrop are choices), else on the frame without a plain backdrop and at its centre; the
  finding says whether the subject itself or the whole photo is too dark or burnt out;
- letterbox/pillarbox bars that the centre crop would keep (`data.find_bars`);
- near-duplicates (doctor_duplicates.py): perceptual hashes of several crops of each photo and of its mirror
  image find candidates, so a mirrored copy (exactly what training's flip augmentation makes) and a slightly
  reframed burst shot are caught; the aligned content must then match everywhere, so another pose of the same
  character on the same plain backdrop is not a duplicate;
- subject too small, or cut by the centre crop: a saliency map from colour contrast with the photo's border
  (doctor_regions.py), trusted only when the border is a plain background and the salient pixels form one blob
  (`Subject.confidence`);
- style sets: one object repeating across photos (the model would learn the object as "the style");
- one subject: photos that stand apart from a tight majority in colour and edge directions (photo_likeness.py),
  e.g. an astronaut, a cat and a cup among five photos of a toy robot.

Thresholds and their measured false-positive and miss rates on real photos: docs/doctor.md.
Everything is numpy on one copy of each photo at the training size: 20 phone photos are checked in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from .data import DatasetReport, ImageRecord, find_bars, read_images
from .doctor_duplicates import (  # noqa: F401 (the doctor's API: tests and callers import these from here)
    CROP_DUPLICATE_BITS,
    PHASH_DUPLICATE_BITS,
    SAME_CONTENT_DIFFERENCE,
    crop_hashes,
    hamming,
    near_duplicate_groups,
    perceptual_hash,
    same_shot,
)
from .doctor_exposure import (  # noqa: F401
    BLOWN_FRACTION,
    BRIGHT_MEAN,
    COLOUR_CLIPPED_FRACTION,
    DARK_HIGHLIGHT,
    DARK_MEAN,
    SUBJECT_BURNT_FRACTION,
    SUBJECT_DARK_HIGHLIGHT,
    Exposure,
    exposure,
)
from .doctor_regions import (  # noqa: F401
    BACKDROP_TOLERANCE,
    PLAIN_BACKDROP_BORDER,
    Subject,
    find_subject,
    plain_backdrop,
    subject_region,
)
from .doctor_sharpness import BLUR_THRESHOLD, sharpness
from .errors import ConfigError
from .subject import DEFAULT_KIND, SUBJECT_KINDS, recipe

SEVERITIES = ("error", "warning", "info")  # error: training cannot use this; warning: hurts results; info: FYI

MIN_BAR_SHARE = 0.03  # bars covering this share of the training square are learned as part of the subject
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
    if light.verdict:
        add(Finding("warning", "exposure", light.message(), light.advice(), name))
    subject = find_subject(working)
    report.measurements[name] = {"sharpness": round(sharp, 3), **light.measurements(),
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
            "warning", "duplicates", f"{', '.join(group)} are near-duplicates (the same shot, perhaps mirrored, "
            "re-encoded or slightly reframed).", "Keep one: copies add no new view and push the model to reproduce "
            "that photo exactly (a mirrored copy adds nothing a flip could not; --random-flip makes such copies "
            "itself)."))


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
