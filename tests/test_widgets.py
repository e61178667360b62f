"""The notebook's logic (dreambooth_helpers.widgets) and its installer (colab_install), without a browser."""

from __future__ import annotations

import datetime
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_helpers import colab_install, widgets
from dreambooth_helpers.config import TrainConfig
from dreambooth_helpers.errors import ConfigError, DreamBoothError, ImageDataError
from tests.conftest import draw_subject

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def smoke(monkeypatch):
    monkeypatch.setenv(widgets.SMOKE_VARIABLE, "1")


@pytest.fixture
def not_smoke(monkeypatch):
    monkeypatch.delenv(widgets.SMOKE_VARIABLE, raising=False)


def png_bytes(index: int, size=(96, 96)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40 * index % 255, 140, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_value(count: int) -> tuple[dict, ...]:
    """What ipywidgets 8 FileUpload.value holds after uploading `count` photos."""
    files = []
    for i in range(count):
        data = png_bytes(i + 1)
        files.append({"name": f"My Photo {i}.PNG", "type": "image/png", "size": len(data),
                      "content": memoryview(data),
                      "last_modified": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)})
    return tuple(files)


# ---------------------------------------------------------------------------- smoke mode and the runtime


def test_smoke_mode_reads_the_environment(monkeypatch):
    monkeypatch.setenv(widgets.SMOKE_VARIABLE, "1")
    assert widgets.smoke_mode() and widgets.for_smoke(25, 2) == 2
    assert widgets.choose_base_model(widgets.SD15_MODEL) in ("tiny", "toy")
    monkeypatch.setenv(widgets.SMOKE_VARIABLE, "0")
    assert not widgets.smoke_mode() and widgets.for_smoke(25, 2) == 25
    assert widgets.choose_base_model(f"  {widgets.SD15_MODEL} ") == widgets.SD15_MODEL
    with pytest.raises(ConfigError, match="BASE_MODEL is empty"):
        widgets.choose_base_model(" ")


def test_smoke_model_is_toy_only_when_its_weights_exist(monkeypatch, tmp_path):
    from dreambooth_helpers import models

    monkeypatch.setattr(models, "TOY_MODEL", "toy", raising=False)
    monkeypatch.setattr(models, "TOY_MODEL_DIR", tmp_path / "toy_model", raising=False)
    assert widgets.smoke_model() == "tiny"
    (tmp_path / "toy_model" / "unet").mkdir(parents=True)
    assert widgets.smoke_model() == "toy"


def test_gpu_status_messages(not_smoke):
    none = widgets.gpu_status(cuda_available=False)
    assert not none.available and "Change runtime type" in none.message and "T4" in none.message
    t4 = widgets.gpu_status(cuda_available=True, name="Tesla T4", memory_bytes=15 * 2**30)
    assert t4.available and t4.memory_gib == 15 and "Tesla T4" in t4.message and "'t4' preset" in t4.message
    small = widgets.gpu_status(cuda_available=True, name="RTX 2070", memory_bytes=8 * 2**30)
    assert "low-memory" in small.message and "LoRA" in small.message


def test_no_gpu_refuses_real_models_but_not_the_tiny_one(not_smoke):
    with pytest.raises(ConfigError, match="no GPU.*Change runtime type"):
        widgets.check_can_train(widgets.SD15_MODEL, cuda_available=False)
    widgets.check_can_train("tiny", cuda_available=False)
    widgets.check_can_train(widgets.SD15_MODEL, cuda_available=True)


def test_drive_and_output_root_outside_colab(not_smoke, monkeypatch, capsys, tmp_path):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert widgets.mount_drive(False) is None
    assert widgets.mount_drive(True) is None
    assert "only be mounted in Colab" in capsys.readouterr().out
    assert widgets.output_root() == Path("outputs")
    assert widgets.output_root(tmp_path) == tmp_path


def test_smoke_output_root_and_no_drive(smoke, monkeypatch, tmp_path):
    monkeypatch.setenv("DREAMBOOTH_HELPERS_SMOKE_OUTPUT", str(tmp_path))
    assert widgets.mount_drive(True) is None
    assert widgets.output_root() == tmp_path


# ---------------------------------------------------------------------------- login


