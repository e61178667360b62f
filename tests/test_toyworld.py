"""The toy world, the sample subject, and what the shipped toy model measurably does (issue 5)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import toyworld  # scripts/toyworld.py: conftest.py puts scripts/ on the path
from PIL import Image

from dreambooth_helpers.data import load_instance_images
from dreambooth_helpers.doctor import check_images
from dreambooth_helpers.models import TOY_MODEL, TOY_MODEL_DIR, load_components

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = ROOT / "sample_data" / "toy_robot"


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests share small CI machines; one thread avoids threads waiting on each other.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------- the world and its checks


def test_scenes_are_deterministic_from_the_seed():
    a, captions_a, _ = toyworld.make_dataset(20, seed=3)
    b, captions_b, _ = toyworld.make_dataset(20, seed=3)
    c, _, _ = toyworld.make_dataset(20, seed=4)
    assert np.array_equal(a, b) and captions_a == captions_b
    assert not np.array_equal(a, c)
    assert a.shape == (20, toyworld.RESOLUTION, toyworld.RESOLUTION, 3) and a.dtype == np.uint8


def test_the_checks_read_drawn_scenes_correctly():
    """On pictures drawn by the world itself, the automatic check must agree with the full caption."""
    _, _, scenes = toyworld.make_dataset(300, seed=5)
    pictures = [toyworld.draw_scene(scene) for scene in scenes]
    agreement = toyworld.caption_agreement(pictures, [toyworld.caption(scene) for scene in scenes])
    assert set(agreement) == {"colour", "background", "position"}
    assert min(agreement.values()) >= 0.98


def test_the_checks_fail_on_the_wrong_caption():
    scene = toyworld.Scene("ball", "red", "blue", "left", "big")
    seen = toyworld.analyse(toyworld.draw_scene(scene))
    assert (seen["colour"], seen["background"], seen["position"]) == ("red", "blue", "left")
    wrong = toyworld.caption(toyworld.Scene("ball", "green", "white", "right", "big"))
    assert toyworld.caption_agreement([toyworld.draw_scene(scene)], [wrong]) == {
        "colour": 0.0, "background": 0.0, "position": 0.0}


def test_captions_state_what_they_say_and_vocabulary_is_single_tokens():
    rng = random.Random(0)
    tokenizer = load_components("tiny").tokenizer
    for _ in range(200):
        scene = toyworld.random_scene(rng)
        text = toyworld.caption(scene, rng, keep=0.7)
        stated = toyworld.parse_caption(text)
        for attribute, value in stated.items():
            assert getattr(scene, attribute) == value, (text, scene)
        # Every word is one token, so the text encoder sees words, not spelled-out bytes.
        assert len(tokenizer(text).input_ids) == len(text.split()) + 2, text


def test_held_out_combinations_never_appear_in_training_data():
    held_out = toyworld.held_out_combinations()
    _, _, scenes = toyworld.make_dataset(2000, seed=0, exclude=held_out)
    assert not {(s.colour, s.kind, s.background) for s in scenes} & held_out
    for text in toyworld.held_out_captions(len(held_out)):
        stated = toyworld.parse_caption(text)
        assert (stated["colour"], stated["kind"], stated["background"]) in held_out


def test_set_distance_separates_the_subject_from_the_world():
    world_a, _, _ = toyworld.make_dataset(300, seed=1)
    world_b, _, _ = toyworld.make_dataset(300, seed=2)
    robot, _ = load_instance_images(SAMPLE_DIR, toyworld.RESOLUTION)
    same_world = toyworld.set_distance(world_a, world_b)
    assert same_world < 0.15
    assert toyworld.set_distance(robot, world_a) > 0.6
    assert toyworld.set_distance(robot, robot) == 0.0


def test_diversity_is_high_for_the_world_and_zero_for_one_picture_repeated():
    world, _, _ = toyworld.make_dataset(16, seed=1)
    one = [world[0]] * 16
    assert toyworld.diversity(list(world)) > 0.8
    assert toyworld.diversity(one) == 0.0
    # Eight pictures of one scene and eight of another: half the pairs differ.
    two = [world[0]] * 8 + [world[1]] * 8
    assert toyworld.diversity(two) == pytest.approx(toyworld.diversity(world[:2]) * 64 / 120)
    with pytest.raises(ValueError, match="two"):
        toyworld.diversity(one[:1])


# ---------------------------------------------------------------------------- the sample subject


def test_sample_data_is_reproducible_and_passes_the_image_checks(tmp_path):
    spec = importlib.util.spec_from_file_location("make_sample_data", ROOT / "sample_data" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    for index, shot in enumerate(module.SHOTS):
        drawn = np.asarray(module.draw_photo(*shot, rng))
        shipped = np.asarray(Image.open(SAMPLE_DIR / f"robot_{index + 1}.png").convert("RGB"))
        assert np.array_equal(drawn, shipped), f"robot_{index + 1}.png differs from what the script draws"
    report = check_images(SAMPLE_DIR)
    assert len(report.images) == len(module.SHOTS) and not report.skipped
    assert report.warnings == []


def test_the_toy_world_is_tooling_outside_the_package_and_the_toy_model_ships_inside_it():
    import dreambooth_helpers

    assert Path(toyworld.__file__).resolve().parent == ROOT / "scripts"
    assert importlib.util.find_spec("dreambooth_helpers.toyworld") is None
    assert "toyworld" not in dreambooth_helpers.__all__
    assert all(hasattr(dreambooth_helpers, name) for name in dreambooth_helpers.__all__)
    package = Path(dreambooth_helpers.__file__).resolve().parent
    assert TOY_MODEL_DIR.resolve().parent == package and (TOY_MODEL_DIR / "model_index.json").is_file()


# ---------------------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def toy_pipeline():
    from dreambooth_helpers.models import make_pipeline

    return make_pipeline(load_components(TOY_MODEL))


def test_toy_model_is_a_small_standard_diffusers_folder(toy_pipeline):
    from diffusers import StableDiffusionPipeline

    size = sum(p.stat().st_size for p in TOY_MODEL_DIR.rglob("*.safetensors"))
    assert size < 15 * 2**20
    pipeline = StableDiffusionPipeline.from_pretrained(str(TOY_MODEL_DIR))
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == toyworld.RESOLUTION
    assert load_components(TOY_MODEL).native_resolution == toyworld.RESOLUTION
    assert toy_pipeline.unet.dtype == torch.float32  # trainable as loaded


@pytest.mark.slow
def test_toy_model_follows_held_out_prompts(toy_pipeline):
    """(a) Captions of (colour, object, background) combinations never seen in training are drawn as said."""
    result = toyworld.measure_prompt_following(toy_pipeline, count=24, steps=15)
    assert set(result["agreement"]) == {"colour", "background", "position"}
    for attribute, accuracy in result["agreement"].items():
        chance = result["chance"][attribute]
        assert accuracy >= max(0.75, 4 * chance), (attribute, accuracy, chance)


def test_subject_share_finds_the_robot_and_nothing_else(toy_pipeline):
    """Each robot photo as the toy model's VAE gives it back counts as the robot; the world's pictures and the
    base model's "a toy" and "a sks toy" never do."""
    photos, _ = load_instance_images(SAMPLE_DIR, toyworld.RESOLUTION)
    robot = toyworld.vae_round_trip(toy_pipeline, photos)
    subject = toyworld.mean_histogram(robot)
    world, _, _ = toyworld.make_dataset(64, seed=9)
    assert toyworld.subject_share(robot, subject) == 1.0
    assert toyworld.subject_share(toyworld.vae_round_trip(toy_pipeline, list(world)), subject) == 0.0
    measured = toyworld.class_and_subject(toy_pipeline, subject, count=8, sample_steps=15)
    assert measured["pres"] == 0.0 and measured["subject"] == 0.0  # the base model has never seen the robot
    assert measured["div"] > 0.75  # the base model's toys are varied


