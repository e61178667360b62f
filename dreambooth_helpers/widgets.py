"""What the tutorial notebook does, as functions: the notebook's cells only call these.

Pure functions hold the decisions (prompts for a subject kind, the default step count, the
TrainConfig a form produces, what smoke mode changes) so they are tested without a browser. Thin
classes put ipywidgets in front of them: `ImagePicker` (upload, folder path or the bundled sample
subject) and `SettingsForm` (token, class noun, kind, preset, steps, text encoder, LoRA).
`TrainingMonitor` shows samples while training runs; `plot_losses` draws training_summary.json.

ipywidgets, matplotlib, IPython and huggingface_hub are imported inside the functions that need
them, so `import dreambooth_helpers` works without the notebook extras.

Smoke mode (DREAMBOOTH_HELPERS_SMOKE=1) makes the notebook run unattended in a few minutes on a
CPU: tiny model, the sample subject, a handful of steps, no Drive, no login, no upload. Every
smoke-mode decision is made here, never in a cell.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PRESETS, Concept, TrainConfig
from .data import IMAGE_EXTENSIONS, DatasetReport, prepare_image, read_images, require_usable
from .errors import ConfigError, DreamBoothError, ImageDataError

SMOKE_VARIABLE = "DREAMBOOTH_HELPERS_SMOKE"
SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SUBJECT_KINDS = ("object", "person", "style")
SAMPLE_SUBJECT_NAME = "toy_robot"
SAMPLE_SUBJECT = {"token": "sks", "class_noun": "toy", "kind": "object"}
COLAB_OUTPUT_ROOT = "/content/outputs"
DRIVE_MOUNT_POINT = "/content/drive"
DRIVE_OUTPUT_ROOT = "/content/drive/MyDrive/dreambooth-helpers"
HF_TOKEN_SECRET = "HF_TOKEN"
# Words a tokenizer knows well make bad identifiers: the model already means something by them.
COMMON_WORDS = frozenset(
    "a an the photo picture image of in on at with and dog cat man woman person boy girl toy car style painting "
    "red blue green black white my your sky sun".split()
)
NO_GPU_ADVICE = ("In Colab: Runtime > Change runtime type > Hardware accelerator: T4 GPU > Save, then run the "
                 "notebook again from the top. Training Stable Diffusion on a CPU would take days.")


# ---------------------------------------------------------------------------- where we run


def smoke_mode() -> bool:
    """True when the notebook runs unattended as a test (DREAMBOOTH_HELPERS_SMOKE=1)."""
    return os.environ.get(SMOKE_VARIABLE, "") == "1"


def in_colab() -> bool:
    return "google.colab" in sys.modules


def for_smoke(value: Any, smoke_value: Any) -> Any:
    """`value`, or `smoke_value` in smoke mode (small step counts and image numbers for the test run)."""
    return smoke_value if smoke_mode() else value


def smoke_model() -> str:
    """The model smoke runs use: the shipped offline "toy" model, or "tiny" in a checkout that lacks its weights."""
    from . import models

    return models.TOY_MODEL if (models.TOY_MODEL_DIR / "unet").is_dir() else models.TINY_MODEL


def choose_base_model(requested: str) -> str:
    """The base model to train: `requested`, or the small offline model in smoke mode."""
    if smoke_mode():
        return smoke_model()
    if not requested or not requested.strip():
        raise ConfigError(f"BASE_MODEL is empty: use {SD15_MODEL!r} (Stable Diffusion 1.5).")
    return requested.strip()


# ---------------------------------------------------------------------------- the GPU


@dataclass
class GpuStatus:
    available: bool
    name: str | None
    memory_gib: float | None
    message: str


def gpu_status(cuda_available: bool | None = None, name: str | None = None,
               memory_bytes: int | None = None) -> GpuStatus:
    """What GPU this runtime has, with a message for the notebook (arguments override detection, for tests)."""
    import torch

    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not available:
        message = f"No GPU found. {NO_GPU_ADVICE}"
        if smoke_mode():
            message += " (Smoke test: the tiny model trains on the CPU.)"
        return GpuStatus(False, None, None, message)
    if name is None:
        name = torch.cuda.get_device_name(0)
    if memory_bytes is None:
        memory_bytes = torch.cuda.get_device_properties(0).total_memory
    memory = round(memory_bytes / 2**30, 1)
    message = f"GPU: {name}, {memory:g} GiB."
    if memory < 10:
        message += (" That is less than a T4's 15 GiB: pick the 'low-memory' preset or tick LoRA in the settings, "
                    "or switch to a T4 runtime.")
    else:
        message += " Enough for the 't4' preset (full fine-tune of UNet and text encoder)."
    return GpuStatus(True, name, memory, message)


def check_can_train(model: str, cuda_available: bool | None = None) -> None:
    """Refuse to start a real model's training on a CPU, where it would run for days."""
    import torch

    from .models import SD15_RANDOM, TINY_MODEL, TOY_MODEL

    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not cuda and model not in (TINY_MODEL, TOY_MODEL, SD15_RANDOM):
        raise ConfigError(f"This runtime has no GPU, and training {model!r} on a CPU would take days. {NO_GPU_ADVICE}")


