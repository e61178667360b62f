"""The dataset doctor on deliberate photography (issue 29): high-key and low-key sets around a well-exposed subject,
a background alone out of focus, one character in other poses; and the true defects on the same sets. The whole
set's verdicts and rates are in test_doctor_real_photos.py; these check the behaviours, and say which case broke."""

from __future__ import annotations

import pytest
from PIL import ImageFilter, ImageOps

from dreambooth_helpers.data import DatasetReport, ImageRecord
from dreambooth_helpers.doctor import (
    BLUR_THRESHOLD,
    SAME_CONTENT_DIFFERENCE,
    diagnose,
    exposure,
    near_duplicate_groups,
    sharpness,
    subject_region,
)
from dreambooth_helpers.doctor_duplicates import _Shot, aligned_difference, same_shot
from tests import photo_deliberate as deliberate
from tests import photo_regression as regression

pytest.importorskip("skimage", reason="scikit-image ships the real photos")
pytest.importorskip("sklearn", reason="scikit-learn ships the real photos")


@pytest.fixture(scope="module")
def cases() -> dict[str, regression.Case]:
    return {case.name: case for case in deliberate.deliberate_cases()}


def findings(case: regression.Case):
    record = ImageRecord(f"{case.name}.jpg", case.image, case.image.size, "RGB")
    report = diagnose(DatasetReport([record]), resolution=case.resolution)
    return [f for f in report.findings if f.check != "count"], report.measurements[record.name]


def records(images: dict) -> list[ImageRecord]:
    return [ImageRecord(name, image, image.size, "RGB") for name, image in images.items()]


@pytest.mark.parametrize("name", ["cat-face-high-key-sheets", "cup-high-key-wall", "yellow-flower-high-key-sheets",
                                  "astronaut-head-low-key-vignette", "dahlia-low-key-garden",
                                  "cat-face-midtone-in-night-garden"])
def test_a_well_exposed_subject_on_a_white_or_dark_set_is_fine(cases, name):
    found, measured = findings(cases[name])
    assert found == [], [f.message for f in found]
    assert measured["exposure_judged"] == "subject" and measured["exposure"] is None
    assert 0.05 < measured["subject_area"] < 0.45


@pytest.mark.parametrize("name, says", [
    ("cat-face-dark-on-sheets", "The subject itself is too dark"),
    ("cup-dark-on-grey-wall", "The subject itself is too dark"),
    ("dahlia-burnt-in-garden", "The subject itself is burnt out"),
    ("astronaut-head-burnt-on-vignette", "The subject itself is burnt out"),
    ("high-key-set-all-dark", "The whole photo is too dark"),
])
def test_a_crushed_or_washed_out_subject_is_named_as_such(cases, name, says):
    found, measured = findings(cases[name])
    assert [f.check for f in found] == ["exposure"]
    assert found[0].message.startswith(says) and found[0].message.count(".") == 1  # one sentence
    on_subject = "whole photo" not in says
    assert measured["exposure_judged"] == ("subject" if on_subject else "frame")
    assert ("set is fine" in found[0].advice) == on_subject  # the set around it is not what to change


def test_whole_photos_too_dark_or_bright_still_say_so():
    photos = regression.originals()
    dark, bright = regression.exposed(photos["astronaut"], -2), regression.exposed(photos["china"], 2)
    assert exposure(dark).verdict == "dark" and exposure(bright).verdict == "bright"
    assert exposure(dark).message().startswith("The whole photo is too dark")
    assert exposure(bright).message().startswith("The whole photo is too bright")
    assert exposure(photos["china"]).verdict is None and exposure(photos["rocket"]).verdict is None  # night launch


def test_the_subject_region_needs_a_set_to_stand_out_from(cases):
    region = subject_region(cases["cat-face-high-key-sheets"].image)
    assert region.trusted and 0.12 < region.area < 0.3
    for name in ("astronaut", "china", "motorcycle", "cameraman"):  # busy photos: the frame is judged
        region = subject_region(regression.originals()[name])
        assert region is None or not region.trusted, name


def test_bokeh_is_sharp_and_a_soft_photo_or_subject_is_not(cases):
    before_soft = cases["cat-face-before-soft-scene"]
    assert sharpness(before_soft.image, before_soft.resolution) > BLUR_THRESHOLD + 0.1
    assert sharpness(cases["cat-face-bokeh"].image, cases["cat-face-bokeh"].resolution) > BLUR_THRESHOLD + 0.1
    whole_soft = before_soft.image.filter(ImageFilter.GaussianBlur(2.5))  # the subject out of focus too
    assert sharpness(whole_soft, before_soft.resolution) < BLUR_THRESHOLD
    found, _ = findings(cases["cat-face-soft-on-sheets"])  # a missed focus on a white set, with sensor noise
    assert [f.check for f in found] == ["blur"]
    # A ratio on the sharpest region: darkening the bokeh photo does not make it soft.
    darker = regression.exposed(before_soft.image, -1.5)
    assert sharpness(darker, 384) == pytest.approx(sharpness(before_soft.image, 384), rel=0.15)


def test_poses_of_one_character_are_not_duplicates_but_its_copies_are():
    poses = {f"{pose}.png": deliberate.character(pose, seed=i) for i, pose in enumerate(deliberate.CHARACTER_POSES)}
    assert near_duplicate_groups(records(poses)) == []  # arms, face, head: each pose is a photo of its own
    copies = {**poses, "standing-mirrored.jpg": regression.jpeg(ImageOps.mirror(poses["standing.png"]), 90),
              "standing-reframed.jpg": regression.jpeg(regression.reframed(poses["standing.png"], 0.06, 0.02, 0.9))}
    report = diagnose(DatasetReport(records(copies)))
    [finding] = [f for f in report.findings if f.check == "duplicates"]
    assert finding.message.startswith("standing.png, standing-mirrored.jpg, standing-reframed.jpg are near-")
    assert "Keep one" in finding.advice


def test_the_aligned_content_decides_between_a_copy_and_another_pose():
    def shot(image) -> _Shot:
        return _Shot.of(records({"photo.png": image})[0])

    standing, winking = shot(deliberate.character("standing")), shot(deliberate.character("winking"))
    second_shot = shot(deliberate.character("standing", seed=5))  # the same pose, the sensor's grain anew
    copy = shot(regression.jpeg(regression.reframed(deliberate.character("standing", seed=5), 0.03, 0.05, 0.92)))
    assert aligned_difference(standing.view, 0, second_shot.view, 0) < 0.02
    assert aligned_difference(winking.view, 0, standing.view, 0) > SAME_CONTENT_DIFFERENCE * 1.3  # one eye closed
    assert aligned_difference(standing.view, 0, winking.view, 0) > SAME_CONTENT_DIFFERENCE * 1.3  # both ways
    assert same_shot(standing, copy) and same_shot(copy, standing) and same_shot(standing, second_shot)
    assert not same_shot(standing, winking) and not same_shot(winking, copy)
