"""The dataset doctor on real photographs (tests/photo_regression.py): every verdict, the false-warning rate on
good photos, and the behaviours the synthetic tests cannot show (darkening, training size, confidence)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageOps

from dreambooth_helpers.config import TrainConfig, option_name
from dreambooth_helpers.data import DatasetReport, ImageRecord, find_bars, prepare_image
from dreambooth_helpers.doctor import BLUR_THRESHOLD, SUBJECT_MIN_CONFIDENCE, diagnose, find_subject, sharpness
from tests import photo_regression as regression

# The photos ship in these wheels; they are test dependencies (requirements.txt), never the library's.
pytest.importorskip("skimage", reason="scikit-image ships the real photos")
pytest.importorskip("sklearn", reason="scikit-learn ships the real photos")


@pytest.fixture(scope="module")
def scored() -> dict:
    return regression.score()


def findings_for(image, resolution: int = regression.TRAINING_SIZE, name: str = "photo.jpg"):
    record = ImageRecord(name, image, image.size, "RGB")
    return [f for f in diagnose(DatasetReport([record]), resolution=resolution).findings if f.check != "count"]


@pytest.mark.slow  # the whole regression set: ~15 s of CPU
def test_every_verdict_on_the_regression_set(scored):
    missed = {(case, check) for check, row in scored["checks"].items() for case in row["missed"]}
    assert missed == regression.KNOWN_MISSES  # a fixed miss must leave KNOWN_MISSES and docs/doctor.md too
    assert {check: row["false"] for check, row in scored["checks"].items() if row["false"]} == {}
    assert len(scored["checks"]["blur"]["should"]) >= 28 and len(scored["checks"]["duplicates"]["should"]) >= 17
    assert len(scored["checks"]["exposure"]["should"]) >= 39  # 16 of them a subject crushed or burnt on its set
    assert len(scored["checks"]["duplicates"]["judged"]) >= 270  # 110 of them poses of one character or cut-out


@pytest.mark.slow
def test_at_most_one_false_warning_per_50_good_photos_and_no_false_subject_verdict(scored):
    assert scored["good_photos"] >= 50
    assert len(scored["false_on_good"]) <= scored["good_photos"] / 50, scored["false_on_good"]
    for check in ("subject-size", "subject-crop"):
        assert scored["checks"][check]["false"] == []
    # Issue 29: the held-out set's false warnings were on deliberate photography; none here, on each kind.
    kinds = scored["kinds"]
    assert {kind: row["good"] >= 6 for kind, row in kinds.items()} == {"other": True, "high-key": True,
                                                                      "low-key": True, "bokeh": True}
    assert {kind: row["false"] for kind, row in kinds.items() if row["false"]} == {}


@pytest.mark.slow
def test_every_finding_says_what_to_do(scored):
    findings = [f for case_findings in scored["findings"].values() for f in case_findings]
    assert len(findings) >= 60
    for finding in findings:
        assert finding.severity == "warning" and finding.file and finding.message and len(finding.advice) > 20


def test_an_unsure_subject_detector_says_nothing():
    photos = regression.originals()
    flower = regression._disc(photos["flower"], (0.5, 0.42), 0.3)
    on_wall = regression.on_backdrop(flower, (1200, 900), (200, 190, 175), 0.03, round_cutout=True)
    on_street = photos["china"].resize((1200, 900))  # a busy scene all round the border: no plain background
    on_street.paste(flower.resize((180, 180)), (510, 360))
    sure, unsure = find_subject(on_wall), find_subject(on_street)
    assert sure.confidence >= SUBJECT_MIN_CONFIDENCE and sure.area < 0.06
    assert unsure is None or unsure.confidence < SUBJECT_MIN_CONFIDENCE
    assert "subject-size" in {f.check for f in findings_for(on_wall)}
    assert not {f.check for f in findings_for(on_street)} & {"subject-size", "subject-crop"}
    # Real photos with busy borders get no subject verdict either way: their confidence is low.
    for name in ("astronaut", "motorcycle", "china", "cameraman"):
        subject = find_subject(photos[name])
        assert subject is None or subject.confidence < SUBJECT_MIN_CONFIDENCE, name


def test_position_advice_only_when_the_centre_crop_cuts_the_subject():
    flower = regression._disc(regression.originals()["flower"], (0.5, 0.42), 0.3)
    for size in ((900, 900), (1200, 600)):
        off_centre = regression.on_backdrop(flower, size, (40, 70, 50), 0.1, centre=(0.2, 0.5), round_cutout=True)
        checks = {f.check for f in findings_for(off_centre)}
        assert ("subject-crop" in checks) == (size[0] != size[1])  # a square photo is not cropped at all


def test_darkening_a_sharp_photo_does_not_make_it_blurry():
    for name in ("astronaut", "coffee", "china"):
        photo = regression.originals()[name]
        for stops in (-2, -3):
            darker = regression.exposed(photo, stops)
            assert sharpness(darker, 384) == pytest.approx(sharpness(photo, 384), rel=0.1)
            checks = {f.check for f in findings_for(darker)}
            assert "exposure" in checks and "blur" not in checks


def test_blur_is_judged_at_the_training_size():
    photo = regression.originals()["astronaut"]
    soft = regression.blurred_at(photo, 3, 2048)  # radius 3 at 2048 px: radius 0.75 at 512, visibly soft
    assert sharpness(soft, 512) < BLUR_THRESHOLD < sharpness(soft, 128)  # at 128 px the blur is too small to see
    assert "blur" in {f.check for f in findings_for(soft, resolution=512)}
    assert sharpness(regression.blurred_at(photo, 0, 2048), 512) > BLUR_THRESHOLD


def test_letterbox_bars_are_found_and_can_be_cropped_off_before_training():
    photo = regression.originals()["coffee"]  # 600x400
    boxed = regression.letterboxed(photo, 0.3)
    left, top, right, bottom = find_bars(boxed)
    assert left == 0 and right == 600 and 60 <= top <= 66 and 334 <= bottom <= 340  # bars of 60 px each
    bar_rows = np.asarray(prepare_image(boxed, 256), dtype=float)[:12]
    assert bar_rows.max() < 20  # the centre crop keeps the bars...
    trimmed = np.asarray(prepare_image(boxed, 256, remove_bars=True), dtype=float)
    assert trimmed[:12].mean() > 40 and trimmed.shape == (256, 256, 3)  # ...--remove-bars does not
    # A plain backdrop is not a bar, and photos without bars are left alone.
    cup = regression._disc(photo, (0.43, 0.38), 0.37)
    product = regression.on_backdrop(cup, (800, 800), (252, 252, 252), 0.35, round_cutout=True)
    assert find_bars(product) == (0, 0, 800, 800)
    assert prepare_image(photo, 256, remove_bars=True).tobytes() == prepare_image(photo, 256).tobytes()
    # Pillarbox bars of 64 px at both sides of a square photo, although the photo is dark where it meets one.
    left, _, right, _ = find_bars(regression.letterboxed(regression.originals()["astronaut"], 0.25, sides=True))
    assert 62 <= left <= 68 and 444 <= right <= 450
    assert option_name("remove_bars") == "--remove-bars" and TrainConfig().remove_bars is False
    assert "--remove-bars" in " ".join(f.advice for f in findings_for(boxed))


def test_a_mirrored_copy_and_a_reframed_burst_shot_are_duplicates_and_distinct_photos_are_not():
    photos = regression.originals()
    shots = {"cat.jpg": photos["cat"], "cat-flipped.jpg": ImageOps.mirror(photos["cat"]),
             "coffee-1.jpg": regression.reframed(photos["coffee"], 0.0, 0.0),
             "coffee-2.jpg": regression.jpeg(regression.reframed(photos["coffee"], 0.08, 0.06)),
             "flower.jpg": photos["flower"], "china.jpg": photos["china"]}
    records = [ImageRecord(name, image, image.size, "RGB") for name, image in shots.items()]
    duplicates = [f for f in diagnose(DatasetReport(records)).findings if f.check == "duplicates"]
    assert sorted(f.message.split(" are ")[0] for f in duplicates) == ["cat.jpg, cat-flipped.jpg",
                                                                      "coffee-1.jpg, coffee-2.jpg"]
    assert all("Keep one" in f.advice for f in duplicates)


# ---------------------------------------------------------------------------- one subject (issue 30)


def test_photos_of_other_things_among_the_sample_robots_are_named():
    """The newcomer's set: five photos of the toy robot, an astronaut, a cat and a coffee cup."""
    photos = regression.originals()
    robots = regression.robot_photos()
    mixed = {**robots, **{f"{name}.jpg": photos[name] for name in ("astronaut", "cat", "coffee")}}
    records = [ImageRecord(name, image, image.size, "RGB") for name, image in mixed.items()]
    report = diagnose(DatasetReport(records), resolution=regression.TRAINING_SIZE)
    [finding] = [f for f in report.findings if f.check == "one-subject"]
    assert finding.severity == "warning" and finding.file is None
    assert finding.message.startswith("astronaut.jpg, cat.jpg, coffee.jpg do not look like the other 5 photos")
    assert not any(name in finding.message for name in robots) and "remove photos" in finding.advice
    assert report.measurements["cat.jpg"]["likeness_distance"] > 0.4
    # The robots alone, on five different backdrops, are one subject: nothing to say.
    alone = diagnose(DatasetReport([ImageRecord(n, i, i.size, "RGB") for n, i in robots.items()]))
    assert not [f for f in alone.findings if f.check == "one-subject"]


