"""Publishing a trained model to the Hugging Face Hub, with a model card.

`push_to_hub(model_dir, repo_id)` writes the model card (`README.md`) and a grid of the last step's samples
(`grid.png`) into the model folder, creates the repository and uploads from the model folder itself, in one
commit, selecting with allow/ignore patterns what belongs in the repository (the diffusers model or the LoRA
weights, the card, the grid): nothing is copied. Checkpoints, class images, optimizer state, samples and the
training summary (which holds local paths) stay behind. The card states what the run used, as its training
summary records it, not what its config asked for.

The token comes from the saved login (`hf auth login`, `huggingface_hub.login()`), from the
`token` argument, or from HF_TOKEN via `token_from_env()`; it is only ever handed to
`huggingface_hub`, never printed or written.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from .config import short_number
from .errors import ConfigError, HubError, ModelLoadError
from .export_lora import lora_family
from .families import SDXL_RANDOM, TINY_SDXL_MODEL, ModelFamily, family_of
from .files import CARD_FILE, GRID_FILE, LORA_WEIGHTS_FILE, MODEL_INDEX_FILE, SAMPLES_DIR, SUMMARY_FILE
from .inference import example_prompts, image_grid, read_training_summary, subject_from_prompts
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
# Inside a diffusers folder, only configs, tokenizer files and safetensors weights are published.
PUBLISHED_SUFFIXES = {".json", ".txt", ".safetensors", ".model"}
UNSAFE_WEIGHT_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth"}
# Never uploaded, whatever else matches: pickles, training leftovers (checkpoints, samples, class images, reports),
# the training summary (it holds local paths), and hidden files (partial writes, caches).
IGNORED_PATTERNS = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.pickle", "checkpoint-*", "*/checkpoint-*",
                    "checkpoints/*", f"{SAMPLES_DIR}/*", "class_images/*", "evaluation/*", SUMMARY_FILE, ".*", "*/.*",
                    "*.tmp"]
COMPONENT_NAME = re.compile(r"^\w+$")  # a diffusers component folder (unet, text_encoder): no glob characters
SAMPLE_NAME = re.compile(r"step-(?P<step>\d+)-(?P<index>\d+)\.png")  # training._save_samples' names
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
MAX_GRID_IMAGES = 4


def token_from_env(variable: str = "HF_TOKEN") -> str:
    """The token in the environment variable HF_TOKEN (the CLI's --token-from-env)."""
    token = os.environ.get(variable, "").strip()
    if not token:
        raise HubError(f"--token-from-env: the environment variable {variable} is not set. Set it to a Hugging Face "
                       "token with write access (https://huggingface.co/settings/tokens), or log in with "
                       "`hf auth login` and drop --token-from-env.")
    return token


def _require_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise HubError("Not logged in to the Hugging Face Hub. Run `hf auth login` (or in a notebook "
                       "`huggingface_hub.login(token=...)`, e.g. with a token from Colab's secrets), or set HF_TOKEN "
                       "and pass --token-from-env. The token needs write access.")
    return token


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


def _base_model_text(base: str | None, is_hub_id: bool, family: ModelFamily) -> str:
    if not base:
        return f"an unrecorded {family.label} model"
    if base in BUILT_IN_BASES:
        return BUILT_IN_BASES[base]
    if is_hub_id:
        return f"[{base}](https://huggingface.co/{base})"
    # A local path says nothing to readers and may reveal the uploader's folders: keep only its name.
    return f"a local {family.label} model ({Path(base).name})"


def _usage_snippet(repo_id: str, facts: dict[str, Any], prompt: str) -> str:
    """How to use the model: diffusers with the family's pipeline class, the CLI, and (LoRA) the webui file."""
    family: ModelFamily = facts["family"]
    pipeline, name = family.pipeline_class_name, repo_id.split("/")[1]
    resolution = facts["resolution"] or family.native_resolution
    if facts["lora"]:
        known_base = facts["base_model_is_hub_id"]
        base = facts["base_model"] if known_base else family.example_hub_id
        load = ("" if known_base else f"# Use the {family.label} model these weights were trained on.\n") + (
                f'pipe = {pipeline}.from_pretrained("{base}", dtype=torch.float16).to("cuda")\n'
                f'pipe.load_lora_weights("{repo_id}", weight_name="{LORA_WEIGHTS_FILE}")')
        cli = f'dreambooth-helpers generate --model {base} --lora ./{name}'
    else:
        load = f'pipe = {pipeline}.from_pretrained("{repo_id}", dtype=torch.float16).to("cuda")'
        cli = f"dreambooth-helpers generate --model {repo_id}"
    webui = ("\nFor AUTOMATIC1111 or ComfyUI, write the weights in their LoRA layout (`lora_unet_*`, `lora_te*_*`) "
             f"and load that file on the UI's own {family.label} base model:\n\n```bash\n"
             f"dreambooth-helpers export-single-file --lora ./{name} --out {name}.safetensors\n```\n")
    return (
        "```python\n"
        "import torch\n"
        f"from diffusers import DPMSolverMultistepScheduler, {pipeline}\n\n"
        f"{load}\n"
        "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)\n"
        f'image = pipe("{prompt}", num_inference_steps=25, guidance_scale=7.5,\n'
        f"             height={resolution}, width={resolution}).images[0]\n"
        'image.save("out.png")\n'
        "```\n\n"
        "With dreambooth-helpers"
        + (" (after `hf download " + repo_id + " --local-dir ./" + repo_id.split("/")[1] + "`)"
           if facts["lora"] else "")
        + ":\n\n"
        "```bash\n"
        f'{cli} --prompt "{prompt}" --num-images 4 --out images/\n'
        "```\n"
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
        *[f"- `{p}`" for p in facts["instance_prompts"] or [prompt]],
        "",
    ]
    if facts["tokens"]:
        lines += [f"The identifier {', '.join(f'`{t}`' for t in facts['tokens'])} stands for the subject; "
                  "combine it with any scene or style, e.g. "
                  f"`{example_prompts(facts['summary'], limit=2)[-1]}`.", ""]
    lines += ["## Samples", ""]
    if has_grid:
        lines += [f"![Samples from the end of training]({GRID_FILE})", ""]
    else:
        lines += ["No sample images were saved during training.", ""]
    lines += ["## Training settings", "", "| Setting | Value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in _settings_rows(facts)]
    lines += [
        "",
        "## Usage",
        "",
        _usage_snippet(repo_id, facts, prompt),
        "## License",
        "",
        f"This model is released under `{license}`"
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


# ---------------------------------------------------------------------------- what the repository gets


def upload_patterns(model_dir: str | Path) -> tuple[list[str], list[str]]:
    """(allow_patterns, ignore_patterns) that pick, from the model folder itself, exactly what the repository gets:
    the diffusers model or the LoRA weights, plus the card and grid push writes next to them.

    Patterns, not copies: a 2-4 GB model on Google Drive is uploaded from where it lies. Checks the folder first
    (a component listed in model_index.json but missing, weights only as pickles) so nothing is created on the
    Hub for a folder that cannot be published.
    """
    model_dir = Path(model_dir)
    if _is_lora_run(model_dir):
        return [LORA_WEIGHTS_FILE, CARD_FILE, GRID_FILE], IGNORED_PATTERNS
    index = json.loads((model_dir / MODEL_INDEX_FILE).read_text())
    # Components are the entries that name a (library, class) pair; the others are pipeline settings.
    components = [name for name, value in index.items()
                  if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None]
    allow = [MODEL_INDEX_FILE, CARD_FILE, GRID_FILE]
    for component in components:
        folder = model_dir / component
        if not COMPONENT_NAME.match(component) or not folder.is_dir():
            raise ModelLoadError(f"{str(folder)!r} is missing but {MODEL_INDEX_FILE} lists it: the model folder is "
                                 "incomplete. Save the model again (training writes it at the end).")
        suffixes = {f.suffix for f in folder.rglob("*") if f.is_file()}
        if ".safetensors" not in suffixes and suffixes & UNSAFE_WEIGHT_SUFFIXES:
            raise ModelLoadError(f"{str(folder)!r} holds weights only as pickle files (.bin). Re-save the model with "
                                 "safetensors (`pipe.save_pretrained(folder, safe_serialization=True)`), then push.")
        allow += [f"{component}/*{suffix}" for suffix in sorted(PUBLISHED_SUFFIXES)]
    return allow, IGNORED_PATTERNS


def published_files(model_dir: str | Path) -> list[str]:
    """The paths (relative, sorted) that `upload_patterns` selects in `model_dir`, with huggingface_hub's own
    matching, so this is the list upload_folder sends. README.md and grid.png are listed once push wrote them."""
    model_dir = Path(model_dir)
    allow, ignore = upload_patterns(model_dir)
    paths = [p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()]
    return sorted(filter_repo_objects(paths, allow_patterns=allow, ignore_patterns=ignore))


def final_samples(model_dir: str | Path) -> list[Path]:
    """The sample images of the run's last sampled step (at most MAX_GRID_IMAGES, in prompt order).

    The step comes from the training summary's history (the files each step drew) or, for summaries without
    one, from the file names (samples/step-000400-0.png): never from file dates, which a copy to Drive or a
    resumed run reorders, and never mixing steps.
    """
    model_dir = Path(model_dir)
    folder = model_dir / SAMPLES_DIR
    summary = read_training_summary(model_dir) or {}
    history = summary.get("history")
    if isinstance(history, list) and history:
        drawn = [h.get("samples") for h in history if isinstance(h, dict) and h.get("samples")]
        # Logged paths are where the run wrote them; the folder may have moved since, so look them up by name.
        found = [folder / Path(path).name for path in drawn[-1]] if drawn else []
        return [path for path in found if path.is_file()][:MAX_GRID_IMAGES]
    by_step: dict[int, list[tuple[int, Path]]] = {}
    for path in folder.glob("*.png"):
        match = SAMPLE_NAME.fullmatch(path.name)
        if match:
            by_step.setdefault(int(match["step"]), []).append((int(match["index"]), path))
    if not by_step:
        return []
    step = summary.get("steps") if summary.get("steps") in by_step else max(by_step)
    return [path for _, path in sorted(by_step[step])][:MAX_GRID_IMAGES]


def _card_and_grid(model_dir: Path, repo_id: str, license: str | None) -> dict[str, bytes]:
    """README.md (and grid.png, when the run drew samples) as bytes: what push adds next to the model."""
    files = {}
    samples = final_samples(model_dir)
    if samples:
        images = []
        for path in samples:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        buffer = io.BytesIO()
        image_grid(images, cols=len(images)).save(buffer, format="PNG")
        files[GRID_FILE] = buffer.getvalue()
    card = build_model_card(model_dir, repo_id, has_grid=bool(samples), license=license)
    files[CARD_FILE] = str(card).encode("utf-8")
    return files


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a push cut short never leaves half a README.md in the model folder."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as file:
        file.write(data)
    try:
        os.replace(file.name, path)
    except BaseException:
        Path(file.name).unlink(missing_ok=True)
        raise


def stage_for_upload(model_dir: str | Path, staging_dir: str | Path, repo_id: str,
                     license: str | None = None) -> list[str]:
    """A look at what push would publish, without publishing (the notebook's smoke mode): fills `staging_dir` with
    the selected files (hard links where possible), the card and the grid; returns the relative paths, sorted.
    `push_to_hub` itself uploads from the model folder and copies nothing."""
    model_dir, staging = Path(model_dir), Path(staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    added = _card_and_grid(model_dir, repo_id, license)
    for relative in published_files(model_dir):
        if relative not in added:
            _place(model_dir / relative, staging / relative)
    for name, data in added.items():
        (staging / name).write_bytes(data)
    return sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# ---------------------------------------------------------------------------- the upload


def push_to_hub(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None, *,
                license: str | None = None, commit_message: str | None = None) -> str:
    """Create `repo_id` (if needed) and upload the trained model in `model_dir` with its card; returns the URL.

    Uploads from `model_dir` itself, selected by `upload_patterns` (no staging copy), in one commit. The card
    (README.md) and sample grid (grid.png) are first written into the model folder, atomically; when the folder is
    read-only they follow in a second commit. Without `token`, the saved login is used; with neither, this refuses
    before touching the network. A Hub that cannot be reached or refuses is a HubError that says what to do.
    """
    check_repo_id(repo_id)
    model_dir = Path(model_dir)
    allow, ignore = upload_patterns(model_dir)  # a wrong folder is reported before anything is created on the Hub
    token = _require_token(token)
    added = _card_and_grid(model_dir, repo_id, license)
    count = len(set(published_files(model_dir)) | set(added))
    api = HfApi(token=token)
    step = "create the repository"
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        step = "upload the model"
        unwritten = _write_next_to_model(model_dir, added)
        api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), repo_type="model", allow_patterns=allow,
                          ignore_patterns=ignore,
                          commit_message=commit_message or f"Upload DreamBooth model ({count} files)")
        if unwritten:
            step = "upload the model card"
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
                          for name, data in unwritten.items()]
            api.create_commit(repo_id=repo_id, repo_type="model", operations=operations,
                              commit_message="Add the model card")
    except HfHubHTTPError as error:
        raise HubError(_hub_refused(repo_id, error, step, token)) from None
    except _network_errors() as error:
        raise HubError(_hub_unreachable(api, repo_id, error, step, token)) from None
    return str(url)


def _write_next_to_model(model_dir: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Write the card and grid into the model folder; returns those it could not write (a read-only folder)."""
    unwritten = {}
    for name, data in files.items():
        try:
            _write_atomically(model_dir / name, data)
        except OSError:
            unwritten[name] = data
    return unwritten


# ---------------------------------------------------------------------------- when the Hub cannot be reached


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which huggingface_hub says the Hub could not be reached.

    OSError covers OfflineModeIsEnabled, requests' errors (huggingface_hub < 1.0), sockets and TimeoutError. The
    httpx family (huggingface_hub 1.x uses httpx, later versions httpx2) raises its own HTTPError, no OSError.
    """
    found: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _hidden(text: str, token: str) -> str:
    """`text` without the token: error texts come from servers and libraries, and must not carry it."""
    return text.replace(token, "hf_***") if token else text


def _hub_unreachable(api: HfApi, repo_id: str, error: BaseException, step: str, token: str) -> str:
    if isinstance(error, OfflineModeIsEnabled):
        return ("Cannot publish: huggingface_hub is in offline mode (the environment variable HF_HUB_OFFLINE is "
                "set). Unset it (`unset HF_HUB_OFFLINE` in a shell; in a notebook, remove what sets it and restart the "
                "runtime: huggingface_hub reads it once, when imported) and run push again.")
    if isinstance(error, OSError) and error.filename is not None:  # the local side: a file of the model folder
        return (f"Reading {error.filename!r} for the upload to {repo_id!r} failed ({error.strerror or error}). Check "
                "that the model folder is still there (on Colab: is Google Drive still mounted?), then run push again.")
    what = "timed out" if "timeout" in type(error).__name__.lower() or isinstance(error, TimeoutError) else "failed"
    reason = _hidden(str(error).strip().splitlines()[0] if str(error).strip() else "", token)
    done = ("Nothing was published." if step == "create the repository" else
            f"The repository {repo_id!r} may exist but is incomplete; push again to finish it.")
    return (f"Could not reach the Hugging Face Hub at {api.endpoint}: the attempt to {step} {what} "
            f"({type(error).__name__}{': ' + reason if reason else ''}). {done} Check the internet connection (and "
            "HF_ENDPOINT or proxy settings, if you set any), then run push again.")


def _hub_refused(repo_id: str, error: HfHubHTTPError, step: str, token: str) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return ("The Hugging Face Hub refused the token (401): it is invalid or expired. Log in again with "
                "`hf auth login` or set a new HF_TOKEN.")
    if status == 403:
        return (f"The token may not write to {repo_id!r} (403). Use a token with write access, and a USER/NAME "
                "where USER is you or an organisation you can write to.")
    if status == 429:
        return "The Hugging Face Hub is rate-limiting this account (429). Wait a few minutes, then run push again."
    said = getattr(error, "server_message", None)
    said = f" The Hub said: {_hidden(said.strip(), token)}" if isinstance(said, str) and said.strip() else ""
    if isinstance(status, int) and status >= 500:
        return (f"The Hugging Face Hub failed to {step} for {repo_id!r} (HTTP {status}): a problem on its side."
                f"{said} Try again in a few minutes (https://status.huggingface.co).")
    return (f"The Hugging Face Hub refused to {step} for {repo_id!r}: {type(error).__name__} (HTTP {status})."
            f"{said} Check the repository name and the token, then run push again.")
