"""Hostile and unusual photos: each gets a defined outcome (used, converted with a note, skipped with the reason).

Nothing a user uploads may crash the reader with anything but the library's own `DreamBoothError`.
"""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dreambooth_helpers import data
from dreambooth_helpers.data import (
    load_instance_images,
    prepare_image,
    read_image,
    read_images,
    require_usable,
)
from dreambooth_helpers.errors import DreamBoothError, ImageDataError


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo(size=(96, 80), colour=(200, 40, 40)) -> Image.Image:
    image = Image.new("RGB", size, colour)
    image.paste((10, 10, 200), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header that claims `width` x `height` pixels, with almost no pixel data behind it:
    what a decompression bomb looks like before decoding."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def outcome(report, name):
    """("used", notes) or ("skipped", reason) for one file of a report."""
    for record in report.images:
        if record.name == name:
            return "used", "; ".join(record.notes)
    for skipped in report.skipped:
        if skipped.name == name:
            return "skipped", skipped.reason
    return "absent", ""


def read_one(name: str, content: bytes):
    return outcome(read_images([(name, content)]), name)


# ---------------------------------------------------------------------------- damaged and fake files


def test_truncated_jpeg_and_png_are_skipped_as_truncated():
    jpeg = encode(photo((256, 256)), "JPEG", quality=90)
    png = encode(photo((256, 256)), "PNG")
    for name, content in (("cut.jpg", jpeg[: len(jpeg) // 2]), ("cut.png", png[: len(png) // 2])):
        kind, reason = read_one(name, content)
        assert kind == "skipped" and "truncated" in reason, (name, reason)


def test_corrupt_headers_zero_byte_and_non_images_are_skipped_with_the_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("these are my holiday notes, not a photo")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00\x13" + b"JFIF" + bytes(500))
    (tmp_path / "readme.txt").write_text("not a photo")
    # An EPS file renamed .jpg: Pillow would hand it to Ghostscript; the reader never does.
    (tmp_path / "script.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    photo().save(tmp_path / "good.png")
    report = read_images(tmp_path)
    assert [r.name for r in report.images] == ["good.png"]
    assert "empty file (0 bytes)" in outcome(report, "empty.jpg")[1]
    assert "not a photo format" in outcome(report, "notes.jpg")[1]
    assert "not a photo format" in outcome(report, "script.jpg")[1]
    assert outcome(report, "garbage.png")[0] == "skipped"
    assert outcome(report, "junk.jpg")[0] == "skipped"
    assert outcome(report, "readme.txt") == ("skipped", "not an image file (.txt)")
    for entry in report.skipped:
        assert entry.reason and entry.name in report.format()


def test_a_set_with_nothing_usable_raises_the_library_error_listing_the_reasons(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_text("text")
    with pytest.raises(ImageDataError, match=r"No usable image.*a\.jpg: empty file"):
        require_usable(read_images(tmp_path))
    with pytest.raises(ImageDataError, match="a.jpg: empty file"):
        read_image("a.jpg", tmp_path / "a.jpg")


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 1000)
    noise = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "big.png")
    kind, reason = outcome(read_images(tmp_path), "big.png")
    assert kind == "skipped" and "limit for one photo" in reason


# ---------------------------------------------------------------------------- formats and modes


@pytest.mark.parametrize("fmt", ["WEBP", "AVIF", "HEIF", "BMP", "TIFF"])
def test_modern_and_other_formats_are_used(fmt):
    content = encode(photo(), fmt, **({"quality": 95} if fmt in ("WEBP", "AVIF", "HEIF") else {}))
    record = read_image(f"photo.{fmt.lower()}", content)
    assert record.image.mode == "RGB" and record.image.size == (96, 80)
    red, green, blue = record.image.getpixel((2, 2))
    assert red > 150 and green < 100 and blue < 100  # the colours survive decoding


def test_heic_without_pillow_heif_says_how_to_fix_it(monkeypatch):
    content = encode(photo(), "HEIF")
    monkeypatch.setattr(data, "HEIF_SUPPORTED", False)
    monkeypatch.setattr(data, "ALLOWED_FORMATS", tuple(f for f in data.ALLOWED_FORMATS if f != "HEIF"))
    with pytest.raises(ImageDataError, match="pip install pillow-heif"):
        read_image("IMG_0001.HEIC", content)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_use_the_first_frame_with_a_note(fmt):
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    content = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    record = read_image(f"anim.{fmt.lower()}", content)
    assert "animated (3 frames): first frame used" in record.notes
    red, green, blue = record.image.getpixel((32, 32))
    assert red > 200 and green < 50 and blue < 50


def test_sixteen_bit_png_is_reduced_to_eight_bits_keeping_its_brightness():
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    content = encode(Image.fromarray(ramp), "PNG")
    record = read_image("depth.png", content)
    assert record.original_mode.startswith("I") and "16-bit image reduced to 8 bits" in record.notes
    pixels = np.asarray(record.image)
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == round(ramp.max() / 65535 * 255)


def test_cmyk_jpeg_is_converted_with_a_note():
    content = encode(Image.new("CMYK", (80, 80), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    record = read_image("print.jpg", content)
    assert record.original_mode == "CMYK" and "converted from CMYK" in record.notes
    red, green, blue = record.image.getpixel((40, 40))
    assert red > 200 and green < 60 and blue < 60


def test_palette_and_la_images_are_converted_and_transparency_goes_on_white():
    palette = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    record = read_image("palette.png", encode(palette, "PNG"))
    assert record.image.mode == "RGB" and "converted from P" in record.notes

    transparent_palette = Image.new("P", (64, 64), 0)
    transparent_palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    transparent_palette.paste(1, (16, 16, 48, 48))
    record = read_image("sticker.png", encode(transparent_palette, "PNG", transparency=0))
    assert "transparent areas placed on white" in record.notes
    assert record.image.getpixel((2, 2)) == (255, 255, 255) and record.image.getpixel((32, 32)) == (255, 0, 0)

    la = Image.new("LA", (64, 64), (0, 0))
    la.paste((30, 255), (16, 16, 48, 48))
    record = read_image("cutout.png", encode(la, "PNG"))
    assert record.original_mode == "LA" and "transparent areas placed on white" in record.notes
    assert record.image.getpixel((2, 2)) == (255, 255, 255) and record.image.getpixel((32, 32)) == (30, 30, 30)


def test_exif_rotated_photo_is_turned_upright():
    image = Image.new("RGB", (120, 60), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 60, 60))  # left half red, as the sensor stored it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    record = read_image("phone.jpg", encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert record.image.size == (60, 120) and "rotated upright from its EXIF orientation" in record.notes
    assert record.image.getpixel((30, 10))[0] > 200  # the red half is now on top


# ---------------------------------------------------------------------------- sizes


def test_extreme_aspect_ratios_tiny_and_dot_sized_images():
    wide = read_image("banner.png", encode(photo((400, 100)), "PNG"))
    assert any("very wide (4.0:1)" in note for note in wide.notes)
    tall = read_image("tower.png", encode(photo((100, 350)), "PNG"))
    assert any("very tall" in note for note in tall.notes)
    kind, reason = read_one("strip.png", encode(photo((1000, 50)), "PNG"))
    assert kind == "skipped" and "strip (20:1)" in reason
    small = read_image("thumb.png", encode(photo((40, 40)), "PNG"))
    assert any("very small (40x40)" in note for note in small.notes)
    kind, reason = read_one("dot.png", encode(photo((4, 4)), "PNG"))
    assert kind == "skipped" and "too small" in reason
    for record in (wide, tall, small):  # every used image prepares to a training square
        for crop in ("center", "pad"):
            assert prepare_image(record.image, 64, crop).size == (64, 64)


@pytest.mark.parametrize("side", [10_000, 30_000, 65_000])
def test_decompression_bombs_are_refused_from_the_header_without_decoding(side, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # even with Pillow's own guard switched off
    started = time.perf_counter()
    kind, reason = read_one("bomb.png", png_header_only(side, side))
    assert kind == "skipped" and "too large to open safely" in reason
    assert time.perf_counter() - started < 1.0  # 4-12 GB of pixels were never allocated


def test_pillows_own_bomb_guard_also_maps_to_the_library_error():
    with pytest.raises(ImageDataError, match="too large to open safely"):
        read_image("bomb.png", png_header_only(20_000, 20_000))


# ---------------------------------------------------------------------------- zips, hidden files, duplicates


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_hidden_files_and_macos_metadata_are_ignored(tmp_path):
    photo().save(tmp_path / "dog.png")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "._dog.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "._dog.png").write_bytes(b"\x00\x05\x16\x07")
    report = read_images(tmp_path)
    assert [r.name for r in report.images] == ["dog.png"] and report.skipped == []
    uploads = read_images([("._dog.png", b"\x00\x05\x16\x07"), ("dog.png", encode(photo(), "PNG"))])
    assert [r.name for r in uploads.images] == ["dog.png"] and uploads.skipped == []


def test_a_zip_in_the_folder_is_read_in_memory_and_unsafe_members_are_skipped(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    members = {
        "trip/dog1.jpg": encode(photo(colour=(200, 0, 0)), "JPEG"),
        "trip/dog2.png": encode(photo(colour=(0, 200, 0)), "PNG"),
        "trip/.hidden.png": encode(photo(), "PNG"),
        "__MACOSX/trip/._dog1.jpg": b"\x00\x05\x16\x07",
        "trip/readme.txt": b"hello",
        "../escape.png": encode(photo(colour=(1, 2, 3)), "PNG"),
        "/etc/evil.png": encode(photo(colour=(4, 5, 6)), "PNG"),
        "trip/inner.zip": make_zip({"x.png": encode(photo(), "PNG")}),
        "trip/broken.jpg": b"\xff\xd8\xff" + b"\x00" * 40,
    }
    (folder / "upload.zip").write_bytes(make_zip(members))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    report = read_images(folder)
    assert sorted(r.name for r in report.images) == ["upload.zip/trip/dog1.jpg", "upload.zip/trip/dog2.png"]
    assert outcome(report, "upload.zip/../escape.png") == ("skipped", "unsafe path inside the zip: not read")
    assert outcome(report, "upload.zip//etc/evil.png") == ("skipped", "unsafe path inside the zip: not read")
    assert "zip inside the zip" in outcome(report, "upload.zip/trip/inner.zip")[1]
    assert outcome(report, "upload.zip/trip/readme.txt")[1] == "not an image file (.txt)"
    assert outcome(report, "upload.zip/trip/broken.jpg")[0] == "skipped"
    assert not any("hidden" in s.name or "MACOSX" in s.name for s in report.skipped)
    # Nothing was written anywhere: the zip was never extracted to disk.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "escape.png").exists()
    # Training reads a zip given directly as the instance folder, too.
    images, _ = load_instance_images(folder / "upload.zip", 32)
    assert len(images) == 2 and images[0].size == (32, 32)


def test_an_uploaded_zip_is_read_like_a_folder():
    content = make_zip({"a.png": encode(photo(colour=(200, 0, 0)), "PNG"),
                        "b.png": encode(photo(colour=(0, 0, 200)), "PNG")})
    widget_value = ({"name": "photos.zip", "type": "application/zip", "size": len(content),
                     "content": memoryview(content)},)
    report = read_images(widget_value)
    assert sorted(r.name for r in report.images) == ["photos.zip/a.png", "photos.zip/b.png"]


def test_damaged_and_bomb_zips_are_skipped_with_the_reason(monkeypatch):
    kind, reason = read_one("photos.zip", b"PK\x03\x04" + b"\x00" * 100)
    assert kind == "skipped" and "not a readable zip" in reason
    kind, reason = read_one("photos.zip", b"")
    assert kind == "skipped"
    # A member whose bytes unpack beyond the per-file limit, and a zip beyond the total.
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 50_000)
    report = read_images([("bomb.zip", make_zip({"huge.png": b"\x00" * 5_000_000}))])
    assert report.images == [] and "limit" in outcome(report, "bomb.zip/huge.png")[1]
    monkeypatch.setattr(data, "MAX_ZIP_TOTAL_BYTES", 30_000)
    many = {f"p{i}.png": encode(photo(colour=(i * 20, 0, 0)), "PNG", compress_level=0) for i in range(10)}
    report = read_images([("many.zip", make_zip(many))])
    assert 0 < len(report.images) < 10 and "unzips to over" in outcome(report, "many.zip")[1]


def test_exact_duplicates_are_used_once_and_the_copy_is_noted(tmp_path):
    content = encode(photo(), "PNG")
    (tmp_path / "a.png").write_bytes(content)
    (tmp_path / "a copy.png").write_bytes(content)
    (tmp_path / "b.png").write_bytes(encode(photo(colour=(0, 90, 0)), "PNG"))
    (tmp_path / "again.zip").write_bytes(make_zip({"a.png": content}))
    report = read_images(tmp_path)
    assert sorted(r.name for r in report.images) == ["a copy.png", "b.png"]
    assert outcome(report, "a.png") == ("skipped", "exact duplicate of a copy.png (used once)")
    assert outcome(report, "again.zip/a.png") == ("skipped", "exact duplicate of a copy.png (used once)")


# ---------------------------------------------------------------------------- property: only our error type


HEADERS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM",
           b"II*\x00", b"PK\x03\x04", b"\x00\x00\x00\x18ftypheic", b"\x00\x00\x00\x1cftypavif", b"%!PS-Adobe-3.0"]
MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I;16", "I", "F"]
FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]


def _never_raises_anything_but_ours(name: str, content: bytes) -> None:
    try:
        read_image(name, content)
    except ImageDataError:
        pass
    report = read_images([(name, content)])  # the batch reader turns every problem into a skip
    if not name.endswith(".zip"):  # a valid empty zip has no outcome; every other file has exactly one
        assert len(report.images) + len(report.skipped) == 1
    for record in report.images:
        assert record.image.mode == "RGB" and min(record.image.size) >= data.MIN_IMAGE_SIDE
        prepare_image(record.image, 16, "pad")


PROPERTY_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(header=st.sampled_from(HEADERS), body=st.binary(max_size=2048),
       name=st.sampled_from(["x.jpg", "x.png", "x.zip", "x.heic", "upload"]))
def test_random_bytes_only_ever_give_the_library_error(header, body, name):
    _never_raises_anything_but_ours(name, header + body)


@PROPERTY_SETTINGS
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(FORMATS), width=st.integers(1, 120),
       height=st.integers(1, 120), seed=st.integers(0, 2**16), damage=st.sampled_from(["none", "cut", "flip"]),
       where=st.floats(0.0, 1.0))
def test_random_valid_and_damaged_images_only_ever_give_the_library_error(mode, fmt, width, height, seed, damage,
                                                                         where):
    rng = np.random.default_rng(seed)
    pixels = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    image = pixels.convert(mode) if mode not in ("I;16", "I", "F") else pixels.convert("L").convert(mode)
    try:
        content = encode(image, fmt)
    except (OSError, ValueError, KeyError):
        return  # this format cannot store this mode: nothing to feed the reader
    if damage == "cut":
        content = content[: int(len(content) * where)]
    elif damage == "flip" and content:
        position = int((len(content) - 1) * where)
        content = content[:position] + bytes([content[position] ^ 0xFF]) + content[position + 1:]
    _never_raises_anything_but_ours(f"image.{fmt.lower()}", content)


def test_bad_sources_raise_the_library_error_or_become_skips(tmp_path):
    for source in (tmp_path / "missing", 42, [object()]):
        with pytest.raises(DreamBoothError):
            read_images(source)
    report = read_images({"a.png": None, "b.png": {"name": "b.png"}})
    assert report.images == [] and [s.name for s in report.skipped] == ["a.png", "b.png"]


# ---------------------------------------------------------------------------- decoding once, at the size needed


def test_a_photo_is_decoded_once_at_the_size_asked_keeping_its_original_size_and_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the photo is 1200 wide and 2400 tall once upright
    sideways = photo((2400, 1200), colour=(200, 40, 40))
    jpeg = read_image("phone.jpg", encode(sideways, "JPEG", exif=exif.tobytes(), quality=90), max_side=512)
    assert jpeg.image.size == (256, 512) and jpeg.original_size == (2400, 1200)
    assert "rotated upright from its EXIF orientation" in jpeg.notes
    for mode, note in (("1", "grayscale, converted to RGB"), ("P", "converted from P"),
                       ("I;16", "16-bit image reduced to 8 bits")):
        image = photo((1800, 1200)).convert("L").convert(mode) if mode != "P" else photo((1800, 1200)).convert("P")
        record = read_image(f"big-{mode}.png", encode(image, "PNG"), max_side=300)
        assert record.image.size == (300, 200) and record.image.mode == "RGB", mode
        assert note in record.notes and record.original_mode == mode
    # Without max_side nothing changes: the full size, as before.
    assert read_image("full.png", encode(photo((900, 600)), "PNG")).image.size == (900, 600)


def test_a_lower_pixel_limit_per_photo_names_the_photo_and_the_limit():
    kind, reason = outcome(read_images([("huge.png", png_header_only(9400, 9400))], max_pixels=70_000_000),
                           "huge.png")
    assert kind == "skipped"
    assert "9400x9400 (88 megapixels)" in reason and "the limit is 70 megapixels per photo" in reason


def test_the_pixels_of_an_upload_are_bounded_all_together_before_decoding(monkeypatch):
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or real_load(image))
    members = {f"p{i}.png": png_header_only(4000, 4000 + i) for i in range(3)}  # 16 MP each
    with pytest.raises(data.TooManyPixels, match=r"over 40 megapixels in all.*p2\.png goes over it"):
        read_images([("many.zip", make_zip(members))], max_total_pixels=40_000_000)
    assert set(decoded) == {(4000, 4000), (4000, 4001)}  # the third one was refused from its header, not decoded
    report = read_images([("a.png", encode(photo(), "PNG")), ("b.png", encode(photo(colour=(0, 9, 0)), "PNG"))],
                         max_total_pixels=2 * 96 * 80)
    assert len(report.images) == 2  # up to the limit is fine
