"""Stable Diffusion 1.x (1.4, 1.5 and their fine-tunes): one CLIP text encoder, no added conditions."""

from __future__ import annotations

import torch

from .base import Conditioning, ModelFamily


class StableDiffusion1(ModelFamily):
    name = "sd1"
    label = "Stable Diffusion 1.x"
    pipeline_class_name = "StableDiffusionPipeline"
    native_resolution = 512
    text_parts = ("text_encoder",)
    tokenizer_folders = ("tokenizer",)
    # kohya's SD 1.x layout names the single text encoder "te".
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}
    hub_tags = ("stable-diffusion", "stable-diffusion-diffusers", "text-to-image")
    license = "creativeml-openrail-m"  # every Stable Diffusion 1.x release
    example_hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    single_file_export = True  # export.py can write a whole model as one original-layout checkpoint
    webui_base_version = "sd_v1"  # kohya's ss_base_model_version

    def tokenize(self, components, prompt: str) -> torch.Tensor:
        tokenizer = components.tokenizer
        return tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids[0]

    def encode(self, text_encoder, input_ids: torch.Tensor) -> Conditioning:
        return Conditioning(text_encoder(input_ids)[0])

    def pipeline(self, components, *, unet=None, text_encoder=None, safety_checker=None, feature_extractor=None):
        return self.pipeline_class()(
            vae=components.vae, text_encoder=text_encoder or components.text_encoder, tokenizer=components.tokenizer,
            unet=unet or components.unet, scheduler=components.scheduler, safety_checker=safety_checker,
            feature_extractor=feature_extractor if safety_checker is not None else None,
            requires_safety_checker=components.safety_checker_in_base,
        )


SD1 = StableDiffusion1()
