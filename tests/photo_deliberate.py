"""Deliberate photography for the dataset doctor's regression set (photo_regression.py, issue 29): subjects cut out
of the shipped real photos (masks made in code) on high-key sets (white sheets with folds, a white wall burnt out in
the middle) and low-key ones (a grey backdrop lit only in the middle, a dark garden), photos with their background
alone blurred, the same subjects' own defects there (crushed, washed out, out of focus), and one cartoon character
drawn in code in several poses, with re-posed cut-outs and true copies among them.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from tests.photo_regression import (
    TRAINING_SIZE,
    Case,
    DuplicateCase,
    _disc,
    _linear_to_srgb,
    _srgb_to_linear,
    _wall,
    exposed,
    jpeg,
    originals,
    reframed,
)

# ---------------------------------------------------------------------------- deliberate photography (issue 29)
# High-key and low-key sets around a well-exposed subject, a background alone out of focus, and one character in
# other poses: good photos a whole-frame judgement wrongly warned about; and their true defects on the same sets.


@cache
def subject_masks() -> dict[str, tuple[Image.Image, Image.Image]]:
    """Subjects in the real photos, each with its mask at its place in the photo (L, 255 inside): the dahlia
    segmented by its colour (orange petals on a blue-green background), the cat's face, the astronaut's head and
    the cup (from above, on its own crop) as ellipses."""
    from scipy import ndimage  # scikit-image's dependency

    photos = originals()
    hsv = np.asarray(photos["flower"].convert("HSV"), dtype=np.float64) / 255
    petals = ((hsv[..., 0] < 50 / 360) | (hsv[..., 0] > 330 / 360)) & (hsv[..., 1] > 0.3) & (hsv[..., 2] > 0.35)
    labels, count = ndimage.label(ndimage.binary_opening(petals, iterations=2))
    head = labels == 1 + int(np.argmax(ndimage.sum(petals, labels, range(1, count + 1))))
    head = ndimage.binary_fill_holes(ndimage.binary_closing(head, iterations=4))
    masks = {"dahlia": (photos["flower"], Image.fromarray(head.astype(np.uint8) * 255))}
    for name, photo, box in (("cat-face", photos["cat"], (0.2, 0.02, 0.9, 1.0)),
                             ("cup", _disc(photos["coffee"], (0.43, 0.38), 0.37), (0, 0, 1, 1)),
                             ("astronaut-head", photos["astronaut"], (0.08, 0.0, 0.52, 0.58))):
        w, h = photo.size
        mask = Image.new("L", photo.size, 0)
        ImageDraw.Draw(mask).ellipse((box[0] * w, box[1] * h, box[2] * w - 1, box[3] * h - 1), fill=255)
        masks[name] = (photo, mask)
    return masks


@cache
def cutouts() -> dict[str, tuple[Image.Image, Image.Image]]:
    """The subjects of `subject_masks`, cut out: each photo and mask cropped to the mask's box."""
    return {name: (photo.crop(mask.getbbox()), mask.crop(mask.getbbox()))
            for name, (photo, mask) in subject_masks().items()}


