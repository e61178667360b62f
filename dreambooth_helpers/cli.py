"""Command line: `python -m dreambooth_helpers COMMAND ...` or `dreambooth-helpers COMMAND ...`.

Each command is a pair: `_add_<command>(subparsers)` declares its flags, `_run_<command>(args)` calls
the library function that does the work. User mistakes (DreamBoothError) print one paragraph and
exit 2; there is no logic here that the notebook would need.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_PRESET,
    PRESETS,
    TOY_MODEL,
    WHAT,
    Concept,
    TrainConfig,
    option_name,
    per_kind,
    short_number,
)
from .errors import ConfigError, DreamBoothError
from .files import GRID_FILE, LORA_WEIGHTS_FILE
from .subject import DEFAULT_KIND, SUBJECT_KINDS

EXIT_USER_ERROR = 2
LORA_HELP = f"Folder with {LORA_WEIGHTS_FILE} to apply on top of --model."


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one paragraph and exit code 2, like the library's own errors."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USER_ERROR, f"error: {message}. Run `{self.prog} --help` for the options.\n")


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="Fine-tune a model on your subject with DreamBooth.",
                              description="Fine-tune Stable Diffusion 1.x or SDXL (LoRA) on a few photos of a "
                              "subject. Settings left out take the preset's value, else the recipe of --kind, else the "
                              "default shown.")
    what = p.add_argument_group(WHAT)
    photos = per_kind(lambda r: "{}-{}".format(*r.recommended_photos))
    what.add_argument("--instance-dir", help=f"Folder with photos of your subject ({photos} work best).")
    what.add_argument("--instance-prompt", help='Prompt naming the subject with a rare token: "a photo of sks dog".')
    what.add_argument("--class-prompt", help='The same without the token, for prior preservation: "a photo of dog".')
    what.add_argument("--class-dir", help="Where class images are kept (default: OUTPUT_DIR/class_images/...). "
                      "Existing images are reused; only the missing ones are generated.")
    what.add_argument("--concepts-list", help="JSON file: a list of {instance_dir, instance_prompt, class_prompt, "
                      "class_dir} to teach several subjects in one run (instead of the four flags above).")
    _add_config_flags(p, {WHAT: what})
    p.set_defaults(run=_run_train)


def _add_config_flags(parser: argparse.ArgumentParser, groups: dict[str, Any]) -> None:
    """One flag per TrainConfig field, described by the field's metadata (config.setting).

    Every flag defaults to None, meaning "not given": the preset's value, then the config's, applies.
    Booleans also get a --no- form; a list field is a repeatable flag; the type comes from the annotation.
    """
    annotations = typing.get_type_hints(TrainConfig)
    for option in dataclasses.fields(TrainConfig):
        about = option.metadata
        if not about.get("cli", True):
            continue
        if about["group"] not in groups:
            groups[about["group"]] = parser.add_argument_group(about["group"])
        flag: dict[str, Any] = {"dest": option.name, "default": None, "help": _help_with_defaults(option)}
        value_type = _value_type(annotations[option.name])
        if value_type is bool:
            flag["action"] = argparse.BooleanOptionalAction
        elif value_type is list:  # one value per use of the flag: --sample-prompt A --sample-prompt B
            flag["action"] = "append"
            flag["metavar"] = option_name(option.name).lstrip("-").replace("-", "_").upper()
        else:
            flag["type"] = value_type
        if about["choices"]:
            flag["choices"] = about["choices"]
        if about["required_on_cli"]:
            flag["required"] = True
        groups[about["group"]].add_argument(option_name(option.name), **flag)


def _value_type(annotation: Any) -> type:
    """int for `int | None`, list for `list[str]`: what argparse converts a flag's text to."""
    if typing.get_origin(annotation) is list:
        return list
    concrete = [t for t in typing.get_args(annotation) if t is not type(None)]
    return concrete[0] if concrete else annotation


