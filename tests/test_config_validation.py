"""Every TrainConfig option refuses a bad value with a message that names the option and what is allowed."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from dreambooth_helpers import PRESETS, Concept, ConfigError, TrainConfig, subject
from dreambooth_helpers.cli import main
from dreambooth_helpers.config import step_in_backward_allowed

# field -> (a bad value, the option name the message must contain, what the message must say is allowed)
BAD_VALUES = {
    "output_dir": ("", "--output-dir", "give a folder"),
    "model": ("", "--model", "Hub id"),
    "vae": ("  ", "--vae", "madebyollin/sdxl-vae-fp16-fix"),
    "preset": ("huge-gpu", "--preset", "t4, t4-lora, low-memory, t4-sdxl, large-gpu"),
    "kind": ("animal", "--kind", "object, person, style"),
    "resolution": (4096, "--resolution", "from 16 to 2048"),
    "crop": ("stretch", "--crop", "center, pad"),
    "random_flip": ("false", "--random-flip", "true or false"),
    "remove_bars": ("yes", "--remove-bars", "true or false"),
    "captions": ("sometimes", "--captions", "auto, strict, off"),
    "with_prior_preservation": ("yes", "--prior-preservation", "true or false"),
    "num_class_images": (-5, "--num-class-images", "from 1 to 10000"),
    "prior_loss_weight": (math.nan, "--prior-loss-weight", "from 0 to 100"),
    "class_images_batch_size": (0, "--class-images-batch-size", "from 1 to 64"),
    "class_images_steps": (1000, "--class-images-steps", "from 1 to 500"),
    "max_train_steps": (0, "--max-train-steps", "from 1 to 1000000"),
    "learning_rate": (1.0, "--learning-rate", "from 1e-09 to 0.1"),
    "text_encoder_learning_rate": (-1e-6, "--text-encoder-learning-rate", "from 1e-09 to 0.1"),
    "lr_scheduler": ("cosine_with_restarts", "--lr-scheduler", "constant, constant_with_warmup, linear, cosine"),
    "lr_warmup_steps": (-1, "--lr-warmup-steps", "from 0 to 1000000"),
    "train_batch_size": (0, "--train-batch-size", "from 1 to 64"),
    "gradient_accumulation_steps": (1.5, "--gradient-accumulation-steps", "whole number from 1 to 256"),
    "max_grad_norm": (-1.0, "--max-grad-norm", "from 0 to 1e+06"),
    "adam_weight_decay": (2.0, "--adam-weight-decay", "from 0 to 1"),
    "use_8bit_adam": (1, "--use-8bit-adam", "true or false"),
    "seed": (-1, "--seed", "from 0 to 4294967295"),
    "train_text_encoder": (None, "--train-text-encoder", "true or false"),
    "stop_text_encoder_training_at": (0, "--stop-text-encoder-training-at", "from 1 to 1000000"),
    "lora": ("true", "--lora", "true or false"),
    "lora_rank": (0, "--lora-rank", "from 1 to 1024"),
    "lora_alpha": (0, "--lora-alpha", "from 1 to 4096"),
    "mixed_precision": ("fp8", "--mixed-precision", "fp16, bf16, no"),
    "gradient_checkpointing": ("on", "--gradient-checkpointing", "true or false"),
    "attention": ("flash", "--attention", "auto, sdpa, xformers"),
    "cache_latents": (0, "--cache-latents", "true or false"),
    "memory_plan": ("fastest", "--memory-plan", "auto, as-set, smallest"),
    "step_in_backward": ("yes", "--step-in-backward", "true or false"),
    "cache_text_embeddings": (1, "--cache-text-embeddings", "true or false"),
    "channels_last": ("no", "--channels-last", "true or false"),
    "checkpoint_every": (0, "--checkpoint-every", "from 1 to 1000000"),
    "checkpoints_total_limit": (0, "--checkpoints-total-limit", "from 1 to 1000"),
    "resume": ("/no/such/checkpoint-000100", "--resume", "--resume latest"),
    "sample_every": (0, "--sample-every", "from 1 to 1000000"),
    "sample_prompts": (["a photo of sks dog", ""], "--sample-prompt", "non-empty prompts"),
    "sample_steps": (0, "--sample-steps", "from 1 to 500"),
    "sample_seed": (2**40, "--sample-seed", "from 0 to 4294967295"),
    "safety_checker": ("no", "--safety-checker", "true or false"),
    "report_to": ("comet", "--report-to", "auto, tensorboard, mlflow, wandb, none"),
}
# Concept fields, checked through a config holding one concept.
BAD_CONCEPTS = {
    "instance_dir": ("", "--instance-dir", "folder with your subject's photos"),
    "instance_prompt": ("   ", "--instance-prompt", "rare token"),
    "class_prompt": (None, "--class-prompt", "--no-prior-preservation"),
    "class_dir": (42, "--class-dir", "must be text"),
}


def good_config(**overrides) -> TrainConfig:
    return TrainConfig.from_preset("t4", concepts=[Concept("photos", "a photo of sks dog", "a photo of dog")],
                                   output_dir="out", **overrides)


def test_the_table_covers_every_option():
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"concepts"}
    assert set(BAD_VALUES) == fields, "add a bad value for each new TrainConfig field"
    assert set(BAD_CONCEPTS) == {f.name for f in dataclasses.fields(Concept)}


def test_the_good_config_is_valid_and_takes_the_object_recipe():
    config = good_config()
    assert config.validate() is config
    assert config.kind == "object" and config.model == "toy"
    assert config.steps_for(5) == subject.default_steps(5, "object")
    assert config.effective_learning_rate == subject.TOY_LEARNING_RATES["full"]
    assert config.effective_num_class_images == subject.recipe("object").num_class_images


@pytest.mark.parametrize("kind", subject.SUBJECT_KINDS)
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("model", ["stable-diffusion-v1-5/stable-diffusion-v1-5", "toy"])
def test_settings_left_at_none_take_the_recipe_of_the_kind(kind, lora, model):
    config = good_config(kind=kind, lora=lora, model=model).validate()
    toy = model == "toy"
    for photos in (1, 4, 12, 40):
        assert config.steps_for(photos) == subject.default_steps(photos, kind)
    assert config.effective_learning_rate == subject.default_learning_rate(kind, lora, toy_model=toy)
    assert config.effective_text_encoder_learning_rate == subject.default_text_encoder_learning_rate(
        kind, lora, toy_model=toy)
    assert config.effective_num_class_images == subject.recipe(kind).num_class_images


def test_values_given_win_over_the_recipe():
    config = good_config(kind="person", max_train_steps=123, learning_rate=3e-6, text_encoder_learning_rate=7e-7,
                         num_class_images=9)
    assert config.steps_for(12) == 123
    assert (config.effective_learning_rate, config.effective_text_encoder_learning_rate) == (3e-6, 7e-7)
    assert config.effective_num_class_images == 9
    assert good_config(num_class_images=9, with_prior_preservation=False).effective_num_class_images == 0


def test_the_text_encoder_rate_follows_a_given_learning_rate_in_the_recipes_proportion():
    """The recipe halves the text encoder's rate under LoRA; a rate given for the UNet keeps that proportion."""
    for lora in (False, True):
        config = good_config(model="stable-diffusion-v1-5/stable-diffusion-v1-5", lora=lora, learning_rate=4e-5)
        share = subject.default_text_encoder_learning_rate(lora=lora) / subject.default_learning_rate(lora=lora)
        assert config.effective_text_encoder_learning_rate == pytest.approx(4e-5 * share)
    assert good_config(lora=True, learning_rate=4e-5).effective_text_encoder_learning_rate < 4e-5


