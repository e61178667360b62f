"""Generating images with a trained model.

`load_generator(model, lora=None)` loads once and returns a `Generator` whose `generate(...)` can be
called many times (the demo does exactly that). `model` is a trained output folder (a full
fine-tune, or a LoRA run whose folder only holds `pytorch_lora_weights.safetensors`), a Hub id, a
local diffusers folder, a single checkpoint file, or "tiny"; `lora` adds LoRA weights from a folder
on top of a base model.

Every image gets its own seed (`seed`, `seed + 1`, ...), so one image of a batch can be made again
on its own; `save_images` writes the prompt, seed and settings into each PNG.
"""

from __future__ import annotations

import json
import numbers
import random
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .config import check_int_range
from .errors import ConfigError, ModelLoadError
from .failures import generation_out_of_memory, is_out_of_memory
from .files import LORA_WEIGHTS_FILE, MODEL_INDEX_FILE, SUMMARY_FILE
from .grids import display_scale, labelled_grid
from .models import load_components, load_safety_checker, make_pipeline, safety_checker_note
from .output_paths import check_output_folder

DEFAULT_SCHEDULER = "dpm++"
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
MAX_SEED = 2**32 - 1


def _scheduler_classes() -> dict[str, tuple[str, dict[str, Any]]]:
    """Scheduler name -> (diffusers class name, extra config). DPM-Solver++ gives good images in ~25 steps."""
    return {
        "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
        "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
        "euler": ("EulerDiscreteScheduler", {}),
        "euler-a": ("EulerAncestralDiscreteScheduler", {}),
        "ddim": ("DDIMScheduler", {}),
        "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
        "unipc": ("UniPCMultistepScheduler", {}),
    }


SCHEDULERS = tuple(_scheduler_classes())


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A scheduler called `name` (see SCHEDULERS) with the model's noise schedule from `base_config`."""
    import diffusers

    choices = _scheduler_classes()
    if name not in choices:
        raise ConfigError(f"--scheduler {name!r} is not known; choose one of: {', '.join(choices)}.")
    class_name, extra = choices[name]
    return getattr(diffusers, class_name).from_config(base_config, **extra)


# ---------------------------------------------------------------------------- what a trained folder says


def read_training_summary(model_dir: str | Path) -> dict[str, Any] | None:
    """The `training_summary.json` the trainer wrote into `model_dir`, or None when there is none."""
    path = Path(model_dir, SUMMARY_FILE)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error}); the training run may have been cut off.") from None


def subject_from_prompts(instance_prompt: str, class_prompt: str | None = None) -> tuple[str | None, str | None]:
    """The identifier token and the class noun of a DreamBooth prompt: "a photo of sks dog" -> ("sks", "dog").

    With a class prompt, the token is the first word the class prompt lacks; without one, the rare
    word is guessed as the one before the last word ("... sks dog").
    """
    words = re.findall(r"[\w-]+", instance_prompt.lower())
    if not words:
        return None, None
    class_words = set(re.findall(r"[\w-]+", (class_prompt or "").lower()))
    if class_words:
        extra = [i for i, w in enumerate(words) if w not in class_words]
        if not extra:
            return None, None
        i = extra[0]
    else:
        if len(words) < 2:
            return words[0], None
        i = len(words) - 2
    token = words[i]
    noun = words[i + 1] if i + 1 < len(words) else None
    return token, noun


def example_prompts(summary: dict[str, Any] | None, limit: int = 5) -> list[str]:
    """Prompts to try a trained subject with, built from its identifier and class ("sks dog on the beach")."""
    concepts = ((summary or {}).get("config") or {}).get("concepts") or []
    prompts = (summary or {}).get("instance_prompts") or [c.get("instance_prompt") for c in concepts]
    class_prompts = {c.get("instance_prompt"): c.get("class_prompt") for c in concepts}
    examples: list[str] = []
    for prompt in [p for p in prompts if p]:
        token, noun = subject_from_prompts(prompt, class_prompts.get(prompt))
        examples.append(prompt)
        if token:
            subject = f"{token} {noun}" if noun else token
            examples += [
                f"a photo of {subject} on the beach",
                f"a painting of {subject} in the style of van gogh",
                f"{subject} in the snow, detailed, sharp focus",
                f"a drawing of {subject}, pencil sketch",
            ]
    if not examples:
        examples = ["a photo of a dog on the beach", "a painting of a house in the style of van gogh"]
    return list(dict.fromkeys(examples))[:limit]


