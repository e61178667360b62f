"""The notebook's glue (dreambooth_helpers.notebook, re-exported as widgets), without a browser."""

from __future__ import annotations

import datetime
import io
import json
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_helpers import cli, subject, widgets
from dreambooth_helpers.config import SDXL_BASE_MODEL, SDXL_FP16_VAE, TrainConfig
from dreambooth_helpers.data import read_images
from dreambooth_helpers.errors import ConfigError, DreamBoothError, ImageDataError
from dreambooth_helpers.grids import labelled_grid
from dreambooth_helpers.notebook.monitor import sample_step
from tests.conftest import draw_subject

REPO = Path(__file__).resolve().parent.parent
PLAIN = widgets.NotebookRuntime(colab=False, smoke=False)
SMOKE = widgets.NotebookRuntime(colab=False, smoke=True)
COLAB = widgets.NotebookRuntime(colab=True, smoke=False)


def png_bytes(index: int, size=(96, 96)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40 * index % 255, 140, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_value_8(count: int) -> tuple[dict, ...]:
    """What ipywidgets 8 FileUpload.value holds after uploading `count` photos."""
    files = []
    for i in range(count):
        data = png_bytes(i + 1)
        files.append({"name": f"My Photo {i}.PNG", "type": "image/png", "size": len(data),
                      "content": memoryview(data),
                      "last_modified": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)})
    return tuple(files)


def upload_value_7(count: int) -> dict[str, dict]:
    """What ipywidgets 7 (Colab's 7.7.1) FileUpload.value holds: {name: {"metadata": ..., "content": bytes}}."""
    return {f"photo{i}.png": {"metadata": {"name": f"photo{i}.png", "type": "image/png", "size": 1,
                                           "lastModified": 0}, "content": png_bytes(i + 1)} for i in range(count)}


# ---------------------------------------------------------------------------- the runtime


def test_detect_runtime_reads_the_environment_once(monkeypatch, tmp_path):
    monkeypatch.setenv(widgets.SMOKE_VARIABLE, "1")
    monkeypatch.setenv("DREAMBOOTH_HELPERS_SMOKE_OUTPUT", str(tmp_path))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    runtime = widgets.detect_runtime()
    assert runtime == widgets.NotebookRuntime(colab=False, smoke=True, smoke_output=str(tmp_path))
    monkeypatch.setenv(widgets.SMOKE_VARIABLE, "0")
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert widgets.detect_runtime().colab and not widgets.detect_runtime().smoke
    assert runtime.smoke  # decided once: a later change of the environment does not reach an existing runtime


def test_choose_base_model():
    assert widgets.choose_base_model(widgets.SD15_MODEL, SMOKE) in ("tiny", "toy")
    assert widgets.choose_base_model(f"  {widgets.SD15_MODEL} ", PLAIN) == widgets.SD15_MODEL
    with pytest.raises(ConfigError, match="BASE_MODEL is empty"):
        widgets.choose_base_model(" ", PLAIN)
    # Empty: the form's base-model choice; a model typed in wins; smoke runs the offline model of its family.
    assert widgets.choose_base_model("", PLAIN, "sdxl-lora") == SDXL_BASE_MODEL
    assert widgets.choose_base_model(" my/sdxl ", PLAIN, "sdxl-lora") == "my/sdxl"
    assert widgets.choose_base_model("", SMOKE, "sdxl-lora") == "tiny-sdxl"
    assert widgets.choose_base_model("", SMOKE, "sd15-lora") in ("tiny", "toy")


def test_smoke_model_is_toy_only_when_its_weights_exist(monkeypatch, tmp_path):
    from dreambooth_helpers import models

    monkeypatch.setattr(models, "TOY_MODEL_DIR", tmp_path / "toy_model", raising=False)
    assert widgets.smoke_model() == "tiny"
    (tmp_path / "toy_model" / "unet").mkdir(parents=True)
    assert widgets.smoke_model() == "toy"


def test_gpu_status_messages():
    none = widgets.gpu_status(PLAIN, cuda_available=False)
    assert not none.available and "Change runtime type" in none.message and "T4" in none.message
    t4 = widgets.gpu_status(PLAIN, cuda_available=True, name="Tesla T4", memory_bytes=15 * 2**30)
    assert t4.available and t4.memory_gib == 15 and "Tesla T4" in t4.message and "'t4' preset" in t4.message
    small = widgets.gpu_status(PLAIN, cuda_available=True, name="RTX 2070", memory_bytes=8 * 2**30)
    assert "low-memory" in small.message and "LoRA" in small.message


def test_drive_and_output_root_outside_colab(capsys, tmp_path):
    assert widgets.mount_drive(False, PLAIN) is None
    assert widgets.mount_drive(True, PLAIN) is None
    assert "only be mounted in Colab" in capsys.readouterr().out
    assert widgets.output_root(PLAIN) == Path("outputs")
    assert widgets.output_root(COLAB) == Path("/content/outputs")
    assert widgets.output_root(PLAIN, tmp_path) == tmp_path


def test_smoke_output_root_and_no_drive(tmp_path):
    smoke = widgets.NotebookRuntime(colab=True, smoke=True, smoke_output=str(tmp_path))
    assert widgets.mount_drive(True, smoke) is None
    assert widgets.output_root(smoke) == tmp_path


# ---------------------------------------------------------------------------- login, only when publishing


def fake_colab(monkeypatch, secrets: dict[str, str] | None = None, uploads: dict[str, bytes] | None = None):
    """Pretend to be in Colab: `secrets` readable (None: access not granted), `uploads` what the user picks."""
    colab = types.ModuleType("google.colab")
    userdata = types.ModuleType("google.colab.userdata")
    files = types.ModuleType("google.colab.files")

    class SecretNotFoundError(Exception):
        pass

    def get(name):
        if secrets is None or name not in secrets:
            raise SecretNotFoundError(name)
        return secrets[name]

    def upload(target_dir=""):
        for name, content in (uploads or {}).items():  # Colab writes each file to target_dir as well
            (Path(target_dir or ".") / name).write_bytes(content)
        files.calls.append(target_dir)
        return {str(Path(target_dir) / name): content for name, content in (uploads or {}).items()}

    userdata.get, files.upload, files.calls = get, upload, []
    colab.userdata, colab.files = userdata, files
    google = sys.modules.get("google") or types.ModuleType("google")
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
    monkeypatch.setitem(sys.modules, "google.colab.files", files)
    return files


