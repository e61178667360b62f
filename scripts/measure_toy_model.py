"""Measure the toy model as issue 5 asks, and print the numbers docs/toy_model.md reports.

(a) prompt following on held-out captions, against chance;
(b) DreamBooth on sample_data/toy_robot: how close "a sks toy" comes to the robot photos;
(c) language drift: where "a toy" goes with and without prior preservation;
(d) class diversity: DIV of "a toy" (div_*) and how often "a sks toy" shows the robot (subject_*).

    python scripts/measure_toy_model.py                 # the shipped model, ~7 min on one CPU core
    python scripts/measure_toy_model.py --model /tmp/my_toy_model --steps 800 --learning-rate 2e-4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import toyworld  # noqa: E402  (scripts/toyworld.py, next to this file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toy", help='"toy" (the shipped model) or a diffusers folder')
    parser.add_argument("--instance-dir", default=str(ROOT / "sample_data" / "toy_robot"))
    parser.add_argument("--captions", type=int, default=96, help="held-out captions for (a)")
    parser.add_argument("--images", type=int, default=32, help='pictures per prompt for (b) and (c)')
    parser.add_argument("--steps", type=int, default=1600, help="DreamBooth training steps")
    parser.add_argument("--class-images", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the config's for the toy model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    following = toyworld.measure_prompt_following(toyworld.load_pipeline(args.model), count=args.captions)
    print(f"(a) prompt following on {args.captions} held-out captions (accuracy vs chance):")
    for attribute, accuracy in following["agreement"].items():
        print(f"    {attribute:10s} {accuracy:.2f}  (chance {following['chance'][attribute]:.2f})")

    with tempfile.TemporaryDirectory() as work:
        distances = toyworld.measure_dreambooth(args.instance_dir, work, model=args.model, steps=args.steps,
                                                count=args.images, num_class_images=args.class_images,
                                                learning_rate=args.learning_rate)
    print("(b), (c) colour-histogram distance (0 = same colours, 1 = none shared); (d) div_*, subject_*:")
    for name, value in distances.items():
        print(f"    {name:28s} {value:.3f}")
    print(f"{(time.time() - started) / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"arguments": vars(args), "prompt_following": following,
                                               "distances": distances}, indent=2))


if __name__ == "__main__":
    main()
