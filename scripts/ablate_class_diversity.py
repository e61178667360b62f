"""Why does "a toy" lose its variety after DreamBooth? One ablation run of the class-diversity measurement.

DreamBooth with prior preservation on the sample robot (the README's command by default: toy model, 1600 steps,
100 class images, the default recipe), then DIV, PRES and the subject's share before and after, at every
checkpoint (`toyworld.measure_class_diversity`). Settings to change are TrainConfig fields:

    PYTHONPATH=. python scripts/ablate_class_diversity.py --name readme --checkpoint-every 400
    PYTHONPATH=. python scripts/ablate_class_diversity.py --name te-off --set train_text_encoder=false
    PYTHONPATH=. python scripts/ablate_class_diversity.py --name lr5e-5 --set learning_rate=5e-5 --steps 800

Each run appends one JSON line to --out; docs/toy_model.md tabulates them.
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


def parse_setting(text: str) -> tuple[str, object]:
    """"name=value" -> (name, value): true/false, none, numbers, else the text."""
    name, _, value = text.partition("=")
    lowered = value.lower()
    if lowered in ("true", "false"):
        return name, lowered == "true"
    if lowered == "none":
        return name, None
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="what this run is called in the results")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--class-images", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=16, help="pictures per prompt")
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a TrainConfig field")
    parser.add_argument("--work-dir", help="keeps the class images between runs (default: a temporary folder)")
    parser.add_argument("--instance-dir", default=str(ROOT / "sample_data" / "toy_robot"))
    parser.add_argument("--out", default="class_diversity_ablation.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    settings = dict(parse_setting(text) for text in args.set)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        run_dir = work / args.name
        results = toyworld.measure_class_diversity(
            args.instance_dir, str(run_dir), steps=args.steps, num_class_images=args.class_images, count=args.seeds,
            checkpoint_every=args.checkpoint_every, class_dir=str(work / "class_images"), **settings)
    for name, measured in results.items():
        print(f"{args.name:24s} {name:12s} " + "  ".join(f"{k} {v:.3f}" for k, v in measured.items()))
    minutes = (time.time() - started) / 60
    print(f"{minutes:.1f} min")
    with open(args.out, "a") as out:
        out.write(json.dumps({"name": args.name, "steps": args.steps, "class_images": args.class_images,
                              "seeds": args.seeds, "settings": settings, "minutes": round(minutes, 1),
                              "results": results}) + "\n")


if __name__ == "__main__":
    main()
