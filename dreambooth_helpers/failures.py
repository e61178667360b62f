"""Turning a GPU running out of memory into advice: which setting to change, and what was kept.

Training, class-image generation and image generation all call into the GPU; any of them can raise
`torch.cuda.OutOfMemoryError` (or, from some kernels, a RuntimeError that says "out of memory").
These helpers recognise that error, free what the failed call held, and raise a `TrainingError` (or
`GenerationError`) whose message names the setting to change.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import torch

from .errors import GenerationError, TrainingError

if TYPE_CHECKING:
    from .config import TrainConfig

_OUT_OF_MEMORY_TEXTS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA out-of-memory errors, including the RuntimeErrors some kernels raise instead."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _OUT_OF_MEMORY_TEXTS)


def release(error: BaseException) -> None:
    """Free the GPU memory a failed call held.

    The error's traceback keeps every frame of the failed forward pass alive, tensors included, and a
    notebook keeps the last exception around: dropping the traceback lets those tensors go.
    """
    error.__traceback__ = None
    free_gpu_memory()


def free_gpu_memory() -> None:
    """Give the memory of tensors nothing refers to any more back to the GPU (before the next model loads)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def training_advice(config: TrainConfig, precision: str | None = None, use_8bit_adam: bool | None = None) -> str:
    """The setting to change after training ran out of memory.

    The memory planner (memory.py) sizes the run and names the first change that fits; when it
    cannot judge this configuration, the fixed order below (cheapest for quality first) is used.
    """
    try:
        from .memory import oom_advice

        return oom_advice(config, precision=precision, use_8bit_adam=use_8bit_adam)
    except Exception:  # the advice is best effort; the out-of-memory message itself must always reach the user
        return _fallback_training_advice(config)


def _fallback_training_advice(config: TrainConfig) -> str:
    changes = []
    if not config.gradient_checkpointing:
        changes.append("--gradient-checkpointing (saves ~40% of activation memory, ~1.5x slower)")
    if not config.use_8bit_adam:
        changes.append("--use-8bit-adam (saves ~5.5 GiB for SD 1.x's UNet and text encoder)")
    if not config.cache_latents:
        changes.append("--cache-latents")
    if config.train_batch_size > 1:
        changes.append(f"--train-batch-size 1 (now {config.train_batch_size})")
    if config.train_text_encoder and not config.lora:
        changes.append("--no-train-text-encoder, or --lora (saves ~1-3 GiB)")
    elif not config.lora:
        changes.append("--lora (trains small adapters: about a third of the memory)")
    if (config.resolution or 512) > 384:
        changes.append("--resolution 384")
    if not changes:
        return "Every memory saving is already on: use a GPU with more memory, or close other programs using it."
    return "Change this setting: " + changes[0] + "." + (
        f" If that is not enough, also: {'; '.join(changes[1:])}." if len(changes) > 1 else "")


def training_out_of_memory(error: BaseException, config: TrainConfig, *, precision: str | None = None,
                           use_8bit_adam: bool | None = None, step: int | None = None) -> TrainingError:
    """The TrainingError to raise for an out-of-memory `error` during training (after freeing memory)."""
    release(error)
    where = f" at step {step}" if step else ""
    kept = (" Checkpoints already saved are kept: after changing the setting, continue with --resume latest "
            "(switching --lora on or off starts a new run)." if config.checkpoint_every else "")
    advice = training_advice(config, precision, use_8bit_adam)
    head = f"The GPU ran out of memory during training{where}. "
    if advice.startswith("The GPU ran out of memory"):  # the planner's advice already says so, with figures
        head = ""
    return TrainingError(f"{head}{advice}{kept}")


def class_images_out_of_memory(error: BaseException, batch_size: int, done: int, wanted: int) -> TrainingError:
    """The TrainingError for running out of memory while generating class images (after freeing memory)."""
    release(error)
    smaller = (f"Lower --class-images-batch-size (now {batch_size}) to {max(1, batch_size // 2)}"
               if batch_size > 1 else "Close other programs using the GPU, or lower --resolution")
    return TrainingError(f"The GPU ran out of memory while generating class images ({done} of {wanted} are made "
                         f"and kept). {smaller}, then run again: only the missing images are generated.")


def generation_out_of_memory(error: BaseException, num_images: int, width: int, height: int) -> GenerationError:
    """The GenerationError for running out of memory while generating images (after freeing memory)."""
    release(error)
    advice = [f"fewer images at once (now {num_images})"] if num_images > 1 else []
    if max(width, height) > 512:
        advice.append(f"a smaller size (now {width}x{height}; 512x512 for SD 1.x)")
    advice.append("--attention-slicing and --vae-tiling (less memory, a little slower)")
    return GenerationError(f"The GPU ran out of memory generating {num_images} image(s) of {width}x{height}. "
                           f"Try {'; or '.join(advice)}.")