def fake_colab(monkeypatch, secrets: dict[str, str] | None):
    """Pretend to be in Colab, with `secrets` readable (None: access not granted)."""
    colab = types.ModuleType("google.colab")
    userdata = types.ModuleType("google.colab.userdata")

    class SecretNotFoundError(Exception):
        pass

    def get(name):
        if secrets is None or name not in secrets:
            raise SecretNotFoundError(name)
        return secrets[name]

    userdata.get = get
    colab.userdata = userdata
    google = sys.modules.get("google") or types.ModuleType("google")
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)


def test_colab_secret(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert widgets.colab_secret() is None  # not in Colab
    fake_colab(monkeypatch, {"HF_TOKEN": "  hf_example_value  "})
    assert widgets.colab_secret() == "hf_example_value"
    fake_colab(monkeypatch, None)
    assert widgets.colab_secret() is None


def test_hub_login_uses_the_colab_secret_and_never_returns_the_token(not_smoke, monkeypatch):
    import huggingface_hub

    secret = "hf_" + "x" * 30
    fake_colab(monkeypatch, {"HF_TOKEN": secret})
    logged_in = {}
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: logged_in.get("token"))
    monkeypatch.setattr(huggingface_hub, "login", lambda token, **kw: logged_in.update(token=token, **kw))
    monkeypatch.setattr(huggingface_hub, "notebook_login", lambda **kw: pytest.fail("prompted despite a secret"))
    monkeypatch.setattr(huggingface_hub, "whoami", lambda *a, **k: {"name": "alice"})
    message = widgets.hub_login()
    assert logged_in == {"token": secret, "add_to_git_credential": False}
    assert "Colab secret HF_TOKEN" in message and "alice" in message and secret not in message
    assert "Already logged in" in widgets.hub_login()


def test_hub_login_falls_back_to_notebook_login(not_smoke, monkeypatch):
    import huggingface_hub

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    prompted = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "notebook_login", lambda **kw: prompted.append(True))
    message = widgets.hub_login()
    assert prompted and "Not logged in" in message and "HF_TOKEN" in message


def test_hub_login_is_skipped_in_smoke_mode(smoke):
    assert "no Hugging Face login" in widgets.hub_login()
    assert widgets.hub_username() is None


# ---------------------------------------------------------------------------- prompts and defaults


@pytest.mark.parametrize("kind, images, steps", [
    ("object", 5, 750), ("object", 1, 400), ("object", 20, 2000), ("person", 5, 1000), ("style", 12, 1200),
])
def test_default_steps(kind, images, steps):
    assert widgets.default_steps(images, kind) == steps


def test_default_steps_refuses_nonsense():
    with pytest.raises(ImageDataError, match="No usable photos"):
        widgets.default_steps(0)
    with pytest.raises(ConfigError, match="choose one of object, person, style"):
        widgets.default_steps(3, "animal")


def test_prompts_for_each_kind():
    obj = widgets.prompts_for("sks", "dog", "object")
    assert (obj.instance, obj.class_) == ("a photo of sks dog", "a photo of dog")
    assert "a sks dog in the jungle" in obj.generation and "a red sks dog" in obj.generation
    assert all("sks dog" in p for p in obj.generation + obj.samples)
    person = widgets.prompts_for("zwx", "woman", "person")
    assert person.instance == "a photo of zwx woman" and all("zwx woman" in p for p in person.generation)
    style = widgets.prompts_for("sks", "painting", "style")
    assert style.instance == "a painting in sks style" and style.class_ == "a painting"
    assert all(p.endswith("in sks style") for p in style.generation)
    assert widgets.prompts_for(" sks ", "  teddy   bear ").instance == "a photo of sks teddy bear"


@pytest.mark.parametrize("token", ["", "two words", "s", "sks!", "x" * 21])
def test_bad_tokens_are_refused(token):
    with pytest.raises(ConfigError, match="one short made-up word"):
        widgets.check_token(token)


def test_token_advice_flags_ordinary_words():
    assert widgets.token_advice("sks", "dog") is None
    assert "ordinary word" in widgets.token_advice("dog", "dog")
    assert "ordinary word" in widgets.token_advice("Red", "car")
    with pytest.raises(ConfigError, match="Class noun"):
        widgets.check_class_noun("  ")