def test_colab_secret(monkeypatch):
    assert widgets.colab_secret(PLAIN) is None  # not in Colab
    fake_colab(monkeypatch, {"HF_TOKEN": "  hf_example_value  "})
    assert widgets.colab_secret(COLAB) == "hf_example_value"
    fake_colab(monkeypatch, None)
    assert widgets.colab_secret(COLAB) is None


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub's login functions replaced: records logins, fails the test on a sign-in prompt."""
    import huggingface_hub

    state = {"token": None, "prompted": 0}
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: state["token"])
    monkeypatch.setattr(huggingface_hub, "login", lambda token, **kw: state.update(token=token, login=kw))
    monkeypatch.setattr(huggingface_hub, "whoami", lambda *a, **k: {"name": "alice"})

    def notebook_login(**kw):
        state["prompted"] += 1
        state["token"] = state.get("typed")

    monkeypatch.setattr(huggingface_hub, "notebook_login", notebook_login)
    return state


def test_hub_login_uses_the_colab_secret_and_never_returns_the_token(hub, monkeypatch):
    secret = "hf_" + "x" * 30
    fake_colab(monkeypatch, {"HF_TOKEN": secret})
    message = widgets.hub_login(COLAB)
    assert hub["token"] == secret and hub["login"] == {"add_to_git_credential": False}
    assert "Colab secret HF_TOKEN" in message and "alice" in message and secret not in message
    assert "Using your Hugging Face login" in widgets.hub_login(COLAB)
    assert hub["prompted"] == 0


def test_hub_login_never_prompts_unless_asked(hub):
    with pytest.raises(ConfigError, match="HF_TOKEN.*SIGN_IN_HERE"):
        widgets.hub_login(PLAIN)
    assert hub["prompted"] == 0  # "Run all" must never sit in a 15-minute sign-in flow
    with pytest.raises(ConfigError, match="No Hugging Face token"):
        widgets.hub_login(PLAIN, sign_in=True)  # prompted, but the user did not finish signing in
    hub["typed"] = "hf_" + "y" * 30
    assert widgets.hub_login(PLAIN, sign_in=True).startswith("Logged in") and hub["prompted"] == 2


def test_publish_does_nothing_unless_ticked(hub, tmp_path):
    message = widgets.publish(tmp_path, widgets.NotebookSettings(), PLAIN, requested=False)
    assert "tick PUBLISH" in message and hub["prompted"] == 0 and hub["token"] is None


def test_publish_logs_in_then_pushes(hub, monkeypatch, tmp_path):
    from dreambooth_helpers import hub as hub_module

    pushed = {}
    monkeypatch.setattr(hub_module, "push_to_hub", lambda folder, repo, private: pushed.update(
        folder=folder, repo=repo, private=private) or f"https://huggingface.co/{repo}")
    hub["token"] = "hf_" + "z" * 30  # e.g. HF_TOKEN in the environment
    message = widgets.publish(tmp_path, widgets.NotebookSettings(token="sks", class_noun="teddy bear"), PLAIN,
                              requested=True)
    assert pushed == {"folder": tmp_path, "repo": "alice/sks-teddy-bear-dreambooth", "private": True}
    assert message == "Pushed to https://huggingface.co/alice/sks-teddy-bear-dreambooth (private)."
    assert widgets.default_repo_id("sks", "dog") == "your-hf-name/sks-dog-dreambooth"


# ---------------------------------------------------------------------------- settings -> config


def test_settings_to_config_leaves_the_recipe_to_the_config(tmp_path, instance_dir):
    settings = widgets.NotebookSettings(token="sks", class_noun="dog")
    config = widgets.settings_to_config(settings, instance_dir, 4, tmp_path / "run", widgets.SD15_MODEL, PLAIN)
    assert isinstance(config, TrainConfig)
    concept = config.concepts[0]
    assert (concept.instance_dir, concept.instance_prompt, concept.class_prompt) == (
        str(instance_dir), "a photo of sks dog", "a photo of dog")
    assert config.model == widgets.SD15_MODEL and config.preset == "t4" and config.kind == "object"
    recipe = subject.recipe("object")
    assert config.steps_for(4) == subject.default_steps(4, "object") == 4 * recipe.steps_per_image
    assert config.effective_learning_rate == recipe.learning_rate
    assert config.with_prior_preservation and config.effective_num_class_images == recipe.num_class_images
    assert config.train_text_encoder and not config.lora
    assert config.sample_every == config.steps_for(4) // 5 and config.sample_prompts[0] == "a photo of sks dog"
    assert config.checkpoint_every is None and config.resume is None


def test_settings_to_config_choices(tmp_path, instance_dir):
    settings = widgets.NotebookSettings(token="zwx", class_noun="man", kind="person", preset="t4-lora", lora=True,
                                        steps=900, num_class_images=0, train_text_encoder=False)
    config = widgets.settings_to_config(settings, instance_dir, 10, tmp_path / "run", widgets.SD15_MODEL, PLAIN)
    assert config.lora and config.lora_rank == 8 and config.effective_learning_rate == subject.LORA_LEARNING_RATE
    assert config.max_train_steps == 900 and not config.train_text_encoder
    assert not config.with_prior_preservation and config.concepts[0].class_prompt is None
    explicit = widgets.NotebookSettings(learning_rate=5e-6)
    assert widgets.settings_to_config(explicit, instance_dir, 3, tmp_path / "b", "tiny", PLAIN).learning_rate == 5e-6


