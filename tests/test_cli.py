"""The command line: the README's main command end to end, and what users see when they get it wrong."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from dreambooth_helpers import subject
from dreambooth_helpers.cli import _config_from_args, build_parser, main
from dreambooth_helpers.config import Concept, TrainConfig, option_name, short_number

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "toy_robot"


def _run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dreambooth_helpers", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_readme_main_command_trains_the_sample_subject_end_to_end(tmp_path):
    """The same command as README.md, with fewer steps: a model folder, samples and a summary come out."""
    result = _run_module(
        "train", "--instance-dir", str(SAMPLE), "--instance-prompt", "a photo of sks toy",
        "--class-prompt", "a photo of toy", "--output-dir", str(tmp_path / "model"),
        "--max-train-steps", "4", "--num-class-images", "2", "--sample-every", "2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trained model:" in result.stdout and "Sample images:" in result.stdout
    out = tmp_path / "model"
    assert (out / "model_index.json").is_file() and (out / "unet").is_dir()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-000002-0.png", "step-000004-0.png"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["config"]["preset"] == "t4"
    assert summary["config"]["model"] == "toy" and summary["resolution"] == 32  # the offline default
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"--instance-dir": "no/such/folder"}, "does not exist"),
        ({"--resolution": "30"}, "--resolution must be a multiple of 8"),
        ({"--learning-rate": "-1"}, "--learning-rate must be a number"),
        ({"--max-train-steps": "0"}, "--max-train-steps must be a whole number"),
        ({"--resume": "nowhere"}, "--resume 'nowhere'"),
        ({"--stop-text-encoder-training-at": "5", "--no-train-text-encoder": None}, "--stop-text-encoder-training-at"),
        ({"--instance-prompt": " "}, "--instance-prompt is empty"),
        ({"--class-prompt": ""}, "--class-prompt is missing"),
    ],
)
def test_user_mistakes_exit_2_with_one_message_and_no_traceback(changes, expected, tmp_path, capsys):
    flags = {"--instance-dir": str(SAMPLE), "--instance-prompt": "a photo of sks toy",
             "--class-prompt": "a photo of toy", "--output-dir": str(tmp_path / "o"), "--model": "tiny", **changes}
    argv = ["train"] + [part for flag, value in flags.items() for part in ([flag] if value is None else [flag, value])]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "o" / "model_index.json").exists()


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a photo")
    code = main(["train", "--instance-dir", str(empty), "--instance-prompt", "a sks dog", "--class-prompt", "a dog",
                 "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "No usable image" in err and "notes.txt" in err


def test_unknown_flag_and_bad_choice_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output-dir", "x", "--preset", "gpu9000"])
    assert exit_info.value.code == 2
    assert "gpu9000" in capsys.readouterr().err


def test_concepts_list_file(tmp_path, capsys):
    concepts = tmp_path / "concepts.json"
    concepts.write_text("{not json")
    code = main(["train", "--concepts-list", str(concepts), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "--concepts-list" in capsys.readouterr().err


def test_check_images_reports_and_exits_by_usability(tmp_path, capsys):
    assert main(["check-images", str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "5 usable image(s), 0 skipped" in out
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    assert main(["check-images", str(broken)]) == 2
    captured = capsys.readouterr()
    assert "a.jpg" in captured.out and "No usable image" in captured.err
    assert main(["check-images", str(tmp_path / "missing")]) == 2


def test_console_entry_point_help_lists_commands(tmp_path):
    result = _run_module("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("train", "check-images"):
        assert command in result.stdout


def _train_config(*flags: str, output_dir: str = "out") -> TrainConfig:
    args = build_parser().parse_args(["train", "--instance-dir", str(SAMPLE), "--instance-prompt", "a photo of sks toy",
                                      "--class-prompt", "a photo of toy", "--output-dir", output_dir, *flags])
    return _config_from_args(args)


def _a_value_unlike_the_default(option: dataclasses.Field, annotation) -> tuple[list[str], object]:
    """Flags that set `option` to a value it does not have by default, and that value."""
    flag = option_name(option.name)
    choices = option.metadata["choices"]
    if isinstance(option.default, bool):
        return ([f"--no-{flag[2:]}"] if option.default else [flag]), not option.default
    if choices:
        value = next(c for c in reversed(choices) if c != option.default)
        return [flag, value], value
    if typing.get_origin(annotation) is list:
        return [flag, "first prompt", flag, "second prompt"], ["first prompt", "second prompt"]
    if float in typing.get_args(annotation) or annotation is float:
        return [flag, "0.5"], 0.5
    if int in typing.get_args(annotation) or annotation is int:
        return [flag, "7"], 7
    return [flag, "some/folder"], "some/folder"


def test_every_config_field_is_a_train_flag_that_reaches_the_config(monkeypatch):
    """The flags are generated from TrainConfig: a field added there is settable from the command line."""
    monkeypatch.setattr(TrainConfig, "validate", lambda self: self)  # plumbing only: values need not make a run
    annotations = typing.get_type_hints(TrainConfig)
    changes = {option.name: _a_value_unlike_the_default(option, annotations[option.name])
               for option in dataclasses.fields(TrainConfig) if option.name not in ("concepts", "output_dir")}
    for name, (flags, value) in changes.items():
        assert getattr(_train_config(*flags), name) == value, flags
    config = _train_config(*[part for flags, _ in changes.values() for part in flags], output_dir="elsewhere")
    assert config.output_dir == "elsewhere"
    assert {name: getattr(config, name) for name in changes} == {name: value for name, (_, value) in changes.items()}


def test_flags_left_out_take_the_preset_then_the_defaults():
    config = _train_config("--preset", "low-memory")
    assert config.to_dict() == TrainConfig.from_preset(
        "low-memory", concepts=[Concept(str(SAMPLE), "a photo of sks toy", "a photo of toy")],
        output_dir="out").to_dict()
    assert config.max_grad_norm == 0 and config.memory_plan == "smallest" and config.class_images_batch_size == 1
    assert _train_config().preset == "t4" and _train_config().kind == "object"


def test_the_previously_missing_flags_exist_and_set_their_fields():
    config = _train_config("--max-grad-norm", "0", "--class-images-batch-size", "2", "--class-images-steps", "10",
                           "--lora", "--lora-alpha", "16", "--adam-weight-decay", "0", "--sample-steps", "5",
                           "--sample-seed", "9")
    assert (config.max_grad_norm, config.class_images_batch_size, config.class_images_steps) == (0.0, 2, 10)
    assert (config.lora_alpha, config.adam_weight_decay, config.sample_steps, config.sample_seed) == (16, 0.0, 5, 9)


def test_step_in_backward_advice_can_be_followed(tmp_path, capsys):
    """`train --step-in-backward` names --max-grad-norm 0; giving it makes a valid run (the flag once did not exist)."""
    code = main(["train", "--instance-dir", str(SAMPLE), "--instance-prompt", "a photo of sks toy", "--class-prompt",
                 "a photo of toy", "--output-dir", str(tmp_path / "o"), "--step-in-backward"])
    assert code == 2 and "Use --max-grad-norm 0" in capsys.readouterr().err
    config = _train_config("--step-in-backward", "--max-grad-norm", "0")
    assert config.step_in_backward and config.max_grad_norm == 0 and config.memory_plan == "as-set"


@pytest.mark.parametrize("model", ["stable-diffusion-v1-5/stable-diffusion-v1-5", "toy"])
def test_train_kind_person_with_t4_lora_gives_the_recipe_for_a_person(model):
    """The CLI side of "the notebook and the CLI train the same recipe" (issue 15, item 1)."""
    config = _train_config("--kind", "person", "--preset", "t4-lora", "--model", model)
    toy = model == "toy"
    photos = 12
    assert config.steps_for(photos) == subject.default_steps(photos, "person")
    assert config.effective_learning_rate == subject.default_learning_rate("person", lora=True, toy_model=toy)
    assert config.effective_text_encoder_learning_rate == subject.default_text_encoder_learning_rate(
        "person", lora=True, toy_model=toy)
    assert config.effective_num_class_images == subject.recipe("person").num_class_images
    # The same inputs through the library (as the notebook's form does, None meaning "recommended") give the
    # same config, field for field.
    library = TrainConfig.from_preset(
        "t4-lora", kind="person", model=model, output_dir="out", max_train_steps=None, learning_rate=None,
        text_encoder_learning_rate=None, num_class_images=None,
        concepts=[Concept(str(SAMPLE), "a photo of sks toy", "a photo of toy")]).validate()
    assert config.to_dict() == library.to_dict()
    # And the kind matters: 12 photos of an object get another step count than a person's.
    as_object = _train_config("--kind", "object", "--preset", "t4-lora", "--model", model)
    assert as_object.steps_for(photos) == subject.default_steps(photos, "object") != config.steps_for(photos)


def test_kind_refuses_an_unknown_kind_at_the_parser(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--output-dir", "x", "--kind", "animal"])
    assert exited.value.code == 2 and "object, person, style" in capsys.readouterr().err.replace("'", "")


def test_train_help_shows_the_recipe_and_preset_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for kind in subject.SUBJECT_KINDS:
        recipe = subject.recipe(kind)
        assert f"{kind}: {recipe.steps_per_image} steps per photo, learning rate {short_number(recipe.learning_rate)}" \
            in text
        assert "{} {}-{}".format(kind, *recipe.recommended_photos) in text  # --instance-dir
    assert "learning rate 2e-6" in text and "e-06" not in text  # rates as the README writes them
    assert "LoRA rank; 8-32 for harder subjects (default 4; t4-lora: 8; low-memory: 8; t4-sdxl: 8)." in text
    assert "Starting settings for your GPU (default t4)." in text
    assert "(default toy; t4-sdxl: stabilityai/stable-diffusion-xl-base-1.0)" in text
    assert ") (" not in text  # one parenthesis per help, defaults included
    # All kinds generate the same number of class images: it is said once, by --num-class-images.
    assert len({subject.recipe(kind).num_class_images for kind in subject.SUBJECT_KINDS}) == 1
    assert "prior preservation generates (default: 50; the paper uses ~200)." in text
    assert "50 class images" not in text
    assert "On a GPU, --memory-plan auto (the default) turns it on only when the free memory needs it" in text


def test_short_number_writes_rates_as_the_readme_does():
    assert [short_number(v) for v in (2e-6, 1e-6, 1.5e-6, 1e-4, 1e-3, 0.01, 1.0, 7.5)] == \
        ["2e-6", "1e-6", "1.5e-6", "1e-4", "1e-3", "0.01", "1", "7.5"]


def _stopped_train_args(tmp_path, *extra: str):
    return build_parser().parse_args(["train", "--instance-dir", str(SAMPLE), "--instance-prompt", "a sks toy",
                                      "--output-dir", str(tmp_path / "out"), *extra])


def test_ctrl_c_before_any_checkpoint_says_none_was_saved(tmp_path):
    from dreambooth_helpers.cli import _interrupted_message

    text = _interrupted_message(_stopped_train_args(tmp_path))
    assert "No checkpoint was saved yet (--checkpoint-every N saves them" in text and "--resume" not in text
    text = _interrupted_message(_stopped_train_args(tmp_path, "--checkpoint-every", "400"))
    assert "No checkpoint was saved yet (--checkpoint-every 400 saves one every 400 steps)" in text


def test_ctrl_c_after_checkpoints_names_the_newest_and_how_to_continue(tmp_path):
    from dreambooth_helpers.checkpoints import checkpoint_dir
    from dreambooth_helpers.cli import _interrupted_message

    for step in (200, 400):
        checkpoint_dir(tmp_path / "out", step).mkdir(parents=True)
        (checkpoint_dir(tmp_path / "out", step) / "state.json").write_text(json.dumps({"step": step}))
    checkpoint_dir(tmp_path / "out", 600).mkdir()  # half-written (no state.json): not a checkpoint to resume
    text = _interrupted_message(_stopped_train_args(tmp_path, "--checkpoint-every", "200"))
    assert str(checkpoint_dir(tmp_path / "out", 400)) in text and "--resume latest" in text
    assert "No checkpoint" not in text


def test_ctrl_c_in_main_prints_what_was_kept_and_exits_130(tmp_path, monkeypatch, capsys):
    from dreambooth_helpers import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_train", interrupted)
    monkeypatch.setattr(cli, "_one_thread_for_built_in_models", lambda args: False)  # tests/test_threads.py
    assert main(["train", "--instance-dir", str(SAMPLE), "--instance-prompt", "a sks toy",
                 "--output-dir", str(tmp_path / "out")]) == 130
    assert "No checkpoint was saved yet" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_run_generate", interrupted)
    assert main(["generate", "--model", "toy", "--prompt", "a sks toy", "--out", str(tmp_path / "images")]) == 130
    err = capsys.readouterr().err
    assert "Stopped." in err and "checkpoint" not in err


def test_train_prints_the_expected_time_before_training_starts(tmp_path, monkeypatch, capsys):
    """The README's command says how long it will take before anything loads (choices.expected_time, the one
    figure the notebook's summary and the app's Check print too)."""
    from dreambooth_helpers import cli, training

    printed_before = []

    def train(config):
        printed_before.append(capsys.readouterr().out)
        raise KeyboardInterrupt  # nothing trains: main says what was kept and exits 130

    monkeypatch.setattr(training, "train", train)
    monkeypatch.setattr(cli, "_one_thread_for_built_in_models", lambda args: False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["train", "--instance-dir", str(SAMPLE), "--instance-prompt", "a sks toy", "--class-prompt", "a toy",
                 "--output-dir", str(tmp_path / "out"), "--max-train-steps", "1600",
                 "--num-class-images", "100"]) == 130
    assert printed_before == ["Expected time: about 5-7 min: 1600 steps at 0.18-0.25 s/step and 100 class images at "
                              "0.31-0.40 s each (measured on the toy model on a 2-core CPU, one thread)\n"]
