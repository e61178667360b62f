"""FLOPs of one DreamBooth training step: this project's step against the anchor's, on any machine.

    PYTHONPATH=. python benchmarks/step_flops.py                      # SD 1.5-shaped, 512 px, seconds on a CPU
    PYTHONPATH=. python benchmarks/step_flops.py --model tiny --out /tmp/flops

FLOPs are hardware-independent, so the issue's "FLOPs per step <= 0.85x the anchor's" can be measured without
a GPU. The models are built on PyTorch's `meta` device: every operation has its real shapes but no data, so
`torch.utils.flop_counter.FlopCounterMode` counts an SD 1.5-sized step in seconds and in no memory.

"Ours" is the step `training.train()` runs (its `set_up_trainable` prepares the models): latents are cached once
before training (no VAE encoder in the step) and a frozen text encoder's embeddings are cached too. "Anchor" is
what diffusers' `train_dreambooth.py` / `train_dreambooth_lora.py` run each step with their defaults: the VAE
encodes the batch's photos and the text encoder encodes the prompts every step. Both: batch 1 + one class image
(prior preservation), the UNet forward and backward, the text encoder's backward when it trains, and the
forward recomputed under gradient checkpointing. `tests/test_benchmark.py` checks that "ours" counted here
equals the count the memory/speed benchmark takes inside the real `train()` loop.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dreambooth_helpers import Concept, TrainConfig
from dreambooth_helpers.memory import GIB, plan_memory, planning_size
from dreambooth_helpers.models import load_components
from dreambooth_helpers.training import Runtime, quiet_library_logs, set_up_trainable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_memory_speed import ROWS, flop_counter  # noqa: E402  (the same matrix and counter)

T4_FREE_GIB = 15.0  # what the `t4` preset's memory planner sees on a free Colab T4


def count_step_flops(config: TrainConfig, gradient_checkpointing: bool, anchor: bool, device: str = "meta") -> int:
    """FLOPs of one training step of `config` (its model, resolution, batch, prior preservation, LoRA, text encoder).

    On "meta" nothing is computed. Attention there runs PyTorch's reference path, whose backward does not
    recompute the attention scores as the fused CUDA/CPU kernels do: one q.k product per attention layer less,
    on both sides of the comparison (~3% of an SD 1.5 step).
    """
    with torch.device(device):
        components = load_components(config.model, seed=config.seed)
    unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
    runtime = Runtime(device, "no", False, False, [], gradient_checkpointing, False)
    # fp32 everywhere: a FLOP count does not depend on the dtype, and meta kernels refuse mixed dtypes.
    set_up_trainable(unet, text_encoder, vae, config, runtime, device, torch.float32)
    unet.train()
    text_encoder.train(config.train_text_encoder)

    resolution = config.resolution or components.native_resolution
    images = config.train_batch_size * (2 if config.with_prior_preservation else 1)
    latent_size = resolution // components.vae_scale_factor
    input_ids = torch.zeros(images, components.tokenizer.model_max_length, dtype=torch.long, device=device)
    timesteps = torch.zeros(images, dtype=torch.long, device=device)
    with flop_counter() as counter:
        if anchor:
            with torch.no_grad():
                pixels = torch.zeros(images, 3, resolution, resolution, device=device)
                latents = vae.encode(pixels).latent_dist.sample()
        else:
            latents = torch.zeros(images, vae.config.latent_channels, latent_size, latent_size, device=device)
        if config.train_text_encoder:
            hidden = text_encoder(input_ids)[0]
        elif anchor:
            with torch.no_grad():
                hidden = text_encoder(input_ids)[0]
        else:
            hidden = torch.zeros(images, input_ids.shape[1], text_encoder.config.hidden_size, device=device)
        prediction = unet(latents, timesteps, hidden).sample
        torch.nn.functional.mse_loss(prediction, torch.zeros_like(prediction)).backward()
    return int(counter.get_total_flops())


def t4_checkpointing(config: TrainConfig) -> bool:
    """Whether the `t4` preset's planner turns gradient checkpointing on with a free T4's 15 GiB (fp16, 8-bit Adam)."""
    plan = plan_memory(config, precision="fp16", use_8bit_adam=True, free_bytes=int(T4_FREE_GIB * GIB),
                       size=planning_size(config.model))
    return plan.settings.gradient_checkpointing


def measure(model: str, rows: list[str]) -> list[dict]:
    results = []
    for name in rows:
        config = TrainConfig.from_preset("t4", model=model, concepts=[Concept("photos", "a sks dog", "a dog")],
                                         **ROWS[name])
        flops = {(ckpt, anchor): count_step_flops(config, ckpt, anchor) for ckpt in (False, True)
                 for anchor in (False, True)}
        t4_ckpt = t4_checkpointing(config)
        results.append({
            "row": name,
            "ours_tflop": flops[False, False] / 1e12, "ours_ckpt_tflop": flops[True, False] / 1e12,
            "anchor_tflop": flops[False, True] / 1e12, "anchor_ckpt_tflop": flops[True, True] / 1e12,
            "t4_plan_checkpointing": t4_ckpt,
            # the bar: the `t4` preset's step against the anchor's fastest (no checkpointing)
            "t4_vs_anchor_fastest": flops[t4_ckpt, False] / flops[False, True],
            # like for like: both without / both with checkpointing
            "ratio_no_ckpt": flops[False, False] / flops[False, True],
            "ratio_ckpt": flops[True, False] / flops[True, True],
        })
    return results


def to_markdown(model: str, results: list[dict]) -> str:
    lines = [f"FLOPs per training step, {model}, batch 1 + 1 class image (FlopCounterMode on meta tensors)", "",
             "| row | ours TFLOP | anchor TFLOP | ours / anchor | ours ckpt | anchor ckpt | ours / anchor (ckpt) "
             "| `t4` plan (15 GiB) | `t4` / anchor fastest |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        plan = "checkpointing" if r["t4_plan_checkpointing"] else "no checkpointing"
        lines.append(f"| {r['row']} | {r['ours_tflop']:.4g} | {r['anchor_tflop']:.4g} | {r['ratio_no_ckpt']:.2f} "
                     f"| {r['ours_ckpt_tflop']:.4g} | {r['anchor_ckpt_tflop']:.4g} | {r['ratio_ckpt']:.2f} "
                     f"| {plan} | **{r['t4_vs_anchor_fastest']:.2f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-random", help='"sd15-random" (SD 1.5 shapes) or "tiny"')
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    parser.add_argument("--out", help="also write results.md and results.json here")
    args = parser.parse_args(argv)
    with quiet_library_logs():
        results = measure(args.model, args.rows.split(","))
    table = to_markdown(args.model, results)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table)
        (out / "results.json").write_text(json.dumps({"model": args.model, "rows": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
