"""Check the toy model's default LoRA learning rate (subject.TOY_LEARNING_RATES["lora"]).

LoRA DreamBooth (preset t4-lora) on the sample robot with prior preservation, measured as
scripts/measure_toy_model.py measures full fine-tuning: "a sks toy" should move towards the photos, "a toy" not,
and "a toy" should stay as varied as the base model's (DIV).

    PYTHONPATH=. python scripts/check_toy_lora.py [--learning-rate 1e-3] [--steps 800]
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
import toyworld  # scripts/toyworld.py, next to this file

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the config's for the toy model")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--images", type=int, default=32, help="pictures per prompt")
    parser.add_argument("--instance-dir", default=str(ROOT / "sample_data" / "toy_robot"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        distances = toyworld.measure_dreambooth(args.instance_dir, work, steps=args.steps, count=args.images,
                                                learning_rate=args.learning_rate, sample_steps=15,
                                                preset="t4-lora", priors=(True,))
    print(f'"a sks toy" to the photos: {distances["sks_base"]:.3f} -> {distances["sks_after_prior"]:.3f}')
    print(f'"a toy" to the photos after: {distances["toy_after_prior"]:.3f}; to the base model\'s "a toy": '
          f'{distances["toy_after_prior_to_base"]:.3f} (two draws of the base: {distances["toy_base_to_base"]:.3f})')
    print(f'"a toy" diversity (DIV): {distances["div_base"]:.3f} -> {distances["div_prior"]:.3f} '
          f'({distances["div_prior"] / distances["div_base"]:.2f}x); "a sks toy" shows the robot in '
          f'{distances["subject_prior"]:.0%} of pictures')
    print(f"{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