def _help_with_defaults(option: dataclasses.Field) -> str:
    """The field's help, plus its default and the presets that change it: "(default 4; t4-lora: 8)"."""
    def shown(value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return short_number(value) if isinstance(value, float) else str(value)

    notes = []
    if option.metadata["default_note"]:
        notes.append(option.metadata["default_note"])
    elif option.default not in (None, dataclasses.MISSING) and not option.metadata["required_on_cli"] \
            and option.name != "preset":  # --preset's help names its default before the presets it lists
        notes.append(f"default {shown(option.default)}")
    notes += [f"{name}: {shown(preset['settings'][option.name])}" for name, preset in PRESETS.items()
              if preset["settings"].get(option.name, option.default) != option.default]
    text = option.metadata["help"]
    if notes:
        text = text.rstrip(".") + f" ({'; '.join(notes)})."
    return text.replace("%", "%%")  # argparse formats help with %-style placeholders


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.concepts_list:
        if args.instance_dir or args.instance_prompt:
            raise ConfigError("Give either --concepts-list or --instance-dir/--instance-prompt, not both.")
        concepts = _read_concepts(args.concepts_list)
    else:
        concepts = [Concept(args.instance_dir or "", args.instance_prompt or "", args.class_prompt, args.class_dir)]
    overrides = {option.name: getattr(args, option.name) for option in dataclasses.fields(TrainConfig)
                 if option.metadata.get("cli", True)}
    if overrides["memory_plan"] is None and (args.gradient_checkpointing is not None or args.step_in_backward):
        overrides["memory_plan"] = "as-set"  # an explicit choice is kept, not re-planned
    preset = overrides.pop("preset") or DEFAULT_PRESET
    return TrainConfig.from_preset(preset, concepts=concepts, **overrides).validate()


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
    from .choices import expected_time
    from .training import train

    config = _config_from_args(args)
    main_process = os.environ.get("RANK", "0") == "0"  # under accelerate launch, one process reports for all
    if main_process:
        print(f"Expected time: {expected_time(config).text()}", flush=True)
    result = train(config)
    if not main_process:
        return 0
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
    p.add_argument("--kind", default=DEFAULT_KIND, choices=SUBJECT_KINDS,
                   help="What the photos teach: a thing or pet, a person's face, or a style (changes the advice).")
    p.add_argument("--json", action="store_true", help="Print the report as JSON.")
    p.set_defaults(run=_run_check_images)


def _run_check_images(args: argparse.Namespace) -> int:
    from .data import require_usable
    from .doctor import diagnose

    report = diagnose(args.folder, kind=args.kind, resolution=args.resolution)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    require_usable(report.dataset)
    return 0


def _add_generate(subparsers) -> None:
    from .inference import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, SCHEDULERS

    p = subparsers.add_parser("generate", help="Make images with a trained model.",
                              description="Generate images from a trained output folder, a Hub id, or a base model "
                              "plus LoRA weights, and save them as PNGs with the prompt and seed in their metadata.")
    p.add_argument("--model", required=True,
                   help='Trained output folder, Hub id, local diffusers folder, "toy", "tiny" or "tiny-sdxl".')
    p.add_argument("--lora", help=LORA_HELP)
    p.add_argument("--prompt", required=True, help='What to draw, with your token: "a photo of sks dog on the beach".')
    p.add_argument("--negative-prompt", default="", help='What to avoid: "blurry, low quality".')
    p.add_argument("--num-images", type=int, default=1, help="How many images (default 1).")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"Denoising steps (default {DEFAULT_STEPS}).")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"How closely to follow the prompt (default {DEFAULT_GUIDANCE}; 5-9 is usual).")
    p.add_argument("--seed", type=int, help="Same seed, same image; image i uses SEED+i (default: random).")
    p.add_argument("--width", type=int, help="Width in pixels (default: the model's training resolution).")
    p.add_argument("--height", type=int, help="Height in pixels (default: the model's training resolution).")
    p.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=SCHEDULERS,
                   help=f"Sampler (default {DEFAULT_SCHEDULER}: DPM-Solver++, good in ~25 steps).")
    _add_memory_savers(p)
    _add_safety_switch(p)
    p.add_argument("--grid", action="store_true", help=f"Also save all images as one {GRID_FILE} (small images "
                   "enlarged, sharp, to cells of at least 256 px; the PNGs keep their true size).")
    p.add_argument("--out", required=True, help="Folder for the PNGs.")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from .grids import DISPLAY_MIN
    from .inference import check_generation_settings, image_grid, load_generator, save_images
    from .output_paths import check_output_folder

    # Everything the user typed is checked before the model loads (minutes for SD on a CPU or a cold Colab).
    check_output_folder(args.out)
    if args.grid and Path(args.out, GRID_FILE).is_dir():
        raise ConfigError(f"--grid: {Path(args.out, GRID_FILE)} is a folder, so the grid cannot be saved there. "
                          "Move it away or choose another --out.")
    check_generation_settings(args.prompt, num_images=args.num_images, steps=args.steps, guidance_scale=args.guidance,
                              seed=args.seed, width=args.width, height=args.height)
    generator = load_generator(args.model, args.lora, scheduler=args.scheduler,
                               attention_slicing=args.attention_slicing, vae_tiling=args.vae_tiling,
                               progress_bar=True, safety_checker=args.safety_checker)
    if generator.safety_note:
        print(generator.safety_note, file=sys.stderr)
    results = generator.generate(args.prompt, negative_prompt=args.negative_prompt, num_images=args.num_images,
                                 steps=args.steps, guidance_scale=args.guidance, seed=args.seed, width=args.width,
                                 height=args.height)
    for path, result in zip(save_images(results, args.out), results, strict=True):
        print(f"{path}  (seed {result.seed})")
    if args.grid:
        grid_path = Path(args.out, GRID_FILE)
        image_grid([r.image for r in results], min_cell=DISPLAY_MIN).save(grid_path)  # small images enlarged
        print(grid_path)
    return 0


