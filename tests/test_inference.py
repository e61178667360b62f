"""Generation: loading every kind of model, reproducible seeds, metadata in PNGs, the generate CLI."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_helpers.cli import main
from dreambooth_helpers.errors import ConfigError, DreamBoothError, ImageDataError, ModelLoadError
from dreambooth_helpers.inference import (
    example_prompts,
    image_grid,
    load_generator,
    read_training_summary,
    save_images,
    subject_from_prompts,
)
from tests.trained_fixtures import CLASS_PROMPT, INSTANCE_PROMPT, make_full_output, make_lora_output

torch.set_num_threads(1)
STEPS = 3


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


@pytest.fixture(scope="module")
def tiny():
    return load_generator("tiny")


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    return make_full_output(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return make_lora_output(tmp_path_factory.mktemp("lora"))


def test_same_seed_same_image_and_each_image_has_its_own_seed(tiny):
    first = tiny.generate("a photo of sks dog", num_images=2, steps=STEPS, seed=42)
    again = tiny.generate("a photo of sks dog", num_images=2, steps=STEPS, seed=42)
    assert [r.seed for r in first] == [42, 43]
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))
    # The second image of a batch can be made again on its own from its recorded seed.
    alone = tiny.generate("a photo of sks dog", num_images=1, steps=STEPS, seed=43)[0]
    assert np.abs(pixels(alone) - pixels(first[1])).max() <= 2


def test_defaults_come_from_the_model(tiny):
    assert tiny.default_resolution == 64
    assert tiny.scheduler_name == "dpm++"
    assert type(tiny.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert tiny.pipeline.scheduler.config.algorithm_type == "dpmsolver++"
    result = tiny.generate("a red ball", steps=STEPS, seed=1)[0]
    assert result.image.size == (64, 64) and (result.width, result.height) == (64, 64)
    assert result.model == "tiny" and result.lora is None and result.steps == STEPS


def test_other_size_scheduler_and_negative_prompt(tiny):
    result = tiny.generate("a red ball", negative_prompt="blue", steps=STEPS, seed=1, width=96, height=64,
                           scheduler="euler-a")[0]
    assert result.image.size == (96, 64)
    assert result.scheduler == "euler-a" and type(tiny.pipeline.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    plain = tiny.generate("a red ball", steps=STEPS, seed=1, width=96, height=64, scheduler="euler-a")[0]
    assert not np.array_equal(pixels(result), pixels(plain))
    tiny.generate("a red ball", steps=STEPS, seed=1, scheduler="dpm++")


@pytest.mark.parametrize("settings, message", [
    (dict(prompt="  "), "prompt is empty"),
    (dict(prompt="a dog", steps=0), "steps"),
    (dict(prompt="a dog", num_images=100), "num_images"),
    (dict(prompt="a dog", guidance_scale=-1.0), "guidance_scale"),
    (dict(prompt="a dog", width=70), "multiple of 8"),
    (dict(prompt="a dog", seed=-5), "seed"),
    (dict(prompt="a dog", scheduler="fastest"), "dpm++"),
])
def test_bad_settings_are_refused_with_the_setting_named(tiny, settings, message):
    with pytest.raises(ConfigError, match=message):
        tiny.generate(**{"steps": STEPS, **settings})


def test_full_fine_tune_folder_loads_with_its_summary(full_dir, tiny):
    generator = load_generator(str(full_dir))
    assert generator.lora is None and generator.default_resolution == 64
    assert generator.summary["instance_prompts"] == [INSTANCE_PROMPT]
    trained = generator.generate("a photo of sks dog", steps=STEPS, seed=7)[0]
    base = tiny.generate("a photo of sks dog", steps=STEPS, seed=7)[0]
    assert not np.array_equal(pixels(trained), pixels(base))  # the trained UNet is really used
    assert generator.example_prompts()[0] == INSTANCE_PROMPT


def test_lora_folder_loads_on_its_base_model(lora_dir, tiny):
    from_folder = load_generator(str(lora_dir))
    assert from_folder.lora == str(lora_dir) and from_folder.model == "tiny"  # the base, named by the summary
    explicit = load_generator("tiny", lora=str(lora_dir))
    one = from_folder.generate("a photo of sks dog", steps=STEPS, seed=3)[0]
    two = explicit.generate("a photo of sks dog", steps=STEPS, seed=3)[0]
    base = tiny.generate("a photo of sks dog", steps=STEPS, seed=3)[0]
    assert np.array_equal(pixels(one), pixels(two))
    assert np.abs(pixels(one) - pixels(base)).max() > 5  # the adapters change the images
    assert "LoRA: " in one.parameters_text()


def test_model_and_lora_mistakes_say_what_to_do(tmp_path, lora_dir):
    with pytest.raises(ModelLoadError, match="no pytorch_lora_weights"):
        load_generator("tiny", lora=str(tmp_path))
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "pytorch_lora_weights.safetensors").write_bytes((lora_dir / "pytorch_lora_weights.safetensors")
                                                              .read_bytes())
    with pytest.raises(ModelLoadError, match="--model BASE --lora"):
        load_generator(str(orphan))
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_generator(str(tmp_path / "missing"))
    (tmp_path / "training_summary.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_training_summary(tmp_path)


def test_saved_pngs_carry_prompt_seed_and_settings(tiny, tmp_path):
    results = tiny.generate("a photo of sks dog", negative_prompt="blurry", num_images=2, steps=STEPS, seed=11,
                            guidance_scale=6.0)
    paths = save_images(results, tmp_path / "out")
    assert len(paths) == 2 and all(p.suffix == ".png" for p in paths)
    for path, seed in zip(paths, (11, 12), strict=True):
        text = Image.open(path).text
        assert text["prompt"] == "a photo of sks dog" and text["negative_prompt"] == "blurry"
        assert text["seed"] == str(seed) and text["steps"] == str(STEPS) and text["guidance_scale"] == "6.0"
        assert text["model"] == "tiny" and text["scheduler"] == "dpm++"
        assert f"Seed: {seed}" in text["parameters"] and "Negative prompt: blurry" in text["parameters"]


def test_image_grid_layout():
    images = [Image.new("RGB", (64, 32), c) for c in ("red", "green", "blue", "white", "black")]
    grid = image_grid(images, cols=2)
    assert grid.size == (128, 96)
    assert grid.getpixel((70, 40)) == (255, 255, 255)  # row 2, column 2: the fourth image
    assert grid.getpixel((100, 80)) == (255, 255, 255)  # the empty last cell keeps the background
    assert image_grid(images[:4]).size == (128, 64)
    with pytest.raises(ImageDataError, match="no images"):
        image_grid([])


def test_subject_and_example_prompts():
    assert subject_from_prompts("a photo of sks dog", "a photo of dog") == ("sks", "dog")
    assert subject_from_prompts("a photo of sks dog") == ("sks", "dog")
    summary = {"instance_prompts": [INSTANCE_PROMPT],
               "config": {"concepts": [{"instance_prompt": INSTANCE_PROMPT, "class_prompt": CLASS_PROMPT}]}}
    examples = example_prompts(summary)
    assert examples[0] == INSTANCE_PROMPT and len(examples) == 5
    assert all("sks dog" in e for e in examples)
    assert example_prompts(None)  # a plain Hub model still gets something to click


def test_generate_cli_writes_pngs(tmp_path, lora_dir, capsys):
    out = tmp_path / "images"
    code = main(["generate", "--model", "tiny", "--lora", str(lora_dir), "--prompt", "a photo of sks dog",
                 "--num-images", "2", "--steps", str(STEPS), "--seed", "5", "--grid", "--out", str(out)])
    assert code == 0
    pngs = sorted(p.name for p in out.glob("image-*.png"))
    assert len(pngs) == 2 and pngs[0].endswith("seed5.png") and pngs[1].endswith("seed6.png")
    assert all(Image.open(out / name).size == (64, 64) for name in pngs)  # the files at their true size
    assert (out / "grid.png").is_file() and Image.open(out / "grid.png").size == (512, 256)  # shown enlarged, 4x
    assert "seed 5" in capsys.readouterr().out


def test_generate_cli_reports_user_errors(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path)])
    assert code == 2 and "no such file or folder" in capsys.readouterr().err
    assert issubclass(ModelLoadError, DreamBoothError)


# ---------------------------------------------------------------------------- checked before the model loads


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test if anything starts loading a model: the checks must come first."""
    import dreambooth_helpers.inference as inference

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(inference, "load_components", refuse)
    monkeypatch.setattr(inference, "load_generator", refuse)


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "steps must be a whole number from 1"),
    (["--num-images", "0"], "num_images must be a whole number from 1"),
    (["--num-images", "65"], "num_images"),
    (["--prompt", "   "], "prompt is empty"),
    (["--guidance", "99"], "guidance_scale must be a number from 0 to 50"),
    (["--guidance", "nan"], "guidance_scale"),
    (["--seed", "-1"], "seed must be a whole number"),
    (["--width", "30"], "width must be a multiple of 8"),
    (["--height", "4096"], "height must be a whole number from 8 to 2048"),
])
def test_generate_settings_are_checked_before_the_model_loads(flags, message, tmp_path, capsys, no_model_loads):
    args = ["generate", "--model", "tiny", "--prompt", "a photo of sks dog", "--out", str(tmp_path / "images")]
    assert main(args + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "images").exists()  # nothing was created for a run that cannot happen