# ---------------------------------------------------------------------------- results


@dataclass
class GeneratedImage:
    """One image and everything needed to make it again."""

    image: Image.Image
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    model: str
    lora: str | None = None
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("image")
        return values

    def parameters_text(self) -> str:
        """The settings as one text block, in the "parameters" format AUTOMATIC1111 also reads."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(f"Steps: {self.steps}, Sampler: {self.scheduler}, CFG scale: {self.guidance_scale:g}, "
                     f"Seed: {self.seed}, Size: {self.width}x{self.height}, Model: {self.model}"
                     + (f", LoRA: {self.lora}" if self.lora else ""))
        return "\n".join(lines)

    def png_info(self) -> PngInfo:
        info = PngInfo()
        info.add_text("parameters", self.parameters_text())
        for key, value in self.metadata().items():
            if value is not None and key != "seconds":
                info.add_text(key, str(value))
        return info


def save_images(results: Sequence[GeneratedImage], out_dir: str | Path, prefix: str = "image") -> list[Path]:
    """Save each image as PNG with its prompt, seed and settings as text chunks; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    for i, result in enumerate(results):
        path = out / f"{prefix}-{stamp}-{i:02d}-seed{result.seed}.png"
        result.image.save(path, pnginfo=result.png_info())
        paths.append(path)
    return paths


def image_grid(images: Sequence[Image.Image], cols: int | None = None, background: str = "white",
               min_cell: int = 0) -> Image.Image:
    """Images side by side in rows of `cols` (default: as square as possible), each cell the largest size; with
    `min_cell`, small images are enlarged by a whole factor (nearest neighbour, grids.enlarged) until a cell is at
    least that many px: `generate --grid` shows the toy model's 32 px images in 256 px cells, not a 96 px grid."""
    images = list(images)
    cols = min(cols or max(1, round(len(images) ** 0.5 + 0.49)), max(1, len(images)))
    cell = (max((im.width for im in images), default=1), max((im.height for im in images), default=1))
    factor = display_scale(cell, min_cell) if min_cell else 1
    cell = (cell[0] * factor, cell[1] * factor)
    rows = [("", images[start:start + cols]) for start in range(0, len(images), cols)]
    return labelled_grid(rows, cell=cell, background=background)


# ---------------------------------------------------------------------------- the generator


