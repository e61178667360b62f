"""The run's stream of training examples: each photo (and class image) encoded once, and every random draw of
an example (which image, its flip, its latent sample, noise and timestep) from a generator seeded by the example's
place in the stream, so a resumed run, or N processes with batch B, draw exactly what one uninterrupted process
with batch N x B draws. SDXL's examples carry their size conditioning (time ids) with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import TrainConfig
from .data import CropGeometry, images_to_tensor


@dataclass
class Example:
    """One training image: its cached latent distribution (or pixels), its prompt's token ids and (SDXL) its size
    conditioning."""

    pixels: torch.Tensor | None  # (2 if flips else 1, 3, H, W), used when latents are not cached
    latent_mean: torch.Tensor | None  # (2 or 1, 4, h, w)
    latent_std: torch.Tensor | None
    input_ids: torch.Tensor  # (77,) for SD 1.x; (2, 77) for SDXL's two tokenizers
    time_ids: torch.Tensor | None = None  # (2 or 1, 6): original size, crop corner, target size; None for SD 1.x


def _make_examples(prepared: list[tuple[Any, CropGeometry]], prompts: str | list[str], components, config,
                   runtime) -> list[Example]:
    """One example per prepared image (prepare_image_and_geometry); `prompts` is one prompt for all of them, or
    each image's own (its caption)."""
    prompts = [prompts] * len(prepared) if isinstance(prompts, str) else prompts
    family, vae = components.family, components.vae
    vae_dtype = next(vae.parameters()).dtype
    examples = []
    for (image, geometry), prompt in zip(prepared, prompts, strict=True):
        ids = family.tokenize(components, prompt)
        pixels = images_to_tensor([image])
        size = (image.height, image.width)
        geometries = [geometry, geometry.mirrored(image.width)] if config.random_flip else [geometry]
        rows = [family.time_ids(g.original, g.crop_top_left, size) for g in geometries]
        time_ids = None if rows[0] is None else torch.stack(rows)
        if config.random_flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        if config.cache_latents:
            with torch.no_grad():
                dist = vae.encode(pixels.to(runtime.device, vae_dtype)).latent_dist
            examples.append(Example(None, dist.mean.float(), dist.std.float(), ids, time_ids))
        else:
            examples.append(Example(pixels, None, None, ids, time_ids))
    return examples


def _pick(n: int, position: int, seed: int) -> int:
    """Index of the example at `position` in an endless stream of seeded epoch shuffles of `n` items."""
    epoch, offset = divmod(position, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return int(order[offset])


def _example_seed(seed: int, index: int, is_class: bool, purpose: int) -> int:
    """The seed of one random draw of the example at `index` in the run's stream: purpose 0 its flip, 1 the rest.

    Keyed by the example, not by the step or the process, so the same example draws the same whatever batch or
    process it lands in (1 process with batch 2 draws what 2 processes with batch 1 draw together).
    """
    return ((seed * 1_000_003 + index) * 2 + int(is_class)) * 2 + purpose


def _assemble(instances, classes, first: int, config: TrainConfig, device) -> dict[str, Any]:
    """The instance examples at stream places first..first+batch-1, then as many class examples (prior
    preservation), each with its flip and its own generator for the latent, noise and timestep draws."""
    size = config.train_batch_size
    places = [(first + k, False) for k in range(size)] + ([(first + k, True) for k in range(size)] if classes else [])
    chosen = [classes[_pick(len(classes), index, config.seed + 1)] if is_class
              else instances[_pick(len(instances), index, config.seed)] for index, is_class in places]
    flips = [int(torch.randint(0, 2, (1,), generator=torch.Generator().manual_seed(
        _example_seed(config.seed, index, is_class, 0)))) if config.random_flip else 0 for index, is_class in places]
    generators = [torch.Generator(device.type).manual_seed(_example_seed(config.seed, index, is_class, 1))
                  for index, is_class in places]
    time_ids = [e.time_ids[f] for e, f in zip(chosen, flips)] if chosen[0].time_ids is not None else None
    return {"examples": chosen, "flips": flips, "num_instance": size, "generators": generators,
            "input_ids": torch.stack([e.input_ids for e in chosen]),
            "time_ids": None if time_ids is None else torch.stack(time_ids).to(device)}


def _per_example_randn(batch, shape, device, dtype=torch.float32) -> torch.Tensor:
    """One standard normal tensor of `shape` per example, each from the example's own generator."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in batch["generators"]])


def _latents(batch, vae, config: TrainConfig, device) -> torch.Tensor:
    """Latents for the batch: sampled from the cached distribution, or encoded now."""
    pairs = list(zip(batch["examples"], batch["flips"]))
    if config.cache_latents:
        mean = torch.stack([e.latent_mean[f] for e, f in pairs]).to(device)
        std = torch.stack([e.latent_std[f] for e, f in pairs]).to(device)
        sample = mean + std * _per_example_randn(batch, mean.shape[1:], device)
    else:
        pixels = torch.stack([e.pixels[f] for e, f in pairs]).to(device, next(vae.parameters()).dtype)
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        sample = (dist.mean + dist.std * _per_example_randn(batch, dist.mean.shape[1:], device,
                                                            dist.mean.dtype)).float()
    return sample * vae.config.scaling_factor


def _noise_and_timesteps(batch, latents: torch.Tensor, num_train_timesteps: int, device):
    """The noise added to each latent and its timestep, drawn after the latent from the example's generator."""
    noise = _per_example_randn(batch, latents.shape[1:], device)
    timesteps = torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g, device=device)
                           for g in batch["generators"]])
    return noise, timesteps
