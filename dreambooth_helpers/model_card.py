"""The model card (README.md) of a published model: what was trained, read from its output folder, and the card.

The card states what the run used, as its training summary records it, not what its config asked for. Everything
from the run that lands in the card (prompts, the identifier, the base model's name, the license) is quoted for
the language it lands in: `shlex.quote` on the bash lines, Python string literals in the Python snippet, code spans
and fences longer than any run of backticks in them in Markdown (table cells escaped), and the YAML front matter
written by a YAML writer; a class noun such as `dog" $(touch X) "` stays text everywhere.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .config import short_number
from .errors import ConfigError, ModelLoadError
from .export_lora import lora_family
from .families import SDXL_RANDOM, TINY_SDXL_MODEL, ModelFamily, family_of
from .files import GRID_FILE, LORA_WEIGHTS_FILE, MODEL_INDEX_FILE
from .inference import example_prompts, read_training_summary, subject_from_prompts
from .models import MOVED_REPOS, SD15_RANDOM, TINY_MODEL, TOY_MODEL

# What the card says of the models this project builds in its own code; they carry the project's license.
BUILT_IN_BASES = {
    TINY_MODEL: "the tiny test model built into dreambooth-helpers (random weights; for trying the tools, not for art)",
    TOY_MODEL: "the toy-world model shipped with dreambooth-helpers (32 px coloured shapes, trained on a CPU; for "
               "trying DreamBooth offline, not for art)",
    SD15_RANDOM: "a randomly initialised model with Stable Diffusion 1.5's shapes (for benchmarks)",
    TINY_SDXL_MODEL: "the tiny SDXL-shaped test model built into dreambooth-helpers (random weights; for trying the "
                     "tools, not for art)",
    SDXL_RANDOM: "a randomly initialised model with SDXL's shapes (for benchmarks)",
}
BUILT_IN_LICENSE = "apache-2.0"
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID_PATTERN.match(repo_id) or ".." in repo_id:
        raise ConfigError(f"--repo-id {repo_id!r} is not a repository name. Use USER/NAME or ORG/NAME, e.g. "
                          "alice/sks-dog-dreambooth (letters, digits, '-', '_', '.').")
    return repo_id


# ---------------------------------------------------------------------------- what was trained


def _is_lora_run(model_dir: Path) -> bool:
    """True for a LoRA run's folder, False for a full fine-tune's; anything else is refused."""
    if (model_dir / MODEL_INDEX_FILE).is_file():
        return False
    if (model_dir / LORA_WEIGHTS_FILE).is_file():
        return True
    raise ModelLoadError(f"{str(model_dir)!r} is not a trained model folder: it has neither {MODEL_INDEX_FILE} "
                         f"(a full fine-tune) nor {LORA_WEIGHTS_FILE} (a LoRA run). Pass the --output-dir of train.")


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and REPO_ID_PATTERN.match(name) is not None and not Path(name).expanduser().exists()


def base_model_license(base_model: str | None, family: ModelFamily) -> str:
    return BUILT_IN_LICENSE if base_model in BUILT_IN_BASES else family.license


def run_family(model_dir: Path, lora: bool) -> ModelFamily:
    """The family of a trained output folder: a LoRA run's summary (or weights) says it, a full model its folder."""
    return lora_family(model_dir) if lora else family_of(str(model_dir))


def describe_training(model_dir: str | Path) -> dict[str, Any]:
    """The facts a model card states, read from the output folder and its training summary."""
    model_dir = Path(model_dir)
    lora = _is_lora_run(model_dir)
    summary = read_training_summary(model_dir) or {}
    config = summary.get("config") or {}
    base = summary.get("base_model") or config.get("model")
    base = MOVED_REPOS.get(base, base)
    concepts = config.get("concepts") or []
    instance_prompts = summary.get("instance_prompts") or [c.get("instance_prompt") for c in concepts]
    instance_prompts = [p for p in instance_prompts if p]
    class_prompts = [c.get("class_prompt") for c in concepts if c.get("class_prompt")]
    tokens = [subject_from_prompts(p, c.get("class_prompt"))[0]
              for p, c in zip(instance_prompts, concepts or [{}] * len(instance_prompts), strict=False)]
    return {
        "lora": lora,
        "family": run_family(model_dir, lora),
        "summary": summary,
        "config": config,
        "base_model": base,
        "base_model_is_hub_id": _is_hub_id(base),
        "instance_prompts": instance_prompts,
        "class_prompts": class_prompts,
        "tokens": [t for t in tokens if t],
        "resolution": summary.get("resolution") or config.get("resolution"),
        "steps": _steps_run(summary),
    }


