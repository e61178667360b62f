"""Train the offline `toy` model: a tiny Stable Diffusion learned from scratch on the toy world, on a CPU.

The model uses the standard diffusers and transformers classes (AutoencoderKL, UNet2DConditionModel,
CLIPTextModel, CLIPTokenizer, a DDPM-family scheduler), so everything that loads Stable Diffusion 1.x
loads it too. Two stages:

1. the VAE learns to squeeze 32 px pictures into 16x16x4 latents and back (reconstruction + a little KL);
2. the UNet and the text encoder learn, together, to denoise those latents given the caption, with 10%
   of captions blanked so classifier-free guidance works.

The result is saved as a diffusers folder (~ a few MB of safetensors) in dreambooth_helpers/toy_model/.
Deterministic from --seed on a given machine and torch build.

    python scripts/train_toy_model.py                  # the shipped model (~30 min on one CPU core)
    python scripts/train_toy_model.py --vae-steps 50 --unet-steps 50 --out /tmp/toy_pilot   # a quick pilot
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import toyworld  # noqa: E402  (scripts/toyworld.py, next to this file)

from dreambooth_helpers.models import SD_SCHEDULE, build_tiny_tokenizer  # noqa: E402

# SD 1.x's betas, rescaled so that the last step keeps none of the picture ("zero terminal SNR", Lin et al.,
# 2024), with v-prediction (epsilon is undefined where no signal is left) and sampling that starts at that
# last step. SD's own schedule keeps 6.8% of the signal at its last step: on 16x16 latents the picture's
# mean colour and layout survive that, so a model trained on it reads background and position from the
# noise instead of the caption, and from pure noise at sampling time draws them at random.
TOY_SCHEDULE = dict(SD_SCHEDULE, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                    timestep_spacing="trailing")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "dreambooth_helpers" / "toy_model"


def build_models(vocab_size: int, tokenizer):
    """Untrained VAE (factor-2 downsampling), UNet and text encoder, sized to learn the toy world on a CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=toyworld.RESOLUTION, norm_num_groups=8, mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=toyworld.RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        # Attention only at 8x8 and 4x4: at 16x16 it costs ~4x the whole step on a CPU, and the coarse
        # levels already see the whole picture, which is what colours and positions need.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return vae, unet, text_encoder


