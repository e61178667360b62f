"""The dataset doctor on synthetic photos: each defect drawn in code must be found, with advice, by file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from dreambooth_helpers.cli import main
from dreambooth_helpers.doctor import BLUR_THRESHOLD, check_images, diagnose, find_subject, hamming, perceptual_hash
from dreambooth_helpers.errors import ConfigError


def photo(seed: int, size=(640, 640), box=(0.25, 0.25, 0.75, 0.75), background=None, subject_seed=None,
          brightness=1.0) -> Image.Image:
    """A sharp 'photo': a grainy flat background and a striped, grainy ellipse as the subject."""
    rng = np.random.default_rng(seed)
    w, h = size
    background = rng.integers(60, 200, 3) if background is None else np.asarray(background)
    pixels = np.ones((h, w, 3)) * background + rng.normal(0, 12, (h, w, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    subject_rng = np.random.default_rng(seed if subject_seed is None else subject_seed)
    colour, period = subject_rng.integers(0, 255, 3), 5 + subject_rng.integers(0, 8)
    y, x = np.mgrid[0:h, 0:w]
    texture = np.ones((h, w, 3)) * colour + 60 * np.sin((x + 2 * y) / period)[..., None]
    texture += subject_rng.normal(0, 20, (h, w, 3))
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((box[0] * w, box[1] * h, box[2] * w, box[3] * h), fill=255)
    image.paste(Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8)), (0, 0), mask)
    if brightness != 1.0:
        image = Image.fromarray(np.clip(np.asarray(image, float) * brightness, 0, 255).astype(np.uint8))
    return image


def folder_of(folder: Path, images: dict[str, Image.Image]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(folder / name)
    return folder


def checks_for(report, name: str | None) -> set[str]:
    return {f.check for f in report.findings if f.file == name}


@pytest.fixture
def good_set(tmp_path):
    return folder_of(tmp_path / "photos", {f"good{i}.png": photo(i) for i in range(4)})


def test_a_good_set_has_no_warnings(good_set):
    report = diagnose(good_set)
    assert report.usable
    assert [f for f in report.findings if f.severity != "info"] == []
    assert set(report.measurements) == {f"good{i}.png" for i in range(4)}
    assert report.measurements["good0.png"]["sharpness"] > BLUR_THRESHOLD


def test_each_defect_is_found_with_advice(tmp_path):
    images = {f"good{i}.png": photo(i) for i in range(3)}
    images["blurry.png"] = photo(10).filter(ImageFilter.GaussianBlur(6))
    images["dark.png"] = photo(11, brightness=0.25)
    washed_out = 255 - (255 - np.asarray(photo(12), float)) * 0.2  # overexposed: everything pushed to white
    images["bright.png"] = Image.fromarray(washed_out.astype(np.uint8))
    images["white_backdrop.png"] = photo(16, background=(252, 252, 252))  # a studio shot is not overexposed
    images["tiny_subject.png"] = photo(13, box=(0.46, 0.46, 0.54, 0.54))
    images["wide.png"] = photo(14, size=(1200, 600), box=(0.02, 0.3, 0.25, 0.7))
    images["small.png"] = photo(15, size=(200, 200))
    report = diagnose(folder_of(tmp_path / "photos", images))
    assert "blur" in checks_for(report, "blurry.png")
    assert "exposure" in checks_for(report, "dark.png")
    assert "exposure" in checks_for(report, "bright.png")
    exposure_says = {f.file: f.message for f in report.findings if f.check == "exposure"}
    assert exposure_says["dark.png"].startswith("The whole photo is too dark (mean brightness ")  # subject and all
    assert exposure_says["bright.png"].startswith("The whole photo is too bright (mean brightness ")
    assert "subject-size" in checks_for(report, "tiny_subject.png")
    assert "subject-crop" in checks_for(report, "wide.png")
    assert "towards the left" in next(f.message for f in report.findings if f.check == "subject-crop")
    assert "resolution" in checks_for(report, "small.png")
    for name in ("good0.png", "good1.png", "good2.png", "white_backdrop.png"):
        assert checks_for(report, name) == set()  # sharp, well lit, centred: nothing to say
    for finding in report.findings:
        assert finding.severity in ("error", "warning", "info") and finding.message and finding.advice
    assert report.usable  # defects are advice, not refusals


def test_transparency_and_count(tmp_path):
    rgba = photo(1).convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    ImageDraw.Draw(alpha).rectangle((0, 0, 200, 640), fill=0)
    rgba.putalpha(alpha)
    report = diagnose(folder_of(tmp_path / "photos", {"cutout.png": rgba}))
    assert "transparency" in checks_for(report, "cutout.png")
    count = [f for f in report.findings if f.check == "count"]
    assert count and count[0].severity == "warning" and "3-20" in count[0].message


def test_near_duplicates_are_grouped(tmp_path):
    original = photo(3)
    images = {"a.png": original, "a_smaller.jpg": original.resize((520, 520)),
              "a_brighter.png": Image.fromarray(np.clip(np.asarray(original, float) + 12, 0, 255).astype(np.uint8)),
              "b.png": photo(4), "c.png": photo(5)}
    report = diagnose(folder_of(tmp_path / "photos", images))
    duplicates = [f for f in report.findings if f.check == "duplicates"]
    assert len(duplicates) == 1
    assert all(name in duplicates[0].message for name in ("a.png", "a_smaller.jpg", "a_brighter.png"))
    assert "b.png" not in duplicates[0].message
    assert hamming(perceptual_hash(photo(4)), perceptual_hash(photo(5))) > 16


def test_style_set_with_one_repeated_object_is_flagged(tmp_path):
    backgrounds = [(40, 60, 90), (200, 180, 120), (90, 150, 70), (170, 90, 140), (60, 160, 170)]
    repeated = {f"style{i}.png": photo(20 + i, background=bg, subject_seed=99) for i, bg in enumerate(backgrounds)}
    report = diagnose(folder_of(tmp_path / "same", repeated), kind="style")
    assert [f.check for f in report.findings if f.check == "style-repeat"] == ["style-repeat"]
    varied = {f"style{i}.png": photo(20 + i, background=bg) for i, bg in enumerate(backgrounds)}
    assert not [f for f in diagnose(folder_of(tmp_path / "varied", varied), kind="style").findings
                if f.check == "style-repeat"]
    # An object set is expected to repeat its subject: no such warning there.
    assert not [f for f in diagnose(folder_of(tmp_path / "object", repeated)).findings if f.check == "style-repeat"]


def test_saliency_finds_where_the_subject_is():
    centred = find_subject(photo(1))
    assert centred is not None and abs(centred.centre[0] - 0.5) < 0.05 and 0.15 < centred.area < 0.35
    corner = find_subject(photo(2, box=(0.0, 0.0, 0.3, 0.3)))
    assert corner.centre[0] < 0.25 and corner.centre[1] < 0.25
    assert find_subject(Image.new("RGB", (300, 300), "gray")) is None  # nothing stands out: no verdict


def test_empty_folder_is_an_error_and_kind_is_checked(tmp_path):
    (tmp_path / "empty").mkdir()
    report = diagnose(tmp_path / "empty")
    assert not report.usable and report.findings[0].severity == "error"
    with pytest.raises(ConfigError, match="--kind"):
        diagnose(tmp_path / "empty", kind="landscape")


def test_check_images_adds_the_findings_as_warnings(tmp_path):
    blurry = photo(10).filter(ImageFilter.GaussianBlur(6))
    folder = folder_of(tmp_path / "photos", {"blurry.png": blurry, "ok.png": photo(1)})
    report = check_images(folder, resolution=512)
    assert len(report.images) == 2
    assert any("blurry.png" in w and "blurry" in w.lower() for w in report.warnings)


def test_cli_check_images(tmp_path, good_set, capsys):
    assert main(["check-images", str(good_set), "--kind", "style", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kind"] == "style" and printed["usable"] is True and "findings" in printed
    (tmp_path / "empty").mkdir()
    assert main(["check-images", str(tmp_path / "empty")]) == 2
    assert "No images found" in capsys.readouterr().err