def test_generate_out_is_checked_before_the_model_loads(tmp_path, capsys, no_model_loads):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    assert main(["generate", "--model", "tiny", "--prompt", "a dog", "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "--out" in err
    # A folder that cannot be made: its parent is a file.
    assert main(["generate", "--model", "tiny", "--prompt", "a dog", "--out", str(a_file / "images")]) == 2
    assert "cannot be made" in capsys.readouterr().err
    # --grid would write grid.png where a folder of that name is.
    (tmp_path / "out" / "grid.png").mkdir(parents=True)
    assert main(["generate", "--model", "tiny", "--prompt", "a dog", "--grid", "--out", str(tmp_path / "out")]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert a_file.read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_generate_out_in_an_unwritable_folder_is_refused_first(tmp_path, capsys, no_model_loads):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["generate", "--model", "tiny", "--prompt", "a dog", "--out", str(locked / "images")]) == 2
        assert "cannot write in" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_generate_function_checks_before_loading(tmp_path, no_model_loads):
    from dreambooth_helpers.inference import generate

    with pytest.raises(ConfigError, match="steps"):
        generate("tiny", "a dog", steps=0)
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        generate("tiny", "a dog", out_dir=tmp_path / "taken")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc, where no one can make files")
def test_generate_out_in_a_place_no_one_can_write_is_refused_first(capsys, no_model_loads):
    assert main(["generate", "--model", "tiny", "--prompt", "a dog", "--out", "/proc/dreambooth-images"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out '/proc/dreambooth-images': cannot write in '/proc'") and "Traceback" not in err


@pytest.mark.parametrize("hub_environment, said", [
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "could not be reached"),  # nothing listens on port 9
    ({"HF_HUB_OFFLINE": "1"}, "offline mode"),
])
def test_a_hub_model_that_cannot_be_had_fails_at_once_with_one_paragraph(tmp_path, hub_environment, said):
    """A mistyped local path looks like a Hub id ("outputs/typo"): without a network that used to mean minutes of
    retries per file before the error; now one quick question to the Hub, and an error that names both readings."""
    import subprocess
    import sys
    import time

    environment = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, not an installed copy
    environment.update(HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=repository, **hub_environment)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dreambooth_helpers", "generate", "--model", "outputs/typo",
                           "--prompt", "a dog", "--out", str(tmp_path / "images")],
                          capture_output=True, text=True, env=environment, timeout=180, cwd=tmp_path)
    assert done.returncode == 2 and time.monotonic() - started < 90
    assert "no local folder of that name" in done.stderr and said in done.stderr
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr + done.stdout
    assert not (tmp_path / "images").exists()
