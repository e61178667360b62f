"""The one image-grid helper: rows of images, each row with an optional label (and each image a caption).

The notebook's photo preview, sample and class-image grids, the generate command's grid.png (through
`inference.image_grid`), a published model's sample grid, the labelled sample sheets of a training run and the
evaluation report all draw their grids with `labelled_grid`.

Small images are shown enlarged, never blurred: an image at most half its cell is scaled up by a whole factor
with nearest neighbour (each pixel a k x k block), so the toy model's 32 px pictures stay crisp in a 256 px cell;
`enlarged` does the same for one image (the app's galleries). Image files themselves keep their true size. Labels
and captions are wrapped and shortened between words ("..." marks a cut), never cut inside a word.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from .errors import ImageDataError

CHAR_WIDTH, LINE_HEIGHT = 6, 11  # PIL's default font, in pixels (text is measured; these size empty layouts)
DISPLAY_MIN = 256  # px: smaller images are shown enlarged (by a whole factor) to at least this on their long side
CAPTION_LINES = 3  # at most, under each image; longer captions end in "..."
ELLIPSIS = "..."  # PIL's built-in bitmap font has no single-character ellipsis


def display_scale(size: tuple[int, int], minimum: int = DISPLAY_MIN) -> int:
    """The whole factor that brings an image of `size` to at least `minimum` px on its long side (1: big enough)."""
    return max(1, -(-minimum // max(1, max(size))))


def enlarged(image: Image.Image, minimum: int = DISPLAY_MIN) -> Image.Image:
    """`image` for showing: each pixel repeated as a k x k block (nearest neighbour, a whole factor k) until its
    long side is at least `minimum`; the image itself when it is already that big. Never blurred, never cropped."""
    factor = display_scale(image.size, minimum)
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def labelled_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], cell: int | tuple[int, int] = 128,
                  label_width: int = 0, background: str = "white",
                  captions: Sequence[Sequence[str]] | None = None) -> Image.Image:
    """One row of cells per (label, images); a label is written above its row (or to its left, wrapped in a
    column `label_width` wide). `cell` is a square's side or a (width, height). `captions`, one list per row,
    are written under each image (wrapped, up to CAPTION_LINES lines). Rows without images are left out; short
    rows leave the background showing. Images at most half the cell are enlarged by a whole factor with
    nearest neighbour and centred (`_fit_cell`)."""
    captions = list(captions) if captions is not None else [[] for _ in rows]
    kept = [(label, list(images), list(texts)) for (label, images), texts in zip(rows, captions, strict=True)
            if images]
    if not kept:
        raise ImageDataError("There are no images to show.")
    cell_width, cell_height = (cell, cell) if isinstance(cell, int) else cell
    columns = max(len(images) for _, images, _ in kept)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    label_height = 0 if label_width or not any(label for label, _, _ in kept) else 16
    wrapped = [[_fit_lines(text, cell_width - 6, CAPTION_LINES, measure) for text in texts] for _, _, texts in kept]
    caption_lines = max((len(lines) for row in wrapped for lines in row), default=0)
    caption_height = caption_lines * LINE_HEIGHT + 6 if caption_lines else 0
    row_height = label_height + cell_height + caption_height
    grid = Image.new("RGB", (label_width + columns * cell_width, len(kept) * row_height), background)
    draw = ImageDraw.Draw(grid)
    for r, (label, images, _) in enumerate(kept):
        top = r * row_height
        if label and label_width:
            lines = _fit_lines(label, label_width - 12, max(1, cell_height // LINE_HEIGHT - 1), measure)
            draw.multiline_text((6, top + 6), "\n".join(lines), fill="black")
        elif label:  # one line across the row, shortened between words
            draw.text((4, top + 2), _fit_lines(label, columns * cell_width - 8, 1, measure)[0], fill="black")
        for c, image in enumerate(images):
            left = label_width + c * cell_width
            fitted = _fit_cell(image, cell_width, cell_height)
            grid.paste(fitted.convert("RGB"), (left + (cell_width - fitted.width) // 2,
                                               top + label_height + (cell_height - fitted.height) // 2))
            if c < len(wrapped[r]) and wrapped[r][c]:
                draw.multiline_text((left + 3, top + label_height + cell_height + 3), "\n".join(wrapped[r][c]),
                                    fill="black", spacing=0)
    return grid


def _fit_cell(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` for a cell: at most half the cell, enlarged by the largest whole factor that fits (nearest
    neighbour: small pictures stay sharp, each pixel a block); otherwise resized to the cell (Lanczos)."""
    factor = min(width // max(1, image.width), height // max(1, image.height))
    if factor >= 2:
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    if image.size != (width, height):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def _fit_lines(text: str, width: float, max_lines: int, measure=None) -> list[str]:
    """`text` in at most `max_lines` lines no wider than `width` px, broken between words. What does not fit
    ends the last line with "...", after a whole word; a single word wider than a line is the only thing ever
    cut inside (and marked "..."). `measure` gives a string's width in px (default: CHAR_WIDTH a character)."""
    measure = measure or (lambda s: len(s) * CHAR_WIDTH)
    lines: list[str] = []
    words = text.split()
    for index, word in enumerate(words):
        if lines and measure(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
            continue
        if len(lines) == max_lines:  # no room for another line: end the last one in "..."
            return lines[:-1] + [_ellipsized(lines[-1], words[index:], width, measure)]
        lines.append(word if measure(word) <= width else _cut_word(word, width, measure))
    return lines


def _ellipsized(line: str, rest: list[str], width: float, measure) -> str:
    """`line` followed by "...", dropping its last words until that fits (a lone word is cut and marked)."""
    words = line.split()
    while len(words) > 1 and measure(" ".join(words) + ELLIPSIS) > width:
        words.pop()
    shortened = " ".join(words)
    if measure(shortened + ELLIPSIS) > width:
        return _cut_word(shortened + " " + " ".join(rest), width, measure)
    return shortened + ELLIPSIS


def _cut_word(word: str, width: float, measure) -> str:
    """A word too wide for any line: as much of it as fits, then "..." (at least one character)."""
    kept = word
    while len(kept) > 1 and measure(kept + ELLIPSIS) > width:
        kept = kept[:-1]
    return kept + ELLIPSIS