def test_learning_rates_and_evaluation_kinds():
    assert widgets.default_learning_rate("object") == 2e-6
    assert widgets.default_learning_rate("person") == 1e-6
    assert widgets.default_learning_rate("person", lora=True) == widgets.LORA_LEARNING_RATE
    assert [widgets.evaluation_kind(k) for k in widgets.SUBJECT_KINDS] == ["object", "live", None]


# ---------------------------------------------------------------------------- settings -> config


def test_settings_to_config_defaults(not_smoke, tmp_path, instance_dir):
    settings = widgets.NotebookSettings(token="sks", class_noun="dog")
    config = widgets.settings_to_config(settings, instance_dir, 4, tmp_path / "run")
    assert isinstance(config, TrainConfig)
    concept = config.concepts[0]
    assert (concept.instance_dir, concept.instance_prompt, concept.class_prompt) == (
        str(instance_dir), "a photo of sks dog", "a photo of dog")
    assert config.model == widgets.SD15_MODEL and config.preset == "t4"
    assert config.max_train_steps == 600 and config.learning_rate == 2e-6
    assert config.with_prior_preservation and config.num_class_images == 50
    assert config.train_text_encoder and not config.lora
    assert config.sample_every == 120 and config.sample_prompts[0] == "a photo of sks dog"
    assert config.checkpoint_every is None and config.resume is None


def test_settings_to_config_choices(not_smoke, tmp_path, instance_dir):
    settings = widgets.NotebookSettings(token="zwx", class_noun="man", kind="person", preset="t4-lora", lora=True,
                                        steps=900, num_class_images=0, train_text_encoder=False)
    config = widgets.settings_to_config(settings, instance_dir, 10, tmp_path / "run", on_drive=True)
    assert config.lora and config.lora_rank == 8 and config.learning_rate == widgets.LORA_LEARNING_RATE
    assert config.text_encoder_learning_rate == widgets.LORA_LEARNING_RATE / 2
    assert config.max_train_steps == 900 and not config.train_text_encoder
    assert not config.with_prior_preservation and config.concepts[0].class_prompt is None
    assert config.checkpoint_every == 225 and config.checkpoints_total_limit == 1
    explicit = widgets.NotebookSettings(learning_rate=5e-6)
    assert widgets.settings_to_config(explicit, instance_dir, 3, tmp_path / "b").learning_rate == 5e-6


def test_settings_to_config_refuses_mistakes(not_smoke, tmp_path, instance_dir):
    with pytest.raises(ConfigError, match="Preset 'a100'"):
        widgets.settings_to_config(widgets.NotebookSettings(preset="a100"), instance_dir, 3, tmp_path)
    with pytest.raises(ConfigError, match="one short made-up word"):
        widgets.settings_to_config(widgets.NotebookSettings(token="my dog"), instance_dir, 3, tmp_path)
    with pytest.raises(ConfigError, match="Steps must be a positive number"):
        widgets.settings_to_config(widgets.NotebookSettings(steps=-5), instance_dir, 3, tmp_path)


def test_settings_to_config_resumes_when_a_checkpoint_exists(not_smoke, tmp_path, instance_dir):
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-000200"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    config = widgets.settings_to_config(widgets.NotebookSettings(), instance_dir, 3, tmp_path / "run", on_drive=True)
    assert config.resume == "latest"
    assert "resume:" in widgets.config_summary(config) and "checkpoints:" in widgets.config_summary(config)


def test_smoke_mode_shrinks_the_run(smoke, tmp_path, instance_dir):
    config = widgets.settings_to_config(widgets.NotebookSettings(), instance_dir, 4, tmp_path / "run",
                                        widgets.SD15_MODEL)
    assert config.model in ("tiny", "toy") and config.max_train_steps == 4 and config.resolution == 32
    assert config.num_class_images == 2 and config.class_images_steps == 2 and config.sample_steps == 2
    assert config.mixed_precision == "no" and not config.use_8bit_adam


def test_describe_settings(tmp_path):
    text = widgets.describe_settings(widgets.NotebookSettings(token="sks", class_noun="dog"), 4)
    assert "a photo of sks dog" in text and "<b>600</b>" in text and "recommended for 4 photo(s)" in text
    assert "ordinary word" in widgets.describe_settings(widgets.NotebookSettings(token="dog"), 4)
    off = widgets.describe_settings(widgets.NotebookSettings(num_class_images=0, steps=50), 4)
    assert "off: 0 class images" in off and "<b>50</b>" in off and "recommended" not in off
    bad = widgets.describe_settings(widgets.NotebookSettings(class_noun="<b>"), 4)
    assert "&lt;b&gt;" in bad or "Class noun" in bad
    assert "<script>" not in widgets.describe_settings(widgets.NotebookSettings(class_noun="<script>"), 4)


