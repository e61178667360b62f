"""Draw the sample subject: five 512x512 photos of one toy robot, made by code so no photo is borrowed.

The robot is chosen to be absent from the toy world the offline model is trained on
(scripts/toyworld.py): world objects are single-coloured balls, cubes, cars, houses and
trees, while the robot is two-coloured (teal body, magenta head) with a yellow antenna and white eyes,
colours the world never uses for a whole object. DreamBooth therefore has something new to learn,
and a colour histogram can tell the robot from anything the base model draws.

Each photo varies background, position, size and tilt. A faint grain on every surface keeps the
pictures sharp to check-images (variance of the Laplacian well above 60) and vanishes when an image
is shrunk to the toy model's 32 px. Deterministic from --seed.

    python sample_data/make_sample_data.py            # writes sample_data/toy_robot/*.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 512
SUPERSAMPLE = 2  # draw at twice the size, then shrink, for smooth but sharp edges
TEAL, MAGENTA, YELLOW, WHITE, DARK = (0, 160, 160), (230, 30, 160), (250, 210, 20), (250, 250, 250), (20, 20, 30)
# One entry per photo: background colour, robot centre (fractions of the frame), height (fraction), tilt degrees.
# Backgrounds are colours of the toy world, so only the robot itself is new to the model.
SHOTS = [
    ((40, 80, 220), (0.50, 0.52), 0.62, 0),  # blue, centred, big
    ((250, 220, 40), (0.34, 0.56), 0.50, -12),  # yellow, left, tilted
    ((240, 240, 240), (0.64, 0.46), 0.56, 10),  # white, right
    ((30, 150, 60), (0.50, 0.60), 0.42, 6),  # green, low, small
    ((20, 20, 20), (0.42, 0.44), 0.66, -6),  # black, upper left, big
]


def robot_parts(height: float) -> list[tuple[str, tuple[int, int, int], list[tuple[float, float]]]]:
    """The robot as (kind, colour, points) in a frame centred on its middle, y pointing down."""
    unit = height / 10.0  # the robot is 10 units tall: antenna 2, head 3, body 5

    def box(x0, y0, x1, y1):
        return [(x0 * unit, y0 * unit), (x1 * unit, y0 * unit), (x1 * unit, y1 * unit), (x0 * unit, y1 * unit)]

    return [
        ("polygon", TEAL, box(-3.0, 0.0, 3.0, 5.0)),  # body
        ("polygon", YELLOW, box(-3.0, 2.0, 3.0, 2.8)),  # belt
        ("polygon", MAGENTA, box(-2.2, -3.0, 2.2, 0.0)),  # head
        ("polygon", YELLOW, box(-0.3, -4.2, 0.3, -3.0)),  # antenna stalk
        ("ellipse", YELLOW, box(-0.8, -5.0, 0.8, -3.6)),  # antenna ball
        ("ellipse", WHITE, box(-1.6, -2.2, -0.4, -1.0)),  # eyes
        ("ellipse", WHITE, box(0.4, -2.2, 1.6, -1.0)),
        ("ellipse", DARK, box(-1.2, -1.9, -0.7, -1.4)),
        ("ellipse", DARK, box(0.8, -1.9, 1.3, -1.4)),
    ]


def _place(points, centre, tilt_degrees, scale):
    """Rotate points about the origin, then move them to `centre`; all in supersampled pixels."""
    angle = math.radians(tilt_degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    return [((x * cos - y * sin) * scale + centre[0], (x * sin + y * cos) * scale + centre[1]) for x, y in points]


def _ellipse_polygon(corners, steps: int = 48):
    """An ellipse inscribed in an axis-aligned box, as a polygon, so it can be tilted like the rest."""
    (x0, y0), _, (x1, y1), _ = corners
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return [(cx + rx * math.cos(2 * math.pi * i / steps), cy + ry * math.sin(2 * math.pi * i / steps))
            for i in range(steps)]


def draw_photo(background, centre, height, tilt, rng: np.random.Generator) -> Image.Image:
    big = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    centre_px = (centre[0] * big, centre[1] * big)
    for kind, colour, corners in robot_parts(height * big):
        points = _ellipse_polygon(corners) if kind == "ellipse" else corners
        draw.polygon(_place(points, centre_px, tilt, 1.0), fill=colour)
    image = image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    grain = rng.normal(0.0, 6.0, size=(SIZE, SIZE, 1))  # the same grain on all three channels: no colour noise
    pixels = np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "toy_robot"), help="folder for the PNGs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for index, (background, centre, height, tilt) in enumerate(SHOTS):
        path = out / f"robot_{index + 1}.png"
        draw_photo(background, centre, height, tilt, rng).save(path)
        print(path)


if __name__ == "__main__":
    main()