@pytest.mark.parametrize("kind, preset, photos", [("person", "t4-lora", 12), ("object", "t4", 5),
                                                  ("style", "low-memory", 20)])
def test_the_notebook_and_the_cli_make_the_same_config(tmp_path, instance_dir, kind, preset, photos):
    """Same subject, same choices: the form's config and `train --kind ...` are equal, field for field."""
    settings = widgets.NotebookSettings(token="sks", class_noun="person", kind=kind, preset=preset)
    notebook = widgets.settings_to_config(settings, instance_dir, photos, tmp_path / "run", widgets.SD15_MODEL, PLAIN)
    concept = notebook.concepts[0]
    argv = ["train", "--kind", kind, "--preset", preset, "--instance-dir", concept.instance_dir,
            "--instance-prompt", concept.instance_prompt, "--class-prompt", concept.class_prompt,
            "--output-dir", notebook.output_dir, "--model", widgets.SD15_MODEL,
            "--sample-every", str(notebook.sample_every)]
    argv += [arg for prompt in notebook.sample_prompts for arg in ("--sample-prompt", prompt)]
    command_line = cli._config_from_args(cli.build_parser().parse_args(argv))
    assert command_line.to_dict() == notebook.to_dict()
    assert command_line.steps_for(photos) == subject.default_steps(photos, kind)


def test_settings_to_config_for_each_base_model(tmp_path, instance_dir):
    """The choice's model (when BASE_MODEL is empty), its preset's LoRA and text encoder, SDXL's fp16-safe VAE."""
    sdxl = widgets.NotebookSettings(base_model="sdxl-lora", preset="t4-sdxl")
    config = widgets.settings_to_config(sdxl, instance_dir, 5, tmp_path / "run", "", PLAIN)
    assert (config.model, config.vae, config.preset) == (SDXL_BASE_MODEL, SDXL_FP16_VAE, "t4-sdxl")
    assert config.lora and not config.train_text_encoder
    assert config.effective_learning_rate == subject.LORA_LEARNING_RATE
    smoke = widgets.settings_to_config(sdxl, instance_dir, 5, tmp_path / "smoke", "tiny-sdxl", SMOKE)
    assert (smoke.model, smoke.vae, smoke.max_train_steps) == ("tiny-sdxl", None, 4)
    lighter = widgets.NotebookSettings(base_model="sdxl-lora", preset="low-memory")
    assert widgets.settings_to_config(lighter, instance_dir, 5, tmp_path / "b", "", PLAIN).vae == SDXL_FP16_VAE
    offline = widgets.NotebookSettings(base_model="tiny-sdxl", preset="t4-sdxl")
    config = widgets.settings_to_config(offline, instance_dir, 5, tmp_path / "c", "", PLAIN)
    assert (config.model, config.vae, config.lora) == ("tiny-sdxl", None, True)
    toy = widgets.settings_to_config(widgets.NotebookSettings(base_model="toy"), instance_dir, 5, tmp_path / "d", "",
                                     PLAIN)
    assert (toy.model, toy.vae, toy.lora, toy.train_text_encoder) == ("toy", None, False, True)
    assert "(VAE madebyollin/sdxl-vae-fp16-fix)" in widgets.config_summary(
        widgets.settings_to_config(sdxl, instance_dir, 5, tmp_path / "e", "", PLAIN), 5)


def test_settings_to_config_refuses_mistakes(tmp_path, instance_dir):
    with pytest.raises(ConfigError, match="Preset 'a100'"):
        widgets.settings_to_config(widgets.NotebookSettings(preset="a100"), instance_dir, 3, tmp_path, "tiny", PLAIN)
    with pytest.raises(ConfigError, match="one short made-up word"):
        widgets.settings_to_config(widgets.NotebookSettings(token="my dog"), instance_dir, 3, tmp_path, "tiny", PLAIN)
    with pytest.raises(ConfigError, match="Steps must be a positive number"):
        widgets.settings_to_config(widgets.NotebookSettings(steps=-5), instance_dir, 3, tmp_path, "tiny", PLAIN)


def test_settings_to_config_resumes_when_a_checkpoint_exists(tmp_path, instance_dir):
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-000200"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    config = widgets.settings_to_config(widgets.NotebookSettings(), instance_dir, 3, tmp_path / "run", "tiny", PLAIN)
    assert config.resume == "latest"
    assert "resume:" in widgets.config_summary(config, 3)


def test_smoke_mode_shrinks_the_run(tmp_path, instance_dir):
    config = widgets.settings_to_config(widgets.NotebookSettings(), instance_dir, 4, tmp_path / "run",
                                        widgets.SD15_MODEL, SMOKE)
    assert config.model in ("tiny", "toy") and config.max_train_steps == 4 and config.resolution == 32
    assert config.num_class_images == 2 and config.class_images_steps == 2 and config.sample_steps == 2
    assert config.mixed_precision == "no" and not config.use_8bit_adam


def test_drive_run_fits_a_free_drive(tmp_path, instance_dir):
    """The default t4 run with Drive: every checkpoint it writes counts (Drive's trash), and it fits 12 GB."""
    config = widgets.settings_to_config(widgets.NotebookSettings(), instance_dir, 5, tmp_path / "run",
                                        "sd15-random", PLAIN)
    on_drive, message = widgets.keep_checkpoints_on_drive(config, 5, drive_free=12 * 10**9)
    assert on_drive.checkpoint_every and on_drive.checkpoints_total_limit == 1
    assert "GB" in message and "trash" in message
    from dreambooth_helpers.checkpoints import plan_checkpoints

    plan = plan_checkpoints(on_drive, 12 * 10**9, steps=on_drive.steps_for(5))
    assert plan.total_bytes <= 12 * 10**9 and plan.checkpoints_written >= 1
    assert all(plan.checkpoint_every * k < on_drive.steps_for(5) for k in range(1, plan.checkpoints_written + 1))
    tight, message = widgets.keep_checkpoints_on_drive(config, 5, drive_free=5 * 10**9)
    assert tight.checkpoint_every is None and "GB" in message  # not even one checkpoint fits: said, not hidden
    lora = widgets.settings_to_config(widgets.NotebookSettings(preset="t4-lora", lora=True), instance_dir, 5,
                                      tmp_path / "lora", "sd15-random", PLAIN)
    assert widgets.keep_checkpoints_on_drive(lora, 5, drive_free=12 * 10**9)[0].checkpoint_every


