"""One typed, validated configuration object for a DreamBooth run, and the presets.

`TrainConfig` holds every setting; `TrainConfig.from_preset("t4", ...)` starts from a preset and
overrides fields. `validate()` refuses bad values and impossible combinations with a message that
names the option, so a mistake is caught before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

MIXED_PRECISIONS = ("fp16", "bf16", "no")
ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
CROP_MODES = ("center", "pad")
MEMORY_PLANS = ("auto", "as-set", "smallest")
TINY_MODEL = "tiny"
TOY_MODEL = "toy"  # the offline default, trained on the toy world and shipped (models.TOY_MODEL_DIR)
TOY_LEARNING_RATES = {"full": 1e-4, "lora": 1e-3}  # measured with scripts/measure_toy_model.py


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


@dataclass
class TrainConfig:
    """Every setting of a training run. Field comments double as the CLI's help text."""

    # What to teach.
    concepts: list[Concept] = field(default_factory=list)
    output_dir: str = "outputs/dreambooth"
    model: str = TOY_MODEL  # Hub id, local diffusers folder, single .safetensors/.ckpt file, "toy" or "tiny"
    preset: str = "t4"

    # Data.
    resolution: int | None = None  # square training size; None: the model's own (512 for SD 1.x, 64 for tiny)
    crop: str = "center"  # "center" crops to a square; "pad" keeps the whole photo and pads it
    random_flip: bool = False  # mirror images at random; do not use for asymmetric subjects or text

    # Prior preservation: generated class images keep the model's idea of the class intact.
    with_prior_preservation: bool = True
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_images_batch_size: int = 4
    class_images_steps: int = 25

    # Optimisation.
    max_train_steps: int | None = None  # None: 150 steps per instance image, within 400..1600
    learning_rate: float | None = None  # None: 2e-6 full fine-tune, 1e-4 LoRA (toy model: TOY_LEARNING_RATES)
    text_encoder_learning_rate: float | None = None  # None: same as learning_rate
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    adam_weight_decay: float = 1e-2
    use_8bit_adam: bool = True
    seed: int = 0

    # Which weights train.
    train_text_encoder: bool = True
    stop_text_encoder_training_at: int | None = None  # freeze the text encoder after this many steps
    lora: bool = False
    lora_rank: int = 4
    lora_alpha: int | None = None  # None: equal to the rank

    # Memory and speed.
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = True
    attention: str = "auto"  # "auto": xformers when installed and working, else PyTorch SDPA
    cache_latents: bool = True  # encode every image once with the VAE, then move the VAE off the GPU
    # "auto": on a GPU, the memory planner picks the fastest checkpointing/step-in-backward that fits the
    # free memory; "smallest": the least memory; "as-set": gradient_checkpointing/step_in_backward as given.
    memory_plan: str = "auto"
    step_in_backward: bool = False  # optimizer step per parameter during backward: no full gradient copy
    cache_text_embeddings: bool = True  # a frozen text encoder encodes each prompt once, then leaves the GPU
    channels_last: bool = False  # UNet convolutions in NHWC layout (tensor-core friendly on some GPUs)

    # Checkpoints and samples.
    checkpoint_every: int | None = None
    checkpoints_total_limit: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    sample_every: int | None = None
    sample_prompts: list[str] = field(default_factory=list)  # empty: the instance prompt(s)
    sample_steps: int = 20
    sample_seed: int = 1234

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_preset(cls, preset: str = "t4", **overrides: Any) -> TrainConfig:
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

    # ------------------------------------------------------------------ derived values

    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        if self.model == TOY_MODEL:
            # ~200x smaller than SD and trained at 6e-4: SD's 2e-6 would not move it in a few hundred steps.
            return TOY_LEARNING_RATES["lora" if self.lora else "full"]
        return 1e-4 if self.lora else 2e-6

    @property
    def effective_text_encoder_learning_rate(self) -> float:
        if self.text_encoder_learning_rate is not None:
            return self.text_encoder_learning_rate
        return self.effective_learning_rate

    def steps_for(self, num_instance_images: int) -> int:
        """The step count: as asked, or ~150 per photo (community practice is 100-200)."""
        if self.max_train_steps is not None:
            return self.max_train_steps
        return min(1600, max(400, 150 * num_instance_images))

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
        _choice("--preset", self.preset, tuple(PRESETS))
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"--model must name a base model (got {self.model!r}): a Hub id such as stable-"
                              f"diffusion-v1-5/stable-diffusion-v1-5, a local folder or file, {TOY_MODEL!r} or "
                              f"{TINY_MODEL!r}.")
        for name, value in (("--random-flip", self.random_flip), ("--prior-preservation", self.with_prior_preservation),
                            ("--use-8bit-adam", self.use_8bit_adam), ("--train-text-encoder", self.train_text_encoder),
                            ("--lora", self.lora), ("--gradient-checkpointing", self.gradient_checkpointing),
                            ("--cache-latents", self.cache_latents), ("--step-in-backward", self.step_in_backward),
                            ("--cache-text-embeddings", self.cache_text_embeddings),
                            ("--channels-last", self.channels_last)):
            if not isinstance(value, bool):  # "false" from a JSON file or a form would read as true
                raise ConfigError(f"{name} must be true or false (got {value!r}).")
        _choice("--mixed-precision", self.mixed_precision, MIXED_PRECISIONS)
        _choice("--attention", self.attention, ATTENTION_BACKENDS)
        _choice("--lr-scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("--crop", self.crop, CROP_MODES)
        _choice("--memory-plan", self.memory_plan, MEMORY_PLANS)
        if self.resolution is not None:
            _int_range("--resolution", self.resolution, 16, 2048)
        if self.resolution is not None and self.resolution % 8:
            raise ConfigError(f"--resolution must be a multiple of 8 (got {self.resolution}); SD 1.x uses 512.")
        _int_range("--num-class-images", self.num_class_images, 1 if self.with_prior_preservation else 0, 10_000)
        _int_range("--class-images-batch-size", self.class_images_batch_size, 1, 64)
        _int_range("--class-images-steps", self.class_images_steps, 1, 500)
        _float_range("--prior-loss-weight", self.prior_loss_weight, 0.0, 100.0)
        if self.max_train_steps is not None:
            _int_range("--max-train-steps", self.max_train_steps, 1, 1_000_000)
        for name, value in (("--learning-rate", self.learning_rate),
                            ("--text-encoder-learning-rate", self.text_encoder_learning_rate)):
            if value is not None:
                _float_range(name, value, 1e-9, 1e-1)
        _int_range("--lr-warmup-steps", self.lr_warmup_steps, 0, 1_000_000)
        _int_range("--train-batch-size", self.train_batch_size, 1, 64)
        _int_range("--gradient-accumulation-steps", self.gradient_accumulation_steps, 1, 256)
        if self.step_in_backward:
            from .memory import step_in_backward_allowed

            why_not = step_in_backward_allowed(self)
            if why_not:
                raise ConfigError(f"--step-in-backward cannot be used here: {why_not}. Use --max-grad-norm 0 "
                                  "and --gradient-accumulation-steps 1, or drop it.")
        _float_range("--max-grad-norm", self.max_grad_norm, 0.0, 1e6)
        _float_range("--adam-weight-decay", self.adam_weight_decay, 0.0, 1.0)
        _int_range("--seed", self.seed, 0, 2**32 - 1)
        _int_range("--lora-rank", self.lora_rank, 1, 1024)
        if self.lora_alpha is not None:
            _int_range("--lora-alpha", self.lora_alpha, 1, 4096)
        if self.stop_text_encoder_training_at is not None:
            if not self.train_text_encoder:
                raise ConfigError(
                    "--stop-text-encoder-training-at only makes sense with --train-text-encoder; "
                    "drop one of the two."
                )
            _int_range("--stop-text-encoder-training-at", self.stop_text_encoder_training_at, 1, 1_000_000)
        if self.checkpoint_every is not None:
            _int_range("--checkpoint-every", self.checkpoint_every, 1, 1_000_000)
        _int_range("--checkpoints-total-limit", self.checkpoints_total_limit, 1, 1000)
        if self.sample_every is not None:
            _int_range("--sample-every", self.sample_every, 1, 1_000_000)
        _int_range("--sample-steps", self.sample_steps, 1, 500)
        _int_range("sample_seed", self.sample_seed, 0, 2**32 - 1)
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


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} {value!r} is not allowed; choose one of: {', '.join(allowed)}.")


