"""Stable Diffusion XL: two text encoders, a pooled prompt embedding and size/crop micro-conditioning.

A prompt goes through both text encoders (CLIP ViT-L, then OpenCLIP bigG with a projection); the UNet's per-token
conditioning is their penultimate hidden states side by side (768 + 1280 = 2048 wide), and its "text_time" added
embedding takes the second encoder's pooled, projected output (1280) plus six numbers per image: the photo's
original (height, width), the top-left corner of the crop taken from it, and the target (height, width). Training
passes each photo's own numbers, so the model learns that a cropped photo was cropped; generation asks for an
uncropped image at the target size.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .base import LORA_TARGETS_TEXT, Conditioning, ModelFamily, seeded_rng

TINY_SDXL_MODEL = "tiny-sdxl"
SDXL_RANDOM = "sdxl-random"  # SDXL's real shapes with random weights, for memory measurements (benchmarks)
TINY_SDXL_RESOLUTION = 64
CLIP_VOCAB = 49408  # both of SDXL's tokenizers


class TextEncoderPair(torch.nn.Module):
    """SDXL's two text encoders as one module, so training, accelerate and checkpoints see one text model."""

    def __init__(self, text_encoder, text_encoder_2) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def forward(self, input_ids: torch.Tensor) -> Conditioning:
        """`input_ids` (batch, 2, tokens): each encoder's own token ids."""
        first = self.text_encoder(input_ids[:, 0], output_hidden_states=True)
        second = self.text_encoder_2(input_ids[:, 1], output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return Conditioning(hidden, second.text_embeds)

    def gradient_checkpointing_enable(self) -> None:
        for encoder in (self.text_encoder, self.text_encoder_2):
            getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    label = "Stable Diffusion XL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    native_resolution = 1024
    text_parts = ("text_encoder", "text_encoder_2")
    tokenizer_folders = ("tokenizer", "tokenizer_2")
    # The layout AUTOMATIC1111, ComfyUI and kohya's sd-scripts read for SDXL LoRA files.
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    hub_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image")
    license = "openrail++"  # SDXL base 1.0's CreativeML Open RAIL++-M
    example_hub_id = "stabilityai/stable-diffusion-xl-base-1.0"
    single_file_export = False  # export.py can write a whole model as one original-layout checkpoint
    webui_base_version = "sdxl_base_v1-0"  # kohya's ss_base_model_version

    def tokenize(self, components, prompt: str) -> torch.Tensor:
        rows = [tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids[0] for tokenizer in (components.tokenizer,
                                                                             components.tokenizer_2)]
        return torch.stack(rows)

    def encode(self, text_encoder, input_ids: torch.Tensor) -> Conditioning:
        return text_encoder(input_ids)

    def time_ids(self, original_size, crop_top_left, target_size) -> torch.Tensor:
        return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)

    def added_conditions(self, conditioning: Conditioning, time_ids: torch.Tensor | None) -> dict[str, Any]:
        pooled = conditioning.pooled
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}

    def text_modules(self, text_encoder) -> dict[str, torch.nn.Module]:
        return {"text_encoder": text_encoder.text_encoder, "text_encoder_2": text_encoder.text_encoder_2}

    def text_lora_targets(self, part: str, encoder: torch.nn.Module) -> list[str]:
        """All attention projections but those of the first encoder's last layer: SDXL reads that encoder's
        penultimate states, so its last layer never reaches the UNet. Adapters there would get no gradient (several
        processes then stop: DDP expects every trained weight to get one) and would only add dead weights."""
        if part != "text_encoder":
            return list(LORA_TARGETS_TEXT)
        last = f"layers.{encoder.config.num_hidden_layers - 1}."
        return [name for name, module in encoder.named_modules()
                if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS_TEXT) and last not in name]

    def pipeline(self, components, *, unet=None, text_encoder=None, safety_checker=None, feature_extractor=None):
        pair = text_encoder or components.text_encoder
        # SDXL has no safety checker; the invisible watermark needs a package Colab lacks and changes pixels.
        return self.pipeline_class()(
            vae=components.vae, text_encoder=pair.text_encoder, text_encoder_2=pair.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=unet or components.unet,
            scheduler=components.scheduler, add_watermarker=False,
        )

    def check_training(self, config) -> None:
        if not config.lora:
            raise ConfigError(f"{config.model!r} is an SDXL model, and SDXL is trained with LoRA here: a full "
                              "fine-tune of SDXL's UNet (2.6B parameters) needs ~40 GB of GPU memory and writes 7 GB "
                              "per checkpoint. Add --lora (on a free Colab T4: --preset t4-sdxl).")


SDXL = StableDiffusionXL()


# ---------------------------------------------------------------------------- models built in code


def _text_config(tokenizer, *, hidden: int, layers: int, heads: int, intermediate: int, projection: int,
                 activation: str, vocab: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          hidden_act=activation, projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _sdxl_unet(*, channels, layers, transformer_layers, heads, cross, time_dim, pooled, sample_size, groups=32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
        transformer_layers_per_block=transformer_layers, attention_head_dim=heads, use_linear_projection=True,
        cross_attention_dim=cross, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled, norm_num_groups=groups,
    )


def build_tiny_parts(tokenizer, seed: int = 0) -> dict[str, Any]:
    """An SDXL-shaped model small enough to train on a CPU (64 px, ~2M parameters): both text encoders, the
    `text_time` added embedding. Random weights from `seed`; no download."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with seeded_rng(seed):
        unet = _sdxl_unet(channels=(32, 64), layers=1, transformer_layers=(1, 2), heads=(2, 4), cross=64,
                          time_dim=8, pooled=32, sample_size=TINY_SDXL_RESOLUTION // 2)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=TINY_SDXL_RESOLUTION, norm_num_groups=32, scaling_factor=0.13025,
        )
        small = dict(hidden=32, layers=2, heads=4, intermediate=64, projection=32)
        text_encoder = CLIPTextModel(_text_config(tokenizer, activation="quick_gelu", **small))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, activation="gelu", **small))
    return {"unet": unet, "vae": vae, "text_encoders": (text_encoder, text_encoder_2),
            "resolution": TINY_SDXL_RESOLUTION}


def build_real_shaped_parts(tokenizer, dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """SDXL base 1.0's exact shapes (UNet 2.6B, CLIP ViT-L 123M, OpenCLIP bigG 695M, VAE 84M) with random weights
    in `dtype`, built without ever holding an fp32 copy: for measuring memory and file sizes without a download."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with seeded_rng(0):
            unet = _sdxl_unet(channels=(320, 640, 1280), layers=2, transformer_layers=(1, 2, 10), heads=(5, 10, 20),
                              cross=2048, time_dim=256, pooled=1280, sample_size=128)
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
                                force_upcast=True)
            text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=768, layers=12, heads=12, intermediate=3072,
                                                      projection=768, activation="quick_gelu", vocab=CLIP_VOCAB))
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(
                tokenizer, hidden=1280, layers=32, heads=20, intermediate=5120, projection=1280, activation="gelu",
                vocab=CLIP_VOCAB))
    finally:
        torch.set_default_dtype(previous)
    return {"unet": unet, "vae": vae, "text_encoders": (text_encoder, text_encoder_2), "resolution": 1024}
