"""The one image-grid helper: rows of images, each row with an optional label.

The notebook's photo preview, sample and class-image grids, the generate command's grid.png, the
evaluation report and the toy-world checks all draw their grids with `labelled_grid`.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from .errors import ImageDataError


def labelled_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], cell: int = 128, label_width: int = 0,
                  background: str = "white") -> Image.Image:
    """One row of `cell`-pixel squares per (label, images); a label is written above its row (or to its left,
    in a column `label_width` wide). Rows without images are left out."""
    rows = [(label, list(images)) for label, images in rows if images]
    if not rows:
        raise ImageDataError("There are no images to show.")
    columns = max(len(images) for _, images in rows)
    label_height = 0 if label_width or not any(label for label, _ in rows) else 16
    row_height = cell + label_height
    grid = Image.new("RGB", (label_width + columns * cell, len(rows) * row_height), background)
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        top = r * row_height
        if label:
            # ~6 px per character in PIL's default font: cut what would run past the row.
            draw.text((4, top + 2), label[: max(8, (label_width or columns * cell) // 6)], fill="black")
        for c, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell, cell)), (label_width + c * cell, top + label_height))
    return grid