def _lit(size: tuple[int, int], level, tint=(1.0, 1.0, 1.0), noise: float = 2.5, seed: int = 0) -> Image.Image:
    """A set from a light level per pixel (above 255 burns out, as a high-key set does), tinted, with noise."""
    rng = np.random.default_rng(seed)
    pixels = level[..., None] * np.asarray(tint) + noise * rng.standard_normal((size[1], size[0], 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _radius2(size: tuple[int, int]) -> np.ndarray:
    y, x = np.mgrid[0:size[1], 0:size[0]]
    return ((x / size[0] - 0.5) ** 2 + (y / size[1] - 0.5) ** 2) / 0.5  # 0 at the centre, 1 at the corners


def white_sheets(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """High-key: white bed sheets lit to burn out, with soft grey folds across them (not one plain colour)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    level = np.full(x.shape, 275.0)
    for _ in range(6):
        angle, offset = rng.uniform(0, np.pi), rng.uniform(0, 1)
        width, depth = rng.uniform(0.03, 0.1), rng.uniform(40, 80)
        level -= depth * np.exp(-(((x * np.cos(angle) + y * np.sin(angle) - offset) / width) ** 2))
    return _lit(size, level, (1.0, 0.99, 0.97), seed=seed)


def lit_white_wall(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """High-key: a white wall burnt out in the middle, greying towards the corners."""
    return _lit(size, 272 - 100 * _radius2(size), (1.0, 0.98, 0.95), seed=seed)


def grey_vignette(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Low-key: a grey backdrop lit only in the middle, near black at the corners."""
    return _lit(size, 120 - 100 * _radius2(size), noise=3, seed=seed)


def dark_garden(size: tuple[int, int], scene: str = "china", stops: float = -3.0) -> Image.Image:
    """Low-key: a busy scene in deep shade, a little out of focus."""
    return exposed(ImageOps.fit(originals()[scene], size), stops).filter(ImageFilter.GaussianBlur(1.5))


def placed(cutout: tuple[Image.Image, Image.Image], backdrop: Image.Image, share: float,
           centre: tuple[float, float] = (0.5, 0.5), angle: float = 0.0) -> Image.Image:
    """The cut-out scaled to `share` of the backdrop's area, turned by `angle` degrees, pasted at `centre`."""
    photo, mask = cutout
    if angle:
        photo, mask = (part.rotate(angle, Image.Resampling.BICUBIC, expand=True) for part in cutout)
    w, h = backdrop.size
    scale = np.sqrt(share * w * h / (photo.width * photo.height))
    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    canvas = backdrop.copy()
    canvas.paste(photo.resize(size, Image.Resampling.LANCZOS),
                 (round(centre[0] * w - size[0] / 2), round(centre[1] * h - size[1] / 2)),
                 mask.resize(size, Image.Resampling.BILINEAR))
    return canvas


def background_blurred(photo: Image.Image, mask: Image.Image, radius: float) -> Image.Image:
    """Shallow depth of field: all but the subject (`mask`, photo-sized) blurred by a lens-like disc of `radius`
    px, in linear light; the subject untouched."""
    from scipy import ndimage

    k = int(np.ceil(radius))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    disc = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    light = _srgb_to_linear(np.asarray(photo, dtype=np.float64) / 255)
    soft = np.stack([ndimage.convolve(light[..., c], disc / disc.sum(), mode="reflect") for c in range(3)], axis=2)
    keep = np.asarray(mask.filter(ImageFilter.GaussianBlur(1)), dtype=np.float64)[..., None] / 255
    pixels = keep * np.asarray(photo, dtype=np.float64) + (1 - keep) * _linear_to_srgb(soft) * 255
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def out_of_focus(photo: Image.Image, radius: float, noise: float = 2.5, seed: int = 4) -> Image.Image:
    """The photo as a camera that missed focus takes it: blurred by the lens, then the sensor's noise on top."""
    pixels = np.asarray(photo.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    grain = noise * np.random.default_rng(seed).standard_normal((photo.height, photo.width, 1))
    return jpeg(Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8)), 90)


def _yellow(cutout: tuple[Image.Image, Image.Image]) -> tuple[Image.Image, Image.Image]:
    """The cut-out recoloured a saturated yellow, lit so its red channel clips on 70% of it (a yellow clock)."""
    hsv = np.asarray(cutout[0].convert("HSV"), dtype=np.float64)
    hsv[..., 0], hsv[..., 1] = 36, 235
    hsv[..., 2] = np.clip(hsv[..., 2] * 1.25, 0, 255)
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), cutout[1]


SUBJECTS = ("dahlia", "cat-face", "cup", "astronaut-head")


@cache
def deliberate_cases() -> tuple[Case, ...]:
    """Good photos on deliberate sets (nothing to say), and the subject's own defects there."""
    photos, cases = originals(), []
    for i, name in enumerate(SUBJECTS):
        subject = cutouts()[name]
        cases += [Case(f"{name}-high-key-sheets", placed(subject, white_sheets((900, 700), i), 0.25)),
                  Case(f"{name}-high-key-wall", placed(subject, lit_white_wall((700, 900), i), 0.25)),
                  Case(f"{name}-low-key-vignette", placed(subject, grey_vignette((800, 800), i), 0.3)),
                  Case(f"{name}-low-key-garden",
                       placed(subject, dark_garden((900, 700), ("china", "motorcycle")[i % 2]), 0.2))]
        if name != "cup":  # a shallow depth of field: a soft busy scene behind the sharp subject
            scene = ImageOps.fit(photos[("motorcycle", "astronaut", "china")[i % 3]], (900, 700))
            cases.append(Case(f"{name}-before-soft-scene", placed(subject, scene.filter(ImageFilter.GaussianBlur(2)),
                                                                  0.15)))
            photo, mask = subject_masks()[name]
            cases.append(Case(f"{name}-bokeh", background_blurred(photo, mask, 6),
                              resolution=min(TRAINING_SIZE, min(photo.size))))
        # The subject's own defects, on the same sets: crushed, washed out, out of focus.
        dark, bright = (exposed(subject[0], -2.5), subject[1]), (exposed(subject[0], 2), subject[1])
        cases += [Case(f"{name}-dark-on-sheets", placed(dark, white_sheets((900, 700), 7), 0.25), {"exposure"}),
                  Case(f"{name}-dark-on-grey-wall", placed(dark, _wall((800, 800), (150, 145, 140), 3), 0.3),
                       {"exposure"}),
                  Case(f"{name}-burnt-in-garden", placed(bright, dark_garden((900, 700)), 0.25), {"exposure"}),
                  Case(f"{name}-burnt-on-vignette", placed(bright, grey_vignette((800, 800)), 0.3), {"exposure"}),
                  Case(f"{name}-soft-on-sheets", out_of_focus(placed(subject, white_sheets((900, 700), 8), 0.25), 2.5),
                       {"blur"})]
    yellow = _yellow(cutouts()["dahlia"])
    cases += [Case("yellow-flower-high-key-sheets", placed(yellow, white_sheets((900, 700), 5), 0.25)),
              Case("yellow-flower-low-key-vignette", placed(yellow, grey_vignette((800, 800), 5), 0.25)),
              Case("cat-face-midtone-in-night-garden",  # the whole frame is dark, the subject a mid-tone
                   placed((exposed(cutouts()["cat-face"][0], -0.7), cutouts()["cat-face"][1]),
                          dark_garden((900, 700), "china", -4), 0.3)),
              Case("high-key-set-all-dark", exposed(placed(cutouts()["cup"], lit_white_wall((800, 800)), 0.25), -3),
                   {"exposure"})]
    return tuple(cases)


CHARACTER_POSES = {  # (left arm, right arm) in degrees raised from hanging, the face, the head's tilt
    "waving": (150, 20, "open", 8), "standing": (20, 20, "smile", 0), "cheering": (150, 150, "open", 0),
    "pointing": (20, 90, "smile", 0), "shrugging": (60, 60, "frown", 0), "winking": (20, 20, "wink", 0),
    "surprised": (20, 20, "open", 0), "tilting": (20, 20, "smile", 10)}


def character(pose: str, size=(800, 800), background=(255, 255, 255), seed: int = 0) -> Image.Image:
    """A cartoon character on a plain backdrop, in one of CHARACTER_POSES: outlined limbs, a badge, a face."""
    import math

    left, right, face, tilt = CHARACTER_POSES[pose]
    ink, cloth, skin = (25, 25, 35), (40, 110, 220), (250, 205, 160)
    w, h = size[0] * 2, size[1] * 2  # drawn at twice the size, then shrunk: smooth, sharp edges
    image = Image.new("RGB", (w, h), background)
    draw, u, line = ImageDraw.Draw(image), 0.07 * h, max(2, round(0.0056 * h))

    def at(x: float, y: float, ox: float = w / 2, oy: float = 0.52 * h) -> tuple[float, float]:
        return ox + x * u, oy + y * u

    def limb(start, end, hand) -> None:
        draw.line([at(*start), at(*end)], fill=ink, width=round(0.62 * u))
        draw.line([at(*start), at(*end)], fill=cloth, width=round(0.45 * u))
        draw.ellipse([at(end[0] - hand[0], end[1] - hand[1]), at(end[0] + hand[0], end[1] + hand[1])],
                     fill=hand[2], outline=ink, width=line)

    for side in (-1, 1):
        limb((side * 0.8, 2.0), (side * 1.1, 4.4), (0.7, 0.35, (200, 40, 40)))  # legs and shoes
    for side, raised in ((-1, left), (1, right)):
        angle = math.radians(raised)
        limb((side * 1.5, -0.6), (side * (1.5 + 2.6 * math.sin(angle)), -0.6 + 2.6 * math.cos(angle)),
             (0.45, 0.45, skin))
    draw.rounded_rectangle([at(-1.7, -1.0), at(1.7, 2.4)], radius=round(0.8 * u), fill=cloth, outline=ink, width=line)
    draw.rectangle([at(-0.5, 0.2), at(0.5, 0.9)], fill=(250, 210, 30), outline=ink, width=line)
    head = Image.new("RGBA", (round(5 * u), round(5 * u)), (0, 0, 0, 0))
    face_draw, c = ImageDraw.Draw(head), 2.5 * u

    def on_face(x: float, y: float) -> tuple[float, float]:
        return at(x, y, c, c)

    face_draw.ellipse([on_face(-1.9, -1.9), on_face(1.9, 1.9)], fill=skin, outline=ink, width=line)
    face_draw.pieslice([on_face(-1.95, -2.0), on_face(1.95, 1.0)], 180, 360, fill=(120, 70, 30), outline=ink,
                       width=line)
    for side in (-1, 1):
        if face == "wink" and side == 1:
            face_draw.line([on_face(0.35, 0.1), on_face(1.05, 0.1)], fill=ink, width=2 * line)
        else:
            face_draw.ellipse([on_face(side * 0.7 - 0.38, -0.3), on_face(side * 0.7 + 0.38, 0.5)],
                              fill=(255, 255, 255), outline=ink, width=line)
            face_draw.ellipse([on_face(side * 0.7 - 0.15, 0.0), on_face(side * 0.7 + 0.15, 0.35)], fill=ink)
    if face == "open":
        face_draw.ellipse([on_face(-0.45, 0.75), on_face(0.45, 1.45)], fill=(150, 30, 40), outline=ink, width=line)
    elif face == "frown":
        face_draw.arc([on_face(-0.7, 0.95), on_face(0.7, 1.7)], 200, 340, fill=ink, width=2 * line)
    else:
        face_draw.arc([on_face(-0.8, 0.3), on_face(0.8, 1.3)], 20, 160, fill=ink, width=2 * line)
    head = head.rotate(tilt, Image.Resampling.BICUBIC)
    image.paste(head, (round(w / 2 - c), round(0.52 * h - 3.2 * u - c)), head)
    grain = np.random.default_rng(seed).normal(0, 2.0, (size[1], size[0], 1))
    pixels = np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float64) + grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@cache