def test_describe_settings(tmp_path):
    from dreambooth_helpers import choices

    steps = subject.default_steps(4)
    text = widgets.describe_settings(widgets.NotebookSettings(token="sks", class_noun="dog"), 4)
    assert "a photo of sks dog" in text and f"{steps} steps (the recipe's for 4 photo(s))" in text
    # The base-model choice's outlook, as choices.py makes it (HTML-escaped), in the notebook's words.
    outlook = choices.outlook("sd15-full", 4).text()
    assert outlook.splitlines()[-2] in text and outlook.splitlines()[-1] in text and "SD 1.5 (full fine-tune)" in text
    assert "ordinary word" in widgets.describe_settings(widgets.NotebookSettings(token="dog"), 4)
    off = widgets.describe_settings(widgets.NotebookSettings(num_class_images=0, steps=50), 4)
    assert "off: 0 class images" in off and "50 steps (as set" in off and "the recipe's" not in off
    assert "<script>" not in widgets.describe_settings(widgets.NotebookSettings(class_noun="<script>"), 4)
    sdxl = widgets.describe_settings(widgets.NotebookSettings(base_model="sdxl-lora", preset="t4-sdxl"), 4)
    assert "1024 px" in sdxl and "GPU on a T4" in sdxl and "System RAM" in sdxl
    assert "Preset 'a100'" in widgets.describe_settings(widgets.NotebookSettings(preset="a100"), 4)


def test_config_summary_lists_what_matters(tmp_path, instance_dir):
    config = widgets.settings_to_config(widgets.NotebookSettings(), instance_dir, 4, tmp_path / "run", "tiny", PLAIN)
    summary = widgets.config_summary(config, 4)
    for expected in ("a photo of sks dog", f"a photo of dog x {subject.recipe('object').num_class_images} images",
                     f"steps:            {subject.default_steps(4)}", "UNet + text encoder", str(tmp_path / "run")):
        assert expected in summary


def test_memory_outlook_plans_for_a_t4_without_a_gpu(tmp_path, instance_dir):
    full = widgets.settings_to_config(widgets.NotebookSettings(), instance_dir, 4, tmp_path / "run",
                                      widgets.SD15_MODEL, PLAIN)
    outlook = widgets.memory_outlook(full, cuda_available=False)
    assert outlook.startswith("On a T4 (14.5 GiB free; no GPU here): Memory plan:"), outlook
    huge = full.replace(train_batch_size=16, resolution=1024, use_8bit_adam=False)
    assert "Does not fit" in widgets.memory_outlook(huge, cuda_available=False)


# ---------------------------------------------------------------------------- messages in the notebook's words


def test_library_messages_name_the_notebooks_settings():
    from dreambooth_helpers.training import _diverged_message

    config = TrainConfig.from_preset("t4", model=widgets.SD15_MODEL)
    diverged = widgets.in_notebook_words(_diverged_message(120, "the loss was NaN/inf", config, Path("/nowhere")))
    assert "--" not in diverged and "'Learning rate' in the settings form" in diverged
    assert widgets.in_notebook_words("continue with --resume latest.") == (
        "continue with a rerun of the training cell (it continues from the newest checkpoint).")
    assert widgets.in_notebook_words("use --no-train-text-encoder or --lora") == (
        "use untick 'Train the text encoder too' in the settings form or the 't4-lora' preset (or tick LoRA) in the "
        "settings form")
    # A setting the form does not have: the line to add to the configuration cell.
    assert widgets.in_notebook_words("Use --max-grad-norm 0.") == (
        "Use `config = config.replace(max_grad_norm=0)` in the configuration cell.")
    assert "mixed_precision='bf16'" in widgets.in_notebook_words("or --mixed-precision bf16")


def test_show_errors_plainly_prints_the_message_alone_in_notebook_words(capsys, monkeypatch):
    import IPython
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    widgets.show_errors_plainly()  # outside IPython: nothing to install, and nothing raised
    shell = InteractiveShell.instance()
    try:
        monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
        widgets.show_errors_plainly()
        result = shell.run_cell("from dreambooth_helpers.errors import ConfigError\n"
                                "raise ConfigError('Lower --learning-rate.')")
        assert isinstance(result.error_in_exec, ConfigError)
        err = capsys.readouterr().err
        assert "ConfigError: Lower 'Learning rate' in the settings form." in err and "Traceback" not in err
        other = shell.run_cell("raise KeyError('x')")  # not a user mistake: the full traceback stays
        assert isinstance(other.error_in_exec, KeyError)
    finally:
        InteractiveShell.clear_instance()


# ---------------------------------------------------------------------------- photos