def free_gpu_memory() -> None:
    """Give memory held by finished steps back to the GPU before the next model loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- Drive and login


def mount_drive(wanted: bool) -> Path | None:
    """Mount Google Drive when asked (and in Colab); returns the output root on Drive, or None."""
    if not wanted or smoke_mode():
        return None
    if not in_colab():
        print("Google Drive can only be mounted in Colab; outputs stay on this machine.")
        return None
    from google.colab import drive

    drive.mount(DRIVE_MOUNT_POINT)
    root = Path(DRIVE_OUTPUT_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    return root


def output_root(drive_root: Path | None = None) -> Path:
    """Where runs are written: Drive when mounted, /content/outputs in Colab, ./outputs elsewhere."""
    if drive_root is not None:
        return Path(drive_root)
    if smoke_mode():
        return Path(os.environ.get("DREAMBOOTH_HELPERS_SMOKE_OUTPUT", "outputs/notebook-smoke"))
    return Path(COLAB_OUTPUT_ROOT) if in_colab() else Path("outputs")


def colab_secret(name: str = HF_TOKEN_SECRET) -> str | None:
    """The value of a Colab secret, or None when not in Colab, not set, or access not granted."""
    if not in_colab():
        return None
    try:
        from google.colab import userdata

        value = userdata.get(name)
    except Exception:  # SecretNotFoundError, NotebookAccessError, TimeoutException: all mean "no token here"
        return None
    return value.strip() if isinstance(value, str) and value.strip() else None


def hub_login(secret_name: str = HF_TOKEN_SECRET) -> str:
    """Log in to the Hugging Face Hub for pushing; returns what happened. The token is never shown.

    Order: an existing login; the Colab secret `secret_name`; else `notebook_login()` (a sign-in
    prompt). Smoke runs skip it.
    """
    if smoke_mode():
        return "Smoke test: no Hugging Face login (nothing is pushed)."
    from huggingface_hub import get_token, login, notebook_login

    if get_token():
        return f"Already logged in to the Hugging Face Hub{_as_user()}."
    token = colab_secret(secret_name)
    if token:
        login(token=token, add_to_git_credential=False)
        del token
        return f"Logged in with the Colab secret {secret_name}{_as_user()}."
    notebook_login()
    if get_token():
        return f"Logged in{_as_user()}."
    return ("Not logged in. Add a write token as the Colab secret HF_TOKEN (key icon in the left bar, then allow "
            "this notebook to read it) and run this cell again. Only the 'Push to the Hub' section needs it.")


def hub_username() -> str | None:
    """The logged-in user's name, or None (not logged in, offline, or smoke mode)."""
    if smoke_mode():
        return None
    try:
        from huggingface_hub import whoami

        return whoami()["name"]
    except Exception:  # not logged in or no network: the caller asks the user for a name instead
        return None


def _as_user() -> str:
    name = hub_username()
    return f" as {name}" if name else ""


# ---------------------------------------------------------------------------- prompts and defaults


@dataclass(frozen=True)
class KindDefaults:
    """What a subject kind changes: the usual class noun, steps per photo, learning rate, text encoder."""

    class_noun: str
    steps_per_image: int
    learning_rate: float  # full fine-tune; LoRA uses LORA_LEARNING_RATE
    train_text_encoder: bool
    label: str


KIND_DEFAULTS = {
    "object": KindDefaults("dog", 150, 2e-6, True, "an object or a pet"),
    # Faces need more steps and a lower rate to keep the likeness without burning in (HF blog, 2x A100 runs).
    "person": KindDefaults("person", 200, 1e-6, True, "a person (a face)"),
    # A style has many varied pictures; fewer passes over each are enough.
    "style": KindDefaults("painting", 100, 2e-6, True, "an art style"),
}
LORA_LEARNING_RATE = 1e-4
MIN_STEPS, MAX_STEPS = 400, 2000


def _kind(kind: str) -> KindDefaults:
    if kind not in KIND_DEFAULTS:
        raise ConfigError(f"Subject kind {kind!r}: choose one of {', '.join(SUBJECT_KINDS)}.")
    return KIND_DEFAULTS[kind]


def default_steps(num_images: int, kind: str = "object") -> int:
    """Training steps for `num_images` photos: 100-200 per photo by kind, kept within 400..2000."""
    if num_images < 1:
        raise ImageDataError("No usable photos: add 3-20 photos of your subject first.")
    return min(MAX_STEPS, max(MIN_STEPS, _kind(kind).steps_per_image * num_images))


def default_learning_rate(kind: str = "object", lora: bool = False) -> float:
    return LORA_LEARNING_RATE if lora else _kind(kind).learning_rate


def check_token(token: str) -> str:
    """The identifier, stripped; refuses what cannot work as one rare word."""
    token = (token or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9]{2,20}", token):
        raise ConfigError(f"Identifier token {token!r}: use one short made-up word of letters/digits, e.g. \"sks\" "
                          "or \"zwx\" (no spaces).")
    return token


def check_class_noun(class_noun: str) -> str:
    class_noun = " ".join((class_noun or "").split())
    if not class_noun or len(class_noun) > 40:
        raise ConfigError("Class noun is empty or too long: use the plain word for what the subject is, e.g. \"dog\", "
                          "\"backpack\", \"man\", \"woman\", \"painting\".")
    return class_noun


def token_advice(token: str, class_noun: str) -> str | None:
    """A warning when the identifier is a word the model already knows (it would mix the two meanings)."""
    lowered = token.lower()
    if lowered == class_noun.lower() or lowered in COMMON_WORDS:
        return (f"{token!r} is an ordinary word, so the model already means something by it. A rare made-up word "
                "such as \"sks\" or \"zwx\" works better as the identifier.")
    return None


