"""SDXL's side of the memory planner: its sizes, the t4-sdxl preset on a T4's 15 GiB, system RAM, --vae."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dreambooth_helpers import Concept, ConfigError, TrainConfig, load_components, memory
from dreambooth_helpers.memory import GIB, SDXL_SIZE, check_ram, estimate_ram, plan_memory, planning_size

T4_FREE = int(15 * GIB)
COLAB_RAM = int(12.7e9)


def _config(preset="t4-sdxl", **changes) -> TrainConfig:
    return TrainConfig.from_preset(preset, concepts=[Concept("photos", "a photo of sks toy", "a photo of toy")],
                                   **changes)


def test_sdxl_sizes_match_sdxl_built_at_its_real_shapes():
    from accelerate import init_empty_weights

    from dreambooth_helpers.models import build_sdxl_shaped_components

    with init_empty_weights():
        components = build_sdxl_shaped_components()
    counted = memory.model_size(components)
    for name in ("unet", "text_encoder", "vae", "unet_lora_per_rank", "text_lora_per_rank", "largest_tensor"):
        assert getattr(counted, name) == getattr(SDXL_SIZE, name), name
    assert components.native_resolution == SDXL_SIZE.native_resolution == 1024


def test_the_t4_sdxl_preset_fits_a_t4_at_1024_px_by_the_planners_estimate():
    config = _config()
    assert config.model == "stabilityai/stable-diffusion-xl-base-1.0" and config.lora
    plan = plan_memory(config, precision="fp16", use_8bit_adam=True, free_bytes=T4_FREE, size=SDXL_SIZE)
    assert plan.settings.gradient_checkpointing
    assert plan.estimate.peak_reserved <= T4_FREE
    # The estimate, stated (README, docs/sdxl.md): ~8.9 GiB allocated, ~10.5 GiB reserved.
    assert 8.0 * GIB < plan.estimate.peak_allocated < 10.0 * GIB
    # Both text encoders trained too: still within a T4.
    with_text = plan_memory(config.replace(train_text_encoder=True), precision="fp16", use_8bit_adam=True,
                            free_bytes=T4_FREE, size=SDXL_SIZE)
    assert with_text.estimate.peak_reserved <= T4_FREE
    # An 8 GB card cannot hold it, and the refusal names changes that keep SDXL useful (768 px, not SD 1.x's 384).
    with pytest.raises(ConfigError, match="--resolution 768") as refused:
        plan_memory(config, precision="fp16", use_8bit_adam=True, free_bytes=int(7.5 * GIB), size=SDXL_SIZE)
    assert "384" not in str(refused.value)


def test_planning_size_follows_the_family_before_anything_loads(tmp_path):
    # Offline (the tests' HF_HUB_OFFLINE): the Hub cannot be asked, the name says SDXL.
    assert planning_size("stabilityai/stable-diffusion-xl-base-1.0") is SDXL_SIZE
    assert planning_size("stabilityai/sdxl-turbo") is SDXL_SIZE
    assert planning_size("stable-diffusion-v1-5/stable-diffusion-v1-5") is memory.SD1_SIZE
    components = load_components("tiny-sdxl")
    components.family.pipeline(components).save_pretrained(tmp_path / "xl")
    # A local folder is counted from its files' headers: a small SDXL-shaped model is not planned as SDXL's 3.5B.
    counted = planning_size(str(tmp_path / "xl"))
    built = memory.model_size(components)
    assert (counted.unet, counted.text_encoder, counted.vae) == (built.unet, built.text_encoder, built.vae)
    assert counted.native_resolution == SDXL_SIZE.native_resolution
    assert planning_size("tiny-sdxl").native_resolution == 64


def test_system_ram_is_budgeted_and_a_run_that_would_be_killed_is_refused_with_the_fix():
    lora = _config()
    needed = estimate_ram(lora, SDXL_SIZE, "fp16")
    assert needed < COLAB_RAM  # fp16 base: fits free Colab
    assert "GiB needed" in check_ram(lora, SDXL_SIZE, "fp16", available=COLAB_RAM)
    full_fp32 = dataclasses.replace(lora, lora=False)
    assert estimate_ram(full_fp32, SDXL_SIZE, "fp16") > COLAB_RAM  # 13.9 GB of fp32 weights alone
    with pytest.raises(ConfigError, match=r"--lora --mixed-precision fp16"):
        check_ram(full_fp32, SDXL_SIZE, "fp16", available=COLAB_RAM)
    # No word from the machine: no refusal.
    assert check_ram(full_fp32, SDXL_SIZE, "fp16", available=None) is None or memory.ram_available_bytes()


def test_a_vae_folder_replaces_the_models_vae_and_a_bad_one_is_named(tmp_path):
    components = load_components("tiny-sdxl")
    components.vae.save_pretrained(tmp_path / "vae")
    with torch.no_grad():
        next(components.vae.parameters()).add_(1.0)  # a different VAE than the one tiny-sdxl builds
    components.vae.save_pretrained(tmp_path / "other-vae")
    swapped = load_components("tiny-sdxl", vae=str(tmp_path / "other-vae"))
    assert torch.equal(next(swapped.vae.parameters()), next(components.vae.parameters()))
    assert not swapped.vae_needs_fp32
    with pytest.raises(Exception, match="--vae"):
        load_components("tiny-sdxl", vae=str(tmp_path / "missing"))


def test_without_a_gpu_the_ram_refusal_does_not_advise_half_precision():
    with pytest.raises(ConfigError) as refused:
        check_ram(_config(), SDXL_SIZE, "no", available=int(4 * GIB), gpu=False)
    assert "fp32" in str(refused.value) and "--mixed-precision" not in str(refused.value)
