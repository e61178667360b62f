"""A regression set of real photographs for the dataset doctor, and what it must say about each.

The photos ship inside scikit-image's and scikit-learn's wheels (no download): the astronaut, a cat, a cup of
coffee, a night rocket launch, a motorcycle, a cameraman, a pagoda and a flower. Each is used as is, in variants
that stay good (mirrored alone, re-encoded, slightly reframed, +-0.5 EV, upscaled) and in variants with one defect
made the way cameras and editors make it (darkened or overexposed in linear light, blurred at the training size,
letterboxed, shrunk onto a large wall), plus product-like shots on plain white and black backdrops. Deliberate
photography (`deliberate_cases`): subjects cut out of these photos (masks made in code) on high-key sets (white
sheets with folds, a white wall burnt out in the middle) and low-key ones (a grey backdrop lit only in the middle,
a dark garden), photos with their background alone blurred, and the same subjects' own defects there (crushed,
washed out, out of focus). A case lists the checks that must fire; any other warning on it is a false positive.
Duplicate sets include one cartoon character and cut-outs in other poses on one plain backdrop (`pose_cases`).
Sets for the one-subject check (`subject_set_cases`) mix these photos, their crops and the sample robot, with the
photos that must be named.

scikit-image and scikit-learn are test dependencies only (requirements.txt), imported when the photos are first
needed: `pytest.importorskip` them in a test module.

`python -m tests.photo_regression` prints every case's findings and the rates that docs/doctor.md quotes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

TRAINING_SIZE = 384  # most of these photos are 400-640 px: checked for 384 px training, so they are not "small"


@dataclass
class Case:
    """One photo and the checks the doctor must raise on it (empty: a good photo, nothing to say)."""

    name: str
    image: Image.Image
    expected: set[str] = field(default_factory=set)
    resolution: int = TRAINING_SIZE
    kind: str = "object"


@dataclass
class DuplicateCase:
    """A set of photos and the groups of names the doctor must call near-duplicates (none: all distinct)."""

    name: str
    images: dict[str, Image.Image]
    groups: list[set[str]]


@cache
def originals() -> dict[str, Image.Image]:
    """The real photos, RGB, at most 1024 px."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = {"astronaut": data.astronaut(), "cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(),
              "motorcycle": data.stereo_motorcycle()[0], "cameraman": data.camera()}
    samples = load_sample_images()
    for path, array in zip(samples.filenames, samples.images):
        arrays[path.rsplit("/", 1)[-1].removesuffix(".jpg")] = array  # china, flower
    photos = {}
    for name, array in arrays.items():
        image = Image.fromarray(array).convert("RGB")
        image.thumbnail((1024, 1024))
        photos[name] = image
    return photos


# ---------------------------------------------------------------------------- variants, made as a camera would


def _srgb_to_linear(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * np.maximum(v, 0) ** (1 / 2.4) - 0.055)


def exposed(image: Image.Image, stops: float) -> Image.Image:
    """The photo as if shot `stops` EV brighter (positive) or darker: light (linear, not sRGB values) scaled by
    2**stops, then clipped as a sensor clips. One table for the 256 values, since each maps independently."""
    light = _srgb_to_linear(np.arange(256) / 255.0) * 2.0 ** stops
    table = np.round(np.clip(_linear_to_srgb(np.clip(light, 0, 1)), 0, 1) * 255).astype(int).tolist()
    return image.point(table * 3)


def jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def reframed(image: Image.Image, left: float, top: float, size: float = 0.9) -> Image.Image:
    """A crop keeping `size` of each side, starting at (left, top) as fractions: a burst shot, slightly moved."""
    w, h = image.size
    return image.crop((round(left * w), round(top * h), round((left + size) * w), round((top + size) * h)))


def blurred_at(image: Image.Image, radius: float, long_side: int) -> Image.Image:
    """Resized to `long_side` (upscaled if need be, sharply), then blurred by a Gaussian of `radius` there."""
    scale = long_side / max(image.size)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    return resized.filter(ImageFilter.GaussianBlur(radius)) if radius else resized


