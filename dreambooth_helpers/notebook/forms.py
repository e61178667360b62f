"""What the user gives the notebook: the photos (Colab's upload, a folder, ipywidgets or the sample subject),
the settings form, and the TrainConfig they make.

The form's values go through `settings_to_config`, which leaves every "recommended" value to the
recipe in subject.py exactly as the command line does (`train --kind ...`), so both train the same run.

Widgets display through `_ipython_display_`, which both ipywidgets 7 (Colab ships 7.7.1 and renders
nothing newer) and 8 understand; ipywidgets is imported inside the classes, so the rest works without it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import captions, choices, subject
from ..checkpoints import list_checkpoints, plan_checkpoints
from ..config import DEFAULT_PRESET, PRESETS, Concept, TrainConfig
from ..data import IMAGE_EXTENSIONS, DatasetReport, prepare_image, read_images, require_usable
from ..errors import ConfigError, ImageDataError
from ..grids import labelled_grid
from ..memory import GIB, plan_memory, planning_size
from .runtime import NotebookRuntime, free_bytes, in_notebook_words, smoke_model

SAMPLE_SUBJECT_NAME = "toy_robot"
SAMPLE_SUBJECT = {"token": "sks", "class_noun": "toy", "kind": "object"}
PHOTO_SOURCES = ("upload", "sample", "folder")  # the notebook's PHOTOS choice
UPLOAD_MAX_SIDE = 2048  # 4x the training size: room for the crop, without 12 MP PNGs filling the disk
# What the photo picker accepts: images, HEIC from iPhones, and zips of either.
UPLOAD_ACCEPT = "image/*,.heic,.heif,.zip"
T4_FREE_GIB = choices.T4_FREE_GIB  # what a Colab T4 leaves free for training (15 GiB card, CUDA context and driver)
# A free Google account has 15 GB for Drive, Gmail and Photos together; plan for what is usually left.
DRIVE_BUDGET_GB = 12


# ---------------------------------------------------------------------------- photos


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
    package_root = Path(__file__).resolve().parents[2]
    roots = [Path(p) for p in search] + [package_root, Path.cwd(), Path.cwd() / "dreambooth-helpers"]
    for root in roots:
        folder = root / "sample_data" / SAMPLE_SUBJECT_NAME
        if folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir()):
            return folder
    raise ImageDataError("The sample subject (sample_data/toy_robot) was not found. Run the setup cell, which clones "
                         "the repository, or upload your own photos.")


def _safe_stem(name: str) -> str:
    stem = os.path.splitext(os.path.basename(name))[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "photo"


def save_uploads(uploads: Any, folder: str | Path, report: DatasetReport | None = None) -> tuple[Path, DatasetReport]:
    """Read uploaded files in memory and write the usable photos into `folder` as upright RGB PNGs, at most
    UPLOAD_MAX_SIDE px. `uploads` is what an upload gives: Colab's `files.upload()` ({name: bytes}),
    ipywidgets 7 or 8 `FileUpload.value`, or (name, bytes) pairs; zips are opened. Each photo is decoded once,
    at that size; `report`: what read_images already made of `uploads` (then nothing is read again).

    Files from an earlier upload are removed first, so two uploads never mix. Returns the folder and
    the report of what was read (skipped files with their reasons).
    """
    report = report if report is not None else read_images(uploads, max_side=UPLOAD_MAX_SIDE)
    require_usable(report)
    folder = Path(folder)
    if folder.is_dir():
        for old in folder.iterdir():
            if old.is_file():
                old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    for index, record in enumerate(report.images):
        image = record.image
        if max(image.size) > UPLOAD_MAX_SIDE:  # a report read at full size
            image = image.copy()
            image.thumbnail((UPLOAD_MAX_SIDE, UPLOAD_MAX_SIDE))
        image.save(folder / f"{index:02d}_{_safe_stem(record.name)}.png")  # no EXIF (GPS) is written
    return folder, report


def colab_upload() -> dict[str, bytes]:
    """Colab's own upload button (`google.colab.files.upload`), which carries phone-sized photos: ipywidgets'
    FileUpload loses files of ~1 MB and more in Colab (jupyter-widgets/ipywidgets#3452). It waits for the user."""
    from google.colab import files

    # Colab also writes each file to target_dir; a scratch folder keeps them off Drive and out of /content.
    scratch = tempfile.mkdtemp(prefix="dreambooth-uploads-")
    try:
        received = files.upload(target_dir=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {os.path.basename(name): content for name, content in (received or {}).items()}


def collect_images(source: str, chosen: Any, work_dir: str | Path) -> ImageSelection:
    """An ImageSelection for the photos chosen: uploaded files (saved under `work_dir` first), or a folder."""
    if source == "upload":
        folder, uploaded = save_uploads(chosen, Path(work_dir) / "instance_images")
        report = read_images(folder)
        report.skipped = uploaded.skipped + report.skipped  # what the upload could not use, with reasons
    else:
        folder = Path(chosen).expanduser()
        report = captions.check_folder(read_images(folder), folder)  # caption mistakes show here, not at training
    return ImageSelection(folder, require_usable(report), is_sample=source == "sample")


class ImagePicker:
    """The photos cell: `PHOTOS` is "upload", "sample" or "folder".

    In Colab, "upload" opens Colab's own upload button right away (the cell waits for the files). Elsewhere
    (Jupyter, VS Code) it shows an ipywidgets picker: upload, a folder path, or the sample subject, which
    smoke mode pre-ticks. `collect(work_dir)` reads whatever was chosen.
    """

    def __init__(self, runtime: NotebookRuntime, source: str = "upload", folder: str = "",
                 search: Sequence[str | Path] = ()):
        source = _photo_source(source)
        self._search = list(search)
        self.source, self.folder = source, (folder or "").strip()
        self.received: dict[str, bytes] | None = None
        self.widget = None
        if source == "folder" and not self.folder:
            raise ImageDataError("PHOTOS is 'folder' but PHOTO_FOLDER is empty: type the folder that holds your "
                                 "photos (for example /content/drive/MyDrive/my_dog_photos), or choose 'upload'.")
        if source == "upload" and runtime.colab and not runtime.smoke:
            self.received = colab_upload()
            size = sum(len(content) for content in self.received.values()) / 1e6
            print(f"Received {len(self.received)} file(s), {size:.1f} MB: {', '.join(sorted(self.received))}")
        elif source == "upload":
            self.widget = _picker_widget(sample_ticked=runtime.smoke)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if self.widget is not None:
            display(self.widget)
        elif self.source == "upload":
            print("Photos received; run the next cell to check them.")
        else:
            print(f"Using {self._describe_choice()}; run the next cell to check the photos.")

    def _describe_choice(self) -> str:
        return "the sample subject (a toy robot)" if self.source == "sample" else f"the photos in {self.folder}"

    def collect(self, work_dir: str | Path) -> ImageSelection:
        """Read the chosen photos; raises ImageDataError saying what to do when none is usable."""
        if self.received is not None:
            if not self.received:
                raise ImageDataError("No file was uploaded: run the photos cell again and choose "
                                     f"{subject.photo_range()} photos (or a .zip of them).")
            return collect_images("upload", self.received, work_dir)
        if self.widget is not None:
            upload, path, use_sample = self.widget.children
            if upload.value:
                return collect_images("upload", upload.value, work_dir)
            if path.value.strip():
                return collect_images("folder", path.value.strip(), work_dir)
            if use_sample.value:
                return collect_images("sample", sample_subject_dir(self._search), work_dir)
            raise ImageDataError(f"No photos chosen: upload {subject.photo_range()} photos of your subject, type the "
                                 "folder that holds them, or tick 'use the sample subject'.")
        if self.source == "sample":
            return collect_images("sample", sample_subject_dir(self._search), work_dir)
        return collect_images("folder", self.folder, work_dir)


def _photo_source(source: str) -> str:
    """"upload", "sample" or "folder" from the PHOTOS form field (which may say "sample subject (toy robot)")."""
    word = (source or "").strip().split(" ")[0].lower()
    if word not in PHOTO_SOURCES:
        raise ImageDataError(f"PHOTOS is {source!r}: choose one of {', '.join(PHOTO_SOURCES)}.")
    return word


def _picker_widget(sample_ticked: bool):
    import ipywidgets as w

    upload = w.FileUpload(accept=UPLOAD_ACCEPT, multiple=True, description="Upload photos")
    path = w.Text(placeholder="/content/drive/MyDrive/my_dog_photos", description="or a folder:",
                  layout=w.Layout(width="60%"))
    use_sample = w.Checkbox(value=sample_ticked, description="use the sample subject (a toy robot)", indent=False)
    return w.VBox([upload, path, use_sample])


def prepared_images(selection: ImageSelection, resolution: int = 512, crop: str = "center",
                    remove_bars: bool = False):
    """The photos exactly as training sees them: bars trimmed if asked, cropped (or padded) to a square, resized."""
    return [prepare_image(record.image, resolution, crop, remove_bars=remove_bars)
            for record in selection.report.images]


def preview_grid(selection: ImageSelection, resolution: int = 512, crop: str = "center", cell: int = 128,
                 remove_bars: bool = False):
    """A grid of the prepared photos, five per row, each row labelled with the photos' names."""
    images = prepared_images(selection, resolution, crop, remove_bars)
    names = [record.name for record in selection.report.images]
    rows = [(", ".join(names[i:i + 5]), images[i:i + 5]) for i in range(0, len(images), 5)]
    return labelled_grid(rows, cell=cell)


def check_dataset(selection: ImageSelection, kind: str = subject.DEFAULT_KIND, resolution: int = 512):
    """The dataset doctor's report for these photos (count, blur, exposure, duplicates, framing)."""
    from ..doctor import diagnose

    return diagnose(selection.report, kind=kind, resolution=resolution)


def doctor_report(selection: ImageSelection, kind: str = subject.DEFAULT_KIND, resolution: int = 512) -> str:
    """The dataset doctor's report as text, naming the notebook's settings where its advice names a flag."""
    return in_notebook_words(check_dataset(selection, kind, resolution).format())


# ---------------------------------------------------------------------------- settings -> TrainConfig


@dataclass
class NotebookSettings:
    """The settings form's values. None means "the recipe's value" (subject.py) for steps, rate and class images.

    `base_model` is a choice of choices.py (SD 1.5 full or LoRA, SDXL LoRA, the offline models): its model is
    trained unless another is given, with `preset` (the form sets the choice's own, which may be changed).
    """

    token: str = "sks"
    class_noun: str = "dog"
    kind: str = subject.DEFAULT_KIND
    base_model: str = choices.DEFAULT_CHOICE
    preset: str = DEFAULT_PRESET
    steps: int | None = None
    learning_rate: float | None = None
    train_text_encoder: bool | None = None  # None: what the preset chooses (t4-sdxl keeps the text encoders frozen)
    lora: bool | None = None  # None: what the preset chooses (t4-lora, low-memory and t4-sdxl train LoRA)
    num_class_images: int | None = None  # 0: no prior preservation

    def prompts(self) -> subject.SubjectPrompts:
        return subject.prompts_for(self.token, self.class_noun, self.kind)


def _preset_lora(preset: str) -> bool:
    return bool(PRESETS[preset]["settings"].get("lora", False))


def _preset_text_encoder(preset: str) -> bool:
    return bool(PRESETS[preset]["settings"].get("train_text_encoder", True))


def run_name(token: str, class_noun: str) -> str:
    """A folder name for a run: "sks-dog"."""
    return re.sub(r"[^a-z0-9]+", "-", f"{token} {class_noun}".lower()).strip("-") or "run"


def smoke_overrides(base_model: str = choices.DEFAULT_CHOICE) -> dict[str, Any]:
    """What smoke mode changes in a TrainConfig: a run of seconds on a CPU, on the offline model of the base
    model's family."""
    return {"model": smoke_model(base_model), "vae": None, "resolution": 32, "num_class_images": 2,
            "class_images_steps": 2, "class_images_batch_size": 2, "max_train_steps": 4, "sample_every": 2,
            "sample_steps": 2, "mixed_precision": "no", "use_8bit_adam": False, "checkpoint_every": None}


def settings_to_config(settings: NotebookSettings, instance_dir: str | Path, num_images: int, output_dir: str | Path,
                       model: str, runtime: NotebookRuntime) -> TrainConfig:
    """The validated TrainConfig for these settings, photos and output folder, as `train --kind ...` makes it.

    Values left at None come from the recipe in subject.py, as on the command line. The notebook adds
    only what it shows: samples five times per run from the kind's sample prompts. A run whose output
    folder already holds checkpoints resumes from the newest ("latest"). An empty `model` is the base-model
    choice's; the choice's model comes with its VAE (SDXL's fp16-safe one) whatever the preset, and a built-in
    model never takes a preset's VAE.
    """
    choice = choices.base_model_choice(settings.base_model)
    model = (model or "").strip() or choice.model
    if settings.preset not in PRESETS:
        raise ConfigError(f"Preset {settings.preset!r}: choose one of {', '.join(PRESETS)}.")
    if settings.steps is not None and settings.steps < 0:
        raise ConfigError(f"Steps must be a positive number, or 0 for the recommended "
                          f"{subject.default_steps(num_images, settings.kind)}.")
    prompts = settings.prompts()
    prior = settings.num_class_images != 0  # None: the recipe's number, never 0
    config = TrainConfig.from_preset(
        settings.preset, kind=settings.kind,
        concepts=[Concept(str(instance_dir), prompts.instance, prompts.class_ if prior else None)],
        output_dir=str(output_dir), model=model, with_prior_preservation=prior,
        num_class_images=settings.num_class_images if prior else 0, max_train_steps=settings.steps or None,
        learning_rate=settings.learning_rate, train_text_encoder=settings.train_text_encoder, lora=settings.lora,
        sample_prompts=list(prompts.samples))
    overrides: dict[str, Any] = {"sample_every": max(1, config.steps_for(num_images) // 5)}
    if model == choice.model and choice.vae:
        overrides["vae"] = choice.vae
    elif model in choices.BUILT_IN_MODELS:
        overrides["vae"] = None
    if runtime.smoke:
        overrides.update(smoke_overrides(choice.key))
    if list_checkpoints(output_dir):
        overrides["resume"] = "latest"
    return config.replace(**overrides).validate()


def keep_checkpoints_on_drive(config: TrainConfig, num_images: int, drive_free: int | None = None) -> tuple[
        TrainConfig, str]:
    """Checkpoints that fit a free Google Drive, and the sentence saying what the run will write there.

    Everything written to Drive counts against the account's 15 GB, also after deletion (Drive keeps deleted
    files in its trash for 30 days), so the plan counts every checkpoint the run will ever write, not only
    the one kept. The budget is the Drive's free space, or DRIVE_BUDGET_GB when it cannot be read.
    """
    budget = drive_free if drive_free is not None else _drive_free_bytes(config.output_dir)
    plan = plan_checkpoints(config, budget, steps=config.steps_for(num_images))
    return config.replace(checkpoint_every=plan.checkpoint_every or None, checkpoints_total_limit=1), plan.message


def _drive_free_bytes(folder: str | Path) -> int:
    try:
        return free_bytes(folder)
    except OSError:
        return int(DRIVE_BUDGET_GB * 1e9)


def describe_settings(settings: NotebookSettings, num_images: int) -> str:
    """A short HTML summary of what the form's values mean, shown under the form: the prompts, and the outlook of
    the base-model choice (choices.py): model, resolution, steps, rates, class images, GPU memory and system RAM."""
    try:
        prompts = settings.prompts()
        outlook = settings_outlook(settings, num_images)
    except ConfigError as error:
        return f"<b style='color:#b00'>{_html(str(error))}</b>"
    class_images = outlook.class_images
    lines = [
        f"Instance prompt: <code>{_html(prompts.instance)}</code>",
        f"Class prompt (prior preservation): <code>{_html(prompts.class_)}</code>"
        + (f" x {class_images} images" if class_images else " <i>off: 0 class images</i>"),
        f"<pre style='white-space:pre-wrap'>{_html(in_notebook_words(outlook.text()))}</pre>",
        f"Preset {_html(settings.preset)}: {_html(PRESETS[settings.preset]['description'])}",
    ]
    advice = subject.token_advice(settings.token, settings.class_noun)
    if advice:
        lines.append(f"<b style='color:#a60'>{_html(advice)}</b>")
    return "<br>".join(lines)


def settings_outlook(settings: NotebookSettings, num_images: int) -> choices.Outlook:
    """The base-model choice's outlook with the form's other values (choices.outlook): what the run will be on a
    T4 and on free Colab's system RAM, before the photos or the model load."""
    if settings.preset not in PRESETS:
        raise ConfigError(f"Preset {settings.preset!r}: choose one of {', '.join(PRESETS)}.")
    return choices.outlook(settings.base_model, num_images, preset=settings.preset, kind=settings.kind,
                           lora=settings.lora, train_text_encoder=settings.train_text_encoder,
                           max_train_steps=settings.steps or None, learning_rate=settings.learning_rate,
                           num_class_images=settings.num_class_images)


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SettingsForm:
    """The run's settings as a form; `settings()` reads it, `to_config(...)` makes the TrainConfig."""

    def __init__(self, num_images: int, defaults: NotebookSettings | None = None):
        import ipywidgets as w

        self.num_images = num_images
        d = defaults or NotebookSettings()
        wide = {"style": {"description_width": "180px"}, "layout": w.Layout(width="520px")}
        self.token = w.Text(value=d.token, description="Identifier token", **wide)
        self.class_noun = w.Text(value=d.class_noun, description="Class noun", **wide)
        self.kind = w.Dropdown(options=[(subject.recipe(k).label, k) for k in subject.SUBJECT_KINDS], value=d.kind,
                               description="Subject kind", **wide)
        self.base_model = w.Dropdown(options=choices.choice_options(), value=choices.base_model_choice(
            d.base_model).key, description="Base model", **wide)
        self.preset = w.Dropdown(options=list(PRESETS), value=d.preset, description="Preset", **wide)
        self.steps = w.BoundedIntText(value=d.steps or 0, min=0, max=20_000, description="Steps (0 = recommended)",
                                      **wide)
        self.learning_rate = w.BoundedFloatText(value=d.learning_rate or 0.0, min=0.0, max=0.01, step=1e-6,
                                                description="Learning rate (0 = rec.)", **wide)
        self.train_text_encoder = w.Checkbox(
            value=_preset_text_encoder(d.preset) if d.train_text_encoder is None else d.train_text_encoder,
            description="Train the text encoder too", indent=False)
        self.lora = w.Checkbox(value=_preset_lora(d.preset) if d.lora is None else d.lora,
                               description="LoRA (small file, less memory)", indent=False)
        default_class_images = subject.recipe(d.kind).num_class_images if d.num_class_images is None \
            else d.num_class_images
        self.num_class_images = w.IntSlider(value=default_class_images, min=0, max=300, step=10,
                                            description="Class images (0 = off)", **wide)
        self.summary = w.HTML()
        self.widget = w.VBox([self.token, self.class_noun, self.kind, self.base_model, self.preset, self.steps,
                              self.learning_rate, self.num_class_images, self.train_text_encoder, self.lora,
                              self.summary])
        self.kind.observe(self._on_kind, names="value")
        self.base_model.observe(self._on_base_model, names="value")
        self.preset.observe(self._on_preset, names="value")
        for control in (self.token, self.class_noun, self.steps, self.learning_rate, self.train_text_encoder,
                        self.lora, self.num_class_images):
            control.observe(lambda _: self.refresh(), names="value")
        self.refresh()

    @classmethod
    def for_images(cls, selection: ImageSelection) -> SettingsForm:
        """A form for these photos; the sample subject comes with its own token and class noun. The base model
        starts as SD 1.5 (full fine-tune) with a GPU, the offline toy model without one."""
        choice = choices.base_model_choice(choices.default_choice())
        subject_values = SAMPLE_SUBJECT if selection.is_sample else {}
        return cls(selection.num_images, NotebookSettings(**subject_values, base_model=choice.key,
                                                          preset=choice.preset))

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _on_kind(self, change) -> None:
        old, new = subject.recipe(change["old"]), subject.recipe(change["new"])
        if self.class_noun.value.strip() in ("", old.class_noun):  # only replace a noun the user did not type
            self.class_noun.value = new.class_noun
        if self.num_class_images.value == old.num_class_images:
            self.num_class_images.value = new.num_class_images
        self.refresh()

    def _on_base_model(self, change) -> None:
        self.preset.value = choices.base_model_choice(change["new"]).preset  # its LoRA and text encoder follow
        self.refresh()

    def _on_preset(self, change) -> None:
        self.lora.value = _preset_lora(change["new"])
        if _preset_text_encoder(change["old"]) != _preset_text_encoder(change["new"]):  # a tick the user set stays
            self.train_text_encoder.value = _preset_text_encoder(change["new"])
        self.refresh()

    def settings(self) -> NotebookSettings:
        return NotebookSettings(
            token=self.token.value.strip(), class_noun=self.class_noun.value.strip(), kind=self.kind.value,
            base_model=self.base_model.value, preset=self.preset.value, steps=self.steps.value or None,
            learning_rate=self.learning_rate.value or None,
            train_text_encoder=self.train_text_encoder.value, lora=self.lora.value,
            num_class_images=self.num_class_images.value,
        )

    def refresh(self) -> None:
        self.summary.value = describe_settings(self.settings(), self.num_images)

    def to_config(self, selection: ImageSelection, root: str | Path, model: str,
                  runtime: NotebookRuntime) -> TrainConfig:
        """The run's TrainConfig; an empty `model` trains the base-model choice's."""
        settings = self.settings()
        output_dir = Path(root) / run_name(settings.token, settings.class_noun)
        return settings_to_config(settings, selection.folder, selection.num_images, output_dir, model, runtime)


# ---------------------------------------------------------------------------- what the run will be


def memory_outlook(config: TrainConfig, cuda_available: bool | None = None) -> str:
    """What the memory planner expects of this run: on this GPU, or on a T4 when there is none.

    Says what to change when it does not fit, before any model is loaded.
    """
    import torch

    from ..training import quiet_library_logs

    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    free = None if cuda else int(T4_FREE_GIB * GIB)
    where = "" if cuda else f"On a T4 ({T4_FREE_GIB:g} GiB free; no GPU here): "
    try:
        with quiet_library_logs():  # the offline models load to be measured: no loading bars for that
            plan = plan_memory(config, free_bytes=free, size=planning_size(config.model))
    except ConfigError as error:
        return in_notebook_words(f"{where}Does not fit: {error}")
    return in_notebook_words(where + plan.reason)


def summary_rows(config: TrainConfig, num_images: int) -> list[tuple[str, str]]:
    """The settings that matter for this run as (name, value) rows, the expected time on this machine included
    (choices.expected_time): what the notebook prints before training and the app's "Check settings" lists."""
    concept = config.concepts[0]
    prior = config.with_prior_preservation
    rows = [
        ("model", config.model + (f" (VAE {config.vae})" if config.vae else "")),
        ("photos", f"{concept.instance_dir} ({num_images})"),
        ("instance prompt", concept.instance_prompt),
        ("class prompt", f"{concept.class_prompt} x {config.effective_num_class_images} images" if prior
         else "(prior preservation off)"),
        ("steps", f"{config.steps_for(num_images)}, learning rate {config.effective_learning_rate:g}"
         + (f" (text encoder {config.effective_text_encoder_learning_rate:g})" if config.train_text_encoder else "")),
        ("trains", f"{'LoRA adapters on ' if config.lora else ''}UNet"
         + (" + text encoder" if config.train_text_encoder else "")),
        ("expected time", choices.expected_time(config, num_images).text()),
        ("samples every", f"{config.sample_every} steps"),
        ("output folder", str(config.output_dir)),
    ]
    if config.checkpoint_every:
        rows.append(("checkpoints", f"every {config.checkpoint_every} steps (newest kept, for resuming)"))
    if config.resume:
        rows.append(("resume", "from the newest checkpoint in the output folder"))
    return rows


def config_summary(config: TrainConfig, num_images: int) -> str:
    """The settings that matter for this run, one line each, for the notebook to print before training."""
    return "\n".join(f"{name + ':':<18}{value}" for name, value in summary_rows(config, num_images))
