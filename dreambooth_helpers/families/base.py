"""The interface every model family answers: what training, generation, export and publishing ask of a model.

SD 1.x and SDXL share the training loop; they differ in how a prompt becomes the UNet's conditioning (one text
encoder, or two whose states are concatenated plus a pooled embedding), in SDXL's added conditions (each image's
original size, crop and target size), in the diffusers pipeline class, and in how LoRA weights are named in files.
A family is one object of a `ModelFamily` subclass; the code that uses it never asks which family it has.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

# The LoRA layers trained in every family: the attention projections of the UNet and of each text encoder.
LORA_TARGETS_UNET = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TARGETS_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_PART = "unet"


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Run with a fixed global seed, then restore the caller's RNG (model constructors and LoRA init use it)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on for a batch of prompts: per-token states, and (SDXL) a pooled embedding."""

    hidden: torch.Tensor  # (batch, tokens, cross_attention_dim)
    pooled: torch.Tensor | None = None  # (batch, projection_dim), SDXL only

    def to(self, device) -> Conditioning:
        return Conditioning(self.hidden.to(device), None if self.pooled is None else self.pooled.to(device))


class ModelFamily:
    """One family of Stable Diffusion models. Subclasses fill in each difference; nothing else branches on it."""

    name: str  # recorded in training summaries and checkpoints: "sd1", "sdxl"
    label: str  # for people: "Stable Diffusion 1.x"
    pipeline_class_name: str  # diffusers' pipeline class for generation
    native_resolution: int  # what the real models of this family were trained at
    text_parts: tuple[str, ...]  # names of the text encoders, as the pipeline and its LoRA files call them
    tokenizer_folders: tuple[str, ...]  # a diffusers folder's tokenizers, one per text encoder
    kohya_prefixes: dict[str, str]  # part name -> the key prefix AUTOMATIC1111/ComfyUI/kohya LoRA files use
    hub_tags: tuple[str, ...]  # tags of a published model
    license: str  # the license the family's base models ship under; a published fine-tune inherits it
    example_hub_id: str  # the base model named in advice
    single_file_export: bool  # export.py converts a whole model of this family to one original-layout file
    webui_base_version: str  # what kohya's LoRA metadata calls this family (ss_base_model_version)

    # ------------------------------------------------------------------ prompts

    def tokenize(self, components, prompt: str) -> torch.Tensor:
        """A prompt's token ids, padded to each tokenizer's length: (77,) for one encoder, (2, 77) for two."""
        raise NotImplementedError

    def encode(self, text_encoder, input_ids: torch.Tensor) -> Conditioning:
        """The conditioning of a batch of token ids (as `tokenize` made them, stacked), on `input_ids`' device."""
        raise NotImplementedError

    # ------------------------------------------------------------------ added conditions

    def time_ids(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                 target_size: tuple[int, int]) -> torch.Tensor | None:
        """The micro-conditioning of one training image, (height, width) pairs; None for families without it."""
        return None

    def added_conditions(self, conditioning: Conditioning, time_ids: torch.Tensor | None) -> dict[str, Any] | None:
        """The UNet's `added_cond_kwargs` for a batch; None for families without added conditions."""
        return None

    # ------------------------------------------------------------------ modules

    def text_modules(self, text_encoder) -> dict[str, torch.nn.Module]:
        """Each text encoder inside the model's text module, by its pipeline name (for LoRA, saving, loading)."""
        return {self.text_parts[0]: text_encoder}

    def text_lora_targets(self, part: str, encoder: torch.nn.Module) -> list[str]:
        """The layers of text encoder `part` that get LoRA adapters: every attention projection."""
        return list(LORA_TARGETS_TEXT)

    def pipeline(self, components, *, unet=None, text_encoder=None, safety_checker=None, feature_extractor=None):
        """A diffusers pipeline of this family over `components` (with trained replacements)."""
        raise NotImplementedError

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    # ------------------------------------------------------------------ what a run may do

    def check_training(self, config) -> None:
        """Refuse (ConfigError) settings this family cannot train, before anything loads."""

    # ------------------------------------------------------------------ LoRA files

    def save_lora(self, folder, layers: dict[str, dict[str, torch.Tensor]], metadata: dict[str, dict]) -> None:
        """Write diffusers' `pytorch_lora_weights.safetensors` from each part's peft state dict (diffusers layout)."""
        pipeline = self.pipeline_class()
        arguments = {}
        for part, weights in layers.items():
            key = "unet" if part == UNET_PART else part
            arguments[f"{key}_lora_layers"] = weights
            arguments[f"{key}_lora_adapter_metadata"] = metadata.get(part)
        pipeline.save_lora_weights(folder, **arguments)

    def lora_state_dict(self, path: str, weight_name: str | None = None) -> dict[str, torch.Tensor]:
        """Read a LoRA file (any layout diffusers knows, the webui one included) as this family's pipeline does."""
        state, *_ = self.pipeline_class().lora_state_dict(path, weight_name=weight_name)
        return state
