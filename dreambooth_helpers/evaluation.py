"""How good is a trained model? The DreamBooth paper's protocol, its report, and which checkpoint to keep.

The paper (Ruiz et al. 2022, section 4.1) measures a personalised model by generating images from 25
prompts (`paper_prompts`, "object" or "live" set: `prompt_set_for`), several images each, and comparing
them with the subject's photos and the prompts: DINO, CLIP-I and CLIP-T (eval_encoders.py: the encoders,
real or tiny, and the numbers). Prior preservation is measured as in the paper's Table 3, on images of the
class prompt from the trained model and from its base model: PRES and DIV (eval_diversity.py).

`evaluate_model(model, instance_dir, class_noun)` runs that protocol and writes a JSON + markdown report
(`EvaluationReport`) and image grids; `evaluate_checkpoints(run_dir, ...)` does it for every saved
checkpoint, plots the numbers against steps and recommends one (`choose_checkpoint` states the rule).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .checkpoints import list_checkpoints, pipeline_from_checkpoint
from .data import read_images, require_usable
from .errors import ConfigError
from .eval_diversity import (
    DEFAULT_CLASS_SAMPLES,
    ClassPriorScores,
    class_comparison_grid,
    class_prior_scores,
    load_perceptual_distance,
)
from .eval_encoders import (
    DEFAULT_ENCODERS,
    Encoders,
    EvalPrompt,
    SubjectScores,
    as_encoders,
    default_device,
    real_image_scores,
    score_images,
)
from .files import LORA_WEIGHTS_FILE, MODEL_INDEX_FILE, SUMMARY_FILE
from .grids import labelled_grid
from .inference import (
    DEFAULT_GUIDANCE,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    Generator,
    load_generator,
    make_scheduler,
    read_training_summary,
    save_memory,
    subject_from_prompts,
)
from .subject import DEFAULT_KIND, SUBJECT_KINDS, evaluation_kind

PROMPT_SETS = ("object", "live")  # the paper's two prompt lists: things, and pets and people
# What evaluate's --kind takes: a subject kind (style is refused: the protocol measures a subject), or "live", the
# paper's own name for the prompt list of pets and people.
KIND_CHOICES = (*SUBJECT_KINDS, *(name for name in PROMPT_SETS if name not in SUBJECT_KINDS))
DEFAULT_IDENTIFIER = "sks"

# Table 1 of the paper. "Real images" compares real photos of a subject with each other: the ceiling.
PAPER_FIGURES: dict[str, dict[str, float | None]] = {
    "DreamBooth (Stable Diffusion), paper": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "DreamBooth (Imagen), paper": {"dino": 0.696, "clip_i": 0.812, "clip_t": 0.306},
    "Real images, paper": {"dino": 0.774, "clip_i": 0.885, "clip_t": None},
}

# The paper's evaluation prompts (its dataset README lists them). "{}" is "<identifier> <class noun>".
# Objects are put in scenes and given new properties; live subjects (pets, people) also get outfits.
OBJECT_PROMPTS = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)
LIVE_SUBJECT_PROMPTS = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)



# ---------------------------------------------------------------------------- prompts


def prompt_set_for(kind: str | None, summary: dict[str, Any] | None = None) -> str:
    """The paper's prompt set ("object" or "live") for `kind`: a subject kind or a prompt set's own name.

    None means the kind the run was trained as (its training summary's config), else DEFAULT_KIND.
    A style is refused: the paper's protocol measures likeness to one subject.
    """
    recorded = ((summary or {}).get("config") or {}).get("kind")
    if kind is None:
        kind = recorded if recorded in SUBJECT_KINDS else DEFAULT_KIND
    if kind in PROMPT_SETS:
        return kind
    if kind not in SUBJECT_KINDS:
        raise ConfigError(f"--kind {kind!r}: use object (things and pets), person (faces; \"live\" is the paper's "
                          "name for the same prompts) or leave it out to use the kind the run was trained as.")
    prompt_set = evaluation_kind(kind)
    if prompt_set is None:
        raise ConfigError(f"--kind {kind}: the DreamBooth paper's protocol measures likeness to one subject, which a "
                          f"{kind} is not, so there is nothing to score. Look at the samples and generated images "
                          "instead (or pass --kind object if the run did teach a subject).")
    return prompt_set


def paper_prompts(class_noun: str, *, prompt_set: str = "object", identifier: str = DEFAULT_IDENTIFIER,
                  count: int | None = None) -> list[EvalPrompt]:
    """The paper's 25 prompts for an object or a live subject; `count` takes the first N (quick looks)."""
    if prompt_set not in PROMPT_SETS:
        raise ConfigError(f"Prompt set {prompt_set!r}: use \"object\" for things, \"live\" for pets and people.")
    if not class_noun or not class_noun.strip():
        raise ConfigError("--class-noun is empty: give the class of your subject, e.g. dog, backpack, man.")
    templates = OBJECT_PROMPTS if prompt_set == "object" else LIVE_SUBJECT_PROMPTS
    if count is not None and not 1 <= count <= len(templates):
        raise ConfigError(f"Number of prompts must be from 1 to {len(templates)} (got {count}).")
    subject = f"{identifier} {class_noun}".strip()
    return [EvalPrompt(t.format(subject), t.format(class_noun.strip())) for t in templates[:count]]


# ---------------------------------------------------------------------------- generation


GenerateFn = Callable[[str, int, int], list[Image.Image]]  # (prompt, first seed, count); image j uses seed + j


def generator_fn(generator, *, num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 resolution: int | None = None) -> GenerateFn:
    """A GenerateFn over an `inference.Generator`: one batched call per prompt, one seed per image."""

    def generate(prompt: str, seed: int, count: int) -> list[Image.Image]:
        results = generator.generate(prompt, num_images=count, steps=num_inference_steps,
                                     guidance_scale=guidance_scale, seed=seed, width=resolution, height=resolution)
        return [result.image for result in results]

    return generate


def generate_images(generate: GenerateFn, prompts: Sequence[EvalPrompt], images_per_prompt: int,
                    seed: int = 0) -> list[list[Image.Image]]:
    """`images_per_prompt` images per prompt with fixed seeds: image j of prompt i uses seed + i*N + j, so
    every checkpoint and every rerun starts from the same noise."""
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ConfigError(f"Images per prompt must be a whole number >= 1 (got {images_per_prompt!r}); "
                          "the paper uses 4.")
    return [generate(p.prompt, seed + i * images_per_prompt, images_per_prompt) for i, p in enumerate(prompts)]


def _checkpoint_generator(checkpoint: Path, base_model: str | None, resolution: int | None = None, device=None,
                          **memory_savings: bool):
    """An `inference.Generator` over one training checkpoint (the training module knows its layout).

    `memory_savings`: attention_slicing and vae_tiling, as `inference.load_generator` takes them.
    """
    pipe = pipeline_from_checkpoint(checkpoint, base_model)
    pipe.scheduler = make_scheduler(DEFAULT_SCHEDULER, pipe.scheduler.config)
    device = torch.device(device) if device is not None else default_device()
    pipe.to(device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    save_memory(pipe, **memory_savings)
    pipe.set_progress_bar_config(disable=True)
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return Generator(pipeline=pipe, model=str(checkpoint), lora=None, default_resolution=resolution,
                     scheduler_name=DEFAULT_SCHEDULER, device=str(device))


def _summary(folder: Any) -> dict[str, Any]:
    path = Path(str(folder)).expanduser()
    return (read_training_summary(path) or {}) if isinstance(folder, (str, Path)) and path.is_dir() else {}


def _identifier_for(summary: dict[str, Any], identifier: str | None) -> tuple[str, str]:
    """The identifier to put in prompts, and where it came from (shown in the report)."""
    if identifier:
        return identifier, "given"
    concepts = (summary.get("config") or {}).get("concepts") or []
    if concepts:
        token, _ = subject_from_prompts(concepts[0].get("instance_prompt", ""), concepts[0].get("class_prompt"))
        if token:
            return token, SUMMARY_FILE
    return DEFAULT_IDENTIFIER, f"assumed {DEFAULT_IDENTIFIER!r} (pass identifier= / --identifier if yours differs)"


# ---------------------------------------------------------------------------- one model


@dataclass
class EvaluationReport:
    """Result of `evaluate_model`: our numbers, the paper's, timings, and where the files are."""

    scores: SubjectScores
    real_images: dict[str, float | None]
    settings: dict[str, Any]
    timings: dict[str, float]
    encoders: str
    encoder_weights: str
    paper: dict[str, dict[str, float | None]] = field(default_factory=lambda: dict(PAPER_FIGURES))
    class_prior: ClassPriorScores | None = None  # DIV and PRES of the class prompt, before and after
    json_path: str | None = None
    markdown_path: str | None = None
    grid_path: str | None = None
    class_grid_path: str | None = None  # the class prompt's images before and after, side by side

    @property
    def figures(self) -> dict[str, float]:
        return {"dino": self.scores.dino, "clip_i": self.scores.clip_i, "clip_t": self.scores.clip_t}

    def to_dict(self) -> dict[str, Any]:
        return {"figures": self.figures, "scores": self.scores.to_dict(), "real_images": self.real_images,
                "paper": self.paper, "settings": self.settings, "timings": self.timings, "encoders": self.encoders,
                "encoder_weights": self.encoder_weights,
                "class_prior": self.class_prior.to_dict() if self.class_prior else None,
                "files": {"json": self.json_path, "markdown": self.markdown_path, "grid": self.grid_path,
                          "class_grid": self.class_grid_path}}

    def to_markdown(self) -> str:
        def cell(value):
            return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

        s = self.settings
        lines = [
            "# DreamBooth evaluation",
            "",
            f"Model `{s['model']}`, subject \"{s['identifier']} {s['class_noun']}\" ({s['prompt_set']}), "
            f"{s['num_prompts']} prompts x {s['images_per_prompt']} images, seed {s['seed']}, "
            f"{s['num_inference_steps']} steps, guidance {s['guidance_scale']}. Encoders: {self.encoders}.",
            "",
        ]
        if self.encoder_weights == "tiny":
            lines += ["**Tiny random encoders: these numbers test the pipeline and mean nothing about the model.**",
                      ""]
        lines += ["| | DINO | CLIP-I | CLIP-T |", "| --- | --- | --- | --- |",
                  f"| **this model** | {cell(self.scores.dino)} | {cell(self.scores.clip_i)} | "
                  f"{cell(self.scores.clip_t)} |",
                  f"| your photos vs each other | {cell(self.real_images['dino'])} | "
                  f"{cell(self.real_images['clip_i'])} | - |"]
        lines += [f"| {name} | {cell(v['dino'])} | {cell(v['clip_i'])} | {cell(v['clip_t'])} |"
                  for name, v in self.paper.items()]
        lines += ["", "DINO and CLIP-I: how much the images look like your subject (higher is closer; your photos "
                  "against each other are the ceiling). CLIP-T: how well each image follows its prompt. See "
                  "docs/evaluation.md for how to read them.", "", "| prompt | DINO | CLIP-I | CLIP-T |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {p.prompt} | {cell(p.dino)} | {cell(p.clip_i)} | {cell(p.clip_t)} |"
                  for p in self.scores.per_prompt]
        if self.class_prior is not None:
            lines += ["", *self.class_prior.markdown_lines(cell, self.class_grid_path)]
        t = self.timings
        lines += ["", f"Time: generation {t['generation_s']:.1f} s, metrics {t['metrics_s']:.2f} s "
                  f"({self.scores.num_images} images)."]
        if self.grid_path:
            lines += ["", f"![images]({Path(self.grid_path).name})"]
        return "\n".join(lines) + "\n"

    def save(self, output_dir: str | Path, grid: Image.Image | None = None,
             class_grid: Image.Image | None = None) -> EvaluationReport:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if grid is not None:
            self.grid_path = str(folder / "evaluation_grid.png")
            grid.save(self.grid_path)
        if class_grid is not None:
            self.class_grid_path = str(folder / "class_prior_grid.png")
            class_grid.save(self.class_grid_path)
        self.json_path, self.markdown_path = str(folder / "evaluation.json"), str(folder / "evaluation.md")
        Path(self.json_path).write_text(json.dumps(self.to_dict(), indent=2))
        Path(self.markdown_path).write_text(self.to_markdown())
        return self


def image_grid(generated: Sequence[Sequence[Image.Image]], prompts: Sequence[EvalPrompt],
               real_images: Sequence[Image.Image] = (), cell: int = 128, label_width: int = 220) -> Image.Image:
    """One row per prompt (label on the left), real photos in the first row."""
    rows = ([("your photos", list(real_images))] if real_images else []) + [
        (p.prompt, list(g)) for p, g in zip(prompts, generated, strict=True)]
    return labelled_grid(rows, cell=cell, label_width=label_width)


def _real_images(instance_dir: Any) -> list[Image.Image]:
    return [record.image for record in require_usable(read_images(instance_dir)).images]


def _instance_dir_for(summary: dict[str, Any], instance_dir: Any) -> Any:
    """The real photos: as given, else the folder the run trained on (from its summary)."""
    concepts = (summary.get("config") or {}).get("concepts") or []
    instance_dir = instance_dir or (concepts[0].get("instance_dir") if concepts else None)
    if not instance_dir:
        raise ConfigError(f"No instance photos given and none recorded in {SUMMARY_FILE}: pass the folder "
                          "with your subject's photos (instance_dir= / --instance-dir).")
    return instance_dir


def evaluate_model(model: Any, class_noun: str, *, instance_dir: Any = None, prompt_set: str | None = None,
                   identifier: str | None = None, images_per_prompt: int = 4, num_prompts: int | None = None,
                   seed: int = 0, num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                   resolution: int | None = None, encoders: Encoders | str | None = DEFAULT_ENCODERS,
                   output_dir: str | Path | None = None, lora: str | None = None,
                   generate: GenerateFn | None = None, attention_slicing: bool = False,
                   vae_tiling: bool = False, class_samples: int = DEFAULT_CLASS_SAMPLES,
                   class_prompt: str | None = None, base_model: str | None = None,
                   diversity_distance: str = "auto", base_generate: GenerateFn | None = None) -> EvaluationReport:
    """Run the paper's protocol on `model` and (with `output_dir`) write evaluation.json/.md and a grid.

    `model`: a trained output folder (full or LoRA), a Hub id, "tiny", or an `inference.Generator` already
    loaded. `instance_dir`: your subject's photos (default: the folder the run trained on). `prompt_set`:
    "object", "live", or a subject kind (see `prompt_set_for`; default: the kind the run was trained as).
    `num_prompts` takes the first N of the 25 for a quick look; the paper uses all 25 with 4 images each.
    `generate` replaces the model entirely (tests, or a custom sampler). `attention_slicing` and `vae_tiling`
    save GPU memory when the model is loaded here (see `inference.load_generator`).

    What prior preservation protects: `class_samples` images of `class_prompt` (default: the run's class prompt,
    else "a photo of CLASS_NOUN") from this model and from its base model (`base_model`, default: the one the run
    trained from; `base_generate` replaces it), scored with DIV and PRES (`class_prior_scores`) and drawn side by
    side (`class_comparison_grid`). `class_samples=0` skips it.
    """
    summary = _summary(model)
    prompt_set = prompt_set_for(prompt_set, summary)
    instance_dir = _instance_dir_for(summary, instance_dir)
    encoders = as_encoders(encoders)  # before generating: a missing encoder should fail before minutes of work
    identifier, identifier_source = _identifier_for(summary, identifier)
    prompts = paper_prompts(class_noun, prompt_set=prompt_set, identifier=identifier, count=num_prompts)
    real = _real_images(instance_dir)
    if class_samples and class_samples < 2:
        raise ConfigError(f"--class-samples {class_samples}: DIV compares pairs, so use 2 or more (16 by default), "
                          "or 0 to skip the class-prompt check.")
    distance = load_perceptual_distance(diversity_distance) if class_samples else None
    class_prompt = class_prompt or _class_prompt_for(summary, class_noun)
    base_model = base_model or _base_model_for(summary, model, lora)
    loads_models = generate is None
    if generate is None:
        loaded = model if hasattr(model, "generate") else load_generator(
            str(model), lora, attention_slicing=attention_slicing, vae_tiling=vae_tiling)
        generate = generator_fn(loaded, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                resolution=resolution)
    started = time.perf_counter()
    generated = generate_images(generate, prompts, images_per_prompt, seed)
    class_after = generate(class_prompt, seed, class_samples) if class_samples else []
    if class_samples and base_generate is None and base_model and loads_models:
        del generate, loaded  # one model on the GPU at a time
        release_memory()
        base_generate = generator_fn(load_generator(base_model, attention_slicing=attention_slicing,
                                                    vae_tiling=vae_tiling),
                                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                     resolution=resolution)
    class_before = base_generate(class_prompt, seed, class_samples) if class_samples and base_generate else []
    generation_s = time.perf_counter() - started
    started = time.perf_counter()
    scores = score_images(generated, prompts, real, encoders)
    real_scores = real_image_scores(real, encoders)
    class_prior = class_prior_scores(class_after, class_prompt, before=class_before, real_images=real,
                                     encoders=encoders, distance=distance,
                                     base_model=base_model if class_before else None) if class_samples else None
    metrics_s = time.perf_counter() - started
    settings = {"model": str(model) if isinstance(model, (str, Path)) else getattr(model, "model", "custom"),
                "lora": lora, "instance_dir": str(instance_dir), "class_noun": class_noun, "prompt_set": prompt_set,
                "identifier": identifier, "identifier_source": identifier_source, "num_prompts": len(prompts),
                "images_per_prompt": images_per_prompt, "seed": seed, "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale, "resolution": resolution, "class_samples": class_samples,
                "class_prompt": class_prompt if class_samples else None}
    report = EvaluationReport(scores, real_scores, settings, {"generation_s": generation_s, "metrics_s": metrics_s},
                              encoders.description, encoders.weights, class_prior=class_prior)
    if output_dir is not None:
        class_grid = class_comparison_grid(class_before, class_after, class_prompt) if class_after else None
        report.save(output_dir, image_grid(generated, prompts, real), class_grid)
    return report


def _class_prompt_for(summary: dict[str, Any], class_noun: str) -> str:
    """The class prompt the run's prior preservation used, else "a photo of CLASS_NOUN"."""
    concepts = (summary.get("config") or {}).get("concepts") or []
    recorded = concepts[0].get("class_prompt") if concepts else None
    return recorded or f"a photo of {class_noun.strip()}"


def _base_model_for(summary: dict[str, Any], model: Any, lora: str | None) -> str | None:
    """The model a run started from: the base given with --lora, else the one its summary records."""
    if lora is not None and isinstance(model, (str, Path)):
        return str(model)
    recorded = summary.get("base_model") or (summary.get("config") or {}).get("model")
    return str(recorded) if recorded else None


def release_memory() -> None:
    """Give freed GPU memory back before the next model loads."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointScore:
    step: int
    path: str
    scores: SubjectScores

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "path": self.path, "dino": self.scores.dino, "clip_i": self.scores.clip_i,
                "clip_t": self.scores.clip_t}


DEFAULT_CLIP_T_TOLERANCE = 0.01


def choose_checkpoint(points: Sequence[CheckpointScore],
                      clip_t_tolerance: float = DEFAULT_CLIP_T_TOLERANCE) -> tuple[CheckpointScore, str]:
    """The rule: among checkpoints whose CLIP-T is within `clip_t_tolerance` of the best CLIP-T of the run,
    take the one with the highest DINO (ties: the earlier step). Returns it and the rule in words.

    Why: DINO rises as the model learns the subject; once it starts copying the training photos,
    prompts stop mattering and CLIP-T falls. The tolerance (0.01, about the spread between the paper's
    methods) lets likeness grow until prompt-following visibly suffers.
    """
    if not points:
        raise ConfigError("No checkpoints to choose from: train with --checkpoint-every N to save some.")
    best_clip_t = max(p.scores.clip_t for p in points)
    eligible = [p for p in points if p.scores.clip_t >= best_clip_t - clip_t_tolerance]
    chosen = max(eligible, key=lambda p: (p.scores.dino, -p.step))
    reason = (f"step {chosen.step}: highest DINO ({chosen.scores.dino:.3f}) among the {len(eligible)} of "
              f"{len(points)} checkpoints whose CLIP-T is within {clip_t_tolerance:g} of the run's best "
              f"({best_clip_t:.3f}); later checkpoints that score higher on DINO but lower on CLIP-T are "
              "copying the training photos instead of following prompts.")
    return chosen, reason


@dataclass
class CheckpointComparison:
    """Result of `evaluate_checkpoints`: the numbers per checkpoint, the plot, and the recommendation."""

    points: list[CheckpointScore]
    recommended: CheckpointScore
    reason: str
    plot_path: str | None = None
    json_path: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def recommended_path(self) -> str:
        return self.recommended.path

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoints": [p.to_dict() for p in self.points], "recommended": self.recommended.to_dict(),
                "reason": self.reason, "plot": self.plot_path, "settings": self.settings}

    def to_markdown(self) -> str:
        lines = ["| step | DINO | CLIP-I | CLIP-T | |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {p.step} | {p.scores.dino:.3f} | {p.scores.clip_i:.3f} | {p.scores.clip_t:.3f} | "
                  f"{'recommended' if p is self.recommended else ''} |" for p in self.points]
        return "\n".join(lines + ["", f"Recommended: {self.reason}"]) + "\n"


def plot_checkpoint_metrics(points: Sequence[CheckpointScore], path: str | Path,
                            recommended: CheckpointScore | None = None) -> str:
    """DINO, CLIP-I (left axis) and CLIP-T (right axis) against steps, the recommendation marked. Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [p.step for p in points]
    figure, subject_axis = plt.subplots(figsize=(7, 4), dpi=110)
    subject_axis.plot(steps, [p.scores.dino for p in points], "o-", color="tab:blue", label="DINO (subject)")
    subject_axis.plot(steps, [p.scores.clip_i for p in points], "s-", color="tab:cyan", label="CLIP-I (subject)")
    subject_axis.set_xlabel("training step")
    subject_axis.xaxis.get_major_locator().set_params(integer=True)
    subject_axis.set_ylabel("subject fidelity")
    prompt_axis = subject_axis.twinx()
    prompt_axis.plot(steps, [p.scores.clip_t for p in points], "^--", color="tab:red", label="CLIP-T (prompt)")
    prompt_axis.set_ylabel("prompt fidelity (CLIP-T)", color="tab:red")
    for axis in (subject_axis, prompt_axis):  # absolute values, not "1e-6 + 0.041" offsets
        axis.ticklabel_format(axis="y", useOffset=False)
    if recommended is not None:
        subject_axis.axvline(recommended.step, color="gray", linestyle=":", label=f"recommended: {recommended.step}")
    handles = subject_axis.get_legend_handles_labels()[0] + prompt_axis.get_legend_handles_labels()[0]
    subject_axis.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    subject_axis.set_title("Subject fidelity rising while CLIP-T falls = overfitting")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return str(path)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def evaluate_checkpoints(run_dir: str | Path, class_noun: str, *, instance_dir: Any = None,
                         prompt_set: str | None = None, identifier: str | None = None, images_per_prompt: int = 2,
                         num_prompts: int | None = 8, seed: int = 0, num_inference_steps: int = DEFAULT_STEPS,
                         guidance_scale: float = DEFAULT_GUIDANCE,
                         resolution: int | None = None, encoders: Encoders | str | None = DEFAULT_ENCODERS,
                         include_final: bool = True, base_model: str | None = None,
                         clip_t_tolerance: float = DEFAULT_CLIP_T_TOLERANCE,
                         output_dir: str | Path | None = None, attention_slicing: bool = False,
                         vae_tiling: bool = False) -> CheckpointComparison:
    """Score every saved checkpoint of a run (and the final model), plot the numbers, recommend one.

    Lighter than the paper by default (8 prompts x 2 images per checkpoint) because it runs once per
    checkpoint; every checkpoint gets the same prompts and seeds, so the differences are the weights'.
    `instance_dir`, `base_model`, the identifier and the prompt set (`prompt_set_for`) default to what the
    run recorded. Writes
    checkpoint_metrics.png, checkpoints.json and checkpoints.md to `output_dir` (default RUN/evaluation).
    """
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise ConfigError(f"Run folder {str(run)!r} does not exist: give the --output-dir of a training run.")
    summary = _summary(run)
    prompt_set = prompt_set_for(prompt_set, summary)
    instance_dir = _instance_dir_for(summary, instance_dir)
    checkpoints = list_checkpoints(run)
    has_final = include_final and ((run / MODEL_INDEX_FILE).is_file() or (run / LORA_WEIGHTS_FILE).is_file())
    if len(checkpoints) + has_final < 2:
        raise ConfigError(
            f"{str(run)!r} has {len(checkpoints)} checkpoint(s){' and the final model' if has_final else ''}: "
            "nothing to compare. Train with --checkpoint-every N and a --checkpoints-total-limit high enough to "
            "keep them (the default keeps only the newest 2)."
        )
    encoders = as_encoders(encoders)
    identifier, _ = _identifier_for(summary, identifier)
    prompts = paper_prompts(class_noun, prompt_set=prompt_set, identifier=identifier, count=num_prompts)
    real = _real_images(instance_dir)
    trained_at = summary.get("resolution")  # checkpoints generate at the run's size, like the final model
    savings = {"attention_slicing": attention_slicing, "vae_tiling": vae_tiling}
    targets = [(_step_of(c), c, lambda c=c: _checkpoint_generator(c, base_model, trained_at, **savings))
               for c in checkpoints]
    final_step = int(summary.get("steps") or (targets[-1][0] + 1 if targets else 0))
    if has_final and final_step not in {step for step, _, _ in targets}:
        targets.append((final_step, run, lambda: load_generator(str(run), **savings)))
    points = []
    for step, folder, load in targets:
        generate = generator_fn(load(), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                resolution=resolution)
        generated = generate_images(generate, prompts, images_per_prompt, seed)
        points.append(CheckpointScore(step, str(folder), score_images(generated, prompts, real, encoders)))
    recommended, reason = choose_checkpoint(points, clip_t_tolerance)
    settings = {"run_dir": str(run), "class_noun": class_noun, "prompt_set": prompt_set, "identifier": identifier,
                "num_prompts": len(prompts), "images_per_prompt": images_per_prompt, "seed": seed,
                "clip_t_tolerance": clip_t_tolerance, "encoders": encoders.description}
    comparison = CheckpointComparison(points, recommended, reason, settings=settings)
    folder = Path(output_dir) if output_dir is not None else run / "evaluation"
    comparison.plot_path = plot_checkpoint_metrics(points, folder / "checkpoint_metrics.png", recommended)
    comparison.json_path = str(folder / "checkpoints.json")
    Path(comparison.json_path).write_text(json.dumps(comparison.to_dict(), indent=2))
    (folder / "checkpoints.md").write_text(comparison.to_markdown())
    return comparison