def test_config_summary_lists_what_matters(not_smoke, tmp_path, instance_dir):
    config = widgets.settings_to_config(widgets.NotebookSettings(), instance_dir, 4, tmp_path / "run")
    summary = widgets.config_summary(config)
    for expected in ("a photo of sks dog", "a photo of dog x 50 images", "steps:            600",
                     "UNet + text encoder", str(tmp_path / "run")):
        assert expected in summary


def test_memory_outlook_plans_for_a_t4_without_a_gpu(not_smoke, tmp_path, instance_dir):
    full = widgets.settings_to_config(widgets.NotebookSettings(), instance_dir, 4, tmp_path / "run")
    outlook = widgets.memory_outlook(full, cuda_available=False)
    assert outlook.startswith("On a T4 (14.5 GiB free; no GPU here): Memory plan:"), outlook
    assert "GiB peak" in outlook
    huge = full.replace(train_batch_size=16, resolution=1024, use_8bit_adam=False)
    assert "Does not fit" in widgets.memory_outlook(huge, cuda_available=False)


# ---------------------------------------------------------------------------- images


def test_save_uploads_from_filupload_value(tmp_path):
    folder, report = widgets.save_uploads(upload_value(3), tmp_path / "instance_images")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["00_My_Photo_0.png", "01_My_Photo_1.png", "02_My_Photo_2.png"]
    assert len(report.images) == 3
    # A second upload replaces the first one instead of mixing with it.
    folder, _ = widgets.save_uploads([("other.png", png_bytes(1))], folder)
    assert [p.name for p in folder.iterdir()] == ["00_other.png"]


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


def test_choose_source_priority(tmp_path):
    sample = tmp_path / "sample"
    assert widgets.choose_source(upload_value(1), "/x", True, lambda: sample)[0] == "upload"
    assert widgets.choose_source((), " ~/photos ", True, lambda: sample) == ("folder", Path("~/photos").expanduser())
    assert widgets.choose_source((), "", True, lambda: sample) == ("sample", sample)
    with pytest.raises(ImageDataError, match="No photos chosen"):
        widgets.choose_source((), "  ", False, lambda: sample)


def test_sample_subject_is_found_in_the_checkout(tmp_path):
    found = widgets.sample_subject_dir()
    assert found == REPO / "sample_data" / "toy_robot"
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
    uploaded = widgets.collect_images("upload", upload_value(2), tmp_path)
    assert uploaded.num_images == 2 and uploaded.folder == tmp_path / "instance_images"
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
    grid = widgets.labelled_grid([("a", images), ("b", images[:1]), ("empty", [])], cell=20)
    assert grid.size == (60, 2 * (20 + 16))
    assert grid.getpixel((30, 16 + 10))[1] > 100  # second cell of the first row is green
    side = widgets.labelled_grid([("label", images)], cell=20, label_width=50)
    assert side.size == (50 + 60, 20)
    with pytest.raises(ImageDataError):
        widgets.labelled_grid([("x", [])])


# ---------------------------------------------------------------------------- the widgets


def test_image_picker(smoke, tmp_path):
    picker = widgets.ImagePicker(search=[REPO])
    assert picker.use_sample.value  # smoke mode: unattended, with the sample subject
    assert "application/vnd.jupyter.widget-view+json" in picker._repr_mimebundle_()
    selection = picker.collect(tmp_path)
    assert selection.is_sample and selection.num_images == 5
    picker.upload.value = upload_value(2)
    selection = picker.collect(tmp_path)
    assert not selection.is_sample and selection.num_images == 2


def test_image_picker_without_a_choice(not_smoke, tmp_path):
    picker = widgets.ImagePicker()
    assert not picker.use_sample.value
    with pytest.raises(ImageDataError, match="No photos chosen"):
        picker.collect(tmp_path)


