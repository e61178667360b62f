"""What comes after `train()`: its real output folders feed generation, publishing and single-file export."""

import json

import numpy as np
import pytest
import torch

from dreambooth_helpers.export import export_single_file
from dreambooth_helpers.hub import build_model_card, stage_for_upload
from dreambooth_helpers.inference import load_generator
from dreambooth_helpers.training import train

torch.set_num_threads(1)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_trained_output_folder_generates_publishes_and_exports(make_config, tmp_path, lora):
    config = make_config(lora=lora, sample_every=4, sample_prompts=["a photo of sks dog"])
    result = train(config, progress=False)
    output = result.output_dir
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["lora"] is lora

    generator = load_generator(str(output))
    assert generator.default_resolution == 32 and (generator.lora is not None) is lora
    images = generator.generate("a photo of sks dog", steps=2, seed=0, num_images=2)
    assert [im.image.size for im in images] == [(32, 32)] * 2

    files = stage_for_upload(output, tmp_path / "stage", "alice/sks-dog")
    assert "README.md" in files and "grid.png" in files
    assert ("pytorch_lora_weights.safetensors" in files) is lora
    assert ("unet/diffusion_pytorch_model.safetensors" in files) is not lora
    assert not any(f.startswith(("checkpoint", "class_images", ".saving")) for f in files)
    card = str(build_model_card(output, "alice/sks-dog"))
    assert "instance_prompt: a photo of sks dog" in card and "| Training steps | 4 |" in card

    exported = export_single_file(str(output), tmp_path / "model.safetensors")
    from safetensors.torch import load_file

    weights = load_file(exported)
    unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    trained_q = generator.pipeline.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    # The exported UNet is the trained (for LoRA: merged) one, not the base model.
    assert np.allclose(weights[unet_key].numpy(), trained_q.detach().numpy(), atol=1e-6)
