"""Instance photos: reading them from anywhere, making them RGB, checking them, preparing them.

`read_images(source)` accepts a folder, a list of paths, or uploaded bytes (ipywidgets'
`FileUpload.value`, or `(name, bytes)` pairs) and returns a `DatasetReport`: the usable images
(orientation fixed, converted to RGB, with a note of each conversion) and the skipped files with
the reason. `check_images` adds the dataset doctor's warnings (the checks live in doctor.py);
`prepare_image` crops or pads and resizes to the training resolution.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageDataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}


@dataclass
class ImageRecord:
    """A usable photo: RGB at its original size, with what was done to make it so."""

    name: str
    image: Image.Image
    original_size: tuple[int, int]
    original_mode: str
    notes: list[str] = field(default_factory=list)


@dataclass
class SkippedImage:
    name: str
    reason: str


@dataclass
class DatasetReport:
    """What came out of reading a set of photos, and what to look out for."""

    images: list[ImageRecord] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def usable(self) -> bool:
        return bool(self.images)

    def format(self) -> str:
        """A plain-text report for the terminal and the notebook."""
        lines = [f"{len(self.images)} usable image(s), {len(self.skipped)} skipped" + (f" in {self.source}" if self.source else "")]
        for record in self.images:
            w, h = record.original_size
            extra = f"  ({'; '.join(record.notes)})" if record.notes else ""
            lines.append(f"  ok    {record.name}  {w}x{h} {record.original_mode}{extra}")
        for skipped in self.skipped:
            lines.append(f"  skip  {skipped.name}: {skipped.reason}")
        if self.warnings:
            lines.append("Warnings:")
            lines.extend(f"  - {w}" for w in self.warnings)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "images": [{"name": r.name, "size": list(r.original_size), "mode": r.original_mode, "notes": r.notes}
                       for r in self.images],
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "warnings": self.warnings,
        }


# ---------------------------------------------------------------------------- reading


def _entries(source: Any) -> tuple[list[tuple[str, Any]], str]:
    """(name, path-or-bytes) pairs from a folder, a list of paths, or uploaded files."""
    if isinstance(source, (str, Path)):
        folder = Path(source).expanduser()
        if not folder.exists():
            raise ImageDataError(f"Image folder {str(folder)!r} does not exist. Check the path (it is case-sensitive).")
        if folder.is_file():
            return [(folder.name, folder)], str(folder)
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        return [(p.name, p) for p in files], str(folder)
    if isinstance(source, dict):  # ipywidgets 7 style: {name: {"content": bytes, ...}}
        return [(name, item.get("content", item)) for name, item in source.items()], "uploaded files"
    if isinstance(source, Iterable):
        entries = []
        for item in source:
            if isinstance(item, dict):  # ipywidgets 8 FileUpload.value entries
                entries.append((str(item.get("name", "upload")), item["content"]))
            elif isinstance(item, tuple) and len(item) == 2:
                entries.append((str(item[0]), item[1]))
            else:
                entries.append((Path(item).name, Path(item)))
        return entries, "uploaded files" if entries and not isinstance(entries[0][1], Path) else "given paths"
    raise ImageDataError(f"Cannot read images from a {type(source).__name__}: give a folder, a list of paths or uploads.")


def _to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """RGB with the photo's own orientation; notes say what changed."""
    notes = []
    oriented = ImageOps.exif_transpose(image)
    if oriented is not image and image.getexif().get(0x0112, 1) != 1:
        notes.append("rotated upright from its EXIF orientation")
    image = oriented
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode != "F" and array.max() > 255 else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
        notes.append("16-bit image reduced to 8 bits")
        mode = "L"
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba).convert("RGB")
            notes.append("transparent areas placed on white")
        else:
            image = rgba.convert("RGB")
    elif mode == "CMYK":
        image = image.convert("RGB")
        notes.append("converted from CMYK")
    elif mode in ("L", "1"):
        image = image.convert("RGB")
        notes.append("grayscale, converted to RGB")
    elif mode != "RGB":
        image = image.convert("RGB")
        notes.append(f"converted from {mode}")
    return image, notes


def read_image(name: str, data: Path | bytes | bytearray | memoryview) -> ImageRecord:
    """Decode one photo to RGB. Raises ImageDataError naming the file when it cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            raw = io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else data
            with Image.open(raw) as opened:
                if getattr(opened, "n_frames", 1) > 1:
                    opened.seek(0)
                opened.load()
                original_mode, original_size = opened.mode, opened.size
                image, notes = _to_rgb(opened)
                if getattr(opened, "n_frames", 1) > 1:
                    notes.append("animated: first frame used")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageDataError(f"{name}: too large to open safely (over {Image.MAX_IMAGE_PIXELS} pixels); "
                             "resize it below 8000x8000.") from None
    except Image.UnidentifiedImageError:
        raise ImageDataError(f"{name}: not an image this library can read (or the file is damaged).") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageDataError(f"{name}: unreadable ({error}); the file may be truncated.") from None
    return ImageRecord(name, image, original_size, original_mode, notes)


def read_images(source: Any) -> DatasetReport:
    """Read every image in `source`; skip unusable files with the reason."""
    entries, description = _entries(source)
    report = DatasetReport(source=description)
    for name, data in entries:
        if isinstance(data, Path) and data.suffix.lower() not in IMAGE_EXTENSIONS:
            report.skipped.append(SkippedImage(name, f"not an image file ({data.suffix or 'no extension'})"))
            continue
        try:
            report.images.append(read_image(name, data))
        except ImageDataError as error:
            report.skipped.append(SkippedImage(name, str(error).removeprefix(f"{name}: ")))
    return report


# ---------------------------------------------------------------------------- checking


def check_images(source: Any, resolution: int = 512, kind: str = "object") -> DatasetReport:
    """Read `source` and add the dataset doctor's advice as warnings (one line each).

    The checks live in `doctor.py`; `doctor.diagnose` returns them as structured findings.
    """
    from .doctor import diagnose

    report = source if isinstance(source, DatasetReport) else read_images(source)
    report.warnings.extend(f.format() for f in diagnose(report, kind=kind, resolution=resolution).findings)
    return report


def require_usable(report: DatasetReport) -> DatasetReport:
    """Raise a clear error when no image can be used; otherwise return the report."""
    if report.usable:
        return report
    if report.skipped:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in report.skipped[:5])
        raise ImageDataError(f"No usable image in {report.source}. Skipped: {reasons}. "
                             "Add JPEG or PNG photos of your subject.")
    raise ImageDataError(f"No images found in {report.source}. Put 3-20 JPEG or PNG photos of your subject there.")


# ---------------------------------------------------------------------------- preparing


def prepare_image(image: Image.Image, resolution: int, crop: str = "center") -> Image.Image:
    """A square `resolution` RGB image: centre-cropped, or padded with white to keep the whole photo."""
    image = image.convert("RGB")
    if crop == "pad":
        fitted = ImageOps.contain(image, (resolution, resolution), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (resolution, resolution), (255, 255, 255))
        canvas.paste(fitted, ((resolution - fitted.width) // 2, (resolution - fitted.height) // 2))
        return canvas
    return ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def load_instance_images(source: Any, resolution: int, crop: str = "center") -> tuple[list[Image.Image], DatasetReport]:
    """Prepared training images from `source`, and the report. Raises ImageDataError if none is usable."""
    report = require_usable(read_images(source))
    return [prepare_image(r.image, resolution, crop) for r in report.images], report


def images_to_tensor(images: Sequence[Image.Image]):
    """A float tensor (N, 3, H, W) in [-1, 1], the VAE's input range."""
    import torch

    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
