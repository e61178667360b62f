"""Publishing a trained model to the Hugging Face Hub, with a model card.

`push_to_hub(model_dir, repo_id)` stages what belongs in the repository into a temporary folder
(the diffusers model or the LoRA weights, `README.md` with the model card, `grid.png` of samples),
creates the repository and uploads that folder in one commit. Checkpoints, class images, optimizer
state and the training summary (which holds local paths) stay behind.

The token comes from the saved login (`hf auth login`, `huggingface_hub.login()`), from the
`token` argument, or from HF_TOKEN via `token_from_env()`; it is only ever handed to
`huggingface_hub`, never printed or written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

from .config import short_number
from .errors import ConfigError, HubError, ModelLoadError
from .files import CARD_FILE, GRID_FILE, LORA_WEIGHTS_FILE, MODEL_INDEX_FILE, SAMPLES_DIR
from .inference import example_prompts, image_grid, read_training_summary, subject_from_prompts
from .models import MOVED_REPOS, SD15_RANDOM, TINY_MODEL, TOY_MODEL

SD1_LICENSE = "creativeml-openrail-m"  # the license every Stable Diffusion 1.x release ships under
# Models this project builds from random weights in its own code carry the project's license.
BUILT_IN_LICENSES = {TINY_MODEL: "apache-2.0", TOY_MODEL: "apache-2.0", SD15_RANDOM: "apache-2.0"}
# Inside a diffusers folder, only configs, tokenizer files and safetensors weights are published.
PUBLISHED_SUFFIXES = {".json", ".txt", ".safetensors", ".model"}
UNSAFE_WEIGHT_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth"}
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


def base_model_license(base_model: str | None) -> str:
    return BUILT_IN_LICENSES.get(base_model or "", SD1_LICENSE)


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
        "summary": summary,
        "config": config,
        "base_model": base,
        "base_model_is_hub_id": _is_hub_id(base),
        "instance_prompts": instance_prompts,
        "class_prompts": class_prompts,
        "tokens": [t for t in tokens if t],
        "resolution": summary.get("resolution") or config.get("resolution"),
        "steps": summary.get("steps") or config.get("max_train_steps"),
    }


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
    config, summary = facts["config"], facts["summary"]
    lora = facts["lora"]

    def known(value: Any) -> bool:
        return value is not None and value != ""

    def rate(key: str) -> str | None:
        value = _recorded(summary, key)
        return short_number(value) if isinstance(value, (int, float)) else None

    text_trained = config.get("train_text_encoder")
    rows = [
        ("Method", f"DreamBooth, LoRA rank {config.get('lora_rank')}" if lora else "DreamBooth, full fine-tune"),
        ("Training steps", facts["steps"]),
        ("Resolution", f"{facts['resolution']} px" if facts["resolution"] else None),
        ("Learning rate", rate("learning_rate")),
        ("Text encoder learning rate", rate("text_encoder_learning_rate") if text_trained else None),
        ("Learning-rate schedule", config.get("lr_scheduler")),
        ("Batch size", config.get("train_batch_size")),
        ("Gradient accumulation", config.get("gradient_accumulation_steps")),
        ("Text encoder trained", _yes_no(text_trained)),
        ("Prior preservation", _prior_text(config, summary)),
        ("Mixed precision", config.get("mixed_precision")),
        ("8-bit Adam", _yes_no(config.get("use_8bit_adam"))),
        ("Preset", config.get("preset")),
        ("Seed", config.get("seed")),
    ]
    return [(name, str(value)) for name, value in rows if known(value)]


def _yes_no(value: Any) -> str | None:
    return None if value is None else ("yes" if value else "no")


def _prior_text(config: dict[str, Any], summary: dict[str, Any]) -> str | None:
    if config.get("with_prior_preservation") is None:
        return None
    if not config["with_prior_preservation"]:
        return "no"
    count = _recorded(summary, "num_class_images")
    images = f"{count} class images" if count is not None else "class images"
    return f"yes, {images}, weight {config.get('prior_loss_weight')}"


def _base_model_text(base: str | None, is_hub_id: bool) -> str:
    if not base:
        return "an unrecorded Stable Diffusion 1.x model"
    if base == TINY_MODEL:
        return "the tiny test model built into dreambooth-helpers (random weights; for trying the tools, not for art)"
    if base == TOY_MODEL:
        return ("the toy-world model shipped with dreambooth-helpers (32 px coloured shapes, trained on a CPU; "
                "for trying DreamBooth offline, not for art)")
    if base == SD15_RANDOM:
        return "a randomly initialised model with Stable Diffusion 1.5's shapes (for benchmarks)"
    if is_hub_id:
        return f"[{base}](https://huggingface.co/{base})"
    # A local path says nothing to readers and may reveal the uploader's folders: keep only its name.
    return f"a local Stable Diffusion 1.x model ({Path(base).name})"


def _usage_snippet(repo_id: str, facts: dict[str, Any], prompt: str) -> str:
    resolution = facts["resolution"] or 512
    if facts["lora"]:
        known_base = facts["base_model_is_hub_id"]
        base = facts["base_model"] if known_base else "stable-diffusion-v1-5/stable-diffusion-v1-5"
        load = ("" if known_base else "# Use the Stable Diffusion 1.x model these weights were trained on.\n") + (
                f'pipe = StableDiffusionPipeline.from_pretrained("{base}", dtype=torch.float16).to("cuda")\n'
                f'pipe.load_lora_weights("{repo_id}")')
        cli = f'dreambooth-helpers generate --model {base} --lora ./{repo_id.split("/")[1]}'
    else:
        load = f'pipe = StableDiffusionPipeline.from_pretrained("{repo_id}", dtype=torch.float16).to("cuda")'
        cli = f"dreambooth-helpers generate --model {repo_id}"
    return (
        "```python\n"
        "import torch\n"
        "from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline\n\n"
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
    lora = facts["lora"]
    base = facts["base_model"]
    license = license or base_model_license(base)
    prompt = facts["instance_prompts"][0] if facts["instance_prompts"] else "a photo of sks dog"
    tags = ["text-to-image", "stable-diffusion", "stable-diffusion-diffusers", "diffusers", "dreambooth",
            "dreambooth-helpers"] + (["lora", "template:sd-lora"] if lora else [])
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
        f"{'LoRA weights' if lora else 'A Stable Diffusion 1.x model'} fine-tuned with "
        f"[DreamBooth](https://arxiv.org/abs/2208.12242) on {_base_model_text(base, facts['base_model_is_hub_id'])}, "
        "trained with dreambooth-helpers.",
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
           "you make with it." if license == SD1_LICENSE else "."),
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


# ---------------------------------------------------------------------------- staging and upload


def _place(source: Path, target: Path) -> None:
    """Put `source` at `target` without doubling disk use where possible (a 2 GB model on Colab's disk)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _stage_full_model(model_dir: Path, staging: Path) -> None:
    index = json.loads((model_dir / MODEL_INDEX_FILE).read_text())
    # Components are the entries that name a (library, class) pair; the others are pipeline settings.
    components = [name for name, value in index.items()
                  if not name.startswith("_") and isinstance(value, list) and value[0] is not None]
    _place(model_dir / MODEL_INDEX_FILE, staging / MODEL_INDEX_FILE)
    for component in components:
        folder = model_dir / component
        if not folder.is_dir():
            raise ModelLoadError(f"{str(folder)!r} is missing but {MODEL_INDEX_FILE} lists it: the model folder is "
                                 "incomplete. Save the model again (training writes it at the end).")
        files = [f for f in folder.rglob("*") if f.is_file()]
        has_safetensors = any(f.suffix == ".safetensors" for f in files)
        if not has_safetensors and any(f.suffix in UNSAFE_WEIGHT_SUFFIXES for f in files):
            raise ModelLoadError(f"{str(folder)!r} holds weights only as pickle files (.bin). Re-save the model with "
                                 "safetensors (`pipe.save_pretrained(folder, safe_serialization=True)`), then push.")
        for file in files:
            if file.suffix in PUBLISHED_SUFFIXES:
                _place(file, staging / file.relative_to(model_dir))


def _sample_images(model_dir: Path) -> list[Path]:
    """The newest sample images (those from the end of training), oldest first."""
    samples = sorted((model_dir / SAMPLES_DIR).glob("*.png"), key=lambda p: (p.stat().st_mtime, p.name))
    return samples[-MAX_GRID_IMAGES:]


def stage_for_upload(model_dir: str | Path, staging_dir: str | Path, repo_id: str,
                     license: str | None = None) -> list[str]:
    """Fill `staging_dir` with exactly what the repository gets; returns the relative paths, sorted."""
    model_dir, staging = Path(model_dir), Path(staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    if _is_lora_run(model_dir):
        _place(model_dir / LORA_WEIGHTS_FILE, staging / LORA_WEIGHTS_FILE)
    else:
        _stage_full_model(model_dir, staging)
    samples = _sample_images(model_dir)
    if samples:
        images = []
        for path in samples:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        image_grid(images, cols=len(images)).save(staging / GRID_FILE)
    card = build_model_card(model_dir, repo_id, has_grid=bool(samples), license=license)
    (staging / CARD_FILE).write_text(str(card), encoding="utf-8")
    return sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())


def push_to_hub(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None, *,
                license: str | None = None, commit_message: str | None = None) -> str:
    """Create `repo_id` (if needed) and upload the trained model in `model_dir` with its card; returns the URL.

    Without `token`, the saved login is used; with neither, this refuses before touching the network.
    """
    check_repo_id(repo_id)
    _is_lora_run(Path(model_dir))  # a wrong folder is reported before anything is created on the Hub
    token = _require_token(token)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="dreambooth-push-") as staging:
        files = stage_for_upload(model_dir, staging, repo_id, license=license)
        try:
            url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type="model",
                              commit_message=commit_message or f"Upload DreamBooth model ({len(files)} files)")
        except HfHubHTTPError as error:
            raise HubError(_upload_advice(repo_id, error)) from None
    return str(url)


def _upload_advice(repo_id: str, error: HfHubHTTPError) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return ("The Hugging Face Hub refused the token (401): it is invalid or expired. Log in again with "
                "`hf auth login` or set a new HF_TOKEN.")
    if status == 403:
        return (f"The token may not write to {repo_id!r} (403). Use a token with write access, and a USER/NAME "
                "where USER is you or an organisation you can write to.")
    return f"Upload to {repo_id!r} failed: {type(error).__name__} (HTTP {status}). Check the network and try again."