def test_save_uploads_from_both_filupload_formats(tmp_path):
    folder, report = widgets.save_uploads(upload_value_8(3), tmp_path / "instance_images")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["00_My_Photo_0.png", "01_My_Photo_1.png", "02_My_Photo_2.png"]
    assert len(report.images) == 3
    # ipywidgets 7 (Colab): a dict of names. A second upload replaces the first one instead of mixing with it.
    folder, report = widgets.save_uploads(upload_value_7(2), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["00_photo0.png", "01_photo1.png"]


def test_save_uploads_skips_broken_files_and_shrinks_huge_ones(tmp_path):
    big = io.BytesIO()
    Image.new("RGB", (3000, 1000), "red").save(big, format="PNG")
    folder, report = widgets.save_uploads([("big.png", big.getvalue()), ("notes.png", b"not an image")],
                                          tmp_path / "up")
    assert [s.name for s in report.skipped] == ["notes.png"]
    with Image.open(next(folder.iterdir())) as saved:
        assert max(saved.size) == widgets.UPLOAD_MAX_SIDE
    with pytest.raises(ImageDataError):
        widgets.save_uploads([("notes.png", b"not an image")], tmp_path / "none")


def test_colab_upload_uses_colabs_own_button(monkeypatch, tmp_path, capsys):
    """In Colab, "upload" is Colab's files.upload (ipywidgets' FileUpload drops files over ~1 MB there)."""
    big = io.BytesIO()
    Image.effect_noise((1500, 1200), 80).convert("RGB").save(big, format="JPEG", quality=98)
    assert len(big.getvalue()) > 1_000_000
    files = fake_colab(monkeypatch, uploads={"IMG_0001.JPG": big.getvalue(), "IMG_0002.PNG": png_bytes(2)})
    picker = widgets.ImagePicker(COLAB, "upload", search=[REPO])
    assert picker.widget is None and len(files.calls) == 1
    assert not Path(files.calls[0]).exists()  # Colab's copies of the files are not left on disk
    assert "Received 2 file(s)" in capsys.readouterr().out
    selection = picker.collect(tmp_path)
    assert selection.num_images == 2 and selection.folder == tmp_path / "instance_images"
    fake_colab(monkeypatch, uploads={})
    with pytest.raises(ImageDataError, match="No file was uploaded"):
        widgets.ImagePicker(COLAB, "upload").collect(tmp_path)


def test_image_picker_sources(tmp_path, instance_dir, capsys):
    sample = widgets.ImagePicker(PLAIN, "sample subject (toy robot)", search=[REPO])
    assert sample.widget is None and sample.collect(tmp_path).is_sample
    sample._ipython_display_()
    assert "sample subject" in capsys.readouterr().out
    folder = widgets.ImagePicker(COLAB, "folder", f"  {instance_dir} ")
    assert folder.collect(tmp_path).num_images == 4
    with pytest.raises(ImageDataError, match="PHOTO_FOLDER is empty"):
        widgets.ImagePicker(PLAIN, "folder", "")
    with pytest.raises(ImageDataError, match="PHOTOS is 'camera'"):
        widgets.ImagePicker(PLAIN, "camera")


def test_image_picker_widget_outside_colab(tmp_path, monkeypatch):
    import IPython.display

    picker = widgets.ImagePicker(SMOKE, "upload", search=[REPO])
    upload, path, use_sample = picker.widget.children
    assert use_sample.value and ".zip" in upload.accept and "image/*" in upload.accept
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objects, **kw: shown.extend(objects))
    picker._ipython_display_()  # how IPython 7 and 8 show it, with ipywidgets 7 or 8
    assert shown == [picker.widget]
    assert picker.collect(tmp_path).is_sample  # smoke mode: the sample subject, pre-ticked
    upload.value = upload_value_8(2)
    assert picker.collect(tmp_path).num_images == 2  # an upload takes priority
    plain = widgets.ImagePicker(PLAIN, "upload")
    assert not plain.widget.children[2].value
    with pytest.raises(ImageDataError, match="No photos chosen"):
        plain.collect(tmp_path)


def test_sample_subject_is_found_in_the_checkout(tmp_path):
    assert widgets.sample_subject_dir() == REPO / "sample_data" / "toy_robot"
    own = tmp_path / "sample_data" / "toy_robot"
    own.mkdir(parents=True)
    draw_subject(own / "a.png", 0)
    assert widgets.sample_subject_dir([tmp_path]) == own


def test_collect_images_and_preview(tmp_path, instance_dir):
    selection = widgets.collect_images("folder", instance_dir, tmp_path)
    assert selection.num_images == 4 and selection.folder == instance_dir and not selection.is_sample
    grid = widgets.preview_grid(selection, resolution=64, cell=32)
    assert grid.size == (4 * 32, 32 + 16)
    assert all(im.size == (64, 64) for im in widgets.prepared_images(selection, 64))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageDataError, match="No images found"):
        widgets.collect_images("folder", empty, tmp_path)


def test_check_dataset_reports_findings(tmp_path, instance_dir):
    selection = widgets.collect_images("folder", instance_dir, tmp_path)
    report = widgets.check_dataset(selection, kind="person", resolution=512)
    assert report.kind == "person" and "Doctor" in report.format()


def test_labelled_grid_layout():
    images = [Image.new("RGB", (10, 10), c) for c in ("red", "green", "blue")]
    grid = labelled_grid([("a", images), ("b", images[:1]), ("empty", [])], cell=20)
    assert grid.size == (60, 2 * (20 + 16))
    assert grid.getpixel((30, 16 + 10))[1] > 100  # second cell of the first row is green
    side = labelled_grid([("label", images)], cell=20, label_width=50)
    assert side.size == (50 + 60, 20)
    with pytest.raises(ImageDataError):
        labelled_grid([("x", [])])


# ---------------------------------------------------------------------------- the settings form


