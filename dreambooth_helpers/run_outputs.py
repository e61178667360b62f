"""What a run writes besides checkpoints: sample images during training, the final model (atomically), and the
facts its summary records about the machine (peak GPU memory, library versions).

Samples: samples/step-000150-0.png ... at the model's true size, each with its prompt, step and seed in the PNG's
text, and in samples/labelled/step-000150.png the same images enlarged for looking at (nearest
neighbour, cells of at least 256 px) with "step 150" above and each prompt under its image.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
from pathlib import Path

import torch
from PIL import Image

from . import checkpoints as ckpt
from .files import LORA_WEIGHTS_FILE, MODEL_INDEX_FILE, SAMPLES_DIR
from .grids import DISPLAY_MIN, display_scale, enlarged, labelled_grid
from .models import SDComponents, load_safety_checker, make_pipeline, write_slow_tokenizer_files

# In samples/: one step's samples enlarged, with the step and prompts; a folder of its own, so that what globs
# samples/*.png (the Hub card's grid, the app, tests) sees only the true-size files.
SAMPLE_SHEET = "labelled/step-{step:06d}.png"
SHEET_COLUMNS = 4


def _save_samples(run, model, step: int) -> list[Path]:
    """Images from fixed prompts and seeds, to watch the subject appear (and overfitting start); `run` and `model`
    are the loop's (training._Run, training._Model)."""
    from diffusers import DPMSolverMultistepScheduler

    config, accelerator, components = run.config, run.accelerator, model.components
    resolution, output_dir = model.resolution, run.output_dir
    prompts = config.sample_prompts or [c.instance_prompt for c in config.concepts]
    device = accelerator.device
    vae_device = next(components.vae.parameters()).device
    text_device = next(components.text_encoder.parameters()).device  # on the CPU when its embeddings are cached
    components.vae.to(device)
    components.text_encoder.to(device)
    pipe = make_pipeline(components, unet=accelerator.unwrap_model(model.unet),
                         text_encoder=accelerator.unwrap_model(model.text_encoder))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(components.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    folder = output_dir / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths, images = [], []
    with torch.no_grad(), accelerator.autocast():
        for i, prompt in enumerate(prompts):
            generator = torch.Generator(device.type).manual_seed(config.sample_seed + i)
            image = pipe(prompt, height=resolution, width=resolution, num_inference_steps=config.sample_steps,
                         generator=generator, output_type="pil").images[0]
            path = folder / f"step-{step:06d}-{i}.png"
            image.save(path, pnginfo=_sample_text(prompt, step, config.sample_seed + i))  # the true size
            paths.append(path)
            images.append(image)
    components.vae.to(vae_device)
    components.text_encoder.to(text_device)
    sheet = folder / SAMPLE_SHEET.format(step=step)
    sheet.parent.mkdir(exist_ok=True)
    sample_sheet(step, prompts, images).save(sheet)
    return paths


def _sample_text(prompt: str, step: int, seed: int):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (("prompt", prompt), ("step", step), ("seed", seed)):
        info.add_text(key, str(value))
    return info


def sample_sheet(step: int, prompts: list[str], images: list) -> Image.Image:
    """One step's samples for looking at: "step N" above, each image enlarged (nearest neighbour, a whole factor,
    cells of at least grids.DISPLAY_MIN px) with its prompt under it, SHEET_COLUMNS to a row."""
    side = max(max(image.size) for image in images)
    cell = side * display_scale((side, side))
    rows = [(f"step {step}" if start == 0 else "", images[start:start + SHEET_COLUMNS])
            for start in range(0, len(images), SHEET_COLUMNS)]
    captions = [list(prompts[start:start + SHEET_COLUMNS]) for start in range(0, len(images), SHEET_COLUMNS)]
    return labelled_grid(rows, cell=cell, captions=captions)


def sample_prompt(path: str | Path, image: Image.Image | None = None) -> str:
    """The prompt a sample file was drawn from, as its PNG's text records it ("" for files without one)."""
    text = getattr(image, "text", None) if image is not None else None
    if text is None:
        with contextlib.suppress(OSError), Image.open(path) as opened:
            text = getattr(opened, "text", None)
    return str((text or {}).get("prompt") or "")


def sample_caption(path: str | Path, image: Image.Image | None = None) -> str:
    """"step 150: <prompt>" for a sample file, else (an older file, no prompt recorded) the file's name."""
    from .notebook.monitor import sample_step

    step, prompt = sample_step(path), sample_prompt(path, image)
    return f"step {step}: {prompt}" if prompt and step >= 0 else Path(path).stem


def shown_sample(path: str | Path, minimum: int = DISPLAY_MIN) -> tuple[Image.Image, str]:
    """A sample file as a gallery shows it: enlarged (nearest neighbour, the file keeps its size) and captioned
    "step N: prompt"."""
    with Image.open(path) as image:
        return enlarged(image.convert("RGB"), minimum), sample_caption(path, image)


def _save_final_model(components: SDComponents, accelerator, unet, text_encoder, config, output_dir: Path) -> None:
    """The trained model, written atomically: a diffusers folder, or LoRA weights."""
    unet = accelerator.unwrap_model(unet)
    text_encoder = accelerator.unwrap_model(text_encoder) if text_encoder is not None else None
    ckpt.require_finite_weights((unet, text_encoder), "the final model", output_dir)
    staging = output_dir / ".saving-model"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if config.lora:
        ckpt.save_trainable_weights(staging, unet, text_encoder, lora=True, family=components.family)
        for part in ckpt.lora_parts(unet, text_encoder, components.family):
            (staging / ckpt.raw_lora_file(part)).unlink(missing_ok=True)  # resume-only; the diffusers file is the model
        ckpt.replace_atomically(staging, output_dir, LORA_WEIGHTS_FILE)
        return
    with_checker = config.safety_checker and load_safety_checker(components)  # the base's NSFW filter, if any
    pipe = make_pipeline(components, unet=unet, text_encoder=text_encoder or components.text_encoder,
                         safety_checker=with_checker)
    pipe.to(torch.float32)  # one dtype for every part, so a plain from_pretrained runs as is
    components.restore_fp32_originals(pipe)  # not the fp16-rounded copies training used
    pipe.save_pretrained(staging, safe_serialization=True)
    write_slow_tokenizer_files(components.tokenizer, staging / "tokenizer")  # for transformers 4.x
    ckpt.replace_atomically(staging, output_dir, MODEL_INDEX_FILE)


def _peak_memory_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "xformers",
                    "dreambooth-helpers"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[package] = md.version(package)
    return versions
