"""The base-model choice (choices.py): each choice's preset and model, and its outlook, whose every value must be the
one TrainConfig's recipe and the memory planner give, not a copy of them."""

from __future__ import annotations

import json

import pytest

from dreambooth_helpers import choices, memory
from dreambooth_helpers.config import SDXL_BASE_MODEL, SDXL_FP16_VAE, TrainConfig
from dreambooth_helpers.errors import ConfigError
from dreambooth_helpers.families import SDXL
from dreambooth_helpers.notebook.runtime import SD15_MODEL

T4_FREE = int(choices.T4_FREE_GIB * memory.GIB)


def test_the_three_base_models_and_the_offline_ones():
    assert [(c.label, c.model, c.preset) for c in choices.CHOICES[:3]] == [
        ("SD 1.5 (full fine-tune)", SD15_MODEL, "t4"), ("SD 1.5 LoRA", SD15_MODEL, "t4-lora"),
        ("SDXL LoRA", SDXL_BASE_MODEL, "t4-sdxl")]
    assert [(c.model, c.offline) for c in choices.CHOICES[3:]] == [("toy", True), ("tiny-sdxl", True)]
    assert choices.choice_options()[2] == ("SDXL LoRA", "sdxl-lora")
    assert choices.base_model_choice("SDXL LoRA") is choices.base_model_choice("sdxl-lora")
    with pytest.raises(ConfigError, match="SD 1.5 LoRA"):
        choices.base_model_choice("sd3")
    assert choices.default_choice(cuda_available=True) == "sd15-full"
    assert choices.default_choice(cuda_available=False) == "toy"
    assert choices.choice_for_model(SD15_MODEL, "t4-lora") == "sd15-lora"
    assert choices.choice_for_model(SD15_MODEL, "low-memory") == "sd15-full"
    assert choices.choice_for_model("tiny") is None
    assert [choices.offline_model(c) for c in ("sd15-full", "sdxl-lora", "tiny-sdxl")] == ["toy", "tiny-sdxl",
                                                                                         "tiny-sdxl"]


@pytest.mark.parametrize("choice", [c.key for c in choices.CHOICES])
def test_a_choice_is_its_preset_with_its_model(choice):
    chosen = choices.base_model_choice(choice)
    config = choices.preview_config(choice)
    preset = TrainConfig.from_preset(chosen.preset)
    assert config.model == chosen.model and config.preset == chosen.preset
    for name in ("lora", "lora_rank", "train_text_encoder", "mixed_precision", "use_8bit_adam", "cache_latents"):
        assert getattr(config, name) == getattr(preset, name), name
    # SDXL's fp16-safe VAE comes with SDXL; a built-in model never takes a VAE it cannot use.
    assert config.vae == (SDXL_FP16_VAE if choice == "sdxl-lora" else None)


@pytest.mark.parametrize("choice", [c.key for c in choices.CHOICES])
def test_the_outlook_is_the_recipes_and_the_planners(choice):
    chosen = choices.base_model_choice(choice)
    outlook = choices.outlook(choice, 5)
    config = choices.preview_config(choice)
    size = memory.planning_size(chosen.model) if chosen.offline else (
        memory.SDXL_SIZE if chosen.family is SDXL else memory.SD1_SIZE)
    assert outlook.steps == config.steps_for(5)
    assert outlook.resolution == (config.resolution or size.native_resolution)
    assert outlook.learning_rate == config.effective_learning_rate
    assert outlook.text_encoder_learning_rate == (config.effective_text_encoder_learning_rate
                                                  if config.train_text_encoder else None)
    assert outlook.class_images == config.effective_num_class_images
    plan = memory.plan_memory(config, free_bytes=T4_FREE, size=size)
    assert outlook.gpu_fits
    assert (outlook.gpu_peak_allocated, outlook.gpu_peak_reserved) == (plan.estimate.peak_allocated,
                                                                       plan.estimate.peak_reserved)
    assert outlook.gpu_settings == plan.settings.describe()
    assert outlook.ram_needed == memory.estimate_ram(config, size, config.mixed_precision)
    assert outlook.ram_budget == int(choices.COLAB_RAM_GIB * memory.GIB) and outlook.ram_fits
    text = outlook.text()
    for expected in (chosen.label, chosen.model, f"{outlook.resolution} px", f"{outlook.steps} steps",
                     f"~{outlook.gpu_peak_allocated / memory.GIB:.1f} GiB peak", outlook.gpu_settings,
                     f"~{outlook.ram_needed / memory.GIB:.1f} GiB to load", "12.7 GiB"):
        assert expected in text, (expected, text)
    data = json.loads(json.dumps(outlook.as_dict()))
    assert data["steps"] == outlook.steps and data["gpu"]["fits"] and data["ram"]["fits"]
    assert data["gpu"]["peak_allocated_gib"] == round(outlook.gpu_peak_allocated / memory.GIB, 2)