def test_a_real_photo_among_crops_of_another_is_named_and_style_sets_are_not_judged():
    photos = regression.originals()
    astronaut = photos["astronaut"]
    crops = {"wide.jpg": astronaut, "zoom.jpg": regression.reframed(astronaut, 0.1, 0.1, 0.8),
             "closer.jpg": regression.reframed(astronaut, 0.2, 0.2, 0.6),
             "left.jpg": regression.reframed(astronaut, 0.0, 0.1, 0.75), "pagoda.jpg": photos["china"]}
    records = [ImageRecord(name, image, image.size, "RGB") for name, image in crops.items()]
    one = [f for f in diagnose(DatasetReport(records)).findings if f.check == "one-subject"]
    assert [f.message.split(" does not")[0] for f in one] == ["pagoda.jpg"]
    assert not [f for f in diagnose(DatasetReport(records), kind="style").findings if f.check == "one-subject"]


@pytest.mark.slow  # ~20 s: 104 sets of real photos
def test_one_subject_on_the_regression_sets_names_every_stray_photo_and_nothing_else():
    from dreambooth_helpers.photo_likeness import outlying_photos

    scored = regression.score_subject_sets()
    assert scored["missed"] == [] and scored["false"] == []
    assert len(scored["should"]) >= 90 and len(scored["judged"]) >= 500 and len(scored["good_sets"]) >= 30
    assert scored["good_sets_warned"] == []
    # The duplicate regression sets (near-copies among unrelated photos) have no one-subject majority either.
    for case in regression.duplicate_cases():
        assert outlying_photos(list(case.images), list(case.images.values())).outliers == [], case.name
