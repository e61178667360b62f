"""Instance photos: reading them from anywhere, making them RGB, checking them, preparing them.

`read_images(source)` accepts a folder, a list of paths, or uploaded bytes (ipywidgets'
`FileUpload.value`, or `(name, bytes)` pairs) and returns a `DatasetReport`: the usable images
(orientation fixed, converted to RGB, with a note of each conversion) and the skipped files with
the reason. `prepare_image` crops or pads and resizes to the training resolution. What is wrong
with a set of photos (blur, duplicates, framing) is judged in doctor.py, which reads through this module.
"""

from __future__ import annotations

import hashlib
import io
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageDataError

try:  # HEIC/HEIF, the iPhone's default format; Pillow itself reads AVIF, WebP and the rest.
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:
    HEIF_SUPPORTED = False

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
ZIP_EXTENSION = ".zip"
# Only decoders for photo formats. Pillow can also open EPS (through Ghostscript) and dozens of
# rare formats; a hostile upload renamed to .jpg must not reach those.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
# Pillow's own decompression-bomb threshold (~9459x9459), enforced here even if a caller raised
# or disabled Pillow's global limit: the size is read from the header and checked before decoding.
MAX_IMAGE_PIXELS = 89_478_485
MAX_FILE_BYTES = 100 * 2**20  # a 50 MP phone JPEG is ~20 MB; beyond this a file is not a photo
MIN_IMAGE_SIDE = 8  # below this there is no subject to see (small images above it get a note)
SMALL_IMAGE_SIDE = 64
MAX_ASPECT_RATIO = 10.0  # a longer strip keeps under a tenth of itself in a square crop
WIDE_ASPECT_RATIO = 3.0
MAX_ZIP_MEMBERS = 1000
MAX_ZIP_TOTAL_BYTES = 1024 * 2**20  # uncompressed, counted as read: a zip bomb stops here


@dataclass
class ImageRecord:
    """A usable photo: RGB at its original size, with what was done to make it so."""

    name: str
    image: Image.Image
    original_size: tuple[int, int]
    original_mode: str
    notes: list[str] = field(default_factory=list)
    digest: str = ""  # sha256 of the file's bytes (set by read_images): the same photo, whatever its name
    caption: str | None = None  # its own training caption (captions.attach_captions); None: the instance prompt


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
        where = f" in {self.source}" if self.source else ""
        lines = [f"{len(self.images)} usable image(s), {len(self.skipped)} skipped{where}"]
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
        return [(str(name), item.get("content", b"") if isinstance(item, dict) else item)
                for name, item in source.items()], "uploaded files"
    if isinstance(source, Iterable):
        entries = []
        for item in source:
            if isinstance(item, dict):  # ipywidgets 8 FileUpload.value entries
                entries.append((str(item.get("name", "upload")), item.get("content", b"")))
            elif isinstance(item, tuple) and len(item) == 2:
                entries.append((str(item[0]), item[1]))
            elif isinstance(item, (str, Path)):
                entries.append((Path(item).name, Path(item)))
            else:
                raise ImageDataError(f"Cannot read an image from a {type(item).__name__}: give paths, "
                                     "(name, bytes) pairs or FileUpload values.")
        return entries, "uploaded files" if entries and not isinstance(entries[0][1], Path) else "given paths"
    raise ImageDataError(f"Cannot read images from a {type(source).__name__}: give a folder, a list of paths "
                         "or uploads.")


# EXIF orientation -> the transpose that turns the stored pixels upright (as ImageOps.exif_transpose does).
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block: the photo is read as stored
        return 1


def _shrunk(image: Image.Image, max_side: int) -> tuple[Image.Image, list[str]]:
    """`image` fitted within `max_side` px, right after decoding: the only full-size copy is the decoded one.
    Modes Pillow cannot resample are converted first (1-bit to gray, palette to RGB(A), 16-bit to 32-bit)."""
    if max(image.size) <= max_side:
        return image, []
    notes = []
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        notes = [] if image.mode == "RGBA" else ["converted from P"]
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image, notes


