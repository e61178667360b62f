"""The one image-grid helper: rows of images, each row with an optional label.

The notebook's photo preview, sample and class-image grids, the generate command's grid.png (through
`inference.image_grid`), a published model's sample grid and the evaluation report all draw their grids
with `labelled_grid`.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from .errors import ImageDataError

CHAR_WIDTH, LINE_HEIGHT = 6, 11  # PIL's default bitmap font, in pixels


def labelled_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], cell: int | tuple[int, int] = 128,
                  label_width: int = 0, background: str = "white") -> Image.Image:
    """One row of cells per (label, images); a label is written above its row (or to its left, wrapped in a
    column `label_width` wide). `cell` is a square's side or a (width, height). Rows without images are left
    out; short rows leave the background showing."""
    rows = [(label, list(images)) for label, images in rows if images]
    if not rows:
        raise ImageDataError("There are no images to show.")
    cell_width, cell_height = (cell, cell) if isinstance(cell, int) else cell
    columns = max(len(images) for _, images in rows)
    label_height = 0 if label_width or not any(label for label, _ in rows) else 16
    row_height = cell_height + label_height
    grid = Image.new("RGB", (label_width + columns * cell_width, len(rows) * row_height), background)
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        top = r * row_height
        if label and label_width:
            lines = _wrap(label, max(8, label_width // CHAR_WIDTH - 2))[: max(1, cell_height // LINE_HEIGHT - 1)]
            draw.multiline_text((6, top + 6), "\n".join(lines), fill="black")
        elif label:  # cut what would run past the row
            draw.text((4, top + 2), label[: max(8, columns * cell_width // CHAR_WIDTH)], fill="black")
        for c, image in enumerate(images):
            if image.size != (cell_width, cell_height):
                image = image.resize((cell_width, cell_height), Image.Resampling.LANCZOS)
            grid.paste(image.convert("RGB"), (label_width + c * cell_width, top + label_height))
    return grid


def _wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` characters, broken between words (a longer word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines
