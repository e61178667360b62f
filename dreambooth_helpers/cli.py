"""Command line: `python -m dreambooth_helpers COMMAND ...` or `dreambooth-helpers COMMAND ...`.

Each command is a pair: `_add_<command>(subparsers)` declares its flags, `_run_<command>(args)` calls
the library function that does the work. User mistakes (DreamBoothError) print one paragraph and
exit 2; there is no logic here that the notebook would need.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ATTENTION_BACKENDS, CROP_MODES, LR_SCHEDULERS, MIXED_PRECISIONS, PRESETS, Concept, TrainConfig
from .errors import ConfigError, DreamBoothError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one paragraph and exit code 2, like the library's own errors."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USER_ERROR, f"error: {message}. Run `{self.prog} --help` for the options.\n")


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="Fine-tune a model on your subject with DreamBooth.",
                              description="Fine-tune Stable Diffusion 1.x on a few photos of a subject.")
    what = p.add_argument_group("what to teach")
    what.add_argument("--instance-dir", help="Folder with 3-20 photos of your subject.")
    what.add_argument("--instance-prompt", help='Prompt naming the subject with a rare token: "a photo of sks dog".')
    what.add_argument("--class-prompt", help='The same without the token, for prior preservation: "a photo of dog".')
    what.add_argument("--class-dir", help="Where class images are kept (default: OUTPUT_DIR/class_images/...). "
                      "Existing images are reused; only the missing ones are generated.")
    what.add_argument("--concepts-list", help="JSON file: a list of {instance_dir, instance_prompt, class_prompt, "
                      "class_dir} to teach several subjects in one run (instead of the four flags above).")
    what.add_argument("--output-dir", required=True, help="Folder for the trained model, checkpoints, samples.")
    what.add_argument("--model", default=None, help='Base model: a Hub id (stable-diffusion-v1-5/stable-diffusion-'
                      'v1-5), a local diffusers folder, a .safetensors file, or "tiny" (offline test model; default).')
    what.add_argument("--preset", default="t4", choices=list(PRESETS),
                      help="; ".join(f"{k}: {v['description']}" for k, v in PRESETS.items()))
    data = p.add_argument_group("data")
    data.add_argument("--resolution", type=int, help="Training size in pixels (default: the model's, 512 for SD 1.x).")
    data.add_argument("--crop", choices=CROP_MODES, help="center: crop to a square; pad: keep the whole photo.")
    data.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=None,
                      help="Mirror images at random (not for asymmetric subjects or text).")
    prior = p.add_argument_group("prior preservation")
    prior.add_argument("--prior-preservation", dest="with_prior_preservation",
                       action=argparse.BooleanOptionalAction, default=None,
                       help="Train on generated class images too, so the model keeps knowing the class (default on).")
    prior.add_argument("--num-class-images", type=int, help="How many class images (default 100; paper uses ~200).")
    prior.add_argument("--prior-loss-weight", type=float, help="Weight of the class-image loss (default 1.0).")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max-train-steps", type=int, help="Steps (default: 150 per photo, 400-1600).")
    opt.add_argument("--learning-rate", type=float, help="Default 2e-6 (full) or 1e-4 (LoRA).")
    opt.add_argument("--text-encoder-learning-rate", type=float, help="Default: the same as --learning-rate.")
    opt.add_argument("--lr-scheduler", choices=LR_SCHEDULERS)
    opt.add_argument("--lr-warmup-steps", type=int)
    opt.add_argument("--train-batch-size", type=int, help="Instance images per step (class images come on top).")
    opt.add_argument("--gradient-accumulation-steps", type=int)
    opt.add_argument("--seed", type=int, help="Makes a run repeatable (default 0).")
    opt.add_argument("--use-8bit-adam", action=argparse.BooleanOptionalAction, default=None,
                     help="bitsandbytes 8-bit AdamW: 3/4 less optimizer memory (default on; plain AdamW on CPU).")
    which = p.add_argument_group("which weights train")
    which.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                       help="Train the text encoder too: better likeness, especially for faces (default on).")
    which.add_argument("--stop-text-encoder-training-at", type=int, help="Freeze the text encoder after N steps.")
    which.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                       help="Train small LoRA adapters instead of all weights: ~6 MB output, less memory.")
    which.add_argument("--lora-rank", type=int, help="LoRA rank (default 4; 8-32 for harder subjects).")
    mem = p.add_argument_group("memory and speed")
    mem.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, help="fp16 on T4; bf16 on A100/L4/30xx+.")
    mem.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                     help="Recompute activations in the backward pass: less memory, ~1.5x slower.")
    mem.add_argument("--attention", choices=ATTENTION_BACKENDS, help="auto: xformers if it works, else SDPA.")
    mem.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=None,
                     help="Encode images once and move the VAE off the GPU (default on).")
    out = p.add_argument_group("checkpoints and samples")
    out.add_argument("--checkpoint-every", type=int, help="Save a resumable checkpoint every N steps.")
    out.add_argument("--checkpoints-total-limit", type=int, help="Keep only the newest K checkpoints (default 2).")
    out.add_argument("--resume", help='"latest" or a checkpoint folder: continue an interrupted run.')
    out.add_argument("--sample-every", type=int, help="Save sample images every N steps.")
    out.add_argument("--sample-prompt", dest="sample_prompts", action="append",
                     help="Prompt for samples (repeatable; default: the instance prompt).")
    p.set_defaults(run=_run_train)


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.concepts_list:
        if args.instance_dir or args.instance_prompt:
            raise ConfigError("Give either --concepts-list or --instance-dir/--instance-prompt, not both.")
        concepts = _read_concepts(args.concepts_list)
    else:
        concepts = [Concept(args.instance_dir or "", args.instance_prompt or "", args.class_prompt, args.class_dir)]
    overrides = {name: getattr(args, name) for name in (
        "output_dir", "model", "resolution", "crop", "random_flip", "with_prior_preservation", "num_class_images",
        "prior_loss_weight", "max_train_steps", "learning_rate", "text_encoder_learning_rate", "lr_scheduler",
        "lr_warmup_steps", "train_batch_size", "gradient_accumulation_steps", "seed", "use_8bit_adam",
        "train_text_encoder", "stop_text_encoder_training_at", "lora", "lora_rank", "mixed_precision",
        "gradient_checkpointing", "attention", "cache_latents", "checkpoint_every", "checkpoints_total_limit",
        "resume", "sample_every", "sample_prompts")}
    return TrainConfig.from_preset(args.preset, concepts=concepts, **overrides).validate()


def _read_concepts(path: str) -> list[Concept]:
    try:
        items = json.loads(Path(path).read_text())
        return [Concept(**item) for item in items]
    except FileNotFoundError:
        raise ConfigError(f"--concepts-list {path!r}: no such file.") from None
    except (json.JSONDecodeError, TypeError) as error:
        raise ConfigError(f"--concepts-list {path!r} is not a JSON list of {{instance_dir, instance_prompt, "
                          f"class_prompt, class_dir}} objects ({error}).") from None


def _run_train(args: argparse.Namespace) -> int:
    from .training import train

    result = train(_config_from_args(args))
    print(f"\nTrained model: {result.output_dir}")
    if result.sample_images:
        print(f"Sample images: {Path(result.sample_images[-1]).parent}")
    print(f"Summary: {result.summary_path}")
    return 0


def _add_check_images(subparsers) -> None:
    p = subparsers.add_parser("check-images", help="Check a folder of photos before training.",
                              description="Read every photo the way training will, and report what was converted "
                              "or skipped and what to improve. Exit 0 when the set is usable.")
    p.add_argument("folder", help="Folder with your subject's photos.")
    p.add_argument("--resolution", type=int, default=512, help="Training size the photos are checked against.")
    p.add_argument("--json", action="store_true", help="Print the report as JSON.")
    p.set_defaults(run=_run_check_images)


def _run_check_images(args: argparse.Namespace) -> int:
    from .data import check_images, require_usable

    report = check_images(args.folder, resolution=args.resolution)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    require_usable(report)
    return 0


COMMANDS = (_add_train, _add_check_images)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dreambooth-helpers", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except DreamBoothError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nStopped. Checkpoints already saved are kept; continue with --resume latest.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