def _to_rgb(image: Image.Image, orientation: int | None = None) -> tuple[Image.Image, list[str]]:
    """RGB with the photo's own orientation (`orientation`: its EXIF value, read from the file before any
    resizing); notes say what changed. Always a new image, never `image` itself."""
    original = image
    notes = []
    orientation = _orientation(image) if orientation is None else orientation
    if orientation in UPRIGHT:
        image = image.transpose(UPRIGHT[orientation])
        notes.append("rotated upright from its EXIF orientation")
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        peak = 65535.0 if mode != "F" and array.max() > 255 else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(np.rint(array / peak * 255.0), 0, 255).astype(np.uint8), "L")
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
    return (image.copy() if image is original else image), notes


def _read_bytes(name: str, data: Path | bytes | bytearray | memoryview) -> bytes:
    """The file's bytes, refusing empty and oversized files before anything is decoded."""
    if isinstance(data, Path):
        try:
            size = data.stat().st_size
            if 0 < size <= MAX_FILE_BYTES:
                data = data.read_bytes()
        except OSError as error:
            raise ImageDataError(f"{name}: cannot be read ({error.strerror or error}).") from None
    elif isinstance(data, (bytes, bytearray, memoryview)):
        size = len(data)
    else:
        raise ImageDataError(f"{name}: got a {type(data).__name__} instead of a file path or bytes.")
    if size == 0:
        raise ImageDataError(f"{name}: empty file (0 bytes); the copy or upload did not finish, add it again.")
    if size > MAX_FILE_BYTES:
        raise ImageDataError(f"{name}: {size / 2**20:.0f} MB is over the {MAX_FILE_BYTES // 2**20} MB limit for one "
                             "photo; save it as a JPEG of about 2000 px.")
    return bytes(data)