def test_the_kind_changes_the_recommended_run():
    person, style = good_config(kind="person", model="sd"), good_config(kind="style", model="sd")
    assert person.steps_for(12) != style.steps_for(12)
    assert person.effective_learning_rate != style.effective_learning_rate


def test_presets_are_valid_and_distinct():
    made = {name: TrainConfig.from_preset(name, concepts=[Concept("x", "a sks dog", "a dog")]).validate()
            for name in PRESETS}
    as_dicts = {name: config.to_dict() for name, config in made.items()}
    for name, preset in PRESETS.items():
        assert as_dicts[name]["preset"] == name
        # Each setting a preset names takes effect, and each preset changes something besides its own name.
        assert {key: as_dicts[name][key] for key in preset["settings"]} == preset["settings"]
    settings_only = {name: {k: v for k, v in d.items() if k != "preset"} for name, d in as_dicts.items()}
    distinct = {json.dumps(d, sort_keys=True) for d in settings_only.values()}
    assert len(distinct) == len(PRESETS), "two presets produce the same settings"
    assert made["t4"].to_dict() == TrainConfig(concepts=[Concept("x", "a sks dog", "a dog")]).to_dict()  # the defaults
    assert made["t4-lora"].lora and not made["t4"].lora
    assert made["large-gpu"].train_batch_size > made["t4"].train_batch_size
    assert made["low-memory"].memory_plan == "smallest" and made["low-memory"].max_grad_norm == 0