def test_settings_form_follows_kind_and_preset(not_smoke, tmp_path, instance_dir):
    form = widgets.SettingsForm(num_images=4)
    assert form.settings() == widgets.NotebookSettings()
    assert "a photo of sks dog" in form.summary.value and "<b>600</b>" in form.summary.value
    form.kind.value = "person"
    assert form.class_noun.value == "person" and "<b>800</b>" in form.summary.value
    form.class_noun.value = "woman"
    form.kind.value = "style"
    assert form.class_noun.value == "woman"  # typed by the user: kept
    form.preset.value = "t4-lora"
    assert form.lora.value and "0.0001" in form.summary.value
    form.preset.value = "t4"
    assert not form.lora.value
    form.token.value = "zwx"
    form.steps.value = 300
    config = form.to_config(widgets.collect_images("folder", instance_dir, tmp_path), tmp_path, "tiny")
    assert config.max_train_steps == 300 and config.concepts[0].instance_prompt == "a woman in zwx style"
    assert config.output_dir == str(tmp_path / "zwx-woman")


def test_settings_form_for_the_sample_subject(smoke):
    selection = widgets.ImageSelection(REPO / "sample_data" / "toy_robot", widgets.read_images(
        REPO / "sample_data" / "toy_robot"), is_sample=True)
    form = widgets.SettingsForm.for_images(selection)
    assert (form.token.value, form.class_noun.value) == ("sks", "toy")
    assert "application/vnd.jupyter.widget-view+json" in form._repr_mimebundle_()


# ---------------------------------------------------------------------------- training views


def write_samples(folder: Path, steps: list[int], prompts: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in steps:
        for i in range(prompts):
            path = folder / f"step-{step:06d}-{i}.png"
            Image.new("RGB", (16, 16), (step % 255, 0, 0)).save(path)
            paths.append(path)
    return paths


def test_new_sample_files_and_grid(tmp_path):
    seen: set[Path] = set()
    assert widgets.new_sample_files(tmp_path / "missing", seen) == []
    first = write_samples(tmp_path / "samples", [100, 50])
    found = widgets.new_sample_files(tmp_path / "samples", seen)
    assert [widgets.sample_step(p) for p in found] == [50, 50, 100, 100]
    assert widgets.new_sample_files(tmp_path / "samples", seen) == []
    write_samples(tmp_path / "samples", [150])
    assert [widgets.sample_step(p) for p in widgets.new_sample_files(tmp_path / "samples", seen)] == [150, 150]
    grid = widgets.sample_grid(first, cell=20)
    assert grid.size == (2 * 20, 2 * (20 + 16))


def test_training_monitor_updates_in_place(tmp_path, monkeypatch):
    import IPython.display

    shown = []

    class Handle:
        def __init__(self, obj):
            shown.append(("display", obj))

        def update(self, obj):
            shown.append(("update", obj))

    monkeypatch.setattr(IPython.display, "display", lambda obj, display_id=False: Handle(obj))
    monitor = widgets.TrainingMonitor(tmp_path, total_steps=20, refresh_every=10)
    for step in range(1, 21):
        if step == 11:
            write_samples(tmp_path / "samples", [10])
        monitor(step, {"step": step, "loss": 0.1, "instance_loss": 0.1, "prior_loss": 0.05, "lr": 2e-6,
                       "time": 5.0 + step})
    updates = [obj for kind, obj in shown if kind == "update"]
    texts = [u for u in updates if isinstance(u, str)]
    assert [t.split(":")[0] for t in texts] == ["step 1/20", "step 10/20", "step 20/20"]
    assert "1.00 s/step" in texts[-1] and "prior loss 0.0500" in texts[-1]
    assert sum(isinstance(u, Image.Image) for u in updates) == 1
    write_samples(tmp_path / "samples", [20])
    monitor.finish()
    assert len(monitor.shown_samples) == 4


def history(steps: int, prior: bool = True, start: float = 30.0) -> list[dict]:
    return [{"step": s, "loss": 0.2 + 0.01 * (s % 3), "instance_loss": 0.1, "prior_loss": 0.1 if prior else None,
             "lr": 2e-6, "time": start + 0.5 * s} for s in range(1, steps + 1)]


def test_moving_average_and_step_time():
    assert widgets.moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert widgets.median_step_seconds(history(10)) == pytest.approx(0.5)
    assert widgets.median_step_seconds(history(1)) is None


def test_plot_losses(tmp_path):
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
               "resolution": 512, "num_instance_images": 5, "num_class_images": 100, "notices": ["xformers off"]}
    (tmp_path / "training_summary.json").write_text(json.dumps(summary))
    facts = widgets.training_facts(widgets.read_summary(tmp_path))
    assert "40 steps in 2.0 min (0.50 s per training step, median)" in facts
    assert "peak GPU memory 9.50 GiB" in facts and "AdamW8bit" in facts and "Note: xformers off" in facts
    assert "no GPU used" in widgets.training_facts({**summary, "peak_gpu_memory_gib": None})