def test_settings_form_follows_kind_and_preset(tmp_path, instance_dir, monkeypatch):
    import IPython.display

    form = widgets.SettingsForm(num_images=4)
    assert form.settings() == widgets.NotebookSettings(num_class_images=subject.recipe("object").num_class_images,
                                                       lora=False, train_text_encoder=True)
    assert "a photo of sks dog" in form.summary.value and f"{subject.default_steps(4)} steps" in form.summary.value
    form.kind.value = "person"
    assert form.class_noun.value == "person"
    assert f"{subject.default_steps(4, 'person')} steps" in form.summary.value
    form.class_noun.value = "woman"
    form.kind.value = "style"
    assert form.class_noun.value == "woman"  # typed by the user: kept
    form.preset.value = "t4-lora"
    assert form.lora.value and "Learning rate 1e-4" in form.summary.value
    form.preset.value = "t4"
    assert not form.lora.value
    # The base model sets its preset, and with it LoRA and the text encoder; the summary shows its outlook.
    form.base_model.value = "sdxl-lora"
    assert (form.preset.value, form.lora.value, form.train_text_encoder.value) == ("t4-sdxl", True, False)
    assert "SDXL LoRA" in form.summary.value and "1024 px" in form.summary.value
    assert "GPU on a T4" in form.summary.value and "System RAM" in form.summary.value
    assert form.settings().base_model == "sdxl-lora"
    form.base_model.value = "sd15-full"
    assert (form.preset.value, form.lora.value, form.train_text_encoder.value) == ("t4", False, True)
    form.token.value = "zwx"
    form.steps.value = 300
    config = form.to_config(widgets.collect_images("folder", instance_dir, tmp_path), tmp_path, "tiny", PLAIN)
    assert config.max_train_steps == 300 and config.concepts[0].instance_prompt == "a woman in zwx style"
    assert config.output_dir == str(tmp_path / "zwx-woman") and config.kind == "style"
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objects, **kw: shown.extend(objects))
    form._ipython_display_()
    assert shown == [form.widget]


def test_settings_form_for_the_sample_subject():
    folder = REPO / "sample_data" / "toy_robot"
    form = widgets.SettingsForm.for_images(widgets.ImageSelection(folder, read_images(folder), is_sample=True))
    assert (form.token.value, form.class_noun.value) == ("sks", "toy")
    from dreambooth_helpers import choices

    chosen = choices.base_model_choice(choices.default_choice())  # the toy model here, without a GPU
    assert (form.base_model.value, form.preset.value) == (chosen.key, chosen.preset)


# ---------------------------------------------------------------------------- training


def write_samples(folder: Path, steps: list[int], prompts: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in steps:
        for i in range(prompts):
            path = folder / f"step-{step:06d}-{i}.png"
            Image.new("RGB", (16, 16), (step % 255, 0, 0)).save(path)
            paths.append(path)
    return paths


def test_sample_grid(tmp_path):
    paths = write_samples(tmp_path / "samples", [100, 50])
    assert [sample_step(p) for p in paths] == [100, 100, 50, 50]
    grid = widgets.sample_grid(paths, cell=20)
    assert grid.size == (2 * 20, 2 * (20 + 16))


def test_training_monitor_updates_in_place_with_plain_text(tmp_path, monkeypatch):
    import IPython.display

    shown = []

    class Handle:
        def __init__(self, obj):
            shown.append(("display", obj))

        def update(self, obj):
            shown.append(("update", obj))

    monkeypatch.setattr(IPython.display, "display", lambda obj, display_id=False: Handle(obj))
    monitor = widgets.TrainingMonitor(total_steps=20, refresh_every=10)
    for step in range(1, 21):
        samples = [str(p) for p in write_samples(tmp_path / "samples", [step])] if step in (10, 20) else []
        monitor(step, {"step": step, "loss": 0.1, "instance_loss": 0.1, "prior_loss": 0.05, "lr": 2e-6,
                       "time": 5.0 + step, "samples": samples})
    texts = [obj for _, obj in shown if isinstance(obj, IPython.display.Pretty)]
    # Pretty shows as plain text, without the quotes a str's repr would add.
    assert texts and all(not t.data.startswith("'") for t in texts)
    updates = [t.data for kind, t in shown if kind == "update" and isinstance(t, IPython.display.Pretty)]
    assert [t.split(":")[0] for t in updates] == ["step 1/20", "step 10/20", "step 20/20"]
    assert "1.00 s/step" in updates[-1] and "prior loss 0.0500" in updates[-1]
    assert sum(isinstance(obj, Image.Image) for kind, obj in shown if kind == "update") == 2
    assert len(monitor.shown_samples) == 4


def test_run_training_reuses_a_finished_run(make_config, monkeypatch, capsys):
    from dreambooth_helpers import training

    config = make_config(max_train_steps=2, with_prior_preservation=False)
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: types.SimpleNamespace(update=lambda *a: None))
    trained = widgets.run_training(config, 4)
    assert (trained.output_dir / "training_summary.json").is_file()
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained again"))
    reused = widgets.run_training(config, 4)
    assert reused.output_dir == trained.output_dir and "already holds this model" in capsys.readouterr().out
    calls = []
    monkeypatch.setattr(training, "train", lambda config, **kw: calls.append(config) or trained)
    widgets.run_training(config.replace(resume="latest"), 4, train_again=True)
    assert calls and calls[0].resume is None  # trains anew from step 0 when asked


def history(steps: int, prior: bool = True, start: float = 30.0) -> list[dict]:
    return [{"step": s, "loss": 0.2 + 0.01 * (s % 3), "instance_loss": 0.1, "prior_loss": 0.1 if prior else None,
             "lr": 2e-6, "time": start + 0.5 * s} for s in range(1, steps + 1)]


def test_moving_average_and_step_time():
    assert widgets.moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert widgets.median_step_seconds(history(10)) == pytest.approx(0.5)
    assert widgets.median_step_seconds(history(1)) is None


def test_plot_losses():
    figure = widgets.plot_losses({"history": history(40)})
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == ["loss (each step)", "loss (mean of 2)", "your photos", "class images (prior)"]
    no_prior = widgets.plot_losses({"history": history(40, prior=False)}, window=5)
    assert len(no_prior.axes[0].get_lines()) == 3
    with pytest.raises(DreamBoothError, match="no per-step history"):
        widgets.plot_losses({"history": []})


