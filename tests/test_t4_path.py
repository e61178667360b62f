"""The path a CUDA user takes, proven without a GPU: torch.cuda mocked as a T4 (sm_75, 15 GiB), an 8 GB card and
an A100, and the fp16 pieces replayed on the CPU. What is tested is each decision the user sees: the precision,
the optimizer and its fallback message, the memory plan, the out-of-memory advice, the disk estimate, and what
the saved model holds (tokenizer files, LoRA alpha, fp32 frozen parts, the text encoder's keys)."""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth_helpers import Concept, ConfigError, TrainConfig, failures, memory, training
from dreambooth_helpers import checkpoints as ckpt
from dreambooth_helpers.errors import TrainingError
from dreambooth_helpers.memory import GIB, SD1_SIZE, MemorySettings, estimate_memory
from dreambooth_helpers.models import (
    FP16_VARIANT,
    base_weights_variant,
    build_tiny_components,
    load_components,
    make_pipeline,
)
from dreambooth_helpers.speedups import StepInBackward, optimizer_state_for

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def mock_gpu(monkeypatch, *, capability: tuple[int, int], total_gib: float, free_gib: float, name: str) -> None:
    """torch.cuda as a real card reports itself. is_bf16_supported() says True on a T4 too (emulation counts)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * GIB), int(total_gib * GIB)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(memory, "_current_plan", None)


@pytest.fixture
def t4(monkeypatch):
    mock_gpu(monkeypatch, capability=(7, 5), total_gib=15.0, free_gib=14.5, name="Tesla T4")


@pytest.fixture
def card_8gb(monkeypatch):
    mock_gpu(monkeypatch, capability=(7, 5), total_gib=8.0, free_gib=7.6, name="NVIDIA GeForce RTX 2070 SUPER")


@pytest.fixture
def a100(monkeypatch):
    mock_gpu(monkeypatch, capability=(8, 0), total_gib=40.0, free_gib=39.0, name="NVIDIA A100-SXM4-40GB")


@pytest.fixture
def bitsandbytes_works(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))


@pytest.fixture
def bitsandbytes_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import` sees when it is not installed


@pytest.fixture
def bitsandbytes_broken(monkeypatch, tmp_path):
    """An installed bitsandbytes whose import fails setting up CUDA (the classic Colab failure)."""
    package = tmp_path / "site" / "bitsandbytes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('CUDA Setup failed despite GPU being available.\\n"
                                         "Inspect the output above')\n")
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.syspath_prepend(str(package.parent))


def sd15(preset: str = "t4", **changes) -> TrainConfig:
    return TrainConfig.from_preset(preset, model=SD15, concepts=[Concept("photos", "a photo of sks dog",
                                                                         "a photo of dog")], **changes)


# ---------------------------------------------------------------------------- 1. precision


def test_bf16_is_refused_on_a_t4_although_torch_says_it_is_supported(t4, bitsandbytes_works):
    assert torch.cuda.is_bf16_supported()  # as on a real Colab T4
    with pytest.raises(ConfigError, match=r"bf16 is not supported by Tesla T4.*8\.0.*--mixed-precision fp16"):
        training.resolve_runtime(sd15(mixed_precision="bf16"), cuda_available=True)
    assert training.resolve_runtime(sd15(), cuda_available=True).mixed_precision == "fp16"


def test_bf16_runs_on_an_a100(a100, bitsandbytes_works):
    assert training.resolve_runtime(sd15("large-gpu"), cuda_available=True).mixed_precision == "bf16"


def test_divergence_advice_suggests_bf16_only_where_the_gpu_has_it(monkeypatch, tmp_path):
    config = sd15()
    mock_gpu(monkeypatch, capability=(7, 5), total_gib=15, free_gib=14, name="Tesla T4")
    on_t4 = training._diverged_message(40, "NaN loss", config, tmp_path)
    assert "bf16" not in on_t4 and "Lower --learning-rate" in on_t4
    mock_gpu(monkeypatch, capability=(8, 9), total_gib=24, free_gib=23, name="NVIDIA L4")
    assert "--mixed-precision bf16" in training._diverged_message(40, "NaN loss", config, tmp_path)


# ---------------------------------------------------------------------------- 2. bitsandbytes


@pytest.mark.parametrize("failure", ["bitsandbytes_missing", "bitsandbytes_broken"])
def test_a_failed_bitsandbytes_is_named_with_its_error_and_true_cost_before_the_planner_refuses(t4, failure, request):
    request.getfixturevalue(failure)
    with pytest.raises(ConfigError) as refused:
        training.resolve_runtime(sd15(), cuda_available=True)
    message = str(refused.value)
    why = "ModuleNotFoundError" if failure == "bitsandbytes_missing" else "RuntimeError: CUDA Setup failed"
    assert message.startswith(f"bitsandbytes failed to load ({why}")
    assert "+~5.5 GiB" in message and "pip install -U bitsandbytes" in message
    assert "8-bit AdamW was planned: with it this run fits" in message
    assert message.index("bitsandbytes") < message.index("This run needs")  # the cause first, the sizes after
    assert "Inspect the output above" not in message  # one line of the error, not the whole setup log


def test_with_a_failed_bitsandbytes_a_run_that_still_fits_says_so_in_a_notice(t4, bitsandbytes_missing):
    runtime = training.resolve_runtime(sd15("t4-lora"), cuda_available=True)
    assert runtime.use_8bit_adam is False
    notice = next(n for n in runtime.notices if n.startswith("bitsandbytes failed to load"))
    assert "LoRA" in notice and "pip install -U bitsandbytes" in notice  # LoRA's small matrices: no real cost


def test_the_extra_memory_of_plain_adamw_is_the_fp32_states_of_what_trains():
    extra = memory.plain_adam_extra_bytes(sd15())
    assert extra == 6 * (SD1_SIZE.unet + SD1_SIZE.text_encoder)  # 8 bytes a parameter instead of 2
    assert 5.4 < extra / GIB < 5.6
    assert "~5.5 GiB" in failures._fallback_training_advice(sd15(use_8bit_adam=False))


# ---------------------------------------------------------------------------- 3. the low-memory preset


def test_low_memory_fits_an_8gb_card_within_6_5_gib_by_its_own_planner(card_8gb, bitsandbytes_works):
    config = sd15("low-memory")
    runtime = training.resolve_runtime(config, cuda_available=True)
    plan = memory.current_plan(config)
    assert plan is not None and plan.estimate.peak_reserved <= 6.5 * GIB
    assert runtime.gradient_checkpointing and runtime.step_in_backward
    assert "low-memory" in config.preset and config.lora
    # A full fine-tune with every saving does not fit 8 GB (the estimate the old preset promised it would).
    with pytest.raises(ConfigError, match="--lora"):
        training.resolve_runtime(sd15("low-memory", lora=False), cuda_available=True)
    mock_gpu_10 = estimate_memory(sd15("low-memory", lora=False), MemorySettings(True, True)).peak_reserved
    assert 8 * GIB < mock_gpu_10 <= 10 * GIB  # what its description says: 10-12 GB cards


def test_t4_gets_the_fastest_plan_and_an_8gb_card_refuses_the_full_t4_preset_naming_low_memory_lora(
        t4, bitsandbytes_works, monkeypatch):
    runtime = training.resolve_runtime(sd15(), cuda_available=True)
    assert not runtime.gradient_checkpointing and not runtime.step_in_backward
    mock_gpu(monkeypatch, capability=(7, 5), total_gib=8, free_gib=7.6, name="RTX 2070")
    with pytest.raises(ConfigError, match="Change this setting: --lora"):
        training.resolve_runtime(sd15(), cuda_available=True)


def test_the_presets_promises_match_the_planner():
    from dreambooth_helpers.config import PRESETS

    low = PRESETS["low-memory"]["description"]
    assert "8 GB" in low and "LoRA" in low and "6.5 GiB" in low
    smallest = memory.candidate_settings(sd15("low-memory"))[-1]
    assert estimate_memory(sd15("low-memory"), smallest).peak_reserved <= 6.5 * GIB
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `low-memory`"))
    assert "LoRA" in row and "8 GB" in row


# ---------------------------------------------------------------------------- 4. out-of-memory advice


def out_of_memory_message(config: TrainConfig) -> str:
    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    return str(failures.training_out_of_memory(error, config))


def test_oom_advice_starts_from_what_the_planner_chose_on_a_t4(t4, bitsandbytes_works):
    config = sd15()  # gradient_checkpointing defaults to True in the config; the planner turns it off on a T4
    training.resolve_runtime(config, cuda_available=True)
    message = out_of_memory_message(config)
    no_checkpointing = estimate_memory(config, MemorySettings(False, False)).peak_allocated / GIB
    assert f"this run needs ~{no_checkpointing:.1f} GiB" in message
    assert "Change this setting: --memory-plan smallest." in message


def test_oom_advice_for_low_memory_does_not_ask_for_what_it_already_runs(card_8gb, bitsandbytes_works):
    config = sd15("low-memory")
    training.resolve_runtime(config, cuda_available=True)
    message = out_of_memory_message(config)
    assert "--memory-plan smallest" not in message and "--gradient-checkpointing" not in message
    assert "--lora" not in message.split("our estimate")[1].split("--resume")[0]
    assert "Change th" in message or "use a GPU with more memory" in message


def test_oom_advice_names_bitsandbytes_when_it_had_failed(monkeypatch, bitsandbytes_missing):
    mock_gpu(monkeypatch, capability=(7, 5), total_gib=24, free_gib=23, name="RTX 3090")
    config = sd15()
    training.resolve_runtime(config, cuda_available=True)
    assert "bitsandbytes did not load): fixing bitsandbytes saves ~5.5 GiB" in out_of_memory_message(config)


# ---------------------------------------------------------------------------- 8. disk and download sizes


def test_the_disk_estimate_counts_8bit_states_at_2_bytes_a_parameter():
    trainable = SD1_SIZE.unet + SD1_SIZE.text_encoder
    eight_bit = ckpt.checkpoint_bytes(trainable, lora=False, eight_bit_adam=True)
    assert 5.4 < eight_bit / GIB < 5.6  # measured: ~5.5 GiB a checkpoint with bitsandbytes
    assert ckpt.checkpoint_bytes(trainable, lora=False, eight_bit_adam=False) / GIB > 10
    plan = ckpt.plan_checkpoints(sd15(checkpoint_every=200), 100 * 10**9, SD1_SIZE, steps=800)
    assert plan.checkpoint_bytes == eight_bit


def test_lora_documented_output_size_matches_the_adapter_count():
    rank8 = 8 * (SD1_SIZE.unet_lora_per_rank + SD1_SIZE.text_lora_per_rank) * 4  # fp32 in the LoRA file
    assert 8.5e6 < rank8 < 9.0e6  # the measured t4-lora file: 8.8 MB
    from dreambooth_helpers.config import PRESETS

    assert "~9 MB" in PRESETS["t4-lora"]["description"]


def test_only_lora_in_fp16_downloads_the_fp16_weights():
    assert base_weights_variant(lora=True, precision="fp16") == FP16_VARIANT
    assert base_weights_variant(lora=False, precision="fp16") is None  # fp32 masters start from fp32 weights
    assert base_weights_variant(lora=True, precision="no") is None


@pytest.fixture(scope="module")
def hub_shaped_model(tmp_path_factory) -> Path:
    """A folder laid out like the Hub's SD 1.5 repository: fp32 and fp16 files per part, a CLIP tokenizer,
    model_index.json naming a safety checker and feature extractor."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    folder = tmp_path_factory.mktemp("sd15-like")
    components = build_tiny_components(seed=3)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=small, projection_dim=16,
                                                      vision_config={**small, "image_size": 32, "patch_size": 16}))
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=components.scheduler, safety_checker=checker,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        requires_safety_checker=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True, variant=FP16_VARIANT)
    return folder