def _add_safety_switch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-safety-checker", dest="safety_checker", action="store_false",
                   help="Do not filter images with the model's safety checker (it blacks out images it flags as "
                        "NSFW); the output then says they are unfiltered.")


def _add_memory_savers(p: argparse.ArgumentParser) -> None:
    """The generator's memory savings, which failures.generation_out_of_memory advises wherever images are made."""
    p.add_argument("--attention-slicing", action="store_true", help="Less GPU memory, a little slower.")
    p.add_argument("--vae-tiling", action="store_true", help="Decode large images in tiles: less GPU memory.")


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="Try a model in a web page (Gradio) with a REST API.",
                              description="Serve a Gradio page and a REST endpoint (POST /api/generate) for a model. "
                              "Runs until Ctrl+C.")
    p.add_argument("--model", required=True,
                   help='Trained output folder, Hub id, local diffusers folder, "toy", "tiny" or "tiny-sdxl".')
    p.add_argument("--lora", help=LORA_HELP)
    p.add_argument("--share", action="store_true", help="Also open a public gradio.live link (lasts up to a week).")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 to let your network in).")
    p.add_argument("--port", type=int, default=7860, help="Port (default 7860; 0 picks a free one).")
    p.add_argument("--auth", help="USER:PASS required to open the page and call the API.")
    _add_memory_savers(p)
    _add_safety_switch(p)
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import launch_demo
    from .demo_api import parse_auth

    demo = launch_demo(args.model, lora=args.lora, share=args.share, host=args.host, port=args.port,
                       auth=parse_auth(args.auth) if args.auth is not None else None, block=True,
                       attention_slicing=args.attention_slicing, vae_tiling=args.vae_tiling,
                       safety_checker=args.safety_checker)
    demo.close()
    return 0


def _add_push(subparsers) -> None:
    p = subparsers.add_parser("push", help="Publish a trained model to the Hugging Face Hub with a model card.",
                              description="Create a Hub repository and upload the model (or LoRA weights), a model "
                              "card and a grid of samples. Log in first with `hf auth login`.")
    p.add_argument("--model", required=True, help="The trained output folder.")
    p.add_argument("--repo-id", required=True, help="USER/NAME (or ORG/NAME) of the repository to create or update.")
    p.add_argument("--private", action="store_true", help="Create the repository as private.")
    p.add_argument("--token-from-env", action="store_true",
                   help="Use the token in the HF_TOKEN environment variable instead of the saved login.")
    p.set_defaults(run=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub, token_from_env

    token = token_from_env() if args.token_from_env else None
    url = push_to_hub(args.model, args.repo_id, private=args.private, token=token)
    print(f"Published: {url}")
    return 0


def _add_export(subparsers) -> None:
    p = subparsers.add_parser("export-single-file", help="Save a model as one .safetensors for AUTOMATIC1111/ComfyUI.",
                              description="Write a trained SD 1.x model as one checkpoint in the original Stable "
                              "Diffusion layout (with --model; a LoRA run is merged into its base model first), or a "
                              "LoRA run alone in the LoRA layout the web UIs read (--lora without --model; SDXL LoRA "
                              "runs always).")
    p.add_argument("--model", help='Trained output folder, local diffusers folder, "toy" or "tiny": written as one '
                   "checkpoint (SD 1.x). Leave it out to export --lora alone.")
    p.add_argument("--lora", help=LORA_HELP + " With --model (SD 1.x), merged into the model before it is written; "
                   "alone (or for SDXL), written as a LoRA file in the AUTOMATIC1111/ComfyUI/kohya layout "
                   "(lora_unet_*, lora_te*_*, with alphas), to load on the UIs' own base model.")
    p.add_argument("--out", required=True, help="The .safetensors file to write.")
    p.add_argument("--half", action="store_true", help="Store fp16 weights (half the size, ~2 GB for SD 1.x).")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_single_file

    path = export_single_file(args.model, args.out, lora=args.lora, half_precision=args.half)
    print(f"Wrote {path}")
    return 0


def _add_evaluate(subparsers) -> None:
    from .eval_diversity import DEFAULT_CLASS_SAMPLES, DISTANCE_CHOICES
    from .eval_encoders import DEFAULT_ENCODERS, ENCODER_CHOICES
    from .evaluation import KIND_CHOICES
    from .inference import DEFAULT_GUIDANCE, DEFAULT_STEPS

    p = subparsers.add_parser("evaluate", help="Score a trained model with the DreamBooth paper's metrics.",
                              description="Generate the paper's 25 prompts (N images each, fixed seeds) and measure "
                              "DINO and CLIP-I (likeness to your photos) and CLIP-T (prompt following). Writes "
                              "evaluation.json, evaluation.md and evaluation_grid.png. With --checkpoints, scores "
                              "every saved checkpoint of the run instead and recommends one.")
    p.add_argument("--model", required=True, help='Trained output folder (or Hub id, "toy", "tiny" or "tiny-sdxl").')
    p.add_argument("--lora", help=LORA_HELP)
    p.add_argument("--instance-dir", help="Your subject's photos (default: the folder the run trained on).")
    p.add_argument("--class-noun", required=True, help="The class of your subject: dog, backpack, man.")
    p.add_argument("--identifier", help="The rare token (default: read from the run's prompts, else sks).")
    p.add_argument("--kind", choices=KIND_CHOICES,
                   help="What the run taught, which picks the paper's prompt list: object (things and pets) or person "
                   "(adds outfits; \"live\", the paper's name for that list, means the same). A style cannot be "
                   "scored. Default: the --kind the run was trained with, else object.")
    p.add_argument("--prompts-per-image", "--images-per-prompt", dest="images_per_prompt", type=int, default=None,
                   help="Images generated per prompt (the paper uses 4; default 4, or 2 with --checkpoints).")
    p.add_argument("--num-prompts", type=int, help="Use only the first N of the 25 prompts (a quicker look).")
    p.add_argument("--seed", type=int, default=0, help="First seed; image j of prompt i uses SEED + i*N + j.")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"Denoising steps (default {DEFAULT_STEPS}).")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"Guidance scale (default {DEFAULT_GUIDANCE}).")
    p.add_argument("--encoders", default=DEFAULT_ENCODERS, choices=ENCODER_CHOICES,
                   help="paper: DINO ViT-S/16 + CLIP from the Hub (needs a network once); tiny: random offline "
                   "encoders that test the pipeline and give meaningless numbers.")
    p.add_argument("--checkpoints", action="store_true",
                   help="Score each checkpoint in MODEL/checkpoints and the final model, plot, recommend one.")
    p.add_argument("--class-samples", type=int, default=DEFAULT_CLASS_SAMPLES,
                   help="Images of the class prompt from this model and its base model, for DIV and PRES before and "
                   f"after (what prior preservation protects; default {DEFAULT_CLASS_SAMPLES}, 0 skips).")
    p.add_argument("--diversity-distance", default="auto", choices=DISTANCE_CHOICES,
                   help="DIV's distance: lpips (the paper's; needs the lpips package and a download), histogram-ssim "
                   "(offline stand-in), auto: LPIPS when it loads, else the stand-in.")
    p.add_argument("--out", help="Folder for the report (default: MODEL/evaluation).")
    _add_memory_savers(p)
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_checkpoints, evaluate_model

    out = args.out
    if out is None and Path(args.model).is_dir():
        out = str(Path(args.model, "evaluation"))
    common = dict(instance_dir=args.instance_dir, prompt_set=args.kind, identifier=args.identifier,
                  num_prompts=args.num_prompts, seed=args.seed, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, encoders=args.encoders,
                  attention_slicing=args.attention_slicing, vae_tiling=args.vae_tiling)
    if args.checkpoints:
        comparison = evaluate_checkpoints(args.model, args.class_noun, images_per_prompt=args.images_per_prompt or 2,
                                          output_dir=out, **common)
        print(comparison.to_markdown())
        print(f"Plot: {comparison.plot_path}\nReport: {comparison.json_path}")
        return 0
    if out is None:
        raise ConfigError("--out is needed when --model is not a local folder: where to write the report.")
    report = evaluate_model(args.model, args.class_noun, lora=args.lora,
                            images_per_prompt=args.images_per_prompt or 4, output_dir=out,
                            class_samples=args.class_samples, diversity_distance=args.diversity_distance, **common)
    print(report.to_markdown())
    print(f"Report: {report.markdown_path}\nJSON: {report.json_path}\nGrid: {report.grid_path}")
    return 0