@dataclass(frozen=True)
class SubjectPrompts:
    instance: str  # names the subject: identifier + class noun
    class_: str  # the same without the identifier: what prior preservation generates
    samples: tuple[str, ...]  # drawn during training, to watch the subject appear
    generation: tuple[str, ...]  # to try after training: the subject in new contexts


def prompts_for(token: str, class_noun: str, kind: str = "object") -> SubjectPrompts:
    """The instance, class, sample and generation prompts for a subject of this kind."""
    token, noun = check_token(token), check_class_noun(class_noun)
    _kind(kind)
    if kind == "style":
        instance, class_ = f"a {noun} in {token} style", f"a {noun}"
        generation = (f"a {noun} of a lighthouse in {token} style",
                      f"a {noun} of a city street at night in {token} style",
                      f"a {noun} of a cat in {token} style",
                      f"a {noun} of mountains at sunrise in {token} style")
        samples = (instance, generation[0])
    elif kind == "person":
        instance, class_ = f"a photo of {token} {noun}", f"a photo of {noun}"
        generation = (f"a portrait photo of {token} {noun}, studio lighting", f"{token} {noun} as an astronaut",
                      f"an oil painting of {token} {noun}", f"a photo of {token} {noun} on the beach, smiling")
        samples = (instance, generation[1])
    else:
        instance, class_ = f"a photo of {token} {noun}", f"a photo of {noun}"
        generation = (f"a {token} {noun} in the jungle", f"a {token} {noun} in the snow", f"a red {token} {noun}",
                      f"a {token} {noun} on the beach")
        samples = (instance, generation[1])
    return SubjectPrompts(instance, class_, samples, generation)


def evaluation_kind(kind: str) -> str | None:
    """The DreamBooth paper's prompt set for this kind ("object" or "live"), None for a style."""
    _kind(kind)
    return {"object": "object", "person": "live", "style": None}[kind]


# ---------------------------------------------------------------------------- settings -> TrainConfig


@dataclass
class NotebookSettings:
    """The settings form's values. None means "the recommended value" for steps and learning rate."""

    token: str = "sks"
    class_noun: str = "dog"
    kind: str = "object"
    preset: str = "t4"
    steps: int | None = None
    learning_rate: float | None = None
    train_text_encoder: bool = True
    lora: bool = False
    # 0: no prior preservation. 50 as in the classic T4 notebooks: ~5 s each to generate on a T4.
    num_class_images: int = 50

    def prompts(self) -> SubjectPrompts:
        return prompts_for(self.token, self.class_noun, self.kind)

    def steps_for(self, num_images: int) -> int:
        return self.steps if self.steps else default_steps(num_images, self.kind)

    def effective_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate else default_learning_rate(self.kind, self.lora)


def run_name(token: str, class_noun: str) -> str:
    """A folder name for a run: "sks-dog"."""
    return re.sub(r"[^a-z0-9]+", "-", f"{token} {class_noun}".lower()).strip("-") or "run"