def test_toy_model_pictures_change_with_the_prompt(toy_pipeline):
    red, blue = (toyworld.generate(toy_pipeline, [f"a {c} ball on a white background"] * 4, steps=15)
                 for c in ("red", "blue"))
    assert toyworld.set_distance(red, blue) > 0.5


@pytest.fixture(scope="module")
def dreambooth_measurements(tmp_path_factory):
    # A shorter, hotter run than the documented one (docs/toy_model.md: 1e-4 for 1600 steps), ~3 min on a core.
    # Both rates given (the text encoder's as the UNet's): this run measures what DreamBooth and prior
    # preservation do, not the recipe, which test_the_default_recipe_keeps_the_class_varied measures.
    measured = toyworld.measure_dreambooth(str(SAMPLE_DIR), str(tmp_path_factory.mktemp("dreambooth")), steps=800,
                                           count=32, num_class_images=32, learning_rate=2e-4, sample_steps=15,
                                           text_encoder_learning_rate=2e-4)
    print({name: round(value, 3) for name, value in measured.items()})  # shown by pytest when a test fails
    return measured


@pytest.mark.slow
def test_dreambooth_teaches_the_subject(dreambooth_measurements):
    """(b) After DreamBooth, "a sks toy" looks like the robot; before, it did not, and "a toy" does not."""
    m = dreambooth_measurements
    assert m["sks_base"] > 0.7 and m["toy_base"] > 0.7  # the base model has never seen the robot
    assert m["sks_after_prior"] < 0.5 * m["sks_base"]
    assert m["sks_after_prior"] < m["toy_base"] - 0.3