def test_read_summary_and_training_facts(tmp_path):
    with pytest.raises(DreamBoothError, match="training has not finished"):
        widgets.read_summary(tmp_path)
    summary = {"steps": 40, "wall_time_s": 120.0, "history": history(40), "peak_gpu_memory_gib": 9.5,
               "device": "cuda", "mixed_precision": "fp16", "optimizer": "AdamW8bit", "lora": False,
               "resolution": 512, "num_instance_images": 5, "num_class_images": 100,
               "notices": ["xformers off", "Memory plan: ... or --lora"]}
    (tmp_path / "training_summary.json").write_text(json.dumps(summary))
    facts = widgets.training_facts(widgets.read_summary(tmp_path))
    assert "40 steps in 2.0 min (0.50 s per training step, median)" in facts
    assert "peak GPU memory 9.50 GiB" in facts and "AdamW8bit" in facts and "Note: xformers off" in facts
    assert "--lora" not in facts and "'t4-lora' preset" in facts  # notices in the notebook's words
    assert "no GPU used" in widgets.training_facts({**summary, "peak_gpu_memory_gib": None})


def test_progress_line():
    line = widgets.progress_line(3, 10, {"loss": 0.25, "lr": 1e-6, "time": 12.0, "prior_loss": None}, 0.5)
    assert line == "step 3/10: loss 0.2500, lr 1.00e-06, 12 s elapsed, 0.50 s/step, about 0 min left"


def test_class_images_are_made_once_and_shown(make_config):
    config = make_config()
    made = widgets.make_class_images(config)
    assert len(made) == 1 and len(list(made[0].glob("*.png"))) == 2
    grid = widgets.class_image_grid(config, cell=16)
    assert grid.size == (2 * 16, 16 + 16)
    before = {p: p.stat().st_mtime_ns for p in made[0].glob("*.png")}
    assert widgets.make_class_images(config) == made
    assert {p: p.stat().st_mtime_ns for p in made[0].glob("*.png")} == before  # reused, not regenerated
    off = make_config(with_prior_preservation=False)
    assert widgets.make_class_images(off) == [] and widgets.class_image_grid(off) is None


def test_the_class_before_and_after_training_side_by_side_flags_a_collapse(make_config):
    config = make_config(num_class_images=4)
    widgets.make_class_images(config)
    asked = []

    class SameEveryTime:  # a trained model whose class has collapsed: one picture for every seed
        def generate(self, prompt, num_images, seed):
            asked.append((prompt, num_images, seed))
            return [types.SimpleNamespace(image=Image.new("RGB", (32, 32), (200, 120, 40))) for _ in range(num_images)]

    grid, text = widgets.class_before_after(config, SameEveryTime(), count=4, cell=16)
    assert asked == [(config.concepts[0].class_prompt, 4, config.seed)]
    assert grid.size == (4 * 16, 2 * (16 + 16))  # two labelled rows of four
    assert "after 0.00" in text and "collapsing" in text and "--" not in text  # in the notebook's words
    assert widgets.class_before_after(config.replace(with_prior_preservation=False), SameEveryTime())[0] is None


# ---------------------------------------------------------------------------- after training


def test_generation_settings():
    chosen = widgets.generation_settings(PLAIN, steps=30, seed=7, negative_prompt="blurry")
    assert (chosen.steps, chosen.seed, chosen.images_per_prompt) == (30, 7, 2)
    small = widgets.generation_settings(SMOKE, steps=30, seed=7)
    assert (small.steps, small.images_per_prompt, small.seed) == (2, 1, 7)


def test_generate_examples_uses_the_same_seed_per_prompt(tmp_path):
    from dreambooth_helpers.inference import GeneratedImage

    calls = []

    class FakeGenerator:
        def generate(self, prompt, **kwargs):
            calls.append((prompt, kwargs))
            return [GeneratedImage(image=Image.new("RGB", (8, 8)), prompt=prompt, negative_prompt="", seed=kwargs[
                "seed"] + i, steps=kwargs["steps"], guidance_scale=kwargs["guidance_scale"], width=8, height=8,
                scheduler="dpm++", model="m", lora=None, seconds=0.1) for i in range(kwargs["num_images"])]

    choice = widgets.GenerationSettings(steps=3, images_per_prompt=2, seed=5, negative_prompt="ugly")
    grid, results = widgets.generate_examples(FakeGenerator(), ["a", "b"], choice, out_dir=tmp_path / "gen")
    assert [c[0] for c in calls] == ["a", "b"] and all(c[1]["seed"] == 5 for c in calls)
    assert calls[0][1]["negative_prompt"] == "ugly" and len(results) == 4
    assert len(list((tmp_path / "gen").glob("*.png"))) == 4
    assert grid.size == (2 * 192, 2 * (192 + 16))


def test_split_prompts():
    assert widgets.split_prompts(" a sks dog ; a sks dog in Paris\n\n;") == ["a sks dog", "a sks dog in Paris"]
    assert widgets.split_prompts("") == []


def test_stop_demo():
    closed = []
    demo = types.SimpleNamespace(close=lambda: closed.append(True))
    assert "keeps running" in widgets.stop_demo(demo, False, PLAIN) and not closed
    assert widgets.stop_demo(demo, True, PLAIN) == "Demo stopped." and closed
    assert widgets.stop_demo(None, True, PLAIN) == "No demo is running."
    assert widgets.stop_demo(demo, False, SMOKE) == "Demo stopped."


def test_evaluation_options():
    assert widgets.evaluation_options("object", False, PLAIN) is None
    assert widgets.evaluation_options("style", True, PLAIN) is None
    options = widgets.evaluation_options("person", True, PLAIN, num_prompts=8)
    assert options["prompt_set"] == "live" and options["encoders"] == "paper" and options["num_prompts"] == 8
    smoke = widgets.evaluation_options("object", False, SMOKE)
    assert smoke["encoders"] == "tiny" and smoke["num_prompts"] == 2


def test_evaluate_skips_styles_with_a_reason(capsys, tmp_path, instance_dir):
    selection = widgets.collect_images("folder", instance_dir, tmp_path)
    assert widgets.evaluate(None, selection, widgets.NotebookSettings(kind="style", class_noun="painting"),
                            tmp_path, True, PLAIN) is None
    assert "measures a subject" in capsys.readouterr().out
    assert widgets.evaluate(None, selection, widgets.NotebookSettings(), tmp_path, False, PLAIN) is None
    assert "RUN_EVALUATION is off" in capsys.readouterr().out