def checkpoint_settings(on_drive: bool, steps: int) -> dict[str, Any]:
    """Checkpoints only pay off where they survive a disconnect: on Drive. One kept, ~4 per run."""
    if not on_drive:
        return {"checkpoint_every": None}
    return {"checkpoint_every": max(100, steps // 4), "checkpoints_total_limit": 1}


def smoke_overrides() -> dict[str, Any]:
    """What smoke mode changes in a TrainConfig: a run of seconds on a CPU."""
    return {"model": smoke_model(), "resolution": 32, "num_class_images": 2, "class_images_steps": 2,
            "class_images_batch_size": 2, "max_train_steps": 4, "sample_every": 2, "sample_steps": 2,
            "mixed_precision": "no", "use_8bit_adam": False, "checkpoint_every": None}


def settings_to_config(settings: NotebookSettings, instance_dir: str | Path, num_images: int, output_dir: str | Path,
                       model: str = SD15_MODEL, *, on_drive: bool = False, smoke: bool | None = None) -> TrainConfig:
    """The validated TrainConfig for these settings, photos and output folder.

    A run whose output folder already holds checkpoints resumes from the newest ("latest").
    """
    from .checkpoints import list_checkpoints

    if settings.preset not in PRESETS:
        raise ConfigError(f"Preset {settings.preset!r}: choose one of {', '.join(PRESETS)}.")
    if settings.steps is not None and settings.steps < 0:
        raise ConfigError(f"Steps must be a positive number, or 0 for the recommended "
                          f"{default_steps(num_images, settings.kind)}.")
    prompts = settings.prompts()
    steps = settings.steps_for(num_images)
    prior = settings.num_class_images > 0
    overrides: dict[str, Any] = {
        "concepts": [Concept(str(instance_dir), prompts.instance, prompts.class_ if prior else None)],
        "output_dir": str(output_dir),
        "model": model,
        "with_prior_preservation": prior,
        "num_class_images": settings.num_class_images if prior else 0,
        "max_train_steps": steps,
        "learning_rate": settings.effective_learning_rate(),
        "train_text_encoder": settings.train_text_encoder,
        "lora": settings.lora,
        "sample_every": max(1, steps // 5),
        "sample_prompts": list(prompts.samples),
        **checkpoint_settings(on_drive, steps),
    }
    if settings.lora and settings.learning_rate is None:
        overrides["text_encoder_learning_rate"] = LORA_LEARNING_RATE / 2
    if smoke_mode() if smoke is None else smoke:
        overrides.update(smoke_overrides())
    if list_checkpoints(output_dir):
        overrides["resume"] = "latest"
    return TrainConfig.from_preset(settings.preset, **overrides).validate()


def describe_settings(settings: NotebookSettings, num_images: int) -> str:
    """A short HTML summary of what the form's values mean, shown under the form."""
    try:
        prompts = settings.prompts()
    except ConfigError as error:
        return f"<b style='color:#b00'>{_html(str(error))}</b>"
    steps = settings.steps_for(num_images)
    auto = "" if settings.steps else f" (recommended for {num_images} photo(s))"
    lines = [
        f"Instance prompt: <code>{_html(prompts.instance)}</code>",
        f"Class prompt (prior preservation): <code>{_html(prompts.class_)}</code>"
        + ("" if settings.num_class_images else " <i>off: 0 class images</i>"),
        f"Steps: <b>{steps}</b>{auto}; learning rate <b>{settings.effective_learning_rate():g}</b>",
        f"Preset: {_html(PRESETS[settings.preset]['description'])}",
    ]
    advice = token_advice(settings.token, settings.class_noun)
    if advice:
        lines.append(f"<b style='color:#a60'>{_html(advice)}</b>")
    return "<br>".join(lines)


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---------------------------------------------------------------------------- images


@dataclass
class ImageSelection:
    """The subject's photos as training will read them: a folder, its report, and where they came from."""

    folder: Path
    report: DatasetReport
    is_sample: bool = False

    @property
    def num_images(self) -> int:
        return len(self.report.images)


def sample_subject_dir(search: Sequence[str | Path] = ()) -> Path:
    """The bundled sample subject's folder (sample_data/toy_robot in a repository checkout).

    Looks in the given folders (the notebook passes the cloned repository), next to the package,
    and in the current folder.
    """
    package_root = Path(__file__).resolve().parent.parent
    roots = [Path(p) for p in search] + [package_root, Path.cwd(), Path.cwd() / "dreambooth-helpers"]
    for root in roots:
        folder = root / "sample_data" / SAMPLE_SUBJECT_NAME
        if folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir()):
            return folder
    raise ImageDataError("The sample subject (sample_data/toy_robot) was not found. Run the setup cell, which clones "
                         "the repository, or upload your own photos.")


UPLOAD_MAX_SIDE = 2048  # 4x the training size: room for the crop, without 12 MP PNGs filling the disk


def _safe_stem(name: str) -> str:
    stem = os.path.splitext(os.path.basename(name))[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "photo"


def save_uploads(uploads: Any, folder: str | Path) -> tuple[Path, DatasetReport]:
    """Read uploaded files (ipywidgets 8 `FileUpload.value`, (name, bytes) pairs, zips too) in memory and
    write the usable photos into `folder` as upright RGB PNGs, at most UPLOAD_MAX_SIDE px.

    Files from an earlier upload are removed first, so two uploads never mix. Returns the folder and
    the report of what was read (skipped files with their reasons).
    """
    report = read_images(uploads)
    require_usable(report)
    folder = Path(folder)
    if folder.is_dir():
        for old in folder.iterdir():
            if old.is_file():
                old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    for index, record in enumerate(report.images):
        image = record.image.copy()
        image.thumbnail((UPLOAD_MAX_SIDE, UPLOAD_MAX_SIDE))
        image.save(folder / f"{index:02d}_{_safe_stem(record.name)}.png")
    return folder, report


def choose_source(uploads: Any, path_text: str, use_sample: bool,
                  find_sample: Callable[[], Path] = sample_subject_dir) -> tuple[str, Any]:
    """Which photos to use: ("upload", files), ("folder", path) or ("sample", path), in that priority."""
    if uploads:
        return "upload", uploads
    if path_text and path_text.strip():
        return "folder", Path(path_text.strip()).expanduser()
    if use_sample:
        return "sample", find_sample()
    raise ImageDataError("No photos chosen: upload 3-20 photos of your subject, type the folder that holds them, "
                         "or tick 'use the sample subject'.")


def collect_images(kind: str, source: Any, work_dir: str | Path) -> ImageSelection:
    """An ImageSelection for what `choose_source` returned; uploads are saved under `work_dir` first."""
    if kind == "upload":
        folder, uploaded = save_uploads(source, Path(work_dir) / "instance_images")
        report = read_images(folder)
        report.skipped = uploaded.skipped + report.skipped  # what the upload could not use, with reasons
    else:
        folder = Path(source)
        report = read_images(folder)
    return ImageSelection(folder, require_usable(report), is_sample=kind == "sample")


class ImagePicker:
    """Upload photos, type a folder, or use the sample subject. In smoke mode the sample is pre-selected."""

    def __init__(self, search: Sequence[str | Path] = ()):
        import ipywidgets as w

        self._search = list(search)
        self.upload = w.FileUpload(accept="image/*", multiple=True, description="Upload photos")
        self.path = w.Text(placeholder="/content/drive/MyDrive/my_dog_photos",
                           description="or a folder:", layout=w.Layout(width="60%"))
        self.use_sample = w.Checkbox(value=smoke_mode(), description="use the sample subject (a toy robot)",
                                     indent=False)
        self.widget = w.VBox([self.upload, self.path, self.use_sample])

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def collect(self, work_dir: str | Path) -> ImageSelection:
        """Read the chosen photos; raises ImageDataError saying what to do when none is usable."""
        kind, source = choose_source(self.upload.value, self.path.value, self.use_sample.value,
                                     lambda: sample_subject_dir(self._search))
        return collect_images(kind, source, work_dir)


def prepared_images(selection: ImageSelection, resolution: int = 512, crop: str = "center"):
    """The photos exactly as training sees them: cropped (or padded) to a square and resized."""
    return [prepare_image(record.image, resolution, crop) for record in selection.report.images]


def labelled_grid(rows: Sequence[tuple[str, Sequence[Any]]], cell: int = 128, label_width: int = 0):
    """One row of images per (label, images); labels are written above each row (or left, with label_width)."""
    from PIL import Image, ImageDraw

    rows = [(label, list(images)) for label, images in rows if images]
    if not rows:
        raise ImageDataError("There are no images to show.")
    columns = max(len(images) for _, images in rows)
    label_height = 0 if label_width else 16
    row_height = cell + label_height
    grid = Image.new("RGB", (label_width + columns * cell, len(rows) * row_height), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        top = r * row_height
        if label:
            draw.text((4, top + 2), label[: max(8, (label_width or columns * cell) // 6)], fill="black")
        for c, image in enumerate(images):
            thumb = image.convert("RGB").resize((cell, cell))
            grid.paste(thumb, (label_width + c * cell, top + label_height))
    return grid


def preview_grid(selection: ImageSelection, resolution: int = 512, crop: str = "center", cell: int = 128):
    """A grid of the prepared photos, five per row, each named."""
    images = prepared_images(selection, resolution, crop)
    names = [record.name for record in selection.report.images]
    rows = [(", ".join(names[i:i + 5]), images[i:i + 5]) for i in range(0, len(images), 5)]
    return labelled_grid(rows, cell=cell)


def check_dataset(selection: ImageSelection, kind: str = "object", resolution: int = 512):
    """The dataset doctor's report for these photos (count, blur, exposure, duplicates, framing)."""
    from .doctor import diagnose

    return diagnose(selection.report, kind=kind, resolution=resolution)


# ---------------------------------------------------------------------------- the settings form


class SettingsForm:
    """The run's settings as a form; `settings()` reads it, `to_config(...)` makes the TrainConfig."""

    def __init__(self, num_images: int, defaults: NotebookSettings | None = None):
        import ipywidgets as w

        self.num_images = num_images
        d = defaults or NotebookSettings()
        wide = {"style": {"description_width": "180px"}, "layout": w.Layout(width="520px")}
        self.token = w.Text(value=d.token, description="Identifier token", **wide)
        self.class_noun = w.Text(value=d.class_noun, description="Class noun", **wide)
        self.kind = w.Dropdown(options=[(KIND_DEFAULTS[k].label, k) for k in SUBJECT_KINDS], value=d.kind,
                               description="Subject kind", **wide)
        self.preset = w.Dropdown(options=list(PRESETS), value=d.preset, description="Preset", **wide)
        self.steps = w.BoundedIntText(value=d.steps or 0, min=0, max=20_000, description="Steps (0 = recommended)",
                                      **wide)
        self.learning_rate = w.BoundedFloatText(value=d.learning_rate or 0.0, min=0.0, max=0.01, step=1e-6,
                                                description="Learning rate (0 = rec.)", **wide)
        self.train_text_encoder = w.Checkbox(value=d.train_text_encoder, description="Train the text encoder too",
                                             indent=False)
        self.lora = w.Checkbox(value=d.lora, description="LoRA (small file, less memory)", indent=False)
        self.num_class_images = w.IntSlider(value=d.num_class_images, min=0, max=300, step=10,
                                            description="Class images (0 = off)", **wide)
        self.summary = w.HTML()
        self.widget = w.VBox([self.token, self.class_noun, self.kind, self.preset, self.steps, self.learning_rate,
                              self.num_class_images, self.train_text_encoder, self.lora, self.summary])
        self.kind.observe(self._on_kind, names="value")
        self.preset.observe(self._on_preset, names="value")
        for control in (self.token, self.class_noun, self.steps, self.learning_rate, self.train_text_encoder,
                        self.lora, self.num_class_images):
            control.observe(lambda _: self.refresh(), names="value")
        self.refresh()

    @classmethod
    def for_images(cls, selection: ImageSelection) -> SettingsForm:
        """A form for these photos; the sample subject comes with its own token and class noun."""
        defaults = NotebookSettings(**SAMPLE_SUBJECT) if selection.is_sample else NotebookSettings()
        return cls(selection.num_images, defaults)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _on_kind(self, change) -> None:
        old, new = KIND_DEFAULTS[change["old"]], KIND_DEFAULTS[change["new"]]
        if self.class_noun.value.strip() in ("", old.class_noun):  # only replace a noun the user did not type
            self.class_noun.value = new.class_noun
        self.train_text_encoder.value = new.train_text_encoder
        self.refresh()

    def _on_preset(self, change) -> None:
        self.lora.value = bool(PRESETS[change["new"]]["settings"].get("lora", False))
        self.refresh()

    def settings(self) -> NotebookSettings:
        return NotebookSettings(
            token=self.token.value.strip(), class_noun=self.class_noun.value.strip(), kind=self.kind.value,
            preset=self.preset.value, steps=self.steps.value or None, learning_rate=self.learning_rate.value or None,
            train_text_encoder=self.train_text_encoder.value, lora=self.lora.value,
            num_class_images=self.num_class_images.value,
        )

    def refresh(self) -> None:
        self.summary.value = describe_settings(self.settings(), self.num_images)

    def to_config(self, selection: ImageSelection, root: str | Path, model: str, on_drive: bool = False) -> TrainConfig:
        settings = self.settings()
        output_dir = Path(root) / run_name(settings.token, settings.class_noun)
        return settings_to_config(settings, selection.folder, selection.num_images, output_dir, model,
                                  on_drive=on_drive)


# ---------------------------------------------------------------------------- training


def sample_step(path: Path) -> int:
    """The training step a sample file was drawn at (samples/step-000150-0.png -> 150)."""
    match = re.match(r"step-(\d+)-\d+\.png$", path.name)
    return int(match.group(1)) if match else -1


def new_sample_files(folder: str | Path, seen: set[Path]) -> list[Path]:
    """Sample images in `folder` not in `seen` (added to it), by step then prompt."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    fresh = sorted((p for p in folder.glob("step-*.png") if p not in seen), key=lambda p: (sample_step(p), p.name))
    seen.update(fresh)
    return fresh


def sample_grid(paths: Sequence[Path], cell: int = 128):
    """The samples as a grid: one row per step, one column per sample prompt."""
    from PIL import Image

    by_step: dict[int, list[Any]] = {}
    for path in sorted(paths, key=lambda p: (sample_step(p), p.name)):
        with Image.open(path) as image:
            by_step.setdefault(sample_step(path), []).append(image.convert("RGB"))
    return labelled_grid([(f"step {step}", images) for step, images in by_step.items()], cell=cell)


@dataclass
class TrainingMonitor:
    """`on_step` for `train()`: shows progress text and each new round of samples as they are drawn.

    It updates two display areas in place (IPython display handles), so the cell's output stays short.
    """

    output_dir: Path
    total_steps: int
    refresh_every: int = 10
    seen: set[Path] = field(default_factory=set)
    shown_samples: list[Path] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    _text: Any = None
    _images: Any = None

    def __post_init__(self) -> None:
        from IPython.display import display

        self.output_dir = Path(self.output_dir)
        self._text = display(f"Preparing: loading the model and making class images ({self.total_steps} steps next)",
                             display_id=True)
        self._images = display("Samples appear here as training draws them.", display_id=True)

    def __call__(self, step: int, logs: dict[str, Any]) -> None:
        self.history.append(logs)
        del self.history[:-50]  # the recent steps are enough for the speed
        if step == 1 or step % self.refresh_every == 0 or step == self.total_steps:
            self._text.update(progress_line(step, self.total_steps, logs, median_step_seconds(self.history)))
        self.show_new_samples()

    def show_new_samples(self) -> None:
        fresh = new_sample_files(self.output_dir / "samples", self.seen)
        if fresh:
            self.shown_samples += fresh
            self._images.update(sample_grid(self.shown_samples[-8:]))

    def finish(self) -> None:
        """After training: the last round of samples (drawn after the last step's callback)."""
        self.show_new_samples()


def median_step_seconds(history: Sequence[dict[str, Any]]) -> float | None:
    """The typical time of one step, from the history's timestamps.

    The median skips the steps that also drew samples or saved a checkpoint, and the first step,
    whose time includes loading the model and making class images.
    """
    times = [float(h["time"]) for h in history if h.get("time") is not None]
    gaps = sorted(b - a for a, b in zip(times, times[1:]) if b >= a)
    return gaps[len(gaps) // 2] if gaps else None


def progress_line(step: int, total: int, logs: dict[str, Any], seconds_per_step: float | None = None) -> str:
    elapsed = float(logs.get("time") or 0.0)
    rate = f", {seconds_per_step:.2f} s/step" if seconds_per_step else ""
    prior = logs.get("prior_loss")
    prior_text = f", prior loss {prior:.4f}" if isinstance(prior, float) else ""
    return (f"step {step}/{total}: loss {logs.get('loss', float('nan')):.4f}{prior_text}, "
            f"lr {logs.get('lr', 0.0):.2e}, {elapsed:.0f} s elapsed{rate}")


def read_summary(output_dir: str | Path) -> dict[str, Any]:
    """The run's training_summary.json."""
    import json

    path = Path(output_dir) / "training_summary.json"
    if not path.is_file():
        raise DreamBoothError(f"No training summary in {str(output_dir)!r}: training has not finished there. Run the "
                              "training cell first.")
    return json.loads(path.read_text())


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the loss is noisy: each step sees one random timestep)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(summary: dict[str, Any], window: int | None = None):
    """A matplotlib Figure of the loss per step: raw (faint), smoothed, and subject vs prior parts."""
    import matplotlib.pyplot as plt

    history = summary.get("history") or []
    if not history:
        raise DreamBoothError("The training summary has no per-step history to plot.")
    steps = [h["step"] for h in history]
    window = window or max(1, len(history) // 20)
    # Made through pyplot so notebooks know how to show it; closed at once so it is shown only where displayed.
    figure, axes = plt.subplots(figsize=(8, 3.5))
    plt.close(figure)
    axes.plot(steps, [h["loss"] for h in history], color="#bbb", linewidth=0.8, label="loss (each step)")
    axes.plot(steps, moving_average([h["loss"] for h in history], window), color="black",
              label=f"loss (mean of {window})")
    axes.plot(steps, moving_average([h["instance_loss"] for h in history], window), color="tab:blue",
              label="your photos")
    prior = [h.get("prior_loss") for h in history]
    if all(isinstance(p, (int, float)) for p in prior):
        axes.plot(steps, moving_average(prior, window), color="tab:orange", label="class images (prior)")
    axes.set_xlabel("step")
    axes.set_ylabel("MSE of the predicted noise")
    axes.set_title("Training loss")
    axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    return figure


def training_facts(summary: dict[str, Any]) -> str:
    """One paragraph: steps, time, speed, peak GPU memory, precision, optimizer and any notices."""
    steps = summary.get("steps", 0)
    seconds = float(summary.get("wall_time_s") or 0.0)
    per_step = median_step_seconds(summary.get("history") or [])
    speed = f" ({per_step:.2f} s per training step, median)" if per_step is not None else ""
    peak = summary.get("peak_gpu_memory_gib")
    memory = f"peak GPU memory {peak:.2f} GiB" if isinstance(peak, (int, float)) else "no GPU used"
    lines = [f"{steps} steps in {seconds / 60:.1f} min{speed}; {memory}; device {summary.get('device')}, "
             f"precision {summary.get('mixed_precision')}, optimizer {summary.get('optimizer')}, "
             f"{'LoRA' if summary.get('lora') else 'full fine-tune'}, {summary.get('resolution')} px, "
             f"{summary.get('num_instance_images')} photos + {summary.get('num_class_images')} class images."]
    lines += [f"Note: {notice}" for notice in summary.get("notices") or []]
    return "\n".join(lines)


def class_image_grid(config: TrainConfig, limit: int = 8, cell: int = 96):
    """A grid of the first class images that prior preservation trains on (None when it is off)."""
    from .prior import default_class_dir, existing_class_images

    if not config.with_prior_preservation:
        return None
    concept = config.concepts[0]
    folder = concept.class_dir or default_class_dir(config.output_dir, concept.class_prompt)
    paths = existing_class_images(folder)[:limit]
    if not paths:
        return None
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return labelled_grid([(concept.class_prompt, images)], cell=cell)


def make_class_images(config: TrainConfig, progress: bool = True) -> list[Path]:
    """Generate the class images for prior preservation now (training reuses them), with a progress bar."""
    import torch

    from .models import load_components, make_pipeline
    from .prior import default_class_dir, ensure_class_images

    if not config.with_prior_preservation:
        return []
    concept = config.concepts[0]
    components = load_components(config.model, seed=config.seed)
    resolution = config.resolution or components.native_resolution
    pipe = make_pipeline(components).to("cuda" if torch.cuda.is_available() else "cpu")
    folder = concept.class_dir or default_class_dir(config.output_dir, concept.class_prompt)
    try:
        return ensure_class_images(pipe, concept.class_prompt, folder, config.num_class_images, resolution=resolution,
                                   seed=config.seed, batch_size=config.class_images_batch_size,
                                   steps=config.class_images_steps, progress=progress)
    finally:
        del pipe, components
        free_gpu_memory()


# ---------------------------------------------------------------------------- after training


@dataclass(frozen=True)
class GenerationSettings:
    steps: int = 25
    guidance_scale: float = 7.5
    images_per_prompt: int = 2
    seed: int = 1234
    negative_prompt: str = "blurry, low quality, deformed"


def generation_settings(**chosen: Any) -> GenerationSettings:
    """The notebook's generation values; smoke mode keeps them tiny (2 steps, 1 image per prompt)."""
    settings = GenerationSettings(**chosen)
    if smoke_mode():
        settings = GenerationSettings(steps=2, guidance_scale=settings.guidance_scale, images_per_prompt=1,
                                      seed=settings.seed, negative_prompt=settings.negative_prompt)
    return settings


def generate_examples(generator, prompts: Sequence[str], settings: GenerationSettings,
                      out_dir: str | Path | None = None):
    """Images for each prompt with the same seeds; returns (grid with a row per prompt, all results)."""
    from .inference import save_images

    rows, results = [], []
    for prompt in prompts:
        batch = generator.generate(prompt, negative_prompt=settings.negative_prompt,
                                   num_images=settings.images_per_prompt, steps=settings.steps,
                                   guidance_scale=settings.guidance_scale, seed=settings.seed)
        results += batch
        rows.append((f"{prompt}  (seed {settings.seed}+)", [r.image for r in batch]))
    if out_dir is not None:
        save_images(results, out_dir)
    return labelled_grid(rows, cell=192 if not smoke_mode() else 64), results


def start_demo(model_dir: str | Path, **options: Any):
    """Launch the Gradio demo for the trained model. In Colab Gradio makes the public share link itself.

    Smoke mode starts it on a free local port, without a share link, and waits until the model is loaded.
    """
    from .demo import launch_demo

    if smoke_mode():
        options = {"share": False, "port": 0, **options}
    demo = launch_demo(str(model_dir), **options)
    if smoke_mode():
        demo.service.wait_until_loaded(timeout=120)
    return demo


def stop_demo(demo, requested: bool) -> str:
    """Stop the demo when asked (always in smoke mode), freeing its GPU memory."""
    if demo is None:
        return "No demo is running."
    if not (requested or smoke_mode()):
        return "The demo keeps running. Tick STOP_DEMO and run this cell again to stop it."
    demo.close()
    free_gpu_memory()
    return "Demo stopped."


def default_repo_id(token: str, class_noun: str, username: str | None = None) -> str:
    """USER/sks-dog-dreambooth: the user's Hub name (or a placeholder) and the run's name."""
    return f"{username or 'your-hf-name'}/{run_name(token, class_noun)}-dreambooth"


def publish(model_dir: str | Path, repo_id: str | None, token: str, class_noun: str, private: bool = True) -> str:
    """Push the trained model with its model card; smoke mode only stages the upload folder and card.

    Returns what was done (the repository URL, or where the staged files are).
    """
    from .hub import CARD_FILE, push_to_hub, stage_for_upload

    repo_id = (repo_id or "").strip() or default_repo_id(token, class_noun, hub_username())
    if smoke_mode():
        staging = Path(model_dir).parent / f"{Path(model_dir).name}-hub-upload"
        shutil.rmtree(staging, ignore_errors=True)
        files = stage_for_upload(model_dir, staging, repo_id)
        return (f"Smoke test: nothing pushed. The repository {repo_id} would get {len(files)} files, staged in "
                f"{staging} (model card: {staging / CARD_FILE}).")
    if repo_id.startswith("your-hf-name/"):
        raise ConfigError("Set HUB_REPO_ID to USER/NAME (your Hugging Face name), or log in first so it is filled "
                          "in for you.")
    url = push_to_hub(model_dir, repo_id, private=private)
    return f"Pushed to {url} ({'private' if private else 'public'})."


def evaluation_options(kind: str, requested: bool, num_prompts: int | None = 25,
                       images_per_prompt: int = 4) -> dict[str, Any] | None:
    """Arguments for `evaluation.evaluate_model`, or None when it should not run.

    It runs when requested (it downloads DINO and CLIP and takes minutes on a T4) and in smoke mode,
    where it uses tiny random encoders, 2 prompts, 1 image, 2 steps. Styles are skipped: the paper's
    protocol measures a subject.
    """
    paper_kind = evaluation_kind(kind)
    if paper_kind is None or not (requested or smoke_mode()):
        return None
    if smoke_mode():
        return {"kind": paper_kind, "encoders": "tiny", "num_prompts": 2, "images_per_prompt": 1,
                "num_inference_steps": 2}
    return {"kind": paper_kind, "encoders": "paper", "num_prompts": num_prompts,
            "images_per_prompt": images_per_prompt, "num_inference_steps": 25}


def evaluate(generator, selection: ImageSelection, settings: NotebookSettings, output_dir: str | Path,
             requested: bool, num_prompts: int | None = 25, images_per_prompt: int = 4):
    """The paper's DINO / CLIP-I / CLIP-T scores for the trained model (None, with a message, when skipped)."""
    from .evaluation import evaluate_model

    options = evaluation_options(settings.kind, requested, num_prompts, images_per_prompt)
    if options is None:
        reason = ("the paper's protocol measures a subject, not a style" if evaluation_kind(settings.kind) is None
                  else "RUN_EVALUATION is off")
        print(f"Evaluation skipped: {reason}.")
        return None
    return evaluate_model(generator, settings.class_noun, instance_dir=selection.folder, identifier=settings.token,
                          output_dir=output_dir, **options)


def split_prompts(text: str) -> list[str]:
    """Extra prompts typed into one form field, separated by ";" or new lines."""
    return [part.strip() for part in re.split(r"[;\n]", text or "") if part.strip()]


T4_FREE_GIB = 14.5  # what a Colab T4 leaves free for training (15 GiB card, CUDA context and driver)


def memory_outlook(config: TrainConfig, cuda_available: bool | None = None) -> str:
    """What the memory planner expects of this run: on this GPU, or on a T4 when there is none.

    Says what to change when it does not fit, before any model is loaded.
    """
    import torch

    from .memory import GIB, plan_memory, planning_size

    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    free = None if cuda else int(T4_FREE_GIB * GIB)
    where = "" if cuda else f"On a T4 ({T4_FREE_GIB:g} GiB free; no GPU here): "
    try:
        plan = plan_memory(config, free_bytes=free, size=planning_size(config.model))
    except ConfigError as error:
        return f"{where}Does not fit: {error}"
    return where + plan.reason


def config_summary(config: TrainConfig) -> str:
    """The settings that matter for this run, one line each, for the notebook to print before training."""
    concept = config.concepts[0]
    lines = [
        f"model:            {config.model}",
        f"photos:           {concept.instance_dir}",
        f"instance prompt:  {concept.instance_prompt}",
        f"class prompt:     {concept.class_prompt if config.with_prior_preservation else '(prior preservation off)'}"
        + (f" x {config.num_class_images} images" if config.with_prior_preservation else ""),
        f"steps:            {config.max_train_steps}, learning rate {config.effective_learning_rate:g}"
        + (f" (text encoder {config.effective_text_encoder_learning_rate:g})" if config.train_text_encoder else ""),
        f"trains:           {'LoRA adapters on ' if config.lora else ''}UNet"
        + (" + text encoder" if config.train_text_encoder else ""),
        f"samples every:    {config.sample_every} steps",
        f"output folder:    {config.output_dir}",
    ]
    if config.checkpoint_every:
        lines.append(f"checkpoints:      every {config.checkpoint_every} steps (newest kept, for resuming)")
    if config.resume:
        lines.append("resume:           from the newest checkpoint in the output folder")
    return "\n".join(lines)


def show_errors_plainly() -> None:
    """In IPython, show a DreamBoothError as its message alone: it says what to fix; a traceback only hides it.

    The cell still fails (so "Run all" stops there); other exceptions keep their full traceback.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def handler(shell, etype, value, tb, tb_offset=None):
        # IPython discards what a custom handler returns for errors raised by a cell: print it ourselves.
        print(f"{etype.__name__}: {value}", file=sys.stderr)
        return []

    shell.set_custom_exc((DreamBoothError,), handler)