def _int_range(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high} (got {value!r}).")


def _float_range(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number from {low:g} to {high:g} (got {value!r}).")


# Each preset: a one-line description (shown by the CLI and the notebook) and the settings it changes.
PRESETS: dict[str, dict[str, Any]] = {
    "t4": {
        "description": "Free Colab T4 (15 GiB): full UNet + text encoder, prior preservation, 8-bit AdamW, "
        "fp16, 512 px; gradient checkpointing only if the free GPU memory needs it.",
        "settings": {},
    },
    "t4-lora": {
        "description": "T4, LoRA rank 8 on UNet and text encoder: small files (~6 MB), faster, less memory.",
        "settings": {"lora": True, "lora_rank": 8, "gradient_checkpointing": False},
    },
    "low-memory": {
        "description": "8 GB cards: full UNet + text encoder with every memory saving on, including the optimizer "
                       "step inside backward (which rules out gradient clipping).",
        # max_grad_norm 0: clipping needs every gradient at once, the very thing the step inside backward avoids.
        # Adam already bounds each weight's step by its learning rate; DreamBooth's rates are small.
        "settings": {"gradient_checkpointing": True, "use_8bit_adam": True, "cache_latents": True,
                     "class_images_batch_size": 1, "memory_plan": "smallest", "max_grad_norm": 0.0},
    },
    "large-gpu": {
        "description": "24 GB+ (A100, L4, 3090/4090): no gradient checkpointing, bf16 where supported, batch 2.",
        "settings": {"gradient_checkpointing": False, "mixed_precision": "bf16", "train_batch_size": 2,
                     "use_8bit_adam": False},
    },
}
