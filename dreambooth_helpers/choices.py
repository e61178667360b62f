"""The base-model choice the notebook and the app offer, and what each choice means for a run before it starts.

A choice is a base model with the preset that trains it on a free Colab T4: SD 1.5 fully fine-tuned (`t4`), SD 1.5
with LoRA (`t4-lora`), SDXL with LoRA (`t4-sdxl`), and the offline models that train on a CPU (`toy`, `tiny-sdxl`).
`outlook(choice, photos)` says what the run will be: the model, resolution, steps, learning rates and class images
(TrainConfig's recipe, subject.py), the memory planner's estimate of GPU memory on a T4 and its estimate of the
system RAM loading takes, against free Colab's. Nothing here imports a widget library, and nothing loads a model
but the small offline ones (to count their parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from . import memory
from .config import DEFAULT_PRESET, PRESETS, SDXL_BASE_MODEL, TINY_MODEL, TOY_MODEL, TrainConfig, short_number
from .errors import ConfigError
from .families import SD1, SDXL, SDXL_RANDOM, TINY_SDXL_MODEL, ModelFamily
from .memory import GIB, SD1_SIZE, SDXL_SIZE, ModelSize, candidate_settings, estimate_memory, estimate_ram
from .models import OFFLINE_RESOLUTIONS, SD15_RANDOM
from .notebook.runtime import SD15_MODEL

T4 = "a T4"
T4_FREE_GIB = 14.5  # what a Colab T4 leaves free for training (15 GiB card, CUDA context and driver)
# Free Colab's system RAM. Colab's resource panel says "12.7 GB"; /proc/meminfo's MemTotal there is ~13.6e9 bytes,
# which is 12.7 GiB: the panel's GB are GiB.
COLAB_RAM_GIB = 12.7
TYPICAL_PHOTOS = 5  # what an outlook counts with before any photo is chosen
# Models built in code or shipped with the package: no download, they train on a CPU, and no other VAE fits them.
BUILT_IN_MODELS = (TINY_MODEL, TOY_MODEL, SD15_RANDOM, TINY_SDXL_MODEL, SDXL_RANDOM)


@dataclass(frozen=True)
class BaseModelChoice:
    """One entry of the base-model list: a model and the preset that trains it."""

    key: str
    label: str  # what the dropdown shows
    model: str
    preset: str
    family: ModelFamily
    offline: bool = False  # built in: no download, trains on a CPU

    @property
    def vae(self) -> str | None:
        """The VAE that goes with the model (SDXL's fp16-safe one, from its preset); None for the built-in models."""
        settings = PRESETS[self.preset]["settings"]
        return None if self.offline or settings.get("model") != self.model else settings.get("vae")


CHOICES = (
    BaseModelChoice("sd15-full", "SD 1.5 (full fine-tune)", SD15_MODEL, "t4", SD1),
    BaseModelChoice("sd15-lora", "SD 1.5 LoRA", SD15_MODEL, "t4-lora", SD1),
    BaseModelChoice("sdxl-lora", "SDXL LoRA", SDXL_BASE_MODEL, "t4-sdxl", SDXL),
    # The toy model with the preset `train` gives it when --preset is left out, as in the README's first command;
    # on a CPU resolve_runtime turns that preset's GPU settings (fp16, 8-bit AdamW) into fp32 and plain AdamW.
    BaseModelChoice("toy", "Toy model (offline, trains on a CPU)", TOY_MODEL, DEFAULT_PRESET, SD1, offline=True),
    BaseModelChoice("tiny-sdxl", "Tiny SDXL (offline, trains on a CPU)", TINY_SDXL_MODEL, "t4-sdxl", SDXL,
                    offline=True),
)
DEFAULT_CHOICE = "sd15-full"
CPU_DEFAULT_CHOICE = "toy"


def base_model_choice(choice: str | BaseModelChoice) -> BaseModelChoice:
    """The choice named by its key or its label."""
    if isinstance(choice, BaseModelChoice):
        return choice
    for candidate in CHOICES:
        if choice in (candidate.key, candidate.label):
            return candidate
    raise ConfigError(f"Base model {choice!r}: choose one of {', '.join(c.label for c in CHOICES)}.")


def choice_options() -> list[tuple[str, str]]:
    """(label, key) pairs, as ipywidgets' and Gradio's dropdowns take them."""
    return [(choice.label, choice.key) for choice in CHOICES]


def default_choice(cuda_available: bool | None = None) -> str:
    """SD 1.5 (full fine-tune) with a GPU; the offline toy model without one."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return DEFAULT_CHOICE if cuda_available else CPU_DEFAULT_CHOICE


def choice_for_model(model: str, preset: str | None = None) -> str | None:
    """The key of the choice that trains `model` (with `preset`, when several do), or None."""
    matching = [choice for choice in CHOICES if choice.model == model]
    for choice in matching:
        if choice.preset == preset:
            return choice.key
    return matching[0].key if matching else None


def preset_for_model(model: str) -> str:
    """The preset that goes with `model`: that of the first choice that trains it (the toy model's is the command
    line's default, SD 1.5's the full fine-tune's), else the command line's default preset."""
    choice = choice_for_model(model)
    return base_model_choice(choice).preset if choice else DEFAULT_PRESET


def on_this_machine(choice: str | BaseModelChoice, preset: str | None = None,
                    cuda_available: bool | None = None) -> str:
    """What `preset` (default: the choice's) becomes for the choice's model on this machine: "" on a GPU, where the
    preset applies as it reads; without one, the settings runtime.resolve_runtime changes and the resolution it
    trains at, or its refusal to train a real model on a CPU."""
    import torch

    from .runtime import resolve_runtime
    from .training import quiet_library_logs

    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if cuda:
        return ""
    choice = base_model_choice(choice)
    config = preview_config(choice, preset=preset)
    try:
        with quiet_library_logs():  # the offline models load to be measured: no loading bars for that
            runtime = resolve_runtime(config, cuda_available=False)
    except ConfigError as refusal:
        return str(refusal)
    changes = []
    if runtime.mixed_precision != config.mixed_precision:
        changes.append(f"in fp32 instead of {config.mixed_precision}")
    if runtime.use_8bit_adam != config.use_8bit_adam:
        changes.append("with plain AdamW instead of 8-bit AdamW")
    resolution = config.resolution or model_size(choice).native_resolution
    changes.append(f"at {resolution} px" + ("" if config.resolution else " (the model's own size)"))
    name = choice.label.split(" (")[0]
    return f"Without a GPU (as here), this preset trains the {name} {', '.join(changes)}."


def offline_model(choice: str | BaseModelChoice) -> str:
    """The built-in model of the same family, for smoke runs on a CPU."""
    return TINY_SDXL_MODEL if base_model_choice(choice).family is SDXL else TOY_MODEL


def preview_config(choice: str | BaseModelChoice, *, preset: str | None = None, **settings: Any) -> TrainConfig:
    """The TrainConfig a run of this choice starts from (no photos yet): the choice's preset (or `preset`), model
    and VAE, with `settings` on top (None: the recipe's). `num_class_images=0` turns prior preservation off."""
    choice = base_model_choice(choice)
    if settings.get("num_class_images") == 0:
        settings["with_prior_preservation"] = False
    config = TrainConfig.from_preset(preset or choice.preset, **{**settings, "model": choice.model})
    return config.replace(vae=choice.vae or (None if choice.model in BUILT_IN_MODELS else config.vae))


# Measured speeds, (fastest, slowest), of the one model they were measured for: the toy model on a CPU, one thread
# (threads.py), on the project's shared 2-core machine. Steps: the README's first command (32 px, one photo and one
# class image a step, UNet and text encoder trained; samples included), 0.18 s/step idle (1600 steps at 5.7 it/s,
# 2026-12-06) to 0.25 s/step beside other work. Class images: 25 DPM-Solver++ steps at 32 px in batches of 4,
# 0.31-0.40 s each (three runs, 2026-12-07). Nothing is measured on a GPU yet (benchmarks/train_memory_speed.py
# will), nor for another model on a CPU: their time is unknown, and said so.
# Sample images cost what a class image costs per denoising step. Starting: the training process's imports and the
# model's load before anything else, 7-8 s seen beside other work in a newcomer's trial of the app (2026-12-07).
CPU_SECONDS_PER_STEP = {TOY_MODEL: (0.18, 0.25)}
CPU_SECONDS_PER_CLASS_IMAGE = {TOY_MODEL: (0.31, 0.40)}
CPU_SECONDS_TO_START = {TOY_MODEL: (5.0, 9.0)}
MEASURED_ON = "the toy model on a 2-core CPU, one thread"


@dataclass(frozen=True)
class ExpectedTime:
    """How long a run will take: its steps and the class images still to make, and the time they take at the
    measured speeds (seconds, fastest and slowest), or None with the reason when nothing measured applies."""

    steps: int
    class_images: int
    seconds_per_step: tuple[float, float] | None
    seconds_per_class_image: tuple[float, float] | None
    unknown_because: str = ""
    samples: int = 0  # sample images drawn while training
    sample_cost: float = 0.0  # a sample image's time as a share of a class image's (their denoising steps)
    seconds_to_start: tuple[float, float] = (0.0, 0.0)

    @property
    def seconds(self) -> tuple[float, float] | None:
        if self.seconds_per_step is None or self.seconds_per_class_image is None:
            return None
        return tuple(start + self.steps * step + (self.class_images + self.samples * self.sample_cost) * image
                     for start, step, image in zip(self.seconds_to_start, self.seconds_per_step,  # type: ignore
                                                   self.seconds_per_class_image, strict=True))

    def text(self) -> str:
        """One line: "about 5-7 min: 1600 steps at 0.18-0.25 s/step and 100 class images at 0.31-0.40 s each
        (measured: ...)", or "unknown for 1600 steps and 100 class images: ..." """
        work = f"{self.steps} steps" + (f" and {self.class_images} class images" if self.class_images else "")
        seconds = self.seconds
        if seconds is None:
            return f"unknown for {work}: {self.unknown_because}"
        rates = f"{self.steps} steps at {_span(self.seconds_per_step, '{:.2f}')} s/step"
        if self.class_images:
            rates += f" and {self.class_images} class images at {_span(self.seconds_per_class_image, '{:.2f}')} s each"
        if self.samples:
            rates += f", with {self.samples} sample images"
        return f"about {_duration(seconds)}: {rates} (measured on {MEASURED_ON})"


def _span(values: tuple[float, float], form: str) -> str:
    low, high = (form.format(value) for value in values)
    return low if low == high else f"{low}-{high}"


def _duration(seconds: tuple[float, float]) -> str:
    if seconds[1] < 90:
        return f"{_span(seconds, '{:.0f}')} s"
    return f"{_span(tuple(value / 60 for value in seconds), '{:.0f}')} min"  # type: ignore[arg-type]


def expected_time(config: TrainConfig, num_images: int | None = None, *, cuda_available: bool | None = None,
                  environ: dict[str, str] | None = None) -> ExpectedTime:
    """The run's expected time on this machine: its steps (for `num_images` photos; None: the photos in its
    folders, read as training reads them) and the class images not yet on disk, at the speeds measured for its
    model on this kind of machine (CPU_SECONDS_PER_STEP); unknown where nothing was measured."""
    import os

    from .prior import class_dir_for, existing_class_images
    from .threads import USER_THREADS_VARIABLE

    if num_images is None:
        from .data import read_images

        num_images = sum(len(read_images(concept.instance_dir).images) for concept in config.concepts)
    wanted = config.effective_num_class_images
    missing = sum(max(0, wanted - len(existing_class_images(class_dir_for(config, concept))))
                  for concept in config.concepts if concept.class_prompt) if wanted else 0
    steps = config.steps_for(num_images)
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    threads = (os.environ if environ is None else environ).get(USER_THREADS_VARIABLE, "1")
    native = OFFLINE_RESOLUTIONS.get(config.model)
    why = ""
    if cuda_available:
        why = ("no training speed has been measured on a GPU in this project yet (benchmarks/train_memory_speed.py "
               "measures it)")
    elif config.model not in CPU_SECONDS_PER_STEP:
        why = f"speeds are measured only for {MEASURED_ON}"
    elif threads.strip() != "1":
        why = f"speeds are measured on one thread, and {USER_THREADS_VARIABLE}={threads} is set"
    elif config.train_batch_size * config.gradient_accumulation_steps != 1 or (config.resolution or native) != native:
        why = f"speeds are measured at the model's own {native} px, one photo a step"
    if why:
        return ExpectedTime(steps, missing, None, None, why)
    every = config.sample_every
    samples = ((steps // every + bool(steps % every)) * len(config.sample_prompts or config.concepts)) if every else 0
    return ExpectedTime(steps, missing, CPU_SECONDS_PER_STEP[config.model], CPU_SECONDS_PER_CLASS_IMAGE[config.model],
                        samples=samples, sample_cost=config.sample_steps / config.class_images_steps,
                        seconds_to_start=CPU_SECONDS_TO_START[config.model])


@cache
def _built_in_size(model: str) -> ModelSize:
    return memory.planning_size(model)  # the built-in models load in a second or two; counted once


def model_size(choice: BaseModelChoice) -> ModelSize:
    """Parameter counts to plan with: the offline models' own, else those of the family's real model."""
    if choice.offline:
        return _built_in_size(choice.model)
    return SDXL_SIZE if choice.family is SDXL else SD1_SIZE


@dataclass(frozen=True)
class Outlook:
    """What a run of a base-model choice will be, before anything loads. Sizes in bytes."""

    choice: BaseModelChoice
    photos: int
    config: TrainConfig
    resolution: int
    steps: int
    learning_rate: float
    text_encoder_learning_rate: float | None  # None: the text encoder(s) do not train
    class_images: int
    gpu_name: str  # the GPU the plan is made for, in words: "a T4"
    gpu_free: int  # its free memory
    gpu_peak_allocated: int  # the planner's estimate with the settings it chose (or its smallest, when none fits)
    gpu_peak_reserved: int
    gpu_fits: bool
    gpu_settings: str  # the settings the planner chose, in words ("gradient checkpointing")
    gpu_note: str  # the faster setting it passed over and its need, or (does not fit) the change that would fit
    ram_needed: int
    ram_budget: int

    @property
    def ram_fits(self) -> bool:
        return self.ram_needed <= self.ram_budget

    def as_dict(self) -> dict[str, Any]:
        """The outlook as plain data (memory in GiB, two decimals), e.g. for JSON."""
        config = self.config
        return {
            "choice": self.choice.key, "label": self.choice.label, "model": config.model, "vae": config.vae,
            "preset": config.preset, "family": self.choice.family.name, "lora": config.lora,
            "lora_rank": config.lora_rank if config.lora else None, "train_text_encoder": config.train_text_encoder,
            "photos": self.photos, "resolution": self.resolution, "steps": self.steps,
            "learning_rate": self.learning_rate, "text_encoder_learning_rate": self.text_encoder_learning_rate,
            "class_images": self.class_images,
            "gpu": {"name": self.gpu_name, "free_gib": _gib(self.gpu_free),
                    "peak_allocated_gib": _gib(self.gpu_peak_allocated),
                    "peak_reserved_gib": _gib(self.gpu_peak_reserved), "fits": self.gpu_fits,
                    "settings": self.gpu_settings, "note": self.gpu_note},
            "ram": {"needed_gib": _gib(self.ram_needed), "budget_gib": _gib(self.ram_budget), "fits": self.ram_fits},
        }

    def text(self) -> str:
        """A few lines for people: what trains, the recipe's values, and both memory outlooks."""
        config, family = self.config, self.choice.family
        model = config.model + (f" with the VAE {config.vae}" if config.vae else "")
        encoders = "both text encoders" if family is SDXL else "the text encoder"
        if config.lora:
            trains = f"LoRA rank {config.lora_rank} on the UNet" + (f" and {encoders}" if config.train_text_encoder
                                                                     else f"; {encoders} frozen")
        else:
            trains = "every weight of the UNet" + (f" and {encoders}" if config.train_text_encoder
                                                   else f"; {encoders} frozen")
        how = "the recipe's" if config.max_train_steps is None else "as set"
        rates = f"learning rate {short_number(self.learning_rate)}"
        if self.text_encoder_learning_rate is not None:
            rates += f" (text encoder {short_number(self.text_encoder_learning_rate)})"
        class_images = (f"{self.class_images} class images (prior preservation)" if self.class_images
                        else "no class images (prior preservation off)")
        gpu = (f"GPU on {self.gpu_name} ({_gib(self.gpu_free):g} GiB free): ~{_gib(self.gpu_peak_allocated):.1f} "
               f"GiB peak, ~{_gib(self.gpu_peak_reserved):.1f} GiB reserved: ")
        if self.gpu_fits:
            gpu += f"fits; the plan: {self.gpu_settings}" + (f" ({self.gpu_note})." if self.gpu_note else ".")
        else:
            gpu += f"does not fit. {self.gpu_note}"
        ram = (f"System RAM: ~{_gib(self.ram_needed):.1f} GiB to load; free Colab has {_gib(self.ram_budget):g} GiB: "
               + ("fits." if self.ram_fits else "does not fit: the session would crash while loading."))
        return "\n".join([
            f"{self.choice.label}: {model} (preset {config.preset})",
            f"Trains: {trains}.",
            f"Resolution {self.resolution} px; {self.steps} steps ({how} for {self.photos} photo(s)).",
            f"{rates[0].upper()}{rates[1:]}; {class_images}.",
            gpu,
            ram,
        ])


def _gib(size: int) -> float:
    return round(size / GIB, 2)


def outlook(choice: str | BaseModelChoice, photos: int = TYPICAL_PHOTOS, *, preset: str | None = None,
            gpu: tuple[str, float] = (T4, T4_FREE_GIB), ram_gib: float = COLAB_RAM_GIB, **settings: Any) -> Outlook:
    """What a run of `choice` on `photos` photos will be (see Outlook) on `gpu` (its name in words, and its free
    GiB); `settings` as preview_config takes them."""
    choice = base_model_choice(choice)
    return outlook_of(preview_config(choice, preset=preset, **settings), photos, choice, gpu=gpu, ram_gib=ram_gib)


def outlook_of(config: TrainConfig, photos: int, choice: str | BaseModelChoice, *,
               gpu: tuple[str, float] = (T4, T4_FREE_GIB), ram_gib: float = COLAB_RAM_GIB) -> Outlook:
    """The Outlook of `config` (made for `choice`'s model) on `photos` photos: the memory planner's plan for a GPU
    `gpu` (when nothing fits: its smallest settings' estimate and its advice), and its estimate
    of the system RAM that loading takes."""
    choice = base_model_choice(choice)
    size = model_size(choice)
    precision = config.mixed_precision
    gpu_name, free = gpu[0], int(gpu[1] * GIB)
    candidates = candidate_settings(config)
    estimates = [estimate_memory(config, settings, precision=precision, size=size) for settings in candidates]
    try:  # a preview: the running training's plan (its out-of-memory advice) stays as it is
        plan = memory.plan_memory(config, precision=precision, free_bytes=free, size=size, record=False)
    except ConfigError as refusal:
        settings, estimate, fits, note = candidates[-1], estimates[-1], False, str(refusal)
    else:
        settings, estimate, fits = plan.settings, plan.estimate, True
        note = "" if settings == candidates[0] else \
            f"{candidates[0].describe()} would need ~{estimates[0].peak_reserved / GIB:.1f} GiB"
    return Outlook(
        choice=choice, photos=photos, config=config,
        resolution=config.resolution or size.native_resolution, steps=config.steps_for(photos),
        learning_rate=config.effective_learning_rate,
        text_encoder_learning_rate=config.effective_text_encoder_learning_rate if config.train_text_encoder else None,
        class_images=config.effective_num_class_images, gpu_name=gpu_name, gpu_free=free,
        gpu_peak_allocated=estimate.peak_allocated, gpu_peak_reserved=estimate.peak_reserved, gpu_fits=fits,
        gpu_settings=settings.describe(), gpu_note=note, ram_needed=estimate_ram(config, size, precision),
        ram_budget=int(ram_gib * GIB))