def _is_heif(raw: bytes) -> bool:
    return raw[4:8] == b"ftyp" and raw[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")


def read_image(name: str, data: Path | bytes | bytearray | memoryview, *, max_side: int | None = None,
               max_pixels: int | None = None,
               on_size: Callable[[tuple[int, int]], None] | None = None) -> ImageRecord:
    """Decode one photo to RGB. Raises ImageDataError naming the file when it cannot be used.

    The size in the header is checked before any pixel is decoded: decompression bombs (over `max_pixels`, at
    most MAX_IMAGE_PIXELS), slivers and dots are refused without spending memory on them; `on_size(size)` is
    called then too, and may refuse it by raising ImageDataError. With `max_side` the photo is decoded once, at
    most that size: a JPEG at a reduced scale straight from the file, other formats fitted right after decoding,
    so no full-size RGB copy is ever made. `original_size` is the size in the file either way.
    """
    raw = _read_bytes(name, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data" and the like: the photo still reads
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS) as opened:
                _check_size(name, opened.size, max_pixels)
                if on_size is not None:
                    on_size(opened.size)
                frames = getattr(opened, "n_frames", 1)
                if frames > 1:
                    opened.seek(0)
                original_mode, original_size = opened.mode, opened.size
                orientation = _orientation(opened)
                if max_side and opened.format in ("JPEG", "MPO"):
                    opened.draft(opened.mode, (max_side, max_side))  # DCT scaling: 1/2 to 1/8 of the pixels
                opened.load()
                shrunk, notes = _shrunk(opened, max_side) if max_side else (opened, [])
                image, more_notes = _to_rgb(shrunk, orientation)
                notes += more_notes
                if frames > 1 and opened.format != "MPO":  # MPO: a camera JPEG with a preview, not a sequence
                    kind = "animated" if opened.format in ("GIF", "WEBP", "PNG", "AVIF") else "multi-page"
                    notes.append(f"{kind} ({frames} frames): first frame used")
    except ImageDataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageDataError(f"{name}: too large to open safely (over {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels); "
                             "resize it to about 2000 px on the long side.") from None
    except Image.UnidentifiedImageError:
        if _is_heif(raw) and not HEIF_SUPPORTED:
            raise ImageDataError(f"{name}: a HEIC photo, and pillow-heif is not installed. Run "
                                 "`pip install pillow-heif`, or export the photo as JPEG.") from None
        raise ImageDataError(f"{name}: not a photo format this library reads (JPEG, PNG, WebP, HEIC, AVIF, GIF, "
                             "BMP, TIFF), or the file is damaged.") from None
    except (OSError, SyntaxError, EOFError) as error:
        raise ImageDataError(f"{name}: unreadable ({error}); the file may be truncated or damaged.") from None
    except Exception as error:  # decoders meet hostile bytes; any failure means "damaged file"
        raise ImageDataError(f"{name}: damaged or not a real image ({type(error).__name__}: {error}).") from None
    if max(image.size) > WIDE_ASPECT_RATIO * min(image.size):
        w, h = image.size
        notes.append(f"very {'wide' if w > h else 'tall'} ({max(w, h) / min(w, h):.1f}:1): a center crop keeps only "
                     "the middle; crop around the subject or use --crop pad")
    if min(image.size) < SMALL_IMAGE_SIDE:
        notes.append(f"very small ({image.width}x{image.height}): upscaled, so it will look blurry")
    return ImageRecord(name, image, original_size, original_mode, notes)


def _check_size(name: str, size: tuple[int, int], max_pixels: int | None = None) -> None:
    """Refuse, from the header alone, images too large to decode safely or too thin to hold a subject."""
    width, height = size
    limit = min(max_pixels or MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS)
    if width * height > limit:
        raise ImageDataError(f"{name}: {width}x{height} ({width * height / 1e6:.0f} megapixels) is too large to open "
                             f"safely (the limit is {limit / 1e6:.0f} megapixels per photo); resize it to about "
                             "2000 px on the long side.")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageDataError(f"{name}: {width}x{height} is too small to show a subject; use photos of 512 px or more.")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageDataError(f"{name}: {width}x{height} is a strip ({max(width, height) / min(width, height):.0f}:1); "
                             "a square crop would keep almost nothing. Crop it around the subject.")


def _is_hidden(name: str) -> bool:
    """Dot files and macOS metadata (`__MACOSX/`, `._photo.jpg`) that zips and uploads bring along."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return any(part.startswith(".") and part not in (".", "..") or part == "__MACOSX" for part in parts)


def _is_zip(name: str, data: Any) -> bool:
    if isinstance(data, Path):
        return data.suffix.lower() == ZIP_EXTENSION
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return False
    return name.lower().endswith(ZIP_EXTENSION) or bytes(data[:4]) in (b"PK\x03\x04", b"PK\x05\x06")


def _zip_members(name: str, data: Path | bytes, report: DatasetReport) -> Iterator[tuple[str, bytes]]:
    """The files in a zip, read into memory and never written to disk, so no member name can reach a
    path outside the zip. Unsafe names, nested zips and anything over the size limits are skipped."""
    try:
        archive = zipfile.ZipFile(data if isinstance(data, Path) else io.BytesIO(bytes(data)))
        members = [info for info in archive.infolist() if not info.is_dir()]
    except Exception as error:  # zipfile raises many types on hostile bytes
        report.skipped.append(SkippedImage(name, f"not a readable zip file ({type(error).__name__}: {error})"))
        return
    total = 0
    with archive:
        for index, info in enumerate(members):
            member_name = f"{name}/{info.filename}"
            path = PurePosixPath(info.filename.replace("\\", "/"))
            if _is_hidden(info.filename):
                continue
            if index >= MAX_ZIP_MEMBERS:
                report.skipped.append(SkippedImage(name, f"more than {MAX_ZIP_MEMBERS} files: the rest was not read"))
                return
            if path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
                report.skipped.append(SkippedImage(member_name, "unsafe path inside the zip: not read"))
                continue
            if path.suffix.lower() == ZIP_EXTENSION:
                report.skipped.append(SkippedImage(member_name, "a zip inside the zip: unzip it and add the photos"))
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                report.skipped.append(SkippedImage(member_name, f"not an image file ({path.suffix or 'no extension'})"))
                continue
            if info.flag_bits & 0x1:
                report.skipped.append(SkippedImage(member_name, "password-protected in the zip: not read"))
                continue
            try:
                with archive.open(info) as member:
                    content = member.read(MAX_FILE_BYTES + 1)  # the declared size may lie; count what comes out
            except Exception as error:  # damaged entries raise BadZipFile, zlib.error, EOFError...
                report.skipped.append(SkippedImage(member_name, f"damaged inside the zip ({type(error).__name__})"))
                continue
            total += len(content)
            if total > MAX_ZIP_TOTAL_BYTES:
                report.skipped.append(SkippedImage(name, f"unzips to over {MAX_ZIP_TOTAL_BYTES // 2**20} MB: the "
                                                         "rest was not read"))
                return
            yield member_name, content


def _expand_zips(entries: list[tuple[str, Any]], report: DatasetReport) -> Iterator[tuple[str, Any]]:
    for name, data in entries:
        if _is_hidden(name):
            continue
        if _is_zip(name, data):
            yield from _zip_members(name, data, report)
        else:
            yield name, data


class TooManyPixels(ImageDataError):
    """The photos together are over the pixel limit of one upload (read_images' `max_total_pixels`)."""


def read_images(source: Any, *, max_side: int | None = None, max_pixels: int | None = None,
                max_total_pixels: int | None = None) -> DatasetReport:
    """Read every image in `source` (zips included); skip unusable files with the reason.

    Outcomes: a photo is used (with notes on what was converted), or skipped with the reason. Hidden
    files and macOS metadata are ignored. A file with exactly the same bytes as an earlier one is
    used once; the copy is listed as skipped. `max_side` and `max_pixels` go to read_image (decode at most
    that size; a lower per-photo limit). `max_total_pixels` bounds the photos' pixels all together, counted
    from their headers before each is decoded: going over raises TooManyPixels.
    """
    entries, description = _entries(source)
    report = DatasetReport(source=description)
    first_with_digest: dict[str, str] = {}
    total_pixels = 0

    def count(name: str, size: tuple[int, int]) -> None:
        nonlocal total_pixels
        total_pixels += size[0] * size[1]
        if max_total_pixels is not None and total_pixels > max_total_pixels:
            raise TooManyPixels(f"The photos hold over {max_total_pixels / 1e6:.0f} megapixels in all, the limit for "
                                f"one upload ({name} goes over it): use fewer or smaller photos (about 2000 px on "
                                "the long side is plenty).")
    for name, data in _expand_zips(entries, report):
        if isinstance(data, Path) and data.suffix.lower() not in IMAGE_EXTENSIONS:
            report.skipped.append(SkippedImage(name, f"not an image file ({data.suffix or 'no extension'})"))
            continue
        try:
            raw = _read_bytes(name, data)
            digest = hashlib.sha256(raw).hexdigest()
            if digest in first_with_digest:
                report.skipped.append(SkippedImage(name, f"exact duplicate of {first_with_digest[digest]} (used once)"))
                continue
            first_with_digest[digest] = name
            record = read_image(name, raw, max_side=max_side, max_pixels=max_pixels,
                                on_size=lambda size, name=name: count(name, size))
            record.digest = digest
            report.images.append(record)
        except TooManyPixels:
            raise
        except ImageDataError as error:
            report.skipped.append(SkippedImage(name, str(error).removeprefix(f"{name}: ")))
    return report


# ---------------------------------------------------------------------------- checking


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


BAR_TOLERANCE = 12  # 0-255: how far a pixel may stray from the bar's colour (JPEG noise on a flat bar)
MIN_BAR_FRACTION = 0.02  # of the side: thinner uniform edges are a frame line, not a letterbox


def find_bars(image: Image.Image) -> tuple[int, int, int, int]:
    """The part of `image` inside letterbox/pillarbox bars, as a (left, top, right, bottom) pixel box.

    A bar is a run of edge rows (or columns) of one flat colour whose end is a sharp edge across most of the
    frame. That last condition keeps a plain studio backdrop, which fades into the subject only where the
    subject is, from counting as a bar. The whole image is returned when there are none.
    """
    rgb = image.convert("RGB")
    scale = min(1.0, 256 / max(rgb.size))
    small = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.int16)

    def flat_run(lines: np.ndarray) -> tuple[int, float, np.ndarray]:
        """(depth of the run of flat lines at this edge, share of the next line that differs from it, its colour);
        `lines` is (n_lines, length, 3), the first line at the frame's edge."""
        length = len(lines)
        colour = np.median(lines[0], axis=0)
        lines = lines[:int(0.45 * length) + 3]  # a bar deeper than 45% of the frame is not a bar
        off = np.abs(lines - colour).max(axis=2) > BAR_TOLERANCE  # (n_lines, length): pixels not of the bar
        flat = off.mean(axis=1) <= 0.01
        depth = int(np.argmin(flat)) if not flat.all() else len(lines)
        if depth < MIN_BAR_FRACTION * length or depth > 0.45 * length:
            return 0, 0.0, colour
        # The line after the bar (or the one after a blended line) differs from the bar nearly all across: a
        # photo starts there. A backdrop changes only where the subject is, so it is no bar.
        return depth, float(off[depth:depth + 2].mean(axis=1).max()), colour

    def pair(first: np.ndarray, second: np.ndarray) -> tuple[int, int]:
        """Bars at two opposite edges. One with a clear edge makes its twin believable without one (a photo dark
        at one side meets a black bar there softly), if the twin is as deep and of the same colour."""
        (depth_a, edge_a, colour_a), (depth_b, edge_b, colour_b) = flat_run(first), flat_run(second)
        twins = abs(depth_a - depth_b) <= 2 and np.abs(colour_a - colour_b).max() <= BAR_TOLERANCE
        keep_a = edge_a >= 0.8 or (twins and edge_b >= 0.8)
        keep_b = edge_b >= 0.8 or (twins and edge_a >= 0.8)
        return depth_a if keep_a else 0, depth_b if keep_b else 0

    top, bottom = pair(pixels, pixels[::-1])
    left, right = pair(pixels.transpose(1, 0, 2), pixels.transpose(1, 0, 2)[::-1])
    # Back to full size, one small pixel further in: the resized edge line is a blend of bar and photo.
    def inward(depth: int) -> int:  # full-size pixels to cut at an edge: none where there is no bar
        return round((depth + 1) / scale) if depth else 0

    box = (inward(left), inward(top), image.width - inward(right), image.height - inward(bottom))
    return box if box[2] > box[0] and box[3] > box[1] else (0, 0, image.width, image.height)


def trim_bars(image: Image.Image) -> Image.Image:
    """`image` without its letterbox/pillarbox bars (unchanged when it has none)."""
    box = find_bars(image)
    return image if box == (0, 0, image.width, image.height) else image.crop(box)


def prepare_image(image: Image.Image, resolution: int, crop: str = "center", remove_bars: bool = False) -> Image.Image:
    """A square `resolution` RGB image: centre-cropped, or padded with white to keep the whole photo.

    `remove_bars` first crops away letterbox/pillarbox bars (`find_bars`), which the model would otherwise learn.
    """
    return prepare_image_and_geometry(image, resolution, crop, remove_bars)[0]


@dataclass(frozen=True)
class CropGeometry:
    """Where a training image came from, as SDXL's size conditioning counts it (all (height, width) or (y, x)).

    `original`: the photo's size (after bar removal); `crop_top_left`: the crop's corner in the photo scaled so its
    short side is the training size (SDXL's convention: resize, then crop); `scaled_width`: that scaled photo's
    width, which a mirrored copy needs to mirror the corner.
    """

    original: tuple[int, int]
    crop_top_left: tuple[int, int]
    scaled_width: int

    def mirrored(self, resolution: int) -> CropGeometry:
        """The geometry of the horizontally flipped image: the same crop, seen from the other side."""
        y, x = self.crop_top_left
        return CropGeometry(self.original, (y, max(0, self.scaled_width - x - resolution)), self.scaled_width)


def prepare_image_and_geometry(image: Image.Image, resolution: int, crop: str = "center",
                               remove_bars: bool = False) -> tuple[Image.Image, CropGeometry]:
    """prepare_image, and the geometry of what it did (CropGeometry): padding keeps the whole photo (corner 0, 0)."""
    image = image.convert("RGB")
    if remove_bars:
        image = trim_bars(image)
    original = (image.height, image.width)
    if crop == "pad":
        fitted = ImageOps.contain(image, (resolution, resolution), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (resolution, resolution), (255, 255, 255))
        canvas.paste(fitted, ((resolution - fitted.width) // 2, (resolution - fitted.height) // 2))
        return canvas, CropGeometry(original, (0, 0), resolution)
    scale = resolution / min(image.width, image.height)
    scaled = (round(image.height * scale), round(image.width * scale))
    corner = ((scaled[0] - resolution) // 2, (scaled[1] - resolution) // 2)  # the centre crop ImageOps.fit takes
    fitted = ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return fitted, CropGeometry(original, corner, scaled[1])


def load_instance_images(source: Any, resolution: int, crop: str = "center") -> tuple[list[Image.Image], DatasetReport]:
    """Prepared training images from `source`, and the report. Raises ImageDataError if none is usable."""
    report = require_usable(read_images(source))
    return [prepare_image(r.image, resolution, crop) for r in report.images], report


def images_to_tensor(images: Sequence[Image.Image]):
    """A float tensor (N, 3, H, W) in [-1, 1], the VAE's input range."""
    import torch

    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