def test_the_fp16_variant_is_read_when_asked_and_loads_in_fp32(hub_shaped_model):
    assert (hub_shaped_model / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    plain = load_components(str(hub_shaped_model))
    half = load_components(str(hub_shaped_model), variant=FP16_VARIANT)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(plain, name).state_dict(), getattr(half, name).state_dict()
        weight = next(k for k, v in a.items() if v.is_floating_point() and v.numel() > 100)
        assert b[weight].dtype == torch.float32
        assert torch.equal(b[weight], a[weight].half().float()) and not torch.equal(b[weight], a[weight])


# ---------------------------------------------------------------------------- 6. what we publish loads elsewhere


class _NoAccelerator:
    @staticmethod
    def unwrap_model(model):
        return model


def test_the_saved_model_has_slow_tokenizer_files_and_the_frozen_parts_fp32_weights(tmp_path):
    from transformers import CLIPTokenizer

    components = build_tiny_components(seed=1)
    original_vae = {k: v.clone() for k, v in components.vae.state_dict().items()}
    original_text = {k: v.clone() for k, v in components.text_encoder.state_dict().items()}
    # As on a GPU with fp16: frozen parts cast to half for training, then the model is saved.
    components.keep_fp32_originals("vae", "text_encoder")
    components.vae.to(torch.float16)
    components.text_encoder.to(torch.float16)
    config = TrainConfig(concepts=[Concept("x", "a sks dog", "a dog")], model="tiny", train_text_encoder=False)
    training._save_final_model(components, _NoAccelerator(), components.unet, None, config, tmp_path)

    for name, original in (("vae", original_vae), ("text_encoder", original_text)):
        saved = {}
        for file in (tmp_path / name).glob("*.safetensors"):
            saved.update(load_file(file))
        assert set(saved) == set(original)
        assert all(torch.equal(saved[k], original[k]) for k in original), f"{name} saved fp16-rounded"

    tokenizer_dir = tmp_path / "tokenizer"
    assert (tokenizer_dir / "vocab.json").is_file() and (tokenizer_dir / "merges.txt").is_file()
    # transformers 4.x's slow CLIPTokenizer reads only these two files: built from them alone, it agrees.
    slow = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    prompt = "a photo of sks dog on the beach"
    assert slow(prompt).input_ids == components.tokenizer(prompt).input_ids


def _lora_unet(alpha: int, rank: int = 4, seed: int = 0):
    from peft import LoraConfig

    components = build_tiny_components(seed=2)
    components.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as after training: lora_B no longer zero, so alpha matters
        for name, parameter in components.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return components


def test_lora_alpha_is_saved_and_a_reloaded_adapter_has_the_trained_strength(tmp_path):
    trained = _lora_unet(alpha=16, rank=4)
    ckpt.save_trainable_weights(tmp_path, trained.unet, None, lora=True)
    latents, timesteps = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(5)), torch.tensor([300])
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = trained.unet(latents, timesteps, hidden).sample
        pipe = make_pipeline(build_tiny_components(seed=2))
        base = pipe.unet(latents, timesteps, hidden).sample
        pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
        reloaded = pipe.unet(latents, timesteps, hidden).sample
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapter changes the output
    torch.testing.assert_close(reloaded, expected, rtol=1e-4, atol=1e-5)