def _steps_run(summary: dict[str, Any]) -> int | None:
    """The steps the run trained: the last one its history logged, else the count it recorded. Never the config's
    --max-train-steps, which is what was asked (and None when the recipe chose it)."""
    history = [h for h in summary.get("history") or [] if isinstance(h, dict) and isinstance(h.get("step"), int)]
    if history:
        return history[-1]["step"]
    for value in (summary.get("steps"), (summary.get("identity") or {}).get("max_train_steps")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


# ---------------------------------------------------------------------------- the model card


def _recorded(summary: dict[str, Any], key: str) -> Any:
    """A value the run used, as its training summary records it: at the top level, else in the run's identity
    (where today's summaries keep the effective learning rates), else the value given in its config (None when
    the recipe chose it). Never re-derived from today's recipe, which may differ from the one the run used.
    """
    for where in (summary, summary.get("identity") or {}, summary.get("config") or {}):
        if where.get(key) is not None:
            return where[key]
    return None


def _settings_rows(facts: dict[str, Any]) -> list[tuple[str, str]]:
    """The training settings table: every value as the run used it (_recorded, _precision_text, _optimizer_text)."""
    summary = facts["summary"]

    def known(value: Any) -> bool:
        return value is not None and value != ""

    def rate(key: str) -> str | None:
        value = _recorded(summary, key)
        return short_number(value) if isinstance(value, (int, float)) else None

    text_trained = _recorded(summary, "train_text_encoder")
    rank = _recorded(summary, "lora_rank")
    method = "DreamBooth, full fine-tune"
    if facts["lora"]:
        method = f"DreamBooth, LoRA rank {rank}" if rank is not None else "DreamBooth, LoRA"
    rows = [
        ("Method", method),
        ("Training steps", facts["steps"]),
        ("Resolution", f"{facts['resolution']} px" if facts["resolution"] else None),
        ("Learning rate", rate("learning_rate")),
        ("Text encoder learning rate", rate("text_encoder_learning_rate") if text_trained else None),
        ("Learning-rate schedule", _recorded(summary, "lr_scheduler")),
        ("Batch size", _recorded(summary, "train_batch_size")),
        ("Gradient accumulation", _recorded(summary, "gradient_accumulation_steps")),
        ("Text encoder trained", _yes_no(text_trained)),
        ("Prior preservation", _prior_text(summary)),
        ("Mixed precision", _precision_text(summary)),
        ("Optimizer", _optimizer_text(summary)),
        ("Preset", _recorded(summary, "preset")),
        ("Seed", _recorded(summary, "seed")),
    ]
    return [(name, str(value)) for name, value in rows if known(value)]


def _precision_text(summary: dict[str, Any]) -> str | None:
    """The precision the run trained in, as the trainer recorded it after fitting the config to the machine
    (fp16 asked on a CPU trains in fp32). A summary that does not record it gets no row: the config says only
    what was asked."""
    precision = summary.get("mixed_precision")
    if not isinstance(precision, str) or not precision:
        return None
    return "no (fp32)" if precision == "no" else precision


def _optimizer_text(summary: dict[str, Any]) -> str | None:
    """The optimizer the run used: 8-bit AdamW falls back to AdamW without a GPU or without bitsandbytes, so the
    config's use_8bit_adam is only what was asked. Read from what the trainer recorded, else no row."""
    name = summary.get("optimizer")
    eight_bit = summary.get("use_8bit_adam")
    if not isinstance(eight_bit, bool):  # older summaries record only the optimizer's class
        eight_bit = {"AdamW8bit": True, "AdamW": False}.get(name) if isinstance(name, str) else None
    if eight_bit is None:
        return name if isinstance(name, str) and name and name != "StepInBackward" else None
    text = "8-bit AdamW (bitsandbytes)" if eight_bit else "AdamW"
    return text + (", stepped inside backward" if name == "StepInBackward" else "")


def _yes_no(value: Any) -> str | None:
    return None if value is None else ("yes" if value else "no")


def _prior_text(summary: dict[str, Any]) -> str | None:
    enabled = _recorded(summary, "with_prior_preservation")
    if enabled is None:
        return None
    if not enabled:
        return "no"
    count = _recorded(summary, "num_class_images")
    images = f"{count} class images" if count is not None else "class images"
    return f"yes, {images}, weight {_recorded(summary, 'prior_loss_weight')}"


# ---------------------------------------------------------------------------- quoting, for each language


def _python_string(text: str) -> str:
    """`text` as a Python string literal in double quotes (JSON's escapes are Python's: \\", \\\\, \\n, \\uXXXX)."""
    return json.dumps(str(text), ensure_ascii=False)


def _shell_word(text: str) -> str:
    """`text` as one bash word (single-quoted unless it is plain: a Hub id or ./folder stays as it is)."""
    return shlex.quote(str(text))


def _longest_backticks(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _code_span(text: str) -> str:
    """`text` as one Markdown code span: on one line (a newline could start a block), between more backticks than
    any run of them inside, with a space of padding when it starts or ends with one (CommonMark strips it)."""
    text = " ".join(str(text).split())
    ticks = "`" * (_longest_backticks(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _code_block(code: str, language: str) -> str:
    """A fenced Markdown code block whose fence is longer than any run of backticks in `code`."""
    fence, code = "`" * max(3, _longest_backticks(code) + 1), code.rstrip("\n")
    return f"{fence}{language}\n{code}\n{fence}\n"


def _cell(text: str) -> str:
    """A table cell's text: one line, with what could end the cell, open a code span, a link or HTML escaped."""
    return re.sub(r"([\\`|<>\[\]])", r"\\\1", " ".join(str(text).split()))


def _base_model_text(base: str | None, is_hub_id: bool, family: ModelFamily) -> str:
    if not base:
        return f"an unrecorded {family.label} model"
    if base in BUILT_IN_BASES:
        return BUILT_IN_BASES[base]
    if is_hub_id:
        return f"[{base}](https://huggingface.co/{base})"
    # A local path says nothing to readers and may reveal the uploader's folders: keep only its name.
    return f"a local {family.label} model ({_code_span(Path(base).name)})"


def _usage_snippet(repo_id: str, facts: dict[str, Any], prompt: str) -> str:
    """How to use the model: diffusers with the family's pipeline class, the CLI, and (LoRA) the webui file."""
    family: ModelFamily = facts["family"]
    pipeline, name = family.pipeline_class_name, repo_id.split("/")[1]
    resolution = facts["resolution"] or family.native_resolution
    if facts["lora"]:
        known_base = facts["base_model_is_hub_id"]
        base = facts["base_model"] if known_base else family.example_hub_id
        load = ("" if known_base else f"# Use the {family.label} model these weights were trained on.\n") + (
                f'pipe = {pipeline}.from_pretrained({_python_string(base)}, dtype=torch.float16).to("cuda")\n'
                f"pipe.load_lora_weights({_python_string(repo_id)}, weight_name={_python_string(LORA_WEIGHTS_FILE)})")
        cli = f"dreambooth-helpers generate --model {_shell_word(base)} --lora {_shell_word(f'./{name}')}"
    else:
        load = f'pipe = {pipeline}.from_pretrained({_python_string(repo_id)}, dtype=torch.float16).to("cuda")'
        cli = f"dreambooth-helpers generate --model {_shell_word(repo_id)}"
    webui = ("\nFor AUTOMATIC1111 or ComfyUI, write the weights in their LoRA layout (`lora_unet_*`, `lora_te*_*`) "
             f"and load that file on the UI's own {family.label} base model:\n\n" + _code_block(
                 f"dreambooth-helpers export-single-file --lora {_shell_word(f'./{name}')} "
                 f"--out {_shell_word(f'{name}.safetensors')}", "bash"))
    download = f"hf download {_shell_word(repo_id)} --local-dir {_shell_word(f'./{name}')}"
    python = (
        "import torch\n"
        f"from diffusers import DPMSolverMultistepScheduler, {pipeline}\n\n"
        f"{load}\n"
        "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)\n"
        f"image = pipe({_python_string(prompt)}, num_inference_steps=25, guidance_scale=7.5,\n"
        f"             height={resolution}, width={resolution}).images[0]\n"
        'image.save("out.png")\n'
    )
    return (
        _code_block(python, "python") + "\n"
        "With dreambooth-helpers" + (f" (after {_code_span(download)})" if facts["lora"] else "") + ":\n\n"
        + _code_block(f"{cli} --prompt {_shell_word(prompt)} --num-images 4 --out images/", "bash")
        + (webui if facts["lora"] else "")
    )


def build_model_card(model_dir: str | Path, repo_id: str, *, has_grid: bool = True,
                     license: str | None = None) -> ModelCard:
    """The model card (README.md) for the model in `model_dir`, published as `repo_id`.

    Front matter: license, base model (when it is a Hub id), tags the Hub uses to list DreamBooth
    and LoRA models, the instance prompt and widget examples. Body: the prompt to use, the sample
    grid, the training settings and how to use the model.
    """
    check_repo_id(repo_id)
    facts = describe_training(model_dir)
    lora, base, family = facts["lora"], facts["base_model"], facts["family"]
    license = license or base_model_license(base, family)
    prompt = facts["instance_prompts"][0] if facts["instance_prompts"] else "a photo of sks dog"
    tags = list(dict.fromkeys(["text-to-image", *family.hub_tags, "diffusers", "dreambooth", "dreambooth-helpers"]
                              + (["lora", "template:sd-lora"] if lora else [])))
    data = ModelCardData(
        license=license,
        base_model=base if facts["base_model_is_hub_id"] else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        instance_prompt=prompt,
        widget=[{"text": text} for text in example_prompts(facts["summary"], limit=3)],
        inference=True,
    )
    name = repo_id.split("/")[1]
    lines = [
        f"# {name}",
        "",
        f"{'LoRA weights' if lora else f'A {family.label} model'} fine-tuned with "
        f"[DreamBooth](https://arxiv.org/abs/2208.12242) on "
        f"{_base_model_text(base, facts['base_model_is_hub_id'], family)}, trained with dreambooth-helpers.",
        "",
        "## Prompt",
        "",
        "Name the subject the way it was taught:",
        "",
        *[f"- {_code_span(p)}" for p in facts["instance_prompts"] or [prompt]],
        "",
    ]
    if facts["tokens"]:
        lines += [f"The identifier {', '.join(_code_span(t) for t in facts['tokens'])} stands for the subject; "
                  "combine it with any scene or style, e.g. "
                  f"{_code_span(example_prompts(facts['summary'], limit=2)[-1])}.", ""]
    lines += ["## Samples", ""]
    if has_grid:
        lines += [f"![Samples from the end of training]({GRID_FILE})", ""]
    else:
        lines += ["No sample images were saved during training.", ""]
    lines += ["## Training settings", "", "| Setting | Value |", "| --- | --- |"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in _settings_rows(facts)]
    lines += [
        "",
        "## Usage",
        "",
        _usage_snippet(repo_id, facts, prompt),
        "## License",
        "",
        f"This model is released under {_code_span(license)}"
        + (", the license of its base model; its use restrictions carry over to this model and to the images "
           "you make with it." if license == family.license else "."),
        "",
        "## Limitations",
        "",
        "A DreamBooth model is only as good as its few training photos: it can copy their backgrounds and poses, "
        "and mixes the subject into other members of its class when trained too long. It inherits the biases of "
        "its base model.",
        "",
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)
