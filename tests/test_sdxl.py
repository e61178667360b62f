"""SDXL through the one training loop, on `tiny-sdxl` (SDXL's structure built in code: two text encoders, the
`text_time` added embedding): what trains, the size conditioning, resume, the files other tools read back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dreambooth_helpers import ConfigError, load_components
from dreambooth_helpers import checkpoints as ckpt
from dreambooth_helpers.data import prepare_image_and_geometry
from dreambooth_helpers.families import SD1, SDXL, family_of
from dreambooth_helpers.files import LORA_WEIGHTS_FILE, SUMMARY_FILE
from dreambooth_helpers.training import Runtime, _make_examples, resolve_runtime, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def sdxl_config(make_config):
    def make(**overrides):
        settings = dict(model="tiny-sdxl", lora=True, lora_rank=4, learning_rate=1e-3, train_text_encoder=True)
        settings.update(overrides)
        return make_config(**settings)

    return make


@pytest.fixture(scope="module")
def trained_sdxl(tmp_path_factory):
    """One short tiny-sdxl LoRA run with both text encoders (shared: several tests read its files)."""
    from dreambooth_helpers import Concept, TrainConfig
    from tests.conftest import draw_subject

    root = tmp_path_factory.mktemp("sdxl")
    photos = root / "photos"
    photos.mkdir()
    for i in range(3):
        draw_subject(photos / f"p{i}.png", i, size=(96, 72))  # landscape: cropped at the sides
    config = TrainConfig.from_preset(
        "t4", concepts=[Concept(str(photos), "a photo of sks dog", "a photo of dog")], output_dir=str(root / "out"),
        model="tiny-sdxl", lora=True, lora_rank=4, learning_rate=1e-2, train_text_encoder=True, resolution=32,
        num_class_images=2, class_images_steps=2, max_train_steps=4, mixed_precision="no", sample_steps=2,
        checkpoint_every=2)
    return train(config, progress=False), config


def test_family_is_detected_for_built_in_names_folders_and_single_files(tmp_path):
    assert family_of("tiny-sdxl") is SDXL and family_of("tiny") is SD1 and family_of("toy") is SD1
    components = load_components("tiny-sdxl")
    pipeline = components.family.pipeline(components)
    pipeline.save_pretrained(tmp_path / "xl")
    assert family_of(str(tmp_path / "xl")) is SDXL
    loaded = load_components(str(tmp_path / "xl"))
    assert loaded.family is SDXL and loaded.tokenizer_2 is not None
    assert type(loaded.text_encoder.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    # Without model_index.json the UNet's "text_time" embedding still says SDXL.
    (tmp_path / "xl" / "model_index.json").unlink()
    assert family_of(str(tmp_path / "xl")) is SDXL
    # A single file: its keys say which (read from the header; no tensor is loaded).
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, tmp_path / "xl.safetensors")
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)},
              tmp_path / "sd.safetensors")
    assert family_of(str(tmp_path / "xl.safetensors")) is SDXL
    assert family_of(str(tmp_path / "sd.safetensors")) is SD1


def test_time_ids_are_each_photos_original_size_and_crop_as_cut(sdxl_config):
    landscape = Image.new("RGB", (100, 60), "white")  # (width, height)
    portrait = Image.new("RGB", (40, 90), "white")
    image, geometry = prepare_image_and_geometry(landscape, 64)
    assert image.size == (64, 64)
    # Scaled so the short side is 64: 107 x 64; the centre crop starts 21 px in from the left.
    assert geometry.original == (60, 100) and geometry.crop_top_left == (0, 21)
    assert geometry.mirrored(64).crop_top_left == (0, 107 - 21 - 64)
    _, tall = prepare_image_and_geometry(portrait, 64)
    assert tall.original == (90, 40) and tall.crop_top_left == ((144 - 64) // 2, 0)
    _, padded = prepare_image_and_geometry(landscape, 64, crop="pad")
    assert padded.original == (60, 100) and padded.crop_top_left == (0, 0)

    components = load_components("tiny-sdxl")
    config = sdxl_config(random_flip=True, resolution=64)
    runtime = Runtime("cpu", "no", False, False, [])
    examples = _make_examples([prepare_image_and_geometry(landscape, 64)], "a photo of sks dog", components, config,
                              runtime)
    assert examples[0].input_ids.shape == (2, 77)  # one row per tokenizer
    assert examples[0].time_ids.tolist() == [[60, 100, 0, 21, 64, 64], [60, 100, 0, 22, 64, 64]]


def test_the_unet_gets_each_photos_time_ids_and_the_pooled_prompt(sdxl_config, tmp_path):
    photos = tmp_path / "odd"
    photos.mkdir()
    Image.new("RGB", (96, 48), (200, 30, 30)).save(photos / "wide.png")
    from dreambooth_helpers import Concept

    seen = []
    original_forward = type(load_components("tiny-sdxl").unet).forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
        seen.append({k: v.detach().clone() for k, v in added_cond_kwargs.items()})
        return original_forward(self, sample, timestep, encoder_hidden_states, *args,
                                added_cond_kwargs=added_cond_kwargs, **kwargs)

    config = sdxl_config(concepts=[Concept(str(photos), "a photo of sks dog", "a photo of dog")],
                         with_prior_preservation=False, max_train_steps=2, resolution=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(load_components("tiny-sdxl").unet), "forward", spy)
        train(config, progress=False)
    training_calls = [call for call in seen if call["time_ids"].shape[0] == 1]
    assert training_calls
    # 96 x 48 scaled to 64 x 32, centre crop from x = 16.
    assert training_calls[0]["time_ids"].tolist() == [[48.0, 96.0, 0.0, 16.0, 32.0, 32.0]]
    assert training_calls[0]["text_embeds"].shape == (1, 32)


def test_lora_run_changes_only_adapters_and_diffusers_reads_every_part(trained_sdxl):
    from diffusers import StableDiffusionXLPipeline

    result, config = trained_sdxl
    out = result.output_dir
    assert (out / LORA_WEIGHTS_FILE).is_file() and not (out / "model_index.json").exists()
    assert not list(out.glob("lora_*.safetensors"))  # resume-only copies stay in the checkpoints
    # weight_name: diffusers < 0.42 (Colab's 0.39) refuses to guess it offline, even for a folder.
    state, _alphas = StableDiffusionXLPipeline.lora_state_dict(str(out), weight_name=LORA_WEIGHTS_FILE)
    assert {key.split(".")[0] for key in state} == {"unet", "text_encoder", "text_encoder_2"}
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["family"] == "sdxl" and summary["base_model"] == "tiny-sdxl"

    # Applying the adapters changes the model; the base weights under them are the base model's.
    base = load_components("tiny-sdxl")
    pipeline = base.family.pipeline(base)
    before = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    pipeline.load_lora_weights(str(out), weight_name=LORA_WEIGHTS_FILE)
    lora_keys = [k for k in pipeline.unet.state_dict() if "lora" in k]
    assert lora_keys
    for key, value in pipeline.unet.state_dict().items():
        plain = key.replace(".base_layer", "")
        if "lora" not in key and plain in before:
            assert torch.equal(value, before[plain])
    trained = load_file(out / LORA_WEIGHTS_FILE)
    assert max(t.abs().max().item() for k, t in trained.items() if ".up." in k or "lora_B" in k) > 0


def test_generate_from_the_run_with_the_sdxl_pipeline(trained_sdxl, tmp_path):
    result, _ = trained_sdxl
    run = subprocess.run([sys.executable, "-m", "dreambooth_helpers", "generate", "--model", str(result.output_dir),
                          "--prompt", "a photo of sks dog", "--num-images", "2", "--steps", "2", "--seed", "3",
                          "--out", str(tmp_path / "images")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    images = sorted((tmp_path / "images").glob("*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (32, 32)


def test_webui_export_has_kohya_keys_and_diffusers_draws_the_same_images(trained_sdxl, tmp_path):
    from dreambooth_helpers.export import export_single_file

    result, _ = trained_sdxl
    out = export_single_file(None, tmp_path / "subject.safetensors", lora=str(result.output_dir))
    exported = load_file(out)
    prefixes = {key.split("_", 2)[0] + "_" + key.split("_", 2)[1] for key in exported}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    alphas = [k for k in exported if k.endswith(".alpha")]
    downs = [k for k in exported if k.endswith(".lora_down.weight")]
    assert len(alphas) == len(downs) > 0
    assert all(float(exported[k]) == 4.0 for k in alphas)  # trained with alpha = rank 4
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for k in exported)

    import diffusers
    from packaging.version import Version

    if Version(diffusers.__version__) < Version("0.42"):
        # diffusers 0.39 (Colab's) cannot read any kohya-layout text-encoder LoRA under transformers 5: its rank lookup
        # expects CLIP module names with "text_model." that transformers 5 no longer has (IndexError in
        # get_peft_kwargs). The layout above is what the web UIs read; the read-back runs on diffusers >= 0.42.
        return

    def draw(lora_file: Path):
        base = load_components("tiny-sdxl")
        pipeline = base.family.pipeline(base)
        pipeline.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return pipeline("a photo of sks dog", num_inference_steps=3, height=32, width=32, generator=generator,
                        output_type="np").images[0]

    original, webui = draw(result.output_dir / LORA_WEIGHTS_FILE), draw(out)
    assert abs(original - webui).max() < 2e-3  # the export stores fp16: its rounding, no more
    # And through the command line, the flag users type.
    run = subprocess.run([sys.executable, "-m", "dreambooth_helpers", "export-single-file", "--lora",
                          str(result.output_dir), "--out", str(tmp_path / "cli.safetensors")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert set(load_file(tmp_path / "cli.safetensors")) == set(exported)


def test_resume_continues_exactly(sdxl_config, tmp_path):
    straight = sdxl_config(output_dir=str(tmp_path / "straight"), max_train_steps=4, checkpoint_every=2)
    train(straight, progress=False)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight/checkpoints/checkpoint-000002", resumed_dir / "checkpoints/checkpoint-000002")
    shutil.copytree(tmp_path / "straight/class_images", resumed_dir / "class_images")
    assert {p.name for p in (resumed_dir / "checkpoints/checkpoint-000002").glob("lora_*")} == {
        "lora_unet.safetensors", "lora_text_encoder.safetensors", "lora_text_encoder_2.safetensors"}
    train(straight.replace(output_dir=str(resumed_dir), resume="latest"), progress=False)
    a, b = load_file(tmp_path / "straight" / LORA_WEIGHTS_FILE), load_file(resumed_dir / LORA_WEIGHTS_FILE)
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def _held_out_loss(components, photos: Path, lora: Path | None = None) -> float:
    """Denoising error on the photos at fixed noise and timesteps that training never drew (with the LoRA applied)."""
    from dreambooth_helpers.data import images_to_tensor, load_instance_images

    if lora is not None:
        components.family.pipeline(components).load_lora_weights(str(lora), weight_name=LORA_WEIGHTS_FILE)
    images, _ = load_instance_images(photos, 32)
    generator = torch.Generator().manual_seed(12345)
    family = components.family
    with torch.no_grad():
        latents = components.vae.encode(images_to_tensor(images)).latent_dist.mean
        latents = latents * components.vae.config.scaling_factor
        prompt = family.encode(components.text_encoder,
                               torch.stack([family.tokenize(components, "a photo of sks dog")] * len(images)))
        time_ids = torch.stack([family.time_ids((96, 96), (0, 0), (32, 32))] * len(images))
        total = 0.0
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
            noisy = components.noise_scheduler.add_noise(latents, noise, t)
            predicted = components.unet(noisy, t, prompt.hidden,
                                        added_cond_kwargs=family.added_conditions(prompt, time_ids)).sample
            total += torch.nn.functional.mse_loss(predicted, noise).item()
    return total / 8


def test_training_lowers_the_held_out_loss_on_the_photos(sdxl_config, instance_dir):
    # UNet LoRA only on a random tiny-sdxl: measured 1.098 -> 0.998 (-9%) after 30 steps; the adapters on the
    # attention layers of a random UNet plateau near 0.99, so the bar is a 5% fall.
    result = train(sdxl_config(with_prior_preservation=False, max_train_steps=30, learning_rate=3e-2, lora_rank=8,
                               train_text_encoder=False), progress=False)
    before = _held_out_loss(load_components("tiny-sdxl"), instance_dir)
    after = _held_out_loss(load_components("tiny-sdxl"), instance_dir, result.output_dir)
    assert after < 0.95 * before, (before, after)


def test_a_full_sdxl_fine_tune_is_refused_before_loading(sdxl_config):
    with pytest.raises(ConfigError, match="--lora"):
        resolve_runtime(sdxl_config(lora=False), cuda_available=False)


def test_checkpoint_files_name_each_text_encoder(trained_sdxl):
    result, _ = trained_sdxl
    newest = ckpt.list_checkpoints(result.output_dir)[-1]
    assert (newest / "lora_text_encoder_2.safetensors").is_file()