def pose_cases() -> tuple[DuplicateCase, ...]:
    """One character, or one cut-out, in other poses on the same plain backdrop (distinct photos), and true copies
    of one of those shots among them (mirrored, reframed and re-encoded)."""
    poses = {f"{pose}.png": character(pose, seed=i) for i, pose in enumerate(CHARACTER_POSES)}
    grey = {f"{pose}-on-grey.png": character(pose, (900, 700), (150, 150, 155), seed=i)
            for i, pose in enumerate(("waving", "standing", "cheering", "winking"))}
    copies = {"standing-mirrored.jpg": jpeg(ImageOps.mirror(poses["standing.png"]), 90),
              "standing-reframed.jpg": jpeg(reframed(character("standing", seed=11), 0.06, 0.02, 0.9))}  # a 2nd shot
    wall = lit_white_wall((800, 800))  # one set for every pose of the cut-outs
    cat, cup = cutouts()["cat-face"], cutouts()["cup"]
    reposed = {"cat-upright.jpg": placed(cat, wall, 0.25), "cat-tilted.jpg": placed(cat, wall, 0.25, angle=20),
               "cat-closer-left.jpg": placed(cat, wall, 0.4, (0.42, 0.5), angle=-12),
               "cup-upright.jpg": placed(cup, wall, 0.25), "cup-turned.jpg": placed(cup, wall, 0.25, angle=60),
               "cup-smaller.jpg": placed(cup, wall, 0.15, (0.45, 0.55), angle=-25)}
    return (DuplicateCase("character-poses-on-white", poses, []),
            DuplicateCase("character-poses-on-grey", grey, []),
            DuplicateCase("character-poses-and-copies", {**poses, **copies},
                          [{"standing.png", "standing-mirrored.jpg", "standing-reframed.jpg"}]),
            DuplicateCase("cut-outs-reposed", reposed, []),
            DuplicateCase("cut-out-and-its-copy", {**reposed, "cat-upright-mirrored.jpg": jpeg(ImageOps.mirror(
                reposed["cat-upright.jpg"]))}, [{"cat-upright.jpg", "cat-upright-mirrored.jpg"}]))
