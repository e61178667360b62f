"""What a run writes besides checkpoints: sample images during training, the final model (atomically), and the
facts its summary records about the machine (peak GPU memory, library versions)."""

from __future__ import annotations

import contextlib
import platform
import shutil
from pathlib import Path

import torch

from . import checkpoints as ckpt
from .files import LORA_WEIGHTS_FILE, MODEL_INDEX_FILE, SAMPLES_DIR
from .models import SDComponents, load_safety_checker, make_pipeline, write_slow_tokenizer_files


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
    paths = []
    with torch.no_grad(), accelerator.autocast():
        for i, prompt in enumerate(prompts):
            generator = torch.Generator(device.type).manual_seed(config.sample_seed + i)
            image = pipe(prompt, height=resolution, width=resolution, num_inference_steps=config.sample_steps,
                         generator=generator, output_type="pil").images[0]
            path = folder / f"step-{step:06d}-{i}.png"
            image.save(path)
            paths.append(path)
    components.vae.to(vae_device)
    components.text_encoder.to(text_device)
    return paths


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