def letterboxed(image: Image.Image, bars: float, colour=(0, 0, 0), sides: bool = False) -> Image.Image:
    """The photo in a frame of its own size with flat bars making up `bars` of the height (or of the width), saved
    as a JPEG, whose noise the bars then carry."""
    w, h = image.size
    canvas = Image.new("RGB", (w, h), colour)
    # The photo cropped to the shape left between the bars (as a video frame or a phone's "fit" export does).
    inner = ImageOps.fit(image, (round(w * (1 - bars)), h) if sides else (w, round(h * (1 - bars))))
    canvas.paste(inner, ((w - inner.width) // 2, (h - inner.height) // 2))
    return jpeg(canvas, 90)


def _wall(size: tuple[int, int], colour, seed: int) -> Image.Image:
    """A plain wall or floor: one colour, a soft light falloff across it, and sensor noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    falloff = 1.0 - 0.08 * np.linspace(-1, 1, w, dtype=np.float32)[None, :] ** 2 \
        - 0.06 * np.linspace(0, 1, h, dtype=np.float32)[:, None]
    noise = 3 * rng.standard_normal((256, 256, 3), dtype=np.float32)  # one patch tiled: as noisy, and cheaper
    pixels = np.asarray(colour, dtype=np.float32) * falloff[..., None] \
        + np.tile(noise, (h // 256 + 1, w // 256 + 1, 1))[:h, :w]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def on_backdrop(subject: Image.Image, canvas_size: tuple[int, int], colour, share: float,
                centre: tuple[float, float] = (0.5, 0.5), round_cutout: bool = False, seed: int = 0) -> Image.Image:
    """`subject` scaled to `share` of the canvas's area and placed at `centre` on a plain backdrop; with
    `round_cutout`, cut out as a disc (a product shot of a round object) instead of a rectangle."""
    w, h = canvas_size
    canvas = _wall(canvas_size, colour, seed)
    scale = np.sqrt(share * w * h / (subject.width * subject.height))
    small = subject.resize((max(1, round(subject.width * scale)), max(1, round(subject.height * scale))),
                           Image.Resampling.LANCZOS)
    mask = None
    if round_cutout:
        mask = Image.new("L", small.size, 0)
        ImageDraw.Draw(mask).ellipse((0, 0, small.width - 1, small.height - 1), fill=255)
        mask = mask.filter(ImageFilter.GaussianBlur(1.5))
    canvas.paste(small, (round(centre[0] * w - small.width / 2), round(centre[1] * h - small.height / 2)), mask)
    return canvas


def _disc(image: Image.Image, centre: tuple[float, float], radius: float) -> Image.Image:
    """A square crop around a round object (the flower's head, the cup and saucer), for product-like shots."""
    w, h = image.size
    r = radius * min(w, h)
    return image.crop((round(centre[0] * w - r), round(centre[1] * h - r), round(centre[0] * w + r),
                       round(centre[1] * h + r)))


# ---------------------------------------------------------------------------- the cases


SHARP_AND_LIT = ("astronaut", "coffee", "motorcycle", "china", "flower", "cameraman")  # safe to darken or blur


@cache
def photo_cases() -> tuple[Case, ...]:
    photos = originals()
    cases: list[Case] = []

    def own_size(name: str) -> int:  # the cat is 451x300: checked at a size it has
        return min(TRAINING_SIZE, min(photos[name].size))

    # Good photos: nothing to say.
    for name, image in photos.items():
        size = own_size(name)
        cases.append(Case(name, image, resolution=size))
        cases.append(Case(f"{name}-mirrored", ImageOps.mirror(image), resolution=size))
        cases.append(Case(f"{name}-jpeg75", jpeg(image), resolution=size))
        shifted = reframed(image, 0.06, 0.04, 0.94)
        cases.append(Case(f"{name}-reframed", shifted, resolution=min(size, min(shifted.size))))
        cases.append(Case(f"{name}-plus-half-ev", exposed(image, 0.5), resolution=size))
        cases.append(Case(f"{name}-minus-half-ev", exposed(image, -0.5), resolution=size))
    for name in ("astronaut", "motorcycle", "china"):  # big photos: sharp at 512 after downscaling
        cases.append(Case(f"{name}-2048", blurred_at(photos[name], 0, 2048), resolution=512))
        cases.append(Case(f"{name}-2048-blur1", blurred_at(photos[name], 1, 2048), resolution=512))
    flower_head, cup = _disc(photos["flower"], (0.5, 0.42), 0.3), _disc(photos["coffee"], (0.43, 0.38), 0.37)
    cases += [Case("flower-on-white", on_backdrop(flower_head, (900, 700), (250, 250, 250), 0.3, round_cutout=True)),
              Case("flower-on-black", on_backdrop(flower_head, (700, 900), (6, 6, 6), 0.3, round_cutout=True)),
              Case("cup-on-white", on_backdrop(cup, (800, 800), (252, 252, 252), 0.35, round_cutout=True, seed=1)),
              Case("cup-on-black", on_backdrop(cup, (900, 600), (4, 4, 4), 0.3, round_cutout=True, seed=2)),
              Case("astronaut-on-grey-wall", on_backdrop(photos["astronaut"], (800, 800), (150, 145, 140), 0.4))]

    # One defect each.
    for name in SHARP_AND_LIT:
        image = photos[name]
        cases.append(Case(f"{name}-minus-2-ev", exposed(image, -2), {"exposure"}))
        cases.append(Case(f"{name}-minus-3-ev", exposed(image, -3), {"exposure"}))
        cases.append(Case(f"{name}-blur2", blurred_at(image, 2, max(image.size)), {"blur"}))
        cases.append(Case(f"{name}-blur4", blurred_at(image, 4, max(image.size)), {"blur"}))
        cases.append(Case(f"{name}-2048-blur3", blurred_at(image, 3, 2048), {"blur"}, resolution=512))
        cases.append(Case(f"{name}-dark-and-blurred", blurred_at(exposed(image, -2.5), 3, max(image.size)),
                          {"exposure", "blur"}))
    for name in ("astronaut", "coffee", "china", "flower"):
        cases.append(Case(f"{name}-plus-2-ev", exposed(photos[name], 2), {"exposure"}))
    for name in ("coffee", "china", "flower", "motorcycle"):  # landscape: bars top and bottom survive the crop
        cases.append(Case(f"{name}-letterbox-30", letterboxed(photos[name], 0.3), {"bars"}))
        cases.append(Case(f"{name}-letterbox-white-12", letterboxed(photos[name], 0.12, (255, 255, 255)), {"bars"}))
    for name in ("astronaut", "cameraman"):  # square: bars at the sides survive too
        cases.append(Case(f"{name}-pillarbox-25", letterboxed(photos[name], 0.25, sides=True), {"bars"}))
    for index, name in enumerate(("cat", "coffee", "astronaut")):
        cases.append(Case(f"{name}-tiny-on-wall", on_backdrop(photos[name], (1280, 960), (200, 190, 175), 0.035,
                                                              seed=10 + index), {"subject-size"}))
    cases.append(Case("flower-tiny-on-white", on_backdrop(flower_head, (1200, 1200), (250, 250, 250), 0.02,
                                                          round_cutout=True), {"subject-size"}))
    cases.append(Case("flower-at-left-of-wide", on_backdrop(flower_head, (1200, 600), (40, 70, 50), 0.12,
                                                            centre=(0.2, 0.5), round_cutout=True), {"subject-crop"}))
    cases.append(Case("cup-at-top-of-tall", on_backdrop(cup, (600, 1200), (230, 225, 215), 0.12,
                                                        centre=(0.5, 0.2), round_cutout=True), {"subject-crop"}))
    from tests.photo_deliberate import deliberate_cases

    return tuple(cases) + deliberate_cases()


@cache
def duplicate_cases() -> tuple[DuplicateCase, ...]:
    photos = originals()
    distinct = {f"{name}.jpg": image for name, image in photos.items()}
    cases = [DuplicateCase("all-distinct", distinct, [])]
    for name in ("astronaut", "cat", "coffee", "flower", "motorcycle"):
        image = photos[name]
        others = {f"{other}.jpg": photos[other] for other in ("china", "rocket", "cameraman") if other != name}
        cases.append(DuplicateCase(f"{name}-mirrored-pair", {"a.jpg": image, "a-flipped.jpg": ImageOps.mirror(image),
                                                             **others}, [{"a.jpg", "a-flipped.jpg"}]))
        cases.append(DuplicateCase(f"{name}-burst-pair", {"burst1.jpg": reframed(image, 0.0, 0.0),
                                                          "burst2.jpg": jpeg(reframed(image, 0.08, 0.06)), **others},
                                   [{"burst1.jpg", "burst2.jpg"}]))
        cases.append(DuplicateCase(f"{name}-zoomed-pair", {"wide.jpg": image, "zoomed.jpg": reframed(image, 0.1, 0.1,
                                                                                                     0.8), **others},
                                   [{"wide.jpg", "zoomed.jpg"}]))
    # Two halves of one scene, and the same subject on two backdrops: different photos, not duplicates.
    china = photos["china"]
    cases.append(DuplicateCase("halves-of-one-scene", {"left.jpg": china.crop((0, 0, 320, 427)),
                                                       "right.jpg": china.crop((320, 0, 640, 427)),
                                                       "flower.jpg": photos["flower"]}, []))
    flower_head = _disc(photos["flower"], (0.5, 0.42), 0.3)
    cases.append(DuplicateCase("same-subject-new-place", {
        "on-white.jpg": on_backdrop(flower_head, (900, 700), (250, 250, 250), 0.3, round_cutout=True),
        "at-left-on-green.jpg": on_backdrop(flower_head, (900, 700), (40, 70, 50), 0.12, centre=(0.3, 0.5),
                                            round_cutout=True)}, []))
    from tests.photo_deliberate import pose_cases

    return tuple(cases) + pose_cases()


@dataclass
class SubjectSetCase:
    """A set of photos and the names that do not show its subject (empty: one subject throughout)."""

    name: str
    images: dict[str, Image.Image]
    outliers: set[str] = field(default_factory=set)


SAMPLE_ROBOT = Path(__file__).resolve().parent.parent / "sample_data"


def robot_photos() -> dict[str, Image.Image]:
    """The sample subject's five photos (a toy robot on blue, yellow, white, green and black)."""
    return {path.name: Image.open(path).convert("RGB") for path in sorted((SAMPLE_ROBOT / "toy_robot").glob("*.png"))}


def robot_on(backgrounds: list[tuple[int, int, int]], seed: int = 3) -> dict[str, Image.Image]:
    """The same robot drawn by sample_data/make_sample_data.py on other backdrops, in its five poses."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample_data", SAMPLE_ROBOT / "make_sample_data.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    rng = np.random.default_rng(seed)
    return {f"robot-{i}-on-{'-'.join(map(str, colour))}.png":
            maker.draw_photo(colour, *maker.SHOTS[i % 5][1:], rng) for i, colour in enumerate(backgrounds)}


def _pasted(background: Image.Image, subject: Image.Image, share: float, centre=(0.5, 0.5)) -> Image.Image:
    """A round cut-out of `subject` at `share` of a busy photo's area: the same thing somewhere else."""
    w, h = background.size
    scale = np.sqrt(share * w * h / (subject.width * subject.height))
    small = subject.resize((round(subject.width * scale), round(subject.height * scale)), Image.Resampling.LANCZOS)
    mask = Image.new("L", small.size, 0)
    ImageDraw.Draw(mask).ellipse((0, 0, small.width - 1, small.height - 1), fill=255)
    canvas = background.copy()
    canvas.paste(small, (round(centre[0] * w - small.width / 2), round(centre[1] * h - small.height / 2)),
                 mask.filter(ImageFilter.GaussianBlur(1.5)))
    return canvas


@cache
def subject_set_cases() -> tuple[SubjectSetCase, ...]:
    """One subject throughout (variants, crops, exposures of one photo; one toy or cup or flower on many backdrops
    and in busy places; unrelated photos with no majority), and such sets with other photos among them."""
    photos, robots = originals(), robot_photos()
    cases = [SubjectSetCase("robots", robots),
             SubjectSetCase("robots-on-seven-backdrops", robot_on([(200, 40, 40), (140, 60, 200), (250, 140, 30),
                                                                   (128, 128, 128), (240, 240, 240), (20, 20, 20),
                                                                   (40, 80, 220)])),
             SubjectSetCase("all-distinct", {f"{name}.jpg": image for name, image in photos.items()})]
    for name, image in photos.items():
        variants = {f"{name}.jpg": image, f"{name}-mirrored.jpg": ImageOps.mirror(image),
                    f"{name}-jpeg75.jpg": jpeg(image), f"{name}-reframed.jpg": reframed(image, 0.06, 0.04, 0.94),
                    f"{name}-plus-half-ev.jpg": exposed(image, 0.5), f"{name}-minus-half-ev.jpg": exposed(image, -0.5)}
        crops = {f"{name}.jpg": image, f"{name}-zoom80.jpg": reframed(image, 0.1, 0.1, 0.8),
                 f"{name}-zoom60.jpg": reframed(image, 0.2, 0.2, 0.6),
                 f"{name}-left.jpg": reframed(image, 0.0, 0.1, 0.75),
                 f"{name}-right-mirrored.jpg": ImageOps.mirror(reframed(image, 0.25, 0.1, 0.75))}
        cases += [SubjectSetCase(f"{name}-variants", variants), SubjectSetCase(f"{name}-crops", crops),
                  SubjectSetCase(f"{name}-exposures", {f"{name}{stops:+}ev.jpg": exposed(image, stops)
                                                       for stops in (-1, -0.5, 0, 0.5, 1)})]
        others = [other for other in photos if other != name]
        cases += [SubjectSetCase(f"{name}-crops+{other}", {**crops, f"{other}.jpg": photos[other]}, {f"{other}.jpg"})
                  for other in others]
        three = {f"{other}.jpg": photos[other] for other in others[:3]}
        cases.append(SubjectSetCase(f"{name}-variants+3", {**dict(list(variants.items())[:5]), **three}, set(three)))
        cases.append(SubjectSetCase(f"robots+{name}", {**robots, f"{name}.jpg": image}, {f"{name}.jpg"}))
    mixed = {f"{name}.jpg": photos[name] for name in ("astronaut", "cat", "coffee")}
    cases.append(SubjectSetCase("robots+astronaut+cat+coffee", {**robots, **mixed}, set(mixed)))  # issue 30
    cup, flower = _disc(photos["coffee"], (0.43, 0.38), 0.37), _disc(photos["flower"], (0.5, 0.42), 0.3)
    for label, thing in (("cup", cup), ("flower", flower)):
        cases.append(SubjectSetCase(f"{label}-on-backdrops", {
            f"{label}-white.jpg": on_backdrop(thing, (800, 800), (250, 250, 250), 0.35, round_cutout=True, seed=1),
            f"{label}-black.jpg": on_backdrop(thing, (900, 600), (6, 6, 6), 0.3, round_cutout=True, seed=2),
            f"{label}-wall.jpg": on_backdrop(thing, (800, 800), (200, 190, 175), 0.3, round_cutout=True, seed=3),
            f"{label}-green.jpg": on_backdrop(thing, (900, 700), (40, 70, 50), 0.25, centre=(0.4, 0.5),
                                              round_cutout=True, seed=4),
            f"{label}-grey.jpg": on_backdrop(thing, (700, 900), (150, 145, 140), 0.4, round_cutout=True, seed=5)}))
        cases.append(SubjectSetCase(f"{label}-in-places", {
            f"{label}-white.jpg": on_backdrop(thing, (800, 800), (250, 250, 250), 0.35, round_cutout=True, seed=1),
            f"{label}-wall.jpg": on_backdrop(thing, (800, 800), (200, 190, 175), 0.3, round_cutout=True, seed=3),
            **{f"{label}-in-{place}.jpg": _pasted(photos[place], thing, 0.35)
               for place in ("china", "motorcycle", "rocket", "cameraman")}}))
    return tuple(cases)


def score_subject_sets() -> dict:
    """The one-subject check on every SubjectSetCase: photos it should name and missed, photos it named wrongly."""
    from dreambooth_helpers.photo_likeness import outlying_photos

    should, missed, judged, false, sets = [], [], [], [], {}
    for case in subject_set_cases():
        likeness = outlying_photos(list(case.images), list(case.images.values()))
        sets[case.name] = likeness
        for name in case.images:
            label = f"{case.name}: {name}"
            (should if name in case.outliers else judged).append(label)
            if name in case.outliers and name not in likeness.outliers:
                missed.append(label)
            if name not in case.outliers and name in likeness.outliers:
                false.append(label)
    good_sets = [case.name for case in subject_set_cases() if not case.outliers]
    return {"should": should, "missed": missed, "judged": judged, "false": false, "sets": sets,
            "good_sets": good_sets, "good_sets_warned": [name for name in good_sets if sets[name].outliers]}


# ---------------------------------------------------------------------------- scoring


def run_doctor(case: Case):
    """The doctor's per-photo findings for `case` (the count check, about the whole set, left out)."""
    from dreambooth_helpers.data import DatasetReport, ImageRecord
    from dreambooth_helpers.doctor import diagnose

    record = ImageRecord(f"{case.name}.jpg", case.image, case.image.size, "RGB")
    report = diagnose(DatasetReport([record]), kind=case.kind, resolution=case.resolution)
    return [f for f in report.findings if f.check != "count"], report


PHOTO_CHECKS = ("resolution", "transparency", "bars", "blur", "exposure", "subject-size", "subject-crop")
# Cases where the doctor is known to stay silent although the case expects a finding; docs/doctor.md lists them.
# The dahlia 2 EV too bright: its red channel is clipped on 92% of it, two channels on only 5% (docs/doctor.md).
KNOWN_MISSES = {("flower-plus-2-ev", "exposure")}


def photo_kind(name: str) -> str:
    """The kind of photography a case shows, for the rates per kind (the held-out set's false warnings were on
    high-key, low-key and shallow depth of field photos)."""
    kinds = {"high-key": "high-key", "low-key": "low-key", "bokeh": "bokeh", "soft-scene": "bokeh",
             "night-garden": "low-key"}
    return next((kind for part, kind in kinds.items() if part in name), "other")


def score() -> dict:
    """Per check: the cases where it should fire and the ones it missed, the cases where it should not and the
    ones it fired on anyway; the warnings on good photos (cases expecting nothing), also per `photo_kind`."""
    from dreambooth_helpers.data import DatasetReport, ImageRecord
    from dreambooth_helpers.doctor import near_duplicate_groups

    rows = {check: {"should": [], "missed": [], "judged": [], "false": []} for check in PHOTO_CHECKS + ("duplicates",)}
    good_photos, false_on_good, all_findings, kinds = 0, [], {}, {}
    for case in photo_cases():
        findings, _ = run_doctor(case)
        all_findings[case.name] = findings
        fired = {f.check for f in findings}
        if not case.expected:
            good_photos += 1
            false_on_good += [f"{case.name}: {f.check}" for f in findings if f.severity != "info"]
            kind = kinds.setdefault(photo_kind(case.name), {"good": 0, "false": []})
            kind["good"] += 1
            kind["false"] += [f"{case.name}: {f.check}" for f in findings if f.severity != "info"]
        for check in PHOTO_CHECKS:
            row = rows[check]
            if check in case.expected:
                row["should"].append(case.name)
                if check not in fired:
                    row["missed"].append(case.name)
            else:
                row["judged"].append(case.name)
                if check in fired:
                    row["false"].append(case.name)
    duplicates = rows["duplicates"]
    for case in duplicate_cases():
        records = [ImageRecord(name, image, image.size, "RGB") for name, image in case.images.items()]
        found = [set(group) for group in near_duplicate_groups(DatasetReport(records).images)]
        for group in case.groups:
            duplicates["should"].append(case.name)
            if group not in found:
                duplicates["missed"].append(case.name)
        names = list(case.images)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if not any({a, b} <= group for group in case.groups):
                    duplicates["judged"].append(f"{case.name}: {a} + {b}")
                    if any({a, b} <= group for group in found):
                        duplicates["false"].append(f"{case.name}: {a} + {b}")
    return {"checks": rows, "good_photos": good_photos, "false_on_good": false_on_good, "findings": all_findings,
            "kinds": kinds}


if __name__ == "__main__":
    for case in photo_cases():
        findings, report = run_doctor(case)
        fired = {f.check for f in findings}
        mark = "ok " if fired == case.expected else "BAD"
        m = report.measurements[f"{case.name}.jpg"]
        subject = m["subject"]
        print(f"{mark} {case.name:36s} want {sorted(case.expected)} got {sorted(fired)}  sharp {m['sharpness']:.2f} "
              f"{m.get('exposure_judged', 'frame')} mean {m['brightness']:.0f} hi {m['highlight']:.0f} "
              f"burnt {m.get('burnt', m['white_clipped']):.2f} bars {m['bars']:.2f} "
              f"subject {'-' if not subject else (round(subject['area'], 3), subject['confidence'])}")
    result = score()
    print("| check | should fire | missed | should not fire | fired anyway |")
    for check, row in result["checks"].items():
        print(f"| {check} | {len(row['should'])} | {len(row['missed'])} {row['missed'] or ''} | {len(row['judged'])} "
              f"| {len(row['false'])} {row['false'] or ''} |")
    false_on_good = result["false_on_good"]
    print(f"warnings on good photos: {len(false_on_good)} / {result['good_photos']} {false_on_good}")
    for kind, row in result["kinds"].items():
        print(f"  {kind}: {len(row['false'])} / {row['good']} {row['false'] or ''}")
    sets = score_subject_sets()
    for name, likeness in sets["sets"].items():
        far = ", ".join(f"{photo} {d:.3f}" for photo, d in likeness.distances.items())
        print(f"{name:36s} spread {likeness.spread:.3f} named {likeness.outliers}  outside the core: {far}")
    print(f"| one-subject | {len(sets['should'])} | {len(sets['missed'])} {sets['missed'] or ''} "
          f"| {len(sets['judged'])} | {len(sets['false'])} {sets['false'] or ''} |")
    print(f"good sets warned: {len(sets['good_sets_warned'])} / {len(sets['good_sets'])}")