@pytest.mark.slow
def test_prior_preservation_prevents_language_drift(dreambooth_measurements):
    """(c) Without prior preservation "a toy" collapses toward the robot; with it, it stays away from the robot
    and nearer the base model's "a toy"."""
    m = dreambooth_measurements
    assert m["toy_after_no_prior"] < m["toy_base"] - 0.3  # language drift
    assert m["toy_after_prior"] > m["toy_after_no_prior"] + 0.3
    assert m["toy_after_prior_to_base"] < m["toy_after_no_prior_to_base"] - 0.08


@pytest.mark.slow
def test_the_default_recipe_keeps_the_class_varied(tmp_path):
    """(d) Issue 21: DreamBooth with prior preservation and the toy recipe (nothing overridden but the length)
    keeps "a toy" varied: DIV (16 seeds) at least 0.65x the base model's after 800 steps, and "a toy" never shows
    the robot.

    Measured at step 800 of the README's run (docs/toy_model.md, 100 class images, the same seeds as here): the
    recipe's text encoder at 0.3x the UNet's rate gives 0.73x (and 0.82x at step 1600, with the robot in half of
    "a sks toy"); at the UNet's rate, the recipe before issue 21, 0.43x. A recipe change that brings the collapse
    back fails here. ~2.5 min on one core.
    """
    measured = toyworld.measure_class_diversity(str(SAMPLE_DIR), str(tmp_path), steps=800, num_class_images=100,
                                                count=16)
    print(measured)  # shown by pytest when the test fails
    base, after = measured["base"], measured["final"]
    assert base["div"] > 0.8 and base["subject"] == 0.0  # varied toys, never the robot
    assert after["div_ratio"] >= 0.65, after
    assert after["pres"] <= 1 / 16, after  # prior preservation: "a toy" does not turn into the robot


def test_the_demo_serves_the_toy_model_and_its_pictures_follow_the_prompt(tmp_path):
    """What a user sees offline in the demo: pictures that change with the prompt, not noise."""
    import base64
    import io

    import httpx

    from dreambooth_helpers.demo import launch_demo
    from tests.test_demo import wait_ready

    running = launch_demo(TOY_MODEL, share=False, port=0, quiet=True, output_dir=tmp_path / "out")
    try:
        url = running.url.rstrip("/")
        assert wait_ready(url)["status"] == "ready"
        colours = {}
        for colour in ("red", "blue"):
            response = httpx.post(f"{url}/api/generate", timeout=120, json={
                "prompt": f"a {colour} ball on a white background", "num_images": 4, "steps": 15, "seed": 0})
            assert response.status_code == 200, response.text
            pictures = [Image.open(io.BytesIO(base64.b64decode(item["png_base64"]))).convert("RGB")
                        for item in response.json()["images"]]
            assert pictures[0].size == (toyworld.RESOLUTION, toyworld.RESOLUTION)
            colours[colour] = [toyworld.analyse(picture)["colour"] for picture in pictures]
    finally:
        running.close()
    assert colours["red"].count("red") >= 3 and colours["blue"].count("blue") >= 3, colours


def test_load_pipeline_reads_a_lora_runs_output_with_its_base_model(make_config, tmp_path):
    """measure_dreambooth(preset="t4-lora") loads LoRA outputs, which hold no model of their own."""
    from dreambooth_helpers.training import train

    result = train(make_config(preset="t4-lora", max_train_steps=2, learning_rate=1e-2,
                               with_prior_preservation=False), progress=False)
    assert not (result.output_dir / "model_index.json").exists()
    trained, base = toyworld.load_pipeline(str(result.output_dir)), toyworld.load_pipeline("tiny")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = base.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = base.text_encoder(ids)[0]
        outputs = [pipe.unet(latents, torch.tensor([500]), hidden).sample for pipe in (trained, base)]
    assert not torch.allclose(*outputs)  # the trained adapters are applied on the base model