def _add_app(subparsers) -> None:
    p = subparsers.add_parser("app", help="The whole journey in one web page: photos, training, trying, publishing.",
                              description="Serve a Gradio page to upload photos, train (in the background, one run "
                              "at a time, resumable), try the model and publish it. Everything lives in --workdir. "
                              "Runs until Ctrl+C; a run still training goes on and the next app finds it.")
    p.add_argument("--workdir", default="dreambooth-app", help="Folder for photos, runs and models "
                   "(default dreambooth-app). Nothing outside it is served.")
    p.add_argument("--share", action="store_true", help="Also open a public gradio.live link (use with --auth).")
    p.add_argument("--auth", action="append", metavar="USER:PASS",
                   help="Require a sign-in; repeat for several users, each then gets a folder of their own.")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 to let your network in).")
    p.add_argument("--port", type=int, default=7860, help="Port (default 7860; 0 picks a free one).")
    p.add_argument("--model", help="Base model the Train tab starts with (default: SD 1.5 on a GPU, toy without).")
    p.add_argument("--models-dir", action="append", metavar="DIR", help="A folder of models visitors may train on "
                   "(repeatable). Without it they get Hub ids and the built-in models only, no server folder.")
    p.add_argument("--publish-with-host-token", action="store_true", help="Publish with this machine's HF_TOKEN "
                   "or saved Hub login when a visitor types no token (off: each visitor pastes their own).")
    p.add_argument("--no-auto-resume", dest="auto_resume", action="store_false", help="Leave runs that an app or "
                   "machine stop interrupted for a click on Resume (default: each is resumed once, by itself, from "
                   "its newest checkpoint when the app starts).")
    _add_memory_savers(p)  # for the Try it tab's generation
    p.set_defaults(run=_run_app)


