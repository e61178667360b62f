"""Output folders shaped like the trainer's, built from the tiny model in a few seconds.

A full fine-tune folder is a saved diffusers pipeline; a LoRA folder holds only
`pytorch_lora_weights.safetensors`. Both get a `training_summary.json` and sample images, as
`dreambooth_helpers.training.train` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from dreambooth_helpers.config import Concept, TrainConfig
from dreambooth_helpers.files import LORA_WEIGHTS_FILE, SAMPLES_DIR, SUMMARY_FILE
from dreambooth_helpers.models import build_tiny_components, make_pipeline

INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"


def write_summary(out: Path, *, lora: bool, base_model: str = "tiny", resolution: int = 64) -> dict:
    config = TrainConfig.from_preset(
        "t4-lora" if lora else "t4", output_dir=str(out), model=base_model, resolution=resolution,
        max_train_steps=10, concepts=[Concept("/home/someone/photos/dog", INSTANCE_PROMPT, CLASS_PROMPT)],
    )
    summary = {
        "config": config.to_dict(), "base_model": base_model, "lora": lora, "resolution": resolution,
        "instance_prompts": [INSTANCE_PROMPT], "steps": 10, "losses": [0.3, 0.2, 0.1],
        # What the run used, recorded as training._finish records it.
        "num_class_images": config.effective_num_class_images,
        "identity": {"learning_rate": config.effective_learning_rate,
                     "text_encoder_learning_rate": config.effective_text_encoder_learning_rate},
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    samples = out / SAMPLES_DIR
    samples.mkdir(exist_ok=True)
    for i, colour in enumerate(("red", "green", "blue", "yellow")):
        Image.new("RGB", (resolution, resolution), colour).save(samples / f"step-10-{i}.png")
    return summary


def make_full_output(out: Path) -> Path:
    """A 'trained' full model: the tiny model with its UNet nudged so it differs from the base."""
    components = build_tiny_components()
    with torch.no_grad():
        for p in components.unet.parameters():
            p.add_(0.01)
    make_pipeline(components).save_pretrained(out)
    # What training leaves besides the model, which must never be published.
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "optimizer.bin").write_bytes(b"state")
    (out / "class_images").mkdir()
    Image.new("RGB", (64, 64), "gray").save(out / "class_images" / "0.png")
    write_summary(out, lora=False)
    return out


def make_lora_output(out: Path, seed: int = 0) -> Path:
    """A 'trained' LoRA run: rank-4 adapters on the tiny UNet with non-zero weights."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out.mkdir(parents=True, exist_ok=True)
    unet = build_tiny_components().unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=layers, weight_name=LORA_WEIGHTS_FILE,
                                              safe_serialization=True)
    write_summary(out, lora=True)
    return out