def test_what_each_real_choice_means_on_a_t4():
    """The facts the notebook's text states, as the recipe and the planner give them today."""
    full, lora, sdxl = (choices.outlook(key, 5) for key in ("sd15-full", "sd15-lora", "sdxl-lora"))
    assert (full.resolution, lora.resolution, sdxl.resolution) == (512, 512, 1024)
    assert full.learning_rate < lora.learning_rate == sdxl.learning_rate
    assert sdxl.text_encoder_learning_rate is None and "both text encoders frozen" in sdxl.text()
    assert lora.gpu_peak_allocated < sdxl.gpu_peak_allocated < full.gpu_peak_allocated  # SDXL LoRA fits a T4
    # SDXL needs gradient checkpointing on a T4, and says what the faster setting would need.
    assert sdxl.gpu_settings == "gradient checkpointing" and "no gradient checkpointing would need" in sdxl.text()
    assert full.ram_needed < sdxl.ram_needed < sdxl.ram_budget


def test_the_forms_values_change_the_outlook():
    frozen = choices.outlook("sdxl-lora", 5)
    trained = choices.outlook("sdxl-lora", 5, train_text_encoder=True)
    assert trained.gpu_peak_allocated > frozen.gpu_peak_allocated and trained.text_encoder_learning_rate
    assert "both text encoders" in trained.text() and "frozen" not in trained.text()
    short = choices.outlook("sd15-full", 12, kind="person", max_train_steps=300, num_class_images=0)
    assert short.steps == 300 and "as set" in short.text()
    assert short.class_images == 0 and "prior preservation off" in short.text()
    person = choices.outlook("sd15-full", 12, kind="person")
    assert person.steps == TrainConfig(kind="person").steps_for(12)
    assert person.learning_rate == TrainConfig(kind="person", model=SD15_MODEL).effective_learning_rate
    low = choices.outlook("sdxl-lora", 5, preset="low-memory")
    assert low.config.preset == "low-memory" and low.config.vae == SDXL_FP16_VAE  # the VAE goes with the model


def test_a_run_that_does_not_fit_says_what_to_change():
    outlook = choices.outlook("sd15-full", 5, gpu=("an 8 GB card", 7.5))
    config = outlook.config
    smallest = memory.candidate_settings(config)[-1]
    assert not outlook.gpu_fits and outlook.gpu_settings == smallest.describe()
    assert outlook.gpu_peak_reserved == memory.estimate_memory(config, smallest, size=memory.SD1_SIZE).peak_reserved
    assert "on an 8 GB card (7.5 GiB free)" in outlook.text() and "does not fit" in outlook.text()
    assert "Change this setting: --lora" in outlook.text()
    tight_ram = choices.outlook("sdxl-lora", 5, ram_gib=4)
    assert not tight_ram.ram_fits and "does not fit" in tight_ram.text().splitlines()[-1]


def test_an_outlook_leaves_the_running_plan_alone():
    """plan_memory records its plan for the run's out-of-memory advice; a preview must not replace it."""
    config = TrainConfig.from_preset("t4", model=SD15_MODEL)
    running = memory.plan_memory(config, free_bytes=40 * memory.GIB)
    choices.outlook("sd15-full", 5)
    choices.outlook("sd15-full", 5, gpu=("a small card", 2))
    assert memory.current_plan(config) is running


def test_the_toy_models_preset_is_the_command_lines_and_says_what_it_becomes_on_a_cpu():
    """Issue 30: on a CPU the app starts on the toy model; its preset is the one `train` gives it (TrainConfig's
    defaults: --model toy, --preset t4), from one place, and the page says what that preset becomes there."""
    from dreambooth_helpers.config import DEFAULT_PRESET, TOY_MODEL

    defaults = TrainConfig()
    assert defaults.model == TOY_MODEL and choices.preset_for_model(TOY_MODEL) == defaults.preset == DEFAULT_PRESET
    assert choices.base_model_choice(choices.choice_for_model(TOY_MODEL)).preset == defaults.preset
    assert choices.preset_for_model("tiny-sdxl") == "t4-sdxl"  # SDXL trains LoRA: never the full fine-tune's
    assert choices.preset_for_model(SD15_MODEL) == "t4" and choices.preset_for_model("someone/model") == "t4"

    here = choices.on_this_machine("toy", cuda_available=False)
    assert here == ("Without a GPU (as here), this preset trains the Toy model in fp32 instead of fp16, with plain "
                    "AdamW instead of 8-bit AdamW, at 32 px (the model's own size).")
    assert "in fp32 instead of bf16" in choices.on_this_machine("toy", "large-gpu", cuda_available=False)
    assert "at 64 px" in choices.on_this_machine("tiny-sdxl", cuda_available=False)
    assert "would take days" in choices.on_this_machine("sd15-full", cuda_available=False)  # runtime's refusal
    assert choices.on_this_machine("toy", cuda_available=True) == ""  # on a GPU the preset reads as it applies