def test_a_smoke_run_checks_the_evaluation_cell_without_showing_a_report_it_was_not_asked_for(
        capsys, tmp_path, instance_dir, monkeypatch):
    """The cell's text says the evaluation runs only when RUN_EVALUATION is ticked: a smoke run still exercises it
    (tiny encoders) but shows no report, only one line; ticked, the report comes back to be shown."""
    import dreambooth_helpers.evaluation as evaluation

    calls = []
    monkeypatch.setattr(evaluation, "evaluate_model", lambda *args, **options: calls.append(options) or "report")
    selection = widgets.collect_images("folder", instance_dir, tmp_path)
    assert widgets.evaluate(None, selection, widgets.NotebookSettings(), tmp_path / "evaluation", False, SMOKE) is None
    assert calls[-1]["encoders"] == "tiny"  # it ran, so the smoke test covers the cell
    printed = capsys.readouterr().out
    assert "RUN_EVALUATION is off" in printed and len(printed.strip().splitlines()) == 1
    assert widgets.evaluate(None, selection, widgets.NotebookSettings(), tmp_path, True, SMOKE) == "report"


def test_show_evaluation_shows_the_grid_inline(tmp_path, monkeypatch):
    import IPython.display

    grid = tmp_path / "evaluation_grid.png"
    Image.new("RGB", (8, 8), "red").save(grid)
    report = types.SimpleNamespace(grid_path=str(grid),
                                   to_markdown=lambda: "# Evaluation\n\n| a |\n\n![images](evaluation_grid.png)\n")
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objects, **kw: shown.extend(objects))
    widgets.show_evaluation(report)
    markdown, image = shown
    assert isinstance(markdown, IPython.display.Markdown) and "![" not in markdown.data
    assert isinstance(image, Image.Image) and image.size == (8, 8)
    shown.clear()
    widgets.show_evaluation(None)
    assert shown == []


def test_no_gpu_refuses_a_real_model_before_class_images(make_config, monkeypatch):
    monkeypatch.delenv("DREAMBOOTH_HELPERS_ALLOW_CPU", raising=False)
    with pytest.raises(ConfigError, match="no GPU.*Change runtime type"):
        widgets.check_can_train(make_config(model=widgets.SD15_MODEL))  # what train() itself would refuse first
    widgets.check_can_train(make_config())  # the tiny model trains on a CPU


def test_doctor_advice_names_the_notebooks_settings(tmp_path, instance_dir):
    selection = widgets.collect_images("folder", instance_dir, tmp_path)
    assert widgets.in_notebook_words("or train with --crop pad.") == (
        "or train with `config = config.replace(crop='pad')` in the configuration cell.")
    report = widgets.doctor_report(selection, kind="object", resolution=512)
    assert "Doctor" in report and "--" not in report.replace("---", "")


def test_training_notices_are_shown_in_the_notebooks_words(make_config, monkeypatch, capsys):
    from dreambooth_helpers import training

    def fake_train(config, on_step, on_notice):
        on_notice("Memory plan: does not fit; use --lora.")
        return "trained"

    monkeypatch.setattr("IPython.display.display", lambda *a, **k: types.SimpleNamespace(update=lambda *a: None))
    monkeypatch.setattr(training, "train", fake_train)
    assert widgets.run_training(make_config(), 4, train_again=True) == "trained"
    assert capsys.readouterr().out.strip() == (
        "Memory plan: does not fit; use the 't4-lora' preset (or tick LoRA) in the settings form.")


def test_generation_memory_advice_names_the_loading_cell():
    text = widgets.in_notebook_words("Generate fewer images, or use --attention-slicing and --vae-tiling.")
    assert "--" not in text and "`attention_slicing=True` in `widgets.load_trained_model(...)`" in text


def test_quiet_library_output_hides_loading_bars_and_optional_kernel_notes():
    import logging

    import transformers

    bnb = logging.getLogger("bitsandbytes")
    level = bnb.level
    try:
        widgets.quiet_library_output()
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert bnb.getEffectiveLevel() == logging.ERROR
    finally:  # the rest of the test session keeps the libraries' defaults
        bnb.setLevel(level)
        transformers.utils.logging.enable_progress_bar()
        transformers.utils.logging.set_verbosity_warning()
        import diffusers

        diffusers.utils.logging.enable_progress_bar()
        diffusers.utils.logging.set_verbosity_warning()


def test_training_facts_name_the_precision_and_a_finished_line_has_no_time_left():
    facts = widgets.training_facts({"steps": 4, "history": history(4), "mixed_precision": "no"})
    assert "precision fp32" in facts
    assert "min left" not in widgets.progress_line(10, 10, {"loss": 0.1, "lr": 1e-6, "time": 3.0}, 0.5)


def test_the_notebook_demo_password_protects_page_and_api():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("gradio")
    demo = widgets.start_demo("tiny", SMOKE, password="pässwort")
    try:
        url = demo.url.rstrip("/")
        assert httpx.get(f"{url}/api/health").status_code == 401
        assert httpx.get(f"{url}/api/health", auth=(widgets.DEMO_USER, "wrong")).status_code == 401
        answer = httpx.get(f"{url}/api/health", auth=(widgets.DEMO_USER.encode(), "pässwort".encode()))
        assert answer.status_code == 200 and answer.json()["status"] == "ready"
    finally:
        widgets.stop_demo(demo, True, SMOKE)


def test_the_web_app_starts_from_the_notebook_only_when_asked(tmp_path, capsys):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("gradio")
    assert widgets.start_app(tmp_path, SMOKE, False) is None
    assert "tick USE_WEB_APP" in capsys.readouterr().out
    app = widgets.start_app(tmp_path, SMOKE, True, password="s3cret")
    try:
        url = app.url.rstrip("/")
        assert httpx.get(f"{url}/config").status_code == 401  # the password guards every route
        assert (tmp_path / "app").is_dir() and "no password" not in capsys.readouterr().out
    finally:
        app.close()
