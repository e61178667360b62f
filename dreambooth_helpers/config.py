"""One typed, validated configuration object for a DreamBooth run, and the presets.

`TrainConfig` holds every setting; `TrainConfig.from_preset("t4", ...)` starts from a preset and
overrides fields. Settings left at None take the recipe of the subject's kind (subject.py): steps,
learning rates, class images. `validate()` refuses bad values and impossible combinations with a
message that names the option, so a mistake is caught before any model is loaded.

Each field's metadata (help, group, choices, flag name) is also the `train` command's flag: cli.py
builds one option per field, so a setting added here appears on the command line by itself.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .subject import (
    DEFAULT_KIND,
    LORA_LEARNING_RATE,
    LORA_TEXT_ENCODER_SHARE,
    MAX_STEPS,
    MIN_STEPS,
    RECIPES,
    SUBJECT_KINDS,
    TOY_LEARNING_RATES,
    TOY_TEXT_ENCODER_SHARE,
    check_prompt_characters,
    default_learning_rate,
    default_steps,
    recipe,
    text_encoder_share,
)

MIXED_PRECISIONS = ("fp16", "bf16", "no")
ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
CROP_MODES = ("center", "pad")
MEMORY_PLANS = ("auto", "as-set", "smallest")
CAPTION_MODES = ("auto", "strict", "off")  # captions.py
REPORT_TO_CHOICES = ("auto", "tensorboard", "mlflow", "wandb", "none")  # tracking.py
TINY_MODEL = "tiny"
SDXL_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"  # SDXL's VAE, fine-tuned to stay finite in fp16
TOY_MODEL = "toy"  # the offline default, trained on the toy world and shipped (models.TOY_MODEL_DIR)
DEFAULT_PRESET = "t4"

# Each preset: a one-line description (shown by the CLI and the notebook) and the settings it changes.
PRESETS: dict[str, dict[str, Any]] = {
    "t4": {
        "description": "Free Colab T4 (15 GiB): full UNet + text encoder, prior preservation, 8-bit AdamW, "
        "fp16, 512 px; gradient checkpointing only if the free GPU memory needs it.",
        "settings": {},
    },
    "t4-lora": {
        "description": "T4, LoRA rank 8 on UNet and text encoder: small files (~9 MB), faster, less memory.",
        "settings": {"lora": True, "lora_rank": 8, "gradient_checkpointing": False},
    },
    "low-memory": {
        # A full fine-tune cannot fit 8 GB by the planner's own estimate: fp32 UNet + text encoder weights
        # (3.7 GiB) and 8-bit Adam states (1.8 GiB) leave too little for two images' activations (~9.2 GiB
        # reserved with every saving on). LoRA on the fp16 base needs ~4.5 GiB, so 8 GB cards train LoRA;
        # `--no-lora` keeps every saving for a full fine-tune on 10-12 GB cards.
        "description": "8 GB cards (fits in 6.5 GiB): LoRA rank 8 on UNet and text encoder with every memory saving "
                       "on (gradient checkpointing, the optimizer step inside backward, so no gradient clipping); "
                       "--no-lora: a full fine-tune with the same savings for 10-12 GB cards (~9.2 GiB).",
        # max_grad_norm 0: clipping needs every gradient at once, the very thing the step inside backward avoids.
        # Adam already bounds each weight's step by its learning rate; DreamBooth's rates are small.
        "settings": {"lora": True, "lora_rank": 8, "gradient_checkpointing": True, "use_8bit_adam": True,
                     "cache_latents": True, "class_images_batch_size": 1, "memory_plan": "smallest",
                     "max_grad_norm": 0.0},
    },
    "t4-sdxl": {
        # The planner's estimate at 1024 px (memory.SDXL_SIZE): ~11 GiB with these settings, measured figures in
        # docs/sdxl.md once a GPU run has been made. The text encoders stay frozen so their outputs are cached
        # and they leave the GPU and RAM; --train-text-encoder adds LoRA to both (~+1.6 GiB).
        "description": "SDXL on a free Colab T4: LoRA rank 8 on the UNet, 1024 px, fp16, 8-bit AdamW, gradient "
                       "checkpointing, cached latents and prompt embeddings (base: stabilityai/stable-diffusion-"
                       "xl-base-1.0, with the fp16-safe VAE madebyollin/sdxl-vae-fp16-fix).",
        "settings": {"model": SDXL_BASE_MODEL, "vae": SDXL_FP16_VAE, "lora": True, "lora_rank": 8,
                     "train_text_encoder": False, "gradient_checkpointing": True, "use_8bit_adam": True,
                     "cache_latents": True, "cache_text_embeddings": True, "class_images_batch_size": 1},
    },
    "large-gpu": {
        "description": "24 GB+ with bf16 (A100, L4, 3090/4090; not V100): no gradient checkpointing, bf16, batch 2.",
        "settings": {"gradient_checkpointing": False, "mixed_precision": "bf16", "train_batch_size": 2,
                     "use_8bit_adam": False},
    },
}


def setting(default: Any, help_text: str, group: str, *, choices: tuple[str, ...] | None = None,
            flag: str | None = None, required_on_cli: bool = False, default_note: str | None = None) -> Any:
    """A TrainConfig field and the description of its `train` flag.

    `flag` replaces the name derived from the field ("--max-train-steps" for max_train_steps);
    `required_on_cli` makes the command line ask for a value the library defaults; `default_note`
    replaces the "default VALUE" the help shows, for a default that is not the whole story.
    """
    metadata = {"help": help_text, "group": group, "choices": choices, "flag": flag, "required_on_cli": required_on_cli,
                "default_note": default_note}
    if isinstance(default, list):  # a fresh list per config, as dataclasses require
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def option_name(field_name: str) -> str:
    """The command-line flag of a TrainConfig field, as messages and the CLI spell it."""
    flag = TrainConfig.__dataclass_fields__[field_name].metadata.get("flag")
    return flag or "--" + field_name.replace("_", "-")


def short_number(value: float) -> str:
    """A number as the README and papers write it: 2e-6 (not 2e-06), 1e-3 (not 0.001), 0.01, 7.5."""
    if value and abs(value) < 0.01:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}"


def per_kind(value_of: Any) -> str:
    """`value_of(recipe)` for each subject kind, "object 3-20, person 8-25, ...", or one value when all agree."""
    values = {kind: value_of(r) for kind, r in RECIPES.items()}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{kind} {value}" for kind, value in values.items())


# Help texts that quote the recipe, so that `train --help` shows the numbers subject.py holds.
_CLASS_IMAGES_PER_KIND = per_kind(lambda r: str(r.num_class_images))
_KIND_HELP = (
    "What the photos show; the settings you leave out follow its recipe. "
    + "; ".join(f"{kind}: {r.steps_per_image} steps per photo, learning rate {short_number(r.learning_rate)}"
                + ("" if _CLASS_IMAGES_PER_KIND.isdigit() else f", {r.num_class_images} class images")
                for kind, r in RECIPES.items())
    + "."
)
_STEPS_HELP = (f"Training steps (default: --kind's steps per photo, kept within {MIN_STEPS}-{MAX_STEPS}).")
_LEARNING_RATE_HELP = (
    f"UNet learning rate (default: --kind's for a full fine-tune, {short_number(LORA_LEARNING_RATE)} with --lora; "
    f"for the toy model {short_number(TOY_LEARNING_RATES['full'])}, {short_number(TOY_LEARNING_RATES['lora'])} "
    "with --lora)."
)
_TEXT_ENCODER_LEARNING_RATE_HELP = (
    "Text encoder learning rate (default: the UNet's for a full fine-tune; with --lora, "
    + ("half" if LORA_TEXT_ENCODER_SHARE == 0.5 else f"{LORA_TEXT_ENCODER_SHARE:g} times")
    + f" the UNet's, because text adapters drift fastest; for the toy model {TOY_TEXT_ENCODER_SHARE:g} times "
    "the UNet's, which keeps the class prompt varied)."
)
_CLASS_IMAGES_HELP = (
    f"How many class images prior preservation generates (default: {_CLASS_IMAGES_PER_KIND}"
    + ("" if _CLASS_IMAGES_PER_KIND.isdigit() else " by --kind") + "; the paper uses ~200)."
)


@dataclass
class Concept:
    """One subject to teach: its photos, the prompt that names it, and the class it belongs to.

    `instance_prompt` carries the rare identifier token ("a photo of sks dog"); `class_prompt` is
    the same without it ("a photo of dog") and drives prior preservation.
    """

    instance_dir: str
    instance_prompt: str
    class_prompt: str | None = None
    class_dir: str | None = None


WHAT, DATA, PRIOR, OPTIMISATION, WEIGHTS, MEMORY, OUTPUTS = (
    "what to teach", "data", "prior preservation", "optimisation", "which weights train", "memory and speed",
    "checkpoints and samples")


@dataclass
class TrainConfig:
    """Every setting of a training run; each field's help is its `train` flag's help."""

    # What to teach. The concepts come from --instance-dir/--instance-prompt/--class-prompt/--class-dir or
    # --concepts-list, which cli.py declares itself (one flag set makes one Concept).
    concepts: list[Concept] = field(default_factory=list, metadata={"cli": False})
    output_dir: str = setting("outputs/dreambooth", "Folder for the trained model, checkpoints and samples.", WHAT,
                              required_on_cli=True)
    model: str = setting(TOY_MODEL, 'Base model: a Hub id (stable-diffusion-v1-5/stable-diffusion-v1-5), a local '
                         'diffusers folder, a .safetensors/.ckpt file, "tiny" (random weights, for tests) or "toy": '
                         'the offline 32 px model that draws coloured shapes. SDXL (e.g. '
                         f'{SDXL_BASE_MODEL}, or "tiny-sdxl" offline) is detected and trains LoRA.', WHAT)
    vae: str | None = setting(None, f"Another VAE for the model (a Hub id or folder), e.g. {SDXL_FP16_VAE}: "
                              "SDXL's own VAE gives NaN images in fp16, so it is kept in fp32 without this; none keeps "
                              "the model's own VAE, also over a preset's.", WHAT)
    preset: str = setting(DEFAULT_PRESET, f"Starting settings for your GPU (default {DEFAULT_PRESET}). "
                          + " ".join(f"{name}: {p['description']}" for name, p in PRESETS.items()),
                          WHAT, choices=tuple(PRESETS))
    kind: str = setting(DEFAULT_KIND, _KIND_HELP, WHAT, choices=SUBJECT_KINDS)

    # Data.
    resolution: int | None = setting(None, "Square training size in pixels (default: the model's own, 512 for "
                                     "SD 1.x, 1024 for SDXL).", DATA)
    crop: str = setting("center", "center: crop each photo to a square; pad: keep the whole photo and pad it.", DATA,
                        choices=CROP_MODES)
    random_flip: bool = setting(False, "Mirror images at random; not for asymmetric subjects or text.", DATA)
    remove_bars: bool = setting(False, "Crop flat letterbox/pillarbox bars off each photo before the square crop; "
                                "the dataset doctor reports photos that have them.", DATA)
    captions: str = setting("auto", "Per-photo captions: photo.txt beside photo.jpg, or a metadata.jsonl "
                            '({"file_name": ..., "text": ...} per line) in the photos\' folder. auto: read them and '
                            "put the instance prompt in front of a caption without the identifier; strict: such a "
                            "caption is an error; off: every photo trains on the instance prompt. Photos without a "
                            "caption always train on the instance prompt.", DATA, choices=CAPTION_MODES)

    # Prior preservation: generated class images keep the model's idea of the class intact.
    with_prior_preservation: bool = setting(True, "Train on generated class images too, so the model keeps knowing "
                                            "the class.", PRIOR, flag="--prior-preservation")
    num_class_images: int | None = setting(None, _CLASS_IMAGES_HELP, PRIOR)
    prior_loss_weight: float = setting(1.0, "Weight of the class-image loss.", PRIOR)
    class_images_batch_size: int = setting(4, "Class images generated at once; 1 uses the least GPU memory.", PRIOR)
    class_images_steps: int = setting(25, "Denoising steps per class image.", PRIOR)

    # Optimisation.
    max_train_steps: int | None = setting(None, _STEPS_HELP, OPTIMISATION)
    learning_rate: float | None = setting(None, _LEARNING_RATE_HELP, OPTIMISATION)
    text_encoder_learning_rate: float | None = setting(None, _TEXT_ENCODER_LEARNING_RATE_HELP, OPTIMISATION)
    lr_scheduler: str = setting("constant", "How the learning rate changes over the run.", OPTIMISATION,
                                choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(0, "Steps to ramp the learning rate up from 0.", OPTIMISATION)
    train_batch_size: int = setting(1, "Instance images per step; as many class images come on top.", OPTIMISATION)
    gradient_accumulation_steps: int = setting(1, "Backward passes per optimizer step.", OPTIMISATION)
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this; 0: no clipping, which "
                                   "--step-in-backward needs.", OPTIMISATION)
    adam_weight_decay: float = setting(1e-2, "AdamW weight decay.", OPTIMISATION)
    use_8bit_adam: bool = setting(True, "bitsandbytes 8-bit AdamW: 3/4 less optimizer memory; plain AdamW on a CPU.",
                                  OPTIMISATION)
    seed: int = setting(0, "Makes a run repeatable.", OPTIMISATION)

    # Which weights train.
    train_text_encoder: bool = setting(True, "Train the text encoder too (SDXL: both of them): better likeness, "
                                       "especially for faces.",
                                       WEIGHTS)
    stop_text_encoder_training_at: int | None = setting(None, "Freeze the text encoder after this many steps.",
                                                        WEIGHTS)
    lora: bool = setting(False, "Train small LoRA adapters instead of all weights: ~9 MB output at rank 8, less "
                         "memory.",
                         WEIGHTS)
    lora_rank: int = setting(4, "LoRA rank; 8-32 for harder subjects.", WEIGHTS)
    lora_alpha: int | None = setting(None, "LoRA scale numerator (default: equal to --lora-rank).", WEIGHTS)

    # Memory and speed.
    mixed_precision: str = setting("fp16", "fp16 on a T4; bf16 on A100/L4/30xx and newer; no: fp32.", MEMORY,
                                   choices=MIXED_PRECISIONS)
    gradient_checkpointing: bool = setting(
        True, "Recompute activations in the backward pass: less memory, ~1.5x slower. On a GPU, --memory-plan auto "
        "(the default) turns it on only when the free memory needs it; setting it on or off yourself implies "
        "--memory-plan as-set.", MEMORY, default_note="default without a GPU or with --memory-plan as-set: on")
    attention: str = setting("auto", "auto: xformers when installed and working, else PyTorch SDPA.", MEMORY,
                             choices=ATTENTION_BACKENDS)
    cache_latents: bool = setting(True, "Encode every image once with the VAE, then move the VAE off the GPU.",
                                  MEMORY)
    memory_plan: str = setting("auto", "auto: on a GPU, the fastest checkpointing/step-in-backward that fits the free "
                               "memory; smallest: the least memory; as-set: --gradient-checkpointing and "
                               "--step-in-backward as given.", MEMORY, choices=MEMORY_PLANS)
    step_in_backward: bool = setting(False, "Apply the optimizer step per weight during backward: no full copy of "
                                     "the gradients (-3.7 GiB for SD 1.x). Needs --max-grad-norm 0 and "
                                     "--gradient-accumulation-steps 1; with fp16 it scales the loss itself.", MEMORY)
    cache_text_embeddings: bool = setting(True, "With a frozen text encoder, encode each prompt once and move the "
                                          "encoder off the GPU.", MEMORY)
    channels_last: bool = setting(False, "UNet convolutions in channels-last (NHWC) layout, tensor-core friendly on "
                                  "some GPUs.", MEMORY)

    # Checkpoints and samples.
    checkpoint_every: int | None = setting(None, "Save a resumable checkpoint every N steps.", OUTPUTS)
    checkpoints_total_limit: int = setting(2, "Keep only the newest K checkpoints.", OUTPUTS)
    resume: str | None = setting(None, '"latest" or a checkpoint folder: continue an interrupted run.', OUTPUTS)
    sample_every: int | None = setting(None, "Save sample images every N steps.", OUTPUTS)
    sample_prompts: list[str] = setting([], "Prompt for the samples (repeat the flag for several; default: the "
                                        "instance prompt).", OUTPUTS, flag="--sample-prompt")
    sample_steps: int = setting(20, "Denoising steps per sample image.", OUTPUTS)
    sample_seed: int = setting(1234, "Seed of the sample images, the same at every step so they compare.", OUTPUTS)
    report_to: str = setting("auto", "Experiment tracking of parameters, loss, learning rate, samples, peak memory "
                             "and time: tensorboard (event files in OUTPUT_DIR/logs), mlflow (MLFLOW_TRACKING_URI, "
                             "else a file store in OUTPUT_DIR/mlruns; the model is logged as an artifact), wandb "
                             "(WANDB_MODE=offline works without an account) or none. auto: tensorboard when the "
                             "tensorboard package is installed (Colab has it), else none.", OUTPUTS,
                             choices=REPORT_TO_CHOICES)
    safety_checker: bool = setting(True, "Keep the base model's safety checker in the saved model (+1.2 GB): it "
                                   "blacks out images it flags as NSFW, sometimes harmless ones. Off: the model is "
                                   "saved without it, unfiltered, and diffusers warns whoever loads it.", OUTPUTS)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_preset(cls, preset: str = DEFAULT_PRESET, **overrides: Any) -> TrainConfig:
        """A config from a named preset, with `overrides` applied on top (None values ignored)."""
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset!r} is not a preset. Choose one of: {', '.join(PRESETS)}.")
        values = {**PRESETS[preset]["settings"], "preset": preset}
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"Unknown setting(s): {', '.join(sorted(unknown))}.")
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["concepts"] = [c if isinstance(c, Concept) else Concept(**c) for c in values.get("concepts", [])]
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        data["concepts"] = [Concept(**c) for c in data.get("concepts", [])]
        return cls(**data)

    # ------------------------------------------------------------------ derived values: the recipe fills the Nones

    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return default_learning_rate(self.kind, self.lora, toy_model=self.model == TOY_MODEL)

    @property
    def effective_text_encoder_learning_rate(self) -> float:
        """As given; else the UNet's rate (given or the recipe's) times the text encoder's share of it."""
        if self.text_encoder_learning_rate is not None:
            return self.text_encoder_learning_rate
        return self.effective_learning_rate * text_encoder_share(self.lora, toy_model=self.model == TOY_MODEL)

    @property
    def effective_num_class_images(self) -> int:
        """The class images this run uses: as given, else the kind's recipe; 0 without prior preservation."""
        if not self.with_prior_preservation:
            return 0
        return recipe(self.kind).num_class_images if self.num_class_images is None else self.num_class_images

    def steps_for(self, num_instance_images: int) -> int:
        """The step count: as asked, or the kind's steps per photo within the recipe's bounds."""
        if self.max_train_steps is not None:
            return self.max_train_steps
        return default_steps(num_instance_images, self.kind)

    # ------------------------------------------------------------------ validation

    def validate(self) -> TrainConfig:
        """Refuse bad values and impossible combinations, naming the option. Returns self."""
        if not self.concepts:
            raise ConfigError("No subject to train: give --instance-dir and --instance-prompt (or --concepts-list).")
        for i, concept in enumerate(self.concepts):
            where = "" if len(self.concepts) == 1 else f" (concept {i + 1})"
            if not isinstance(concept.instance_dir, (str, Path)) or not str(concept.instance_dir).strip():
                raise ConfigError(f"--instance-dir is empty{where}: give the folder with your subject's photos.")
            if not isinstance(concept.instance_prompt, str) or not concept.instance_prompt.strip():
                raise ConfigError(
                    f"--instance-prompt is empty{where}: give a prompt with a rare token and the class, "
                    "e.g. \"a photo of sks dog\"."
                )
            if self.with_prior_preservation and not (concept.class_prompt and concept.class_prompt.strip()):
                raise ConfigError(
                    f"Prior preservation is on but --class-prompt is missing{where}. Give the instance prompt "
                    "without the identifier (e.g. \"a photo of dog\"), or pass --no-prior-preservation."
                )
            for name, value in (("--class-prompt", concept.class_prompt), ("--class-dir", concept.class_dir)):
                if value is not None and not isinstance(value, (str, Path)):
                    raise ConfigError(f"{name} must be text{where} (got a {type(value).__name__}).")
            for name, prompt in (("--instance-prompt", concept.instance_prompt),
                                 ("--class-prompt", concept.class_prompt)):
                if isinstance(prompt, str):
                    check_prompt_characters(name, prompt, where)
        _choice("--preset", self.preset, tuple(PRESETS))
        _choice("--kind", self.kind, SUBJECT_KINDS)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"--model must name a base model (got {self.model!r}): a Hub id such as stable-"
                              f"diffusion-v1-5/stable-diffusion-v1-5, a local folder or file, {TOY_MODEL!r} or "
                              f"{TINY_MODEL!r}.")
        if isinstance(self.vae, str) and self.vae.strip().lower() == "none":  # "--vae none": the model's own VAE
            self.vae = None
        if self.vae is not None and (not isinstance(self.vae, str) or not self.vae.strip()):
            raise ConfigError(f"--vae must name a VAE (got {self.vae!r}): a Hub id such as {SDXL_FP16_VAE} or a "
                              "folder; leave it out to keep the model's own VAE.")
        for option in dataclasses.fields(self):
            value = getattr(self, option.name)
            if isinstance(option.default, bool) and not isinstance(value, bool):
                # "false" from a JSON file or a form would read as true
                raise ConfigError(f"{option_name(option.name)} must be true or false (got {value!r}).")
        _choice("--mixed-precision", self.mixed_precision, MIXED_PRECISIONS)
        _choice("--attention", self.attention, ATTENTION_BACKENDS)
        _choice("--lr-scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("--crop", self.crop, CROP_MODES)
        _choice("--memory-plan", self.memory_plan, MEMORY_PLANS)
        _choice("--captions", self.captions, CAPTION_MODES)
        _choice("--report-to", self.report_to, REPORT_TO_CHOICES)
        if self.resolution is not None:
            check_int_range("--resolution", self.resolution, 16, 2048)
        if self.resolution is not None and self.resolution % 8:
            raise ConfigError(f"--resolution must be a multiple of 8 (got {self.resolution}); SD 1.x uses 512.")
        if self.num_class_images is not None:
            check_int_range("--num-class-images", self.num_class_images, int(self.with_prior_preservation), 10_000)
        check_int_range("--class-images-batch-size", self.class_images_batch_size, 1, 64)
        check_int_range("--class-images-steps", self.class_images_steps, 1, 500)
        _float_range("--prior-loss-weight", self.prior_loss_weight, 0.0, 100.0)
        if self.max_train_steps is not None:
            check_int_range("--max-train-steps", self.max_train_steps, 1, 1_000_000)
        for name, value in (("--learning-rate", self.learning_rate),
                            ("--text-encoder-learning-rate", self.text_encoder_learning_rate)):
            if value is not None:
                _float_range(name, value, 1e-9, 1e-1)
        check_int_range("--lr-warmup-steps", self.lr_warmup_steps, 0, 1_000_000)
        check_int_range("--train-batch-size", self.train_batch_size, 1, 64)
        check_int_range("--gradient-accumulation-steps", self.gradient_accumulation_steps, 1, 256)
        _float_range("--max-grad-norm", self.max_grad_norm, 0.0, 1e6)
        if self.step_in_backward:
            why_not = step_in_backward_allowed(self)
            if why_not:
                raise ConfigError(f"--step-in-backward cannot be used here: {why_not}. Use --max-grad-norm 0 "
                                  "and --gradient-accumulation-steps 1, or drop it.")
        _float_range("--adam-weight-decay", self.adam_weight_decay, 0.0, 1.0)
        check_int_range("--seed", self.seed, 0, 2**32 - 1)
        check_int_range("--lora-rank", self.lora_rank, 1, 1024)
        if self.lora_alpha is not None:
            check_int_range("--lora-alpha", self.lora_alpha, 1, 4096)
        if self.stop_text_encoder_training_at is not None:
            if not self.train_text_encoder:
                raise ConfigError(
                    "--stop-text-encoder-training-at only makes sense with --train-text-encoder; "
                    "drop one of the two."
                )
            check_int_range("--stop-text-encoder-training-at", self.stop_text_encoder_training_at, 1, 1_000_000)
        if self.checkpoint_every is not None:
            check_int_range("--checkpoint-every", self.checkpoint_every, 1, 1_000_000)
        check_int_range("--checkpoints-total-limit", self.checkpoints_total_limit, 1, 1000)
        if self.sample_every is not None:
            check_int_range("--sample-every", self.sample_every, 1, 1_000_000)
        check_int_range("--sample-steps", self.sample_steps, 1, 500)
        check_int_range("--sample-seed", self.sample_seed, 0, 2**32 - 1)
        if not isinstance(self.sample_prompts, (list, tuple)) or not all(
                isinstance(p, str) and p.strip() for p in self.sample_prompts):
            raise ConfigError(f"--sample-prompt must be a list of non-empty prompts (got {self.sample_prompts!r}).")
        if self.resume is not None and self.resume != "latest" and not Path(self.resume).is_dir():
            raise ConfigError(
                f"--resume {self.resume!r}: no such checkpoint folder. Use --resume latest to continue from the "
                "newest checkpoint in the output folder, or give a checkpoint-N folder."
            )
        if not self.output_dir:
            raise ConfigError("--output-dir is empty: give a folder for the trained model.")
        return self

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def step_in_backward_allowed(config: TrainConfig) -> str | None:
    """None when the optimizer step may run inside the backward pass; else the reason it may not."""
    if config.max_grad_norm > 0:
        return "gradient clipping needs the norm of all gradients before any parameter changes"
    if config.gradient_accumulation_steps > 1:
        return "gradient accumulation needs the gradients of several backward passes"
    return None


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} {value!r} is not allowed; choose one of: {', '.join(allowed)}.")


def check_int_range(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high} (got {value!r}).")


def _float_range(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number from {low:g} to {high:g} (got {value!r}).")
