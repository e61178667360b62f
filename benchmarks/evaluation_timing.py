"""Time the DreamBooth metrics for the paper's protocol: 25 prompts x 4 images.

    PYTHONPATH=. python benchmarks/evaluation_timing.py --shapes tiny   # tiny SD + encoders: generation, metrics
    PYTHONPATH=. python benchmarks/evaluation_timing.py --shapes paper  # metrics only, ViT-S/16 + ViT-B/32 shapes

"paper" builds encoders with the real models' architectures and random weights (no download), so the
time is the real metrics cost; images are random 512 px pictures, since metric time does not depend on
what they show. On a GPU the encoders run in fp16; the device used is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image


def paper_shaped_encoders(device=None):
    """DINO ViT-S/16 and CLIP ViT-B/32 architectures with random weights."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from dreambooth_helpers.eval_encoders import ClipEncoder, DinoImageEncoder, Encoders
    from dreambooth_helpers.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    dino = ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12,
                              num_attention_heads=6, intermediate_size=1536), add_pooling_layer=False)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12),
        projection_dim=512,
    ))
    return Encoders(DinoImageEncoder(dino, name="ViT-S/16-shaped (random)", device=device),
                    ClipEncoder(clip, tokenizer, name="ViT-B/32-shaped (random)", device=device), weights="tiny")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=("tiny", "paper"), default="tiny")
    parser.add_argument("--prompts", type=int, default=25)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--real-images", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dreambooth_helpers.eval_encoders import build_tiny_encoders, real_image_scores, score_images
    from dreambooth_helpers.evaluation import generate_images, generator_fn, paper_prompts

    prompts = paper_prompts("dog", count=args.prompts)
    rng = np.random.default_rng(0)
    size = 64 if args.shapes == "tiny" else 512
    real = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(args.real_images)]
    result = {"shapes": args.shapes, "prompts": len(prompts), "images_per_prompt": args.images_per_prompt,
              "device": "cuda (" + torch.cuda.get_device_name() + ")" if torch.cuda.is_available() else "cpu",
              "threads": args.threads}
    if args.shapes == "tiny":
        from dreambooth_helpers.inference import load_generator

        encoders = build_tiny_encoders()
        generate = generator_fn(load_generator("tiny"), num_inference_steps=25)
        started = time.perf_counter()
        generated = generate_images(generate, prompts, args.images_per_prompt)
        result["generation_s"] = round(time.perf_counter() - started, 2)
    else:
        encoders = paper_shaped_encoders()
        generated = [[Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
                      for _ in range(args.images_per_prompt)] for _ in prompts]
    score_images(generated[:1], prompts[:1], real[:1], encoders)  # warm-up: first-call allocations
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    scores = score_images(generated, prompts, real, encoders)
    real_image_scores(real, encoders)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    result["metrics_s"] = round(time.perf_counter() - started, 2)
    result["images_scored"] = scores.num_images
    result["encoders"] = encoders.description
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