def test_progress_line():
    line = widgets.progress_line(3, 10, {"loss": 0.25, "lr": 1e-6, "time": 12.0, "prior_loss": None}, 0.5)
    assert line == "step 3/10: loss 0.2500, lr 1.00e-06, 12 s elapsed, 0.50 s/step"


def test_class_images_are_made_once_and_shown(make_config):
    config = make_config()
    made = widgets.make_class_images(config, progress=False)
    assert len(made) == 2
    grid = widgets.class_image_grid(config, cell=16)
    assert grid.size == (2 * 16, 16 + 16)
    assert widgets.make_class_images(config, progress=False) == made  # reused, not regenerated
    off = make_config(with_prior_preservation=False)
    assert widgets.make_class_images(off) == [] and widgets.class_image_grid(off) is None


# ---------------------------------------------------------------------------- after training


def test_generation_settings(monkeypatch):
    monkeypatch.delenv(widgets.SMOKE_VARIABLE, raising=False)
    chosen = widgets.generation_settings(steps=30, seed=7, negative_prompt="blurry")
    assert (chosen.steps, chosen.seed, chosen.images_per_prompt) == (30, 7, 2)
    monkeypatch.setenv(widgets.SMOKE_VARIABLE, "1")
    small = widgets.generation_settings(steps=30, seed=7)
    assert (small.steps, small.images_per_prompt, small.seed) == (2, 1, 7)


def test_generate_examples_uses_the_same_seed_per_prompt(not_smoke, tmp_path):
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


def test_stop_demo(not_smoke, monkeypatch):
    closed = []
    demo = types.SimpleNamespace(close=lambda: closed.append(True))
    assert "keeps running" in widgets.stop_demo(demo, requested=False) and not closed
    assert widgets.stop_demo(demo, requested=True) == "Demo stopped." and closed
    assert widgets.stop_demo(None, requested=True) == "No demo is running."
    monkeypatch.setenv(widgets.SMOKE_VARIABLE, "1")
    assert widgets.stop_demo(demo, requested=False) == "Demo stopped."


def test_repo_ids_and_publish_refusals(not_smoke, monkeypatch, tmp_path):
    assert widgets.default_repo_id("sks", "teddy bear", "alice") == "alice/sks-teddy-bear-dreambooth"
    assert widgets.default_repo_id("sks", "dog") == "your-hf-name/sks-dog-dreambooth"
    monkeypatch.setattr(widgets, "hub_username", lambda: None)
    with pytest.raises(ConfigError, match="HUB_REPO_ID"):
        widgets.publish(tmp_path, "", "sks", "dog")


def test_evaluation_options(monkeypatch):
    monkeypatch.delenv(widgets.SMOKE_VARIABLE, raising=False)
    assert widgets.evaluation_options("object", requested=False) is None
    assert widgets.evaluation_options("style", requested=True) is None
    options = widgets.evaluation_options("person", requested=True, num_prompts=8)
    assert options["kind"] == "live" and options["encoders"] == "paper" and options["num_prompts"] == 8
    monkeypatch.setenv(widgets.SMOKE_VARIABLE, "1")
    smoke = widgets.evaluation_options("object", requested=False)
    assert smoke["encoders"] == "tiny" and smoke["num_prompts"] == 2


def test_evaluate_skips_styles_with_a_reason(not_smoke, capsys, tmp_path, instance_dir):
    selection = widgets.collect_images("folder", instance_dir, tmp_path)
    assert widgets.evaluate(None, selection, widgets.NotebookSettings(kind="style", class_noun="painting"),
                            tmp_path, requested=True) is None
    assert "measures a subject" in capsys.readouterr().out
    assert widgets.evaluate(None, selection, widgets.NotebookSettings(), tmp_path, requested=False) is None
    assert "RUN_EVALUATION is off" in capsys.readouterr().out


