"""Single-file export: original Stable Diffusion key names, and a lossless round trip through diffusers."""

from __future__ import annotations

import gc
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreambooth_helpers.cli import main
from dreambooth_helpers.errors import ConfigError
from dreambooth_helpers.export import export_single_file
from dreambooth_helpers.inference import load_generator
from dreambooth_helpers.models import build_tiny_components, make_pipeline
from tests.trained_fixtures import make_full_output, make_lora_output

torch.set_num_threads(1)


def sd_layout_pipeline():
    """SD 1.5's block structure (4 levels, 2 layers, attention in the first three, widths growing 1:2:3:3 like
    320:640:1280:1280 so the same blocks have skip connections) at a tiny width."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    components = build_tiny_components()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 96, 96),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64), layers_per_block=2, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=unet,
        scheduler=components.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def assert_same_weights(loaded, reference):
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert set(got) == set(want), name
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key}"


def from_single_file(path, config_dir):
    from diffusers import StableDiffusionPipeline

    # `config` points at a local diffusers folder, so nothing is fetched from the Hub.
    return StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)


def test_sd_layout_uses_the_original_key_names_and_round_trips(tmp_path):
    pipeline = sd_layout_pipeline()
    folder = tmp_path / "sd-layout"
    pipeline.save_pretrained(folder)
    path = export_single_file(str(folder), tmp_path / "sd.safetensors")
    keys = set(load_file(path))
    # Names every SD 1.x checkpoint has (AUTOMATIC1111 and ComfyUI look these up).
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.8.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.block.1.conv2.weight",
        "first_stage_model.encoder.down.3.block.1.norm1.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.0.block.2.conv1.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.norm_out.weight",
        "first_stage_model.quant_conv.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in keys, key
    assert load_file(path)["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # a 1x1 conv, as in LDM
    assert not any(".resnets." in k or "down_blocks" in k or k.startswith("unet.") for k in keys)
    assert_same_weights(from_single_file(path, folder), pipeline)


def test_trained_full_model_round_trips(tmp_path):
    from diffusers import StableDiffusionPipeline

    trained = make_full_output(tmp_path / "trained")
    path = export_single_file(str(trained), tmp_path / "trained.safetensors")
    assert_same_weights(from_single_file(path, trained), StableDiffusionPipeline.from_pretrained(trained))


def test_lora_run_is_merged_into_its_base(tmp_path):
    lora_dir = make_lora_output(tmp_path / "lora")
    config_dir = tmp_path / "tiny-config"
    make_pipeline(build_tiny_components()).save_pretrained(config_dir)
    path = export_single_file(str(lora_dir), tmp_path / "merged.safetensors", half_precision=True)
    assert all(t.dtype == torch.float16 for t in load_file(path).values())
    assert not any("lora" in k for k in load_file(path))
    # The same, with the base model and the LoRA folder given apart (what the error for a LoRA folder without
    # a summary advises): the same merged weights.
    apart = export_single_file("tiny", tmp_path / "apart.safetensors", lora=str(lora_dir), half_precision=True)
    assert load_file(apart).keys() == load_file(path).keys()
    assert all(torch.equal(load_file(apart)[k], load_file(path)[k]) for k in load_file(path))
    merged = from_single_file(path, config_dir).to(torch.float32)
    merged.set_progress_bar_config(disable=True)
    with_adapters = load_generator(str(lora_dir))
    settings = dict(num_inference_steps=3, height=64, width=64, output_type="np")
    merged.scheduler = with_adapters.pipeline.scheduler
    got = merged("a photo of sks dog", generator=torch.Generator().manual_seed(0), **settings).images
    want = with_adapters.pipeline("a photo of sks dog", generator=torch.Generator().manual_seed(0), **settings).images
    assert np.abs(got - want).max() < 0.02  # fp16 storage, otherwise the same model


def test_export_cli_and_mistakes(tmp_path, capsys):
    assert main(["export-single-file", "--model", "tiny", "--out", str(tmp_path / "tiny.safetensors")]) == 0
    assert "tiny.safetensors" in capsys.readouterr().out
    assert main(["export-single-file", "--model", "tiny", "--out", str(tmp_path / "tiny.ckpt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        export_single_file("tiny", tmp_path / "x.bin")


# ---------------------------------------------------------------------------- checks first, memory


def test_export_out_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import dreambooth_helpers.export as export

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(export, "load_components", refuse)
    folder = tmp_path / "exports.safetensors"  # a folder, however it is named
    folder.mkdir()
    assert main(["export-single-file", "--model", "tiny", "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a folder" in err and "model.safetensors" in err
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert main(["export-single-file", "--model", "tiny", "--out", str(a_file / "model.safetensors")]) == 2
    assert "cannot be made" in capsys.readouterr().err
    assert main(["export-single-file", "--model", "tiny", "--out", str(tmp_path / "model.ckpt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    if os.path.isdir("/proc/self"):  # a place no one (not even root) can make files in
        assert main(["export-single-file", "--model", "tiny", "--out", "/proc/exports/model.safetensors"]) == 2
        assert "cannot write in '/proc'" in capsys.readouterr().err


def test_conversion_keeps_the_models_own_tensors_and_writing_clones_nothing(tmp_path, monkeypatch):
    """Renaming keys and reshaping the VAE's attention weights are views of the loaded weights; the writer streams
    them (fp16 conversion one tensor at a time), so no second copy of the model is ever made."""
    from dreambooth_helpers.export import convert_to_original_layout, write_checkpoint

    components = build_tiny_components()
    own = {t.untyped_storage().data_ptr() for m in (components.unet, components.vae, components.text_encoder)
           for t in m.state_dict().values()}
    checkpoint = convert_to_original_layout(components.unet, components.vae, components.text_encoder)
    assert {t.untyped_storage().data_ptr() for t in checkpoint.values()} <= own
    reference = {key: tensor.detach().clone() for key, tensor in checkpoint.items()}

    def no_clone(self, *args, **kwargs):
        raise AssertionError("export cloned a tensor")

    monkeypatch.setattr(torch.Tensor, "clone", no_clone)
    write_checkpoint(components, tmp_path / "fp32.safetensors")
    write_checkpoint(components, tmp_path / "fp16.safetensors", half_precision=True)
    monkeypatch.undo()
    fp32, fp16 = load_file(tmp_path / "fp32.safetensors"), load_file(tmp_path / "fp16.safetensors")
    assert fp32.keys() == fp16.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(fp32[key], tensor), key
        assert fp16[key].dtype == torch.float16 and torch.equal(fp16[key], tensor.half()), key
    assert not list(tmp_path.glob(".*partial"))  # written beside the target, then renamed


def _rss_status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("half", [False, True])
def test_export_peak_memory_stays_near_one_model(tmp_path, half):
    """The memory the export adds on top of the loaded model (peak RSS, reset after loading) stays far below the
    model's size: before issue 14 every tensor was cloned, adding a whole model (half one with --half)."""
    from diffusers import UNet2DConditionModel

    from dreambooth_helpers.export import write_checkpoint

    components = build_tiny_components()
    torch.manual_seed(0)
    # SD 1.5's block layout at a width that makes the model ~90 MB: large against the noise of the process.
    components.unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 192, 192),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32)
    model_bytes = sum(t.numel() * t.element_size() for m in (components.unet, components.vae, components.text_encoder)
                      for t in m.state_dict().values())
    assert model_bytes > 60 * 2**20
    gc.collect()
    before = _rss_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    write_checkpoint(components, tmp_path / "model.safetensors", half_precision=half)
    extra = _rss_status("VmHWM") - before
    assert extra < 0.25 * model_bytes, f"export added {extra / 2**20:.0f} MiB to a {model_bytes / 2**20:.0f} MiB model"
    assert (tmp_path / "model.safetensors").stat().st_size > model_bytes * (0.45 if half else 0.95)