def to_model_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1], the VAE's input range."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, pixels: np.ndarray, steps: int, batch_size: int, lr: float, generator: torch.Generator, log):
    """Reconstruction (L1 + MSE) with a small KL term: the latents stay smooth enough for diffusion."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    images = to_model_range(pixels)
    vae.train()
    for step in range(1, steps + 1):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        kl = posterior.kl().mean() / latents[0].numel()
        loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch) + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:  # linear decay to 10% by the end
            group["lr"] = lr * (1.0 - 0.9 * step / steps)
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} kl/elem {kl.item():.3f}")
    vae.eval()


@torch.no_grad()
def encode_all(vae, pixels: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every picture, so the diffusion stage never runs the encoder again."""
    means, stds = [], []
    images = to_model_range(pixels)
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start:start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_diffusion(unet, text_encoder, noise_scheduler, latent_mean, latent_std, token_ids, empty_ids, steps,
                    batch_size, lr, scaling_factor, generator, log, save=None, save_every=0):
    """v-prediction denoising on cached latents, UNet and text encoder trained jointly."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = max(1, steps // 20)
    unet.train()
    text_encoder.train()
    started = time.time()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:  # warm up, then decay linearly to 0: the end state is well settled
            group["lr"] = lr * min(step / warmup, (steps - step + 1) / (steps - warmup + 1))
        index = torch.randint(len(latent_mean), (batch_size,), generator=generator)
        latents = (latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape,
                                                                        generator=generator)) * scaling_factor
        ids = token_ids[index].clone()
        blank = torch.rand(batch_size, generator=generator) < 0.1  # unconditional examples for guidance
        ids[blank] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        context = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, context).sample
        loss = F.mse_loss(prediction, noise_scheduler.get_velocity(latents, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps:
            rate = (time.time() - started) / step
            left = rate * (steps - step) / 60
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({rate:.2f} s/step, ~{left:.0f} min left)")
        if save is not None and save_every and step % save_every == 0 and step < steps:
            save(step)  # an intermediate model, to look at while training goes on
    unet.eval()
    text_encoder.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the diffusers model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset-size", type=int, default=20000)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    # One thread by default: on a shared or busy CPU, several torch threads wait on each other and run
    # ~10x slower than one. Use more on an idle machine (results then differ in the last bits).
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--save-every", type=int, default=0, help="also save OUT-stepN every N UNet steps")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()

    def log(message: str) -> None:
        print(f"[{(time.time() - started) / 60:5.1f} min] {message}", flush=True)

    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    held_out = toyworld.held_out_combinations()
    pixels, captions, _ = toyworld.make_dataset(args.dataset_size, seed=args.seed, exclude=held_out)
    log(f"{len(pixels)} pictures, e.g. {captions[0]!r}; {len(held_out)} (colour, object, background) held out")

    tokenizer = build_tiny_tokenizer()
    vae, unet, text_encoder = build_models(len(tokenizer), tokenizer)
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in
             (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))}
    log(f"parameters: {sizes}")

    # The VAE learns the world and, in equal share, the same scenes in any colours: it must encode new
    # subjects (DreamBooth's whole point), not only what the captions name.
    any_colour = toyworld.make_any_colour_pictures(len(pixels) // 2, seed=args.seed + 2)
    train_vae(vae, np.concatenate([pixels[: len(any_colour)], any_colour]), args.vae_steps, args.vae_batch_size,
              args.vae_lr, generator, log)
    latent_mean, latent_std = encode_all(vae, pixels)
    # Latents enter the UNet with unit variance, as SD's 0.18215 arranges for its own VAE.
    scaling_factor = float(1.0 / latent_mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    log(f"latent scaling factor {scaling_factor:.4f}")

    # The VAE must keep what the captions talk about: read its reconstructions back with the world's checks.
    with torch.no_grad():
        probe = toyworld.make_dataset(256, seed=args.seed + 1)
        decoded = vae.decode(latent_mean_of(vae, probe[0])).sample
        pictures = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    agreement = toyworld.caption_agreement(pictures, [toyworld.caption(scene) for scene in probe[2]])
    log(f"VAE reconstructions agree with their scenes: {agreement}")
    with torch.no_grad():  # and colours outside the palette come back too (mean error in 0-255 units)
        strange = toyworld.make_any_colour_pictures(256, seed=args.seed + 3)
        decoded = vae.decode(latent_mean_of(vae, strange)).sample
        error = ((decoded.clamp(-1, 1) + 1) * 127.5 - to_model_range(strange).add(1).mul(127.5)).abs().mean()
    log(f"VAE error on pictures in any colours: {error.item():.1f} / 255")

    noise_scheduler = DDPMScheduler(**TOY_SCHEDULE, clip_sample=False)
    token_ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    out = Path(args.out)

    def save(step: int | None = None) -> None:
        # DPM-Solver++ draws good pictures in ~20 steps; pipelines read its class from the saved config.
        scheduler = DPMSolverMultistepScheduler(**TOY_SCHEDULE, steps_offset=1)
        pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        folder = out if step is None else out.with_name(f"{out.name}-step{step}")
        pipeline.save_pretrained(folder, safe_serialization=True)
        (folder / "training.json").write_text(json.dumps({
            "script": "scripts/train_toy_model.py", "arguments": vars(args), "parameters": sizes,
            "unet_steps_done": step or args.unet_steps, "minutes": round((time.time() - started) / 60, 1),
            "torch": torch.__version__,
        }, indent=2))
        log(f"saved {folder}")

    train_diffusion(unet, text_encoder, noise_scheduler, latent_mean, latent_std, token_ids, empty_ids,
                    args.unet_steps, args.batch_size, args.lr, scaling_factor, generator, log, save, args.save_every)
    # The shipped UNet and VAE are stored in fp16 (half the download); diffusers loads them back as fp32.
    # The text encoder stays fp32: transformers would load it as fp16, which CPUs cannot train.
    unet.half()
    vae.half()
    save()


def latent_mean_of(vae, pixels: np.ndarray) -> torch.Tensor:
    return vae.encode(to_model_range(pixels)).latent_dist.mean


if __name__ == "__main__":
    main()
