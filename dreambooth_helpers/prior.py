"""Class images for prior preservation.

DreamBooth trains on generated images of the plain class ("a photo of dog") next to the subject's
photos, so the model keeps its idea of the class instead of turning every dog into yours. Images are
named by index and generated from seed + index, so an interrupted generation resumes where it
stopped and a rerun reuses what exists.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm

from .data import IMAGE_EXTENSIONS
from .failures import class_images_out_of_memory, free_gpu_memory, is_out_of_memory

if TYPE_CHECKING:
    from .config import Concept, TrainConfig

CLASS_IMAGE_PATTERN = re.compile(r"^class-(\d{5})\.png$")


def default_class_dir(output_dir: str | Path, class_prompt: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", class_prompt.lower()).strip("-")[:60] or "class"
    return Path(output_dir) / "class_images" / slug


def class_dir_for(config: TrainConfig, concept: Concept) -> Path:
    """Where `concept`'s class images live: its own class_dir, else a folder per class prompt in the output folder."""
    return Path(concept.class_dir) if concept.class_dir else default_class_dir(config.output_dir, concept.class_prompt)


def prepare_class_images(config: TrainConfig, components=None, *, device=None, progress: bool = True) -> list[Path]:
    """Make sure every concept's class folder holds its class images; return the folders, one per concept.

    Training and the notebook both call this (the notebook before training, to show them). Only missing images
    are generated; an empty list means prior preservation is off. Without `components` the base model is loaded
    here, and only when an image is missing, then freed; `device` defaults to the GPU when there is one.
    """
    if not config.with_prior_preservation:
        return []
    from .models import load_components, make_pipeline

    wanted = config.effective_num_class_images
    folders = [class_dir_for(config, concept) for concept in config.concepts]
    loaded_here = components is None
    if loaded_here:  # a multi-GB load: only when an image is missing
        if all(len(existing_class_images(folder)) >= wanted for folder in folders):
            return folders
        components = load_components(config.model, seed=config.seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipeline = make_pipeline(components).to(device)  # with the caller's components: no copy, nothing loads
    try:
        for concept, folder in zip(config.concepts, folders):  # each folder is scanned once, in ensure_class_images
            ensure_class_images(pipeline, concept.class_prompt, folder, wanted,
                                resolution=config.resolution or components.native_resolution, seed=config.seed,
                                batch_size=config.class_images_batch_size, steps=config.class_images_steps,
                                progress=progress)
    finally:
        del pipeline
        if loaded_here:  # give the GPU back before training (or the next cell) loads its own copy
            del components
            free_gpu_memory()
    return folders


def existing_class_images(class_dir: str | Path) -> list[Path]:
    """Readable images already in `class_dir` (any name: users may bring their own)."""
    folder = Path(class_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
            try:
                with Image.open(path) as image:
                    image.verify()
                found.append(path)
            except Exception:  # a half-written or foreign file: leave it out, it will be regenerated
                continue
    return found


def ensure_class_images(
    pipeline,
    class_prompt: str,
    class_dir: str | Path,
    num_images: int,
    *,
    resolution: int,
    seed: int = 0,
    batch_size: int = 4,
    steps: int = 25,
    progress: bool = True,
) -> list[Path]:
    """Make sure `class_dir` holds `num_images` class images; generate only the missing ones.

    `pipeline` is a StableDiffusionPipeline already on its device. It samples with DPM-Solver++
    (25 steps look like PNDM's 50) under fp16 autocast on a GPU, in batches.
    """
    from diffusers import DPMSolverMultistepScheduler

    folder = Path(class_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = existing_class_images(folder)
    if len(have) >= num_images:
        return have[:num_images]
    taken = {int(m.group(1)) for p in have if (m := CLASS_IMAGE_PATTERN.match(p.name))}
    missing = num_images - len(have)
    # Indices not yet on disk, so image k is always made from seed + k, whatever was interrupted.
    indices = [i for i in range(num_images + len(taken)) if i not in taken][:missing]

    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    device = pipeline.device
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    bar = tqdm(total=missing, desc=f"Class images for {class_prompt!r}", disable=not progress)
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        generators = [torch.Generator(device.type).manual_seed(seed + i) for i in batch]
        try:
            with torch.no_grad(), autocast:
                images = pipeline([class_prompt] * len(batch), height=resolution, width=resolution,
                                  num_inference_steps=steps, generator=generators).images
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(error):
                raise
            bar.close()
            raise class_images_out_of_memory(error, batch_size, len(have) + start, num_images) from None
        for index, image in zip(batch, images):
            _save_atomically(image, folder / f"class-{index:05d}.png")
        bar.update(len(batch))
    bar.close()
    return existing_class_images(folder)[:num_images]


def _save_atomically(image: Image.Image, path: Path) -> None:
    """Write then rename, so a disconnect mid-write never leaves a truncated PNG that looks finished."""
    partial = path.with_name(f".{path.name}.partial")
    image.save(partial, format="PNG")
    os.replace(partial, path)