def test_lora_init_is_seeded_so_two_runs_start_the_same(make_config):
    def lora_weights(seed):
        components = build_tiny_components()
        config = make_config(preset="t4-lora", seed=seed)
        runtime = training.Runtime("cpu", "no", False, False, [], gradient_checkpointing=False)
        training.set_up_trainable(components.unet, components.text_encoder, components.vae, config, runtime,
                                  "cpu", torch.float32)
        return {k: v.clone() for m in (components.unet, components.text_encoder)
                for k, v in m.named_parameters() if v.requires_grad}

    torch.manual_seed(123)
    first = lora_weights(seed=0)
    after = torch.rand(1)
    torch.manual_seed(999)  # a different global RNG state must not matter
    second = lora_weights(seed=0)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], v) for k, v in lora_weights(seed=1).items())
    torch.manual_seed(123)
    lora_weights(seed=0)
    assert torch.equal(torch.rand(1), after)  # the caller's RNG is left as it was


def test_text_encoder_weights_in_the_other_key_layout_load_and_foreign_ones_are_refused(tmp_path):
    trained, fresh = build_tiny_components(seed=1), build_tiny_components(seed=2)
    old_layout = {"text_model." + k: v for k, v in trained.text_encoder.state_dict().items()}
    old_layout["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # transformers 4.x kept this buffer
    ckpt.load_text_encoder_weights(fresh.text_encoder, old_layout, tmp_path)
    for k, v in trained.text_encoder.state_dict().items():
        assert torch.equal(fresh.text_encoder.state_dict()[k], v)

    foreign = {"encoder.layers.0.mlp.fc1.weight": torch.zeros(3, 3)}
    with pytest.raises(TrainingError, match="do not fit this model.*missing"):
        ckpt.load_text_encoder_weights(fresh.text_encoder, foreign, tmp_path)


def test_a_checkpoint_with_text_encoder_keys_of_another_layout_resumes_them(tmp_path):
    trained, fresh = build_tiny_components(seed=1), build_tiny_components(seed=2)
    (tmp_path / "text_encoder").mkdir()
    save_file({"text_model." + k: v.contiguous() for k, v in trained.text_encoder.state_dict().items()},
              tmp_path / "text_encoder" / "model.safetensors")
    loaded = ckpt._load_folder_weights(tmp_path / "text_encoder")
    ckpt.load_text_encoder_weights(fresh.text_encoder, loaded, tmp_path / "text_encoder")
    name = "encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(fresh.text_encoder.state_dict()[name], trained.text_encoder.state_dict()[name])


# ---------------------------------------------------------------------------- 7. resume across a plan flip


def _two_groups(components):
    return [{"params": list(components.unet.parameters()), "lr": 1e-3},
            {"params": list(components.text_encoder.parameters()), "lr": 5e-4}]


def _loss(components, seed):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    ids = components.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    hidden = components.text_encoder(ids)[0]
    return components.unet(latents, torch.tensor([200]), hidden).sample.pow(2).mean()


def _parameters(components):
    return [p.detach().clone() for m in (components.unet, components.text_encoder) for p in m.parameters()]


@pytest.mark.parametrize("first_in_backward", [False, True])
def test_resuming_after_the_planner_flips_the_optimizer_step_continues_the_same_training(first_in_backward):
    def make(components, in_backward):
        adamw = lambda groups: torch.optim.AdamW(groups, weight_decay=1e-2)  # noqa: E731
        return StepInBackward(_two_groups(components), adamw) if in_backward else adamw(_two_groups(components))

    def one_step(components, optimizer, seed):
        _loss(components, seed).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reference = build_tiny_components()
    optimizer = make(reference, first_in_backward)
    for step in range(2):
        one_step(reference, optimizer, step)
    saved_weights = [p.clone() for p in _parameters(reference)]
    saved_state = copy.deepcopy(optimizer.state_dict())  # as saved to disk: not changed by later steps
    one_step(reference, optimizer, 2)  # the uninterrupted run's third step

    resumed = build_tiny_components()
    with torch.no_grad():
        for parameter, value in zip((p for m in (resumed.unet, resumed.text_encoder) for p in m.parameters()),
                                    saved_weights, strict=True):
            parameter.copy_(value)
    flipped = make(resumed, not first_in_backward)
    flipped.load_state_dict(optimizer_state_for(flipped, saved_state))
    one_step(resumed, flipped, 2)
    for a, b in zip(_parameters(reference), _parameters(resumed), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- 5. the safety checker


def _saved_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())


@pytest.mark.parametrize("keep", [True, False])
def test_a_full_model_keeps_the_base_safety_checker_unless_turned_off_and_never_silently(hub_shaped_model, tmp_path,
                                                                                         keep):
    from diffusers import StableDiffusionPipeline

    components = load_components(str(hub_shaped_model))
    assert components.safety_checker_in_base and components.safety_checker is None  # loaded only when needed
    config = TrainConfig(concepts=[Concept("x", "a sks dog", "a dog")], model=str(hub_shaped_model),
                         safety_checker=keep)
    training._save_final_model(components, _NoAccelerator(), components.unet, None, config, tmp_path)
    index = _saved_index(tmp_path)
    assert index["requires_safety_checker"] is True  # off: diffusers warns whoever loads it
    if keep:
        assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
        loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
        assert loaded.safety_checker is not None and loaded.feature_extractor is not None
    else:
        assert index["safety_checker"] == [None, None] and not (tmp_path / "safety_checker").exists()


def test_the_notice_says_when_the_safety_checker_is_off(t4, bitsandbytes_works):
    notices = training.resolve_runtime(sd15(safety_checker=False), cuda_available=True).notices
    assert any(n.startswith("Safety checker off (--no-safety-checker)") for n in notices)
    assert not any("Safety checker" in n for n in training.resolve_runtime(sd15(), cuda_available=True).notices)


def test_generation_filters_by_default_and_says_plainly_when_it_does_not(hub_shaped_model):
    from dreambooth_helpers.inference import load_generator

    filtered = load_generator(str(hub_shaped_model), device="cpu")
    assert filtered.pipeline.safety_checker is not None and filtered.safety_note is None
    unfiltered = load_generator(str(hub_shaped_model), device="cpu", safety_checker=False)
    assert unfiltered.pipeline.safety_checker is None
    assert unfiltered.safety_note == "Safety checker off: images are not filtered for NSFW content."
    assert load_generator("tiny", device="cpu").safety_note is None  # the built-in models draw shapes


def test_generate_and_demo_have_the_switch():
    from dreambooth_helpers.cli import build_parser

    parser = build_parser()
    for command in (["generate", "--model", "m", "--prompt", "p", "--out", "o"], ["demo", "--model", "m"]):
        assert parser.parse_args(command).safety_checker is True
        assert parser.parse_args([*command, "--no-safety-checker"]).safety_checker is False
    train = parser.parse_args(["train", "--instance-dir", "x", "--instance-prompt", "a sks dog", "--output-dir", "o",
                               "--no-safety-checker"])
    assert train.safety_checker is False


def test_the_fp16_loss_scale_survives_a_switch_between_the_two_optimizer_steps(tmp_path):
    components = build_tiny_components()
    in_backward = StepInBackward(_two_groups(components), lambda g: torch.optim.AdamW(g), loss_scaling=True)
    torch.save({"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                "_growth_tracker": 3}, tmp_path / "scaler.pt")
    plain_saved = {"state": {}, "param_groups": []}
    state = ckpt.TrainingState(components.unet, None, in_backward, None, None, lora=False)
    ckpt._carry_loss_scale(tmp_path, state, in_backward, plain_saved)
    assert in_backward.loss_scale == 1024.0  # plain -> inside backward: the GradScaler's settled scale

    scaler = torch.amp.GradScaler("cpu")
    state = ckpt.TrainingState(components.unet, None, None, None, scaler, lora=False)
    ckpt._carry_loss_scale(tmp_path / "none", state, torch.optim.AdamW(_two_groups(components)),
                           {"inner": [], "lr": [], "loss_scale": 512.0, "clean_steps": 7})
    assert scaler.get_scale() == 512.0  # inside backward -> plain