@dataclass
class Generator:
    """A loaded pipeline plus what it was loaded from. Thread-safe: one generation at a time."""

    pipeline: Any
    model: str
    lora: str | None
    default_resolution: int
    scheduler_name: str
    device: str
    summary: dict[str, Any] | None = None
    safety_note: str | None = None  # set when images are not NSFW-filtered (models.safety_checker_note)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def resolution_multiple(self) -> int:
        # The pipeline checks pixel sizes against 8; the tiny VAE's factor is smaller, SD's is exactly 8.
        return 8

    def example_prompts(self, limit: int = 5) -> list[str]:
        return example_prompts(self.summary, limit)

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        num_images: int = 1,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        scheduler: str | None = None,
    ) -> list[GeneratedImage]:
        """Make `num_images` images of `prompt`. Image i uses seed `seed + i` (random `seed` when None)."""
        check_generation_settings(prompt, num_images=num_images, steps=steps, guidance_scale=guidance_scale,
                                  seed=seed, width=width, height=height, size_multiple=self.resolution_multiple)
        if seed is None:
            seed = random.randint(0, MAX_SEED - num_images)
        width = width or self.default_resolution
        height = height or self.default_resolution
        check_generation_settings(prompt, width=width, height=height, size_multiple=self.resolution_multiple)
        seeds = [seed + i for i in range(num_images)]
        # CPU generators make a seed give the same starting noise on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        with self._lock:
            scheduler_name = scheduler or self.scheduler_name
            if scheduler_name != self.scheduler_name:
                self.pipeline.scheduler = make_scheduler(scheduler_name, self.pipeline.scheduler.config)
                self.scheduler_name = scheduler_name
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    output = self.pipeline(
                        prompt=[prompt] * num_images, negative_prompt=[negative_prompt or ""] * num_images,
                        num_inference_steps=steps, guidance_scale=float(guidance_scale), generator=generators,
                        width=width, height=height,
                    )
            except RuntimeError as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
                if not is_out_of_memory(error):
                    raise
                raise generation_out_of_memory(error, num_images, width, height) from None
            seconds = (time.perf_counter() - start) / num_images
        return [
            GeneratedImage(image=image, prompt=prompt, negative_prompt=negative_prompt or "", seed=s, steps=steps,
                           guidance_scale=float(guidance_scale), width=width, height=height,
                           scheduler=scheduler_name, model=self.model, lora=self.lora, seconds=seconds)
            for image, s in zip(output.images, seeds, strict=True)
        ]