def test_step_in_backward_needs_no_clipping_and_no_accumulation():
    with pytest.raises(ConfigError, match="--step-in-backward cannot be used here.*--max-grad-norm 0"):
        good_config(step_in_backward=True).validate()
    with pytest.raises(ConfigError, match="gradient accumulation"):
        good_config(step_in_backward=True, max_grad_norm=0.0, gradient_accumulation_steps=2).validate()
    good_config(step_in_backward=True, max_grad_norm=0.0).validate()
    assert step_in_backward_allowed(TrainConfig.from_preset("low-memory")) is None


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_every_option_refuses_a_bad_value_naming_itself_and_the_allowed_range(field):
    value, option, allowed = BAD_VALUES[field]
    config = good_config()
    if field == "stop_text_encoder_training_at":
        config.train_text_encoder = True
    setattr(config, field, value)  # as a notebook or a JSON file would set it, past from_preset's defaults
    with pytest.raises(ConfigError) as caught:
        config.validate()
    message = str(caught.value)
    assert option in message and allowed in message, message


@pytest.mark.parametrize("field", sorted(BAD_CONCEPTS))
def test_every_concept_field_refuses_a_bad_value(field):
    value, option, allowed = BAD_CONCEPTS[field]
    config = good_config()
    setattr(config.concepts[0], field, value)
    with pytest.raises(ConfigError) as caught:
        config.validate()
    assert option in str(caught.value) and allowed in str(caught.value), str(caught.value)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, True, "1e-6"])
def test_numbers_refuse_inf_nan_booleans_and_text(value):
    with pytest.raises(ConfigError, match="--learning-rate must be a number"):
        good_config(learning_rate=value).validate()


def test_combinations_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="--stop-text-encoder-training-at only makes sense with"):
        good_config(train_text_encoder=False, stop_text_encoder_training_at=10).validate()
    with pytest.raises(ConfigError, match="--num-class-images must be a whole number from 1"):
        good_config(num_class_images=0).validate()
    good_config(num_class_images=0, with_prior_preservation=False).validate()  # no class images needed then
    with pytest.raises(ConfigError, match="multiple of 8"):
        good_config(resolution=500).validate()
    with pytest.raises(ConfigError, match="No subject to train"):
        TrainConfig().validate()
    with pytest.raises(ConfigError, match=r"Unknown setting\(s\): learning_rat"):
        TrainConfig.from_preset("t4", learning_rat=1e-6)


def test_the_cli_reports_a_bad_value_in_one_paragraph_and_exit_code_2(tmp_path, capsys):
    code = main(["train", "--instance-dir", str(tmp_path), "--instance-prompt", "a sks dog", "--class-prompt",
                 "a dog", "--output-dir", str(tmp_path / "out"), "--learning-rate", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "--learning-rate must be a number from 1e-09 to 0.1 (got 5.0)" in err
    assert "Traceback" not in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exited:
        main(["train", "--output-dir", str(tmp_path), "--max-train-steps", "many"])
    assert exited.value.code == 2 and "invalid int value: 'many'" in capsys.readouterr().err


@pytest.mark.parametrize("prompt, shown", [
    ('a photo of sks dog" $(touch X) "', "'\"' '$'"),
    ("a photo of sks dog`touch X`", "'`'"),
    ("a photo of sks dog; rm -rf ~", "';'"),
    ("a photo of sks\ndog", "'\\n'"),
])
@pytest.mark.parametrize("field, option", [("instance_prompt", "--instance-prompt"),
                                           ("class_prompt", "--class-prompt")])
def test_prompts_with_characters_for_a_shell_or_markdown_are_refused_naming_them(prompt, shown, field, option):
    config = good_config()
    setattr(config.concepts[0], field, prompt)
    with pytest.raises(ConfigError) as caught:
        config.validate()
    message = str(caught.value)
    assert message.startswith(f"{option} {prompt!r}") and shown in message and "ordinary punctuation" in message


@pytest.mark.parametrize("instance, class_", [
    ("photo of <zwx> chair", "photo of chair"), ("a woman in zwx style", "a woman"),
    ("a photo of sks dog, 4k (detailed:1.2)!", "a photo of dog"), ("une photo de sks chien", "une photo de chien"),
    ("a photo of sks teddy-bear's ear", "a photo of teddy-bear's ear"), ("a photo of sks toy", "a photo of toy"),
])
def test_ordinary_prompts_stay_valid(instance, class_):
    TrainConfig.from_preset("t4", concepts=[Concept("photos", instance, class_)], output_dir="out").validate()


def test_the_forms_class_noun_and_identifier_take_sensible_characters_only():
    for noun in ("dog", "teddy bear", "t-shirt", "80's car", "chien", "robot_arm", "st. bernard, puppy"):
        assert subject.prompts_for("sks", noun).instance == f"a photo of sks {noun}"
    for noun in ('dog" $(touch X) "', "dog`touch X`", "dog; rm", "<img src=x>", "dog\\cat", "(dog)"):
        with pytest.raises(ConfigError, match=r"Class noun .*: use letters, digits, spaces and - ' _ \. , only"):
            subject.check_class_noun(noun)
    with pytest.raises(ConfigError, match="Identifier token"):
        subject.prompts_for('sks"', "dog")