def readme_run(tmp_path, **changes) -> TrainConfig:
    """The README's first command: the toy model, 1600 steps, 100 class images."""
    from dreambooth_helpers.config import Concept

    settings = dict(concepts=[Concept("sample_data/toy_robot", "a sks toy", "a toy")],
                    output_dir=str(tmp_path / "out"), max_train_steps=1600, num_class_images=100)
    return TrainConfig(**{**settings, **changes})


def test_the_expected_time_is_steps_and_class_images_at_the_measured_speeds(tmp_path):
    cpu = {"cuda_available": False, "environ": {}}
    expected = choices.expected_time(readme_run(tmp_path), 5, **cpu)
    assert (expected.steps, expected.class_images) == (1600, 100)
    low, high = expected.seconds
    assert low == pytest.approx(5 + 1600 * 0.18 + 100 * 0.31) and high == pytest.approx(9 + 1600 * 0.25 + 100 * 0.40)
    assert expected.text() == ("about 5-7 min: 1600 steps at 0.18-0.25 s/step and 100 class images at 0.31-0.40 s "
                               "each (measured on the toy model on a 2-core CPU, one thread)")
    # Class images already on disk are not made again; without prior preservation there are none.
    class_dir = tmp_path / "out" / "class_images" / "a-toy"
    class_dir.mkdir(parents=True)
    for i in range(40):
        (class_dir / f"class-{i:05d}.png").write_bytes(_png())
    assert choices.expected_time(readme_run(tmp_path), 5, **cpu).class_images == 60
    short = choices.expected_time(readme_run(tmp_path, max_train_steps=100, with_prior_preservation=False), 5, **cpu)
    assert short.text() == ("about 23-34 s: 100 steps at 0.18-0.25 s/step (measured on the toy model on a 2-core "
                            "CPU, one thread)")
    # The app's 8-step run of a newcomer's trial (50 class images, samples at every step: 8 of 20 denoising steps
    # each) took 29.7 s from start to finish, where 17-22 s had been said, samples and starting left out.
    tried = choices.expected_time(readme_run(tmp_path / "new", max_train_steps=8, num_class_images=50,
                                             sample_every=1), 5, **cpu)
    low, high = tried.seconds
    assert tried.samples == 8 and low < 29.7 < high and "with 8 sample images" in tried.text()
    assert choices.expected_time(readme_run(tmp_path, max_train_steps=None), 5, **cpu).steps == 750  # the recipe's


@pytest.mark.parametrize(("changes", "where", "why"), [
    ({}, {"cuda_available": True, "environ": {}}, "no training speed has been measured on a GPU"),
    ({"model": "tiny"}, {"cuda_available": False, "environ": {}}, "measured only for the toy model"),
    ({"resolution": 64}, {"cuda_available": False, "environ": {}}, "at the model's own 32 px"),
    ({"train_batch_size": 2}, {"cuda_available": False, "environ": {}}, "one photo a step"),
    ({}, {"cuda_available": False, "environ": {"OMP_NUM_THREADS": "2"}}, "OMP_NUM_THREADS=2 is set"),
])
def test_the_expected_time_is_unknown_where_nothing_measured_applies(tmp_path, changes, where, why):
    expected = choices.expected_time(readme_run(tmp_path, **changes), 5, **where)
    assert expected.seconds is None
    assert expected.text().startswith("unknown for 1600 steps and 100 class images: ") and why in expected.text()


def test_the_notebooks_summary_prints_the_same_expected_time(tmp_path):
    from dreambooth_helpers.notebook.forms import config_summary

    config = readme_run(tmp_path)
    line = next(line for line in config_summary(config, 5).splitlines() if line.startswith("expected time:"))
    assert line == f"expected time:    {choices.expected_time(config, 5).text()}"


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()