def test_show_errors_plainly_outside_ipython_is_a_no_op():
    widgets.show_errors_plainly()


def test_show_errors_plainly_prints_the_message_alone(capsys, monkeypatch):
    import IPython
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
        widgets.show_errors_plainly()
        result = shell.run_cell("from dreambooth_helpers.errors import ConfigError\nraise ConfigError('fix X')")
        assert isinstance(result.error_in_exec, ConfigError)
        err = capsys.readouterr().err
        assert "ConfigError: fix X" in err and "Traceback" not in err
    finally:
        InteractiveShell.clear_instance()


# ---------------------------------------------------------------------------- the installer


def test_constraints_pin_the_installed_torch():
    versions = colab_install.installed_versions(
        ("torch", "torchvision", "nothere"),
        lookup=lambda name: {"torch": "2.8.0+cu126", "torchvision": "0.23.0+cu126"}[name]
        if name != "nothere" else (_ for _ in ()).throw(colab_install.metadata.PackageNotFoundError(name)))
    assert versions == {"torch": "2.8.0+cu126", "torchvision": "0.23.0+cu126"}
    text = colab_install.constraints_text(versions)
    assert "torch==2.8.0+cu126\n" in text and "torchvision==0.23.0+cu126\n" in text


def test_install_plan_for_a_folder_and_a_url(tmp_path, monkeypatch):
    (tmp_path / "dreambooth-helpers").mkdir()
    monkeypatch.chdir(tmp_path)
    plan = colab_install.plan_install("dreambooth-helpers", "/tmp/c.txt", python="py")
    # An absolute path: a bare "dreambooth-helpers[...]" would make pip look on PyPI instead.
    assert plan.commands == [["py", "-m", "pip", "install", "--quiet", "--constraint", "/tmp/c.txt",
                              f"{tmp_path / 'dreambooth-helpers'}[demo,notebook,gpu]"]]
    assert not plan.optional
    url = colab_install.plan_install("git+https://github.com/OWNER/dreambooth-helpers", "c.txt", extras=["demo"],
                                     xformers=True, python="py")
    assert url.commands[0][-1] == "dreambooth-helpers[demo] @ git+https://github.com/OWNER/dreambooth-helpers"
    assert url.commands[1][-3:] == ["--only-binary", ":all:", "xformers"] and url.optional == {1}
    assert all("--constraint" in command for command in url.commands)
    assert not any(part == "torch" for command in url.commands for part in command)
    assert "(optional)" in url.describe() and "SDPA" in url.describe()
    for wrong in ("", "no-such-folder"):
        with pytest.raises(ValueError, match="neither a folder nor a git"):
            colab_install.plan_install(wrong, "c.txt")


def test_run_plan_outcomes(tmp_path):
    plan = colab_install.plan_install(str(tmp_path), "c.txt", xformers=True, python="py")

    def run_ok_then_fail(command, **kwargs):
        failed = command[-1] == "xformers"
        return subprocess.CompletedProcess(command, 1 if failed else 0, "", "ResolutionImpossible" if failed else "")

    assert colab_install.run_plan(plan, run_ok_then_fail) == [
        f"installed: {tmp_path}[demo,notebook,gpu]",
        "skipped: xformers (no build for this torch; PyTorch SDPA attention will be used)"]

    def run_fail(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "line\nERROR: Cannot install torch==9")

    with pytest.raises(RuntimeError, match="Cannot install torch==9"):
        colab_install.run_plan(plan, run_fail)


def test_installer_dry_run(capsys, monkeypatch):
    monkeypatch.delenv(colab_install.SMOKE_VARIABLE, raising=False)
    assert colab_install.main(["--source", str(REPO), "--dry-run", "--xformers"]) == 0
    out = capsys.readouterr().out
    assert "Keeping the installed torch" in out and "Dry run" in out and "xformers" in out


def test_installer_runs_standalone_with_the_standard_library_only():
    """The notebook runs it before anything is installed: it must not import the package or third parties."""
    source = Path(colab_install.__file__).read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from ")) and not line.startswith("from __future__")}
    assert imports <= set(sys.stdlib_module_names), imports
    result = subprocess.run([sys.executable, colab_install.__file__, "--source", str(REPO), "--dry-run"],
                            capture_output=True, text=True, cwd="/")
    assert result.returncode == 0 and "Dry run" in result.stdout
