"""Check the toy model's default LoRA learning rate (config.TOY_LEARNING_RATES["lora"]).

LoRA DreamBooth on the sample robot with prior preservation, then the same colour distances as
scripts/measure_toy_model.py: "a sks toy" should move towards the photos, "a toy" should not.

    PYTHONPATH=. python scripts/check_toy_lora.py [--learning-rate 1e-3] [--steps 800]
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from dreambooth_helpers import toyworld
from dreambooth_helpers.config import Concept, TrainConfig
from dreambooth_helpers.data import load_instance_images
from dreambooth_helpers.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the config's for the toy model")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--images", type=int, default=32, help="pictures per prompt")
    parser.add_argument("--instance-dir", default="sample_data/toy_robot")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sample_steps = 15

    base = toyworld.load_pipeline("toy")
    resolution = base.unet.config.sample_size * base.vae_scale_factor
    photos, _ = load_instance_images(args.instance_dir, resolution)
    instances = toyworld.vae_round_trip(base, photos)
    subject, toy = [toyworld.SUBJECT_PROMPT] * args.images, [toyworld.CLASS_PROMPT] * args.images
    base_toy = toyworld.generate(base, toy, seed=10_000, steps=sample_steps)
    sks_base = toyworld.set_distance(toyworld.generate(base, subject, seed=0, steps=sample_steps), instances)

    with tempfile.TemporaryDirectory() as work:
        config = TrainConfig.from_preset(
            "t4-lora", model="toy", output_dir=str(Path(work, "out")), max_train_steps=args.steps,
            resolution=resolution, num_class_images=32, learning_rate=args.learning_rate,
            concepts=[Concept(args.instance_dir, toyworld.SUBJECT_PROMPT, toyworld.CLASS_PROMPT,
                              str(Path(work, "class_images")))],
            mixed_precision="no", use_8bit_adam=False, gradient_checkpointing=False, seed=0,
            class_images_steps=sample_steps,
        )
        started = time.perf_counter()
        output_dir = train(config, progress=False).output_dir
        seconds = time.perf_counter() - started
        trained = toyworld.load_pipeline("toy")
        trained.load_lora_weights(str(output_dir))
        sks_after = toyworld.set_distance(toyworld.generate(trained, subject, seed=0, steps=sample_steps), instances)
        toy_after = toyworld.generate(trained, toy, seed=10_000, steps=sample_steps)

    print(f"training (incl. class images): {seconds:.0f} s")
    print(f'"a sks toy" to the photos: {sks_base:.3f} -> {sks_after:.3f}')
    print(f'"a toy" to the photos after: {toyworld.set_distance(toy_after, instances):.3f}; '
          f"to the base model's \"a toy\": {toyworld.set_distance(toy_after, base_toy):.3f}")


if __name__ == "__main__":
    main()