def check_generation_settings(prompt: str, *, num_images: int = 1, steps: int = DEFAULT_STEPS,
                              guidance_scale: float = DEFAULT_GUIDANCE, seed: int | None = None,
                              width: int | None = None, height: int | None = None, size_multiple: int = 8) -> None:
    """Refuse settings no generation can use (ConfigError). Called by `generate` and, with the same values, by the
    CLI and `generate()` before the model loads, so a typo costs a second, not a model load. None: decided later
    (a random seed, the model's resolution)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("The prompt is empty: describe the image, e.g. \"a photo of sks dog on the beach\".")
    check_int_range("num_images", num_images, 1, 64)
    check_int_range("steps", steps, 1, 500)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) or not (
            0.0 <= guidance_scale <= 50.0):
        raise ConfigError(f"guidance_scale must be a number from 0 to 50 (got {guidance_scale!r}); 5-9 is usual.")
    if seed is not None:
        check_int_range("seed", seed, 0, MAX_SEED - num_images + 1)
    for name, size in (("width", width), ("height", height)):
        if size is not None:
            check_int_range(name, size, 8, 2048)
            if size % size_multiple:
                raise ConfigError(f"{name} must be a multiple of {size_multiple} (got {size}).")


def resolve_model(model: str, lora: str | None = None) -> tuple[str, str | None, dict[str, Any] | None]:
    """(base model to load, LoRA folder or None, training summary or None) for what the user passed.

    A LoRA run's output folder has no model of its own: its base model comes from its summary.
    """
    path = Path(model).expanduser()
    summary = read_training_summary(path) if path.is_dir() else None
    if lora is not None:
        lora_path = Path(lora).expanduser()
        if not Path(lora_path, LORA_WEIGHTS_FILE).is_file() and not (lora_path.is_file()
                                                                      and lora_path.suffix == ".safetensors"):
            raise ModelLoadError(f"--lora {lora!r}: no {LORA_WEIGHTS_FILE} there. Give the output folder of a LoRA "
                                 "training run (or the .safetensors file itself).")
        summary = summary or read_training_summary(lora_path if lora_path.is_dir() else lora_path.parent)
        return model, str(lora_path), summary
    if path.is_dir() and Path(path, LORA_WEIGHTS_FILE).is_file() and not Path(path, MODEL_INDEX_FILE).is_file():
        base = (summary or {}).get("base_model") or ((summary or {}).get("config") or {}).get("model")
        if not base:
            raise ModelLoadError(
                f"{model!r} holds LoRA weights but no {SUMMARY_FILE} naming their base model. "
                f"Pass the base model and the LoRA folder: --model BASE --lora {model}."
            )
        return base, str(path), summary
    return model, None, summary


def load_generator(
    model: str,
    lora: str | None = None,
    *,
    scheduler: str = DEFAULT_SCHEDULER,
    device: str | None = None,
    half_precision: bool | None = None,
    attention_slicing: bool = False,
    vae_tiling: bool = False,
    progress_bar: bool = False,
    safety_checker: bool = True,
) -> Generator:
    """Load a model (and LoRA weights) once, for any number of `generate` calls.

    `device` defaults to CUDA when present; `half_precision` (fp16) defaults to on with CUDA.
    `attention_slicing` and `vae_tiling` trade speed for memory on small GPUs. `safety_checker`: use the
    model's (or LoRA base's) NSFW filter when it has one; off, or without one, `Generator.safety_note` says so.
    """
    base, lora_path, summary = resolve_model(model, lora)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if half_precision is None:
        half_precision = device.startswith("cuda")
    variant = "fp16" if half_precision else None  # fp16 generation: the fp16 files, half the download, where present
    components = load_components(base, variant=variant)
    with_checker = safety_checker and load_safety_checker(components, variant=variant)
    pipeline = make_pipeline(components, safety_checker=with_checker)
    pipeline.scheduler = make_scheduler(scheduler, components.scheduler.config)
    if lora_path:
        apply_lora(pipeline, lora_path)
    # Loaded weights are fp32 already; only a change of precision needs a cast.
    if half_precision:
        pipeline.to(device=device, dtype=torch.float16)
    else:
        pipeline.to(device)
    save_memory(pipeline, attention_slicing=attention_slicing, vae_tiling=vae_tiling)
    pipeline.set_progress_bar_config(disable=not progress_bar)
    resolution = int((summary or {}).get("resolution") or components.native_resolution)
    return Generator(pipeline=pipeline, model=base, lora=lora_path, default_resolution=resolution,
                     scheduler_name=scheduler, device=device, summary=summary,
                     safety_note=safety_checker_note(components, with_checker))


def save_memory(pipeline, *, attention_slicing: bool = False, vae_tiling: bool = False) -> None:
    """The --attention-slicing and --vae-tiling savings: less GPU memory for a little speed."""
    if attention_slicing:
        pipeline.enable_attention_slicing()
    if vae_tiling:
        pipeline.vae.enable_tiling()


def apply_lora(pipeline, lora_path: str) -> None:
    """Load LoRA weights (a folder or a .safetensors file) into `pipeline` and merge them into its weights."""
    path = Path(lora_path)
    where, weight_name = (str(path.parent), path.name) if path.is_file() else (str(path), LORA_WEIGHTS_FILE)
    try:
        pipeline.load_lora_weights(where, weight_name=weight_name)
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        raise ModelLoadError(
            f"Could not apply the LoRA weights in {lora_path!r} to this base model ({type(error).__name__}: "
            f"{error}). LoRA weights only fit the base model they were trained on; check --model."
        ) from None
    # Merging the adapters into the weights makes each step as fast as the base model's.
    pipeline.fuse_lora()


def generate(
    model: str,
    prompt: str,
    *,
    lora: str | None = None,
    out_dir: str | Path | None = None,
    scheduler: str = DEFAULT_SCHEDULER,
    attention_slicing: bool = False,
    vae_tiling: bool = False,
    **settings: Any,
) -> list[GeneratedImage]:
    """Load `model` and make images in one call; with `out_dir`, also save them as PNGs.

    `settings` are `Generator.generate`'s: negative_prompt, num_images, steps, guidance_scale, seed,
    width, height. To make many batches, use `load_generator` once instead.
    """
    check_generation_settings(prompt, **{k: v for k, v in settings.items() if k != "negative_prompt"})
    if out_dir is not None:
        check_output_folder(out_dir, "out_dir")
    generator = load_generator(model, lora, scheduler=scheduler, attention_slicing=attention_slicing,
                               vae_tiling=vae_tiling, progress_bar=True)
    results = generator.generate(prompt, **settings)
    if out_dir is not None:
        save_images(results, out_dir)
    return results
