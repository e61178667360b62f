"""Reading photos: orientation, colour modes, cropping, sources, and the messages for bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dreambooth_helpers import ImageDataError
from dreambooth_helpers.data import load_instance_images, prepare_image, read_images


def _png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _record(tmp_path, name: str, image: Image.Image, fmt: str = "PNG", **kwargs):
    path = tmp_path / name
    path.write_bytes(_png_bytes(image, fmt, **kwargs))
    report = read_images([path])
    assert not report.skipped, report.skipped
    return report.images[0]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 30), "red")
    image.paste((0, 0, 255), (0, 0, 10, 30))  # a blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    record = _record(tmp_path, "rotated.jpg", image, "JPEG", exif=exif.tobytes(), quality=95)
    assert record.image.size == (30, 60)
    assert "rotated upright from its EXIF orientation" in record.notes
    top = np.asarray(record.image)[2, 15]
    assert top[2] > 150 and top[0] < 100  # the blue stripe is now at the top


def test_transparent_rgba_la_and_palette_are_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (5, 5, 15, 15))
    record = _record(tmp_path, "a.png", rgba)
    assert record.image.mode == "RGB" and "transparent areas placed on white" in record.notes
    assert tuple(np.asarray(record.image)[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(record.image)[10, 10]) == (255, 0, 0)

    la = Image.new("LA", (20, 20), (0, 0))
    assert "transparent areas placed on white" in _record(tmp_path, "la.png", la).notes

    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    palette.info["transparency"] = 0
    assert "transparent areas placed on white" in _record(tmp_path, "p.png", palette, transparency=0).notes


def test_cmyk_grayscale_and_16_bit_become_rgb_with_a_note(tmp_path):
    cmyk = _record(tmp_path, "c.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")
    assert cmyk.image.mode == "RGB" and "converted from CMYK" in cmyk.notes
    grey = _record(tmp_path, "g.png", Image.new("L", (16, 16), 128))
    assert grey.image.mode == "RGB" and "grayscale, converted to RGB" in grey.notes
    deep = Image.fromarray(np.full((16, 16), 65535 // 2, dtype=np.uint16))
    sixteen = _record(tmp_path, "d.png", deep)
    assert sixteen.image.mode == "RGB" and "16-bit image reduced to 8 bits" in sixteen.notes
    assert abs(int(np.asarray(sixteen.image)[0, 0, 0]) - 127) <= 1


def test_center_crop_and_pad_keep_what_they_promise():
    wide = Image.new("RGB", (200, 100), "blue")
    wide.paste((255, 0, 0), (0, 0, 20, 100))  # red at the far left edge
    cropped = prepare_image(wide, 64, "center")
    assert cropped.size == (64, 64)
    assert np.asarray(cropped)[32, 0, 0] < 50  # the left edge was cropped away
    padded = prepare_image(wide, 64, "pad")
    assert padded.size == (64, 64)
    assert tuple(np.asarray(padded)[0, 32]) == (255, 255, 255)  # white bars above and below
    assert np.asarray(padded)[32, 0, 0] > 200  # the whole photo, red edge included, is kept


def test_uploaded_bytes_in_ipywidgets_8_shape_and_pairs(tmp_path):
    image = Image.new("RGB", (32, 32), "green")
    upload = ({"name": "a.png", "type": "image/png", "size": 10, "content": memoryview(_png_bytes(image)),
               "last_modified": 0},)
    report = read_images(upload)
    assert [r.name for r in report.images] == ["a.png"] and report.source == "uploaded files"
    report = read_images([("b.png", _png_bytes(image)), ("bad.png", b"nope")])
    assert [r.name for r in report.images] == ["b.png"]
    assert report.skipped[0].name == "bad.png" and "not a photo format" in report.skipped[0].reason


def test_unreadable_files_are_skipped_by_name_and_truncated_ones_explained(tmp_path):
    good = Image.new("RGB", (64, 64), "white")
    good.paste((0, 0, 0), (10, 10, 40, 40))
    (tmp_path / "ok.png").write_bytes(_png_bytes(good))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(_png_bytes(good)[:60])
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")
    report = read_images(tmp_path)
    assert [r.name for r in report.images] == ["ok.png"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"empty.jpg", "cut.png", "readme.txt"}
    assert "not an image file" in reasons["readme.txt"]
    text = report.format()
    assert "skip  cut.png" in text and "ok    ok.png" in text


def test_a_folder_without_usable_images_is_a_clear_error(tmp_path):
    with pytest.raises(ImageDataError, match="No images found"):
        load_instance_images(tmp_path, 64)
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(ImageDataError, match=r"No usable image .*x\.jpg"):
        load_instance_images(tmp_path, 64)
    with pytest.raises(ImageDataError, match="does not exist"):
        load_instance_images(tmp_path / "missing", 64)


def test_load_instance_images_prepares_every_usable_photo(tmp_path):
    for i, size in enumerate([(300, 200), (120, 400), (64, 64)]):
        Image.new("RGB", size, (i * 60, 100, 100)).save(tmp_path / f"{i}.png")
    images, report = load_instance_images(tmp_path, 48, crop="pad")
    assert len(images) == 3 and all(im.size == (48, 48) and im.mode == "RGB" for im in images)
    assert len(report.images) == 3
