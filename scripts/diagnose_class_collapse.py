"""Where does the class's variety go? Draw "a toy" from a trained model with parts of the base model put back.

For a DreamBooth output folder or one of its checkpoints, DIV of "a toy" (`toyworld.diversity`, 16 seeds) with:
the trained model as it is; classifier-free guidance off (guidance 1); the base model's text encoder for the
unconditional ("") embedding only; the base model's text encoder for both embeddings (only the UNet trained).

    PYTHONPATH=. python scripts/diagnose_class_collapse.py /tmp/run/checkpoints/checkpoint-000800
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import toyworld  # noqa: E402  (scripts/toyworld.py, next to this file)


def embed(pipeline, prompt: str, count: int) -> torch.Tensor:
    ids = pipeline.tokenizer([prompt] * count, padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipeline.text_encoder(ids)[0]


def draw(pipeline, count: int, guidance: float, prompt_embeds=None, negative_embeds=None, steps: int = 20):
    """`count` pictures of "a toy", picture i from seed CLASS_SEED + i, as toyworld.generate draws them."""
    pipeline.set_progress_bar_config(disable=True)
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    generators = [torch.Generator().manual_seed(toyworld.CLASS_SEED + i) for i in range(count)]
    prompt = None if prompt_embeds is not None else [toyworld.CLASS_PROMPT] * count
    with torch.no_grad():
        return pipeline(prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=size,
                        width=size, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a DreamBooth output folder or a checkpoint folder of one")
    parser.add_argument("--base", default="toy")
    parser.add_argument("--seeds", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dreambooth_helpers.checkpoints import pipeline_from_checkpoint

    path = Path(args.model)
    trained = pipeline_from_checkpoint(path) if (path / "state.json").is_file() else toyworld.load_pipeline(args.model)
    base = toyworld.load_pipeline(args.base)
    n, guidance = args.seeds, toyworld.MEASURE_GUIDANCE
    rows = {
        "base model": draw(base, n, guidance),
        "base model, guidance 1": draw(base, n, 1.0),
        "trained": draw(trained, n, guidance),
        "trained, guidance 1": draw(trained, n, 1.0),
        'trained, base text encoder for ""': draw(trained, n, guidance, embed(trained, toyworld.CLASS_PROMPT, n),
                                                  embed(base, "", n)),
        "trained UNet, base text encoder": draw(trained, n, guidance, embed(base, toyworld.CLASS_PROMPT, n),
                                                embed(base, "", n)),
    }
    for name, images in rows.items():
        print(f"{name:38s} DIV {toyworld.diversity(images):.3f}")


if __name__ == "__main__":
    main()