def _run_app(args: argparse.Namespace) -> int:
    from .app_launch import launch_app

    launch_app(args.workdir, share=args.share, auth=args.auth, host=args.host, port=args.port, model=args.model,
               block=True, generator_options={"attention_slicing": args.attention_slicing,
                                              "vae_tiling": args.vae_tiling},
               models_dir=args.models_dir, publish_with_host_token=args.publish_with_host_token,
               auto_resume=args.auto_resume)
    return 0


def _add_register(subparsers) -> None:
    p = subparsers.add_parser("register", help="Register a trained model in MLflow's model registry, to serve it.",
                              description="Log a trained output folder as an MLflow model (a pyfunc that takes a "
                              "prompt and returns a base64 PNG), register it as a new version of NAME, point ALIAS "
                              "at it and print models:/NAME@ALIAS. Serve it with "
                              "`mlflow models serve -m models:/NAME@ALIAS --env-manager local`. Needs mlflow.")
    p.add_argument("--model", required=True, help="The trained output folder (a full fine-tune or a LoRA run).")
    p.add_argument("--name", required=True, help="The registered model's name, e.g. sks-dog.")
    p.add_argument("--alias", default="champion", help="Alias pointed at the new version (default champion).")
    p.add_argument("--tracking-uri", help="MLflow server or database (default: MLFLOW_TRACKING_URI, else "
                   "sqlite:///MODEL/mlflow.db, where `train --report-to mlflow` records by default).")
    p.set_defaults(run=_run_register)


def _run_register(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("register needs the mlflow package: `pip install mlflow` (or the `registry` extra: "
                          "`pip install 'dreambooth-helpers[registry]'`).")
    from .registry import register_model

    registered = register_model(args.model, args.name, alias=args.alias, tracking_uri=args.tracking_uri)
    link = f", linked to training run {registered.training_run_id}" if registered.training_run_id else ""
    print(f"Registered {registered.name} version {registered.version} at {registered.tracking_uri}{link}.",
          file=sys.stderr)
    print(registered.uri)
    return 0


COMMANDS = (_add_train, _add_check_images, _add_generate, _add_demo, _add_push, _add_export, _add_evaluate, _add_app,
            _add_register)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dreambooth-helpers", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(subparsers)
    return parser


def _command_model(args: argparse.Namespace) -> str | None:
    """The base model the command will load, also when --model is left out.

    `train` without --model trains the preset's model, else TrainConfig's default (the toy model); the app
    without a GPU starts on the toy model too. Commands that load no model give None.
    """
    model = getattr(args, "model", None)
    if model is not None:
        return model
    if args.command == "train":
        preset = PRESETS.get(args.preset or DEFAULT_PRESET, {}).get("settings", {})
        return preset.get("model", next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "model"))
    if args.command == "app":
        return TOY_MODEL  # its base model without a GPU; with one, the thread count is left alone anyway
    return None


def _one_thread_for_built_in_models(args: argparse.Namespace) -> bool:
    """The built-in models on a CPU run on one thread unless OMP_NUM_THREADS says otherwise (threads.py says why).

    The model is the one the command will really load: `train` without --model trains the toy model.
    """
    from .threads import use_one_thread_for

    return use_one_thread_for(_command_model(args))


def _interrupted_message(args: argparse.Namespace) -> str:
    """What Ctrl+C leaves behind, as it is: the newest checkpoint to resume from, or that there is none yet.

    Only `train` saves checkpoints (in --output-dir/checkpoints, every --checkpoint-every steps; none without it).
    """
    from .checkpoints import list_checkpoints

    if getattr(args, "command", None) != "train":
        return "Stopped."
    saved = list_checkpoints(args.output_dir)  # --output-dir is required
    if saved:
        return (f"Stopped. The newest checkpoint is kept: {saved[-1]}; continue from it with the same command and "
                "--resume latest.")
    every = args.checkpoint_every
    how = (f"--checkpoint-every {every} saves one every {every} steps" if every
           else "--checkpoint-every N saves them, so that a stopped run can continue")
    return f"Stopped. No checkpoint was saved yet ({how}); running the command again starts from step 0."


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _one_thread_for_built_in_models(args)
    try:
        return args.run(args) or 0
    except DreamBoothError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"\n{_interrupted_message(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
