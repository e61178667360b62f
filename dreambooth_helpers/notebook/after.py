"""The notebook around training: class images before it; generation, the demo, publishing and evaluation after.

Model loading here is quiet (no "Loading weights" bars, which sit at 0% while a shard loads and look stuck):
these cells print one line saying what they load instead.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import subject
from ..config import TrainConfig
from ..errors import ConfigError
from ..failures import free_gpu_memory
from ..grids import labelled_grid
from ..inference import DEFAULT_GUIDANCE, DEFAULT_STEPS
from .forms import ImageSelection, NotebookSettings, run_name
from .runtime import NotebookRuntime, hub_login, hub_username, smoke_model


def make_class_images(config: TrainConfig) -> list[Path]:
    """Generate the class images for prior preservation now, with a progress bar (training reuses them)."""
    from ..prior import prepare_class_images
    from ..threads import use_one_thread_for
    from ..training import quiet_library_logs

    use_one_thread_for(config.model)
    if not config.with_prior_preservation:
        print("Prior preservation is off (0 class images): nothing to generate.")
        return []
    print(f"Loading {config.model} to draw {config.effective_num_class_images} images of "
          f"\"{config.concepts[0].class_prompt}\" (images already there are kept)...")
    with quiet_library_logs():
        return prepare_class_images(config)  # which frees the model's GPU memory when it is done


def class_image_grid(config: TrainConfig, limit: int = 8, cell: int = 128):
    """A grid of the first class images that prior preservation trains on (None when it is off)."""
    images = _first_class_images(config, limit) if config.with_prior_preservation else []
    return labelled_grid([(config.concepts[0].class_prompt, images)], cell=cell) if images else None


def _first_class_images(config: TrainConfig, limit: int) -> list:
    from PIL import Image

    from ..prior import class_dir_for, existing_class_images

    images = []
    for path in existing_class_images(class_dir_for(config, config.concepts[0]))[:limit]:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def class_before_after(config: TrainConfig, generator, count: int = 8, cell: int = 128):
    """What prior preservation protects: the class prompt drawn by the base model (the first class images) above
    the same prompt drawn by the trained model, with each row's diversity (DIV, eval_diversity.diversity with the
    offline histogram+SSIM distance) and a verdict. Returns (grid, text); (None, why) without class images.
    """
    from ..eval_diversity import ClassPriorScores, HistogramSsimDistance, class_comparison_grid, diversity
    from .runtime import in_notebook_words

    before = _first_class_images(config, count) if config.with_prior_preservation else []
    if len(before) < 2:
        return None, "No class images to compare with (prior preservation is off)."
    class_prompt = config.concepts[0].class_prompt
    after = [result.image for result in generator.generate(class_prompt, num_images=len(before), seed=config.seed)]
    distance = HistogramSsimDistance()
    scores = ClassPriorScores(class_prompt, len(after), distance.name, diversity(after, distance), None,
                              diversity(before, distance), None, config.model)
    text = (f"DIV (how varied the class is, higher is more varied): before {scores.div_before:.2f}, "
            f"after {scores.div_after:.2f}. " + in_notebook_words(scores.verdict()))
    return class_comparison_grid(before, after, class_prompt, cell=cell), text


def load_trained_model(output_dir: str | Path, **options: Any):
    """The trained model as a Generator, loaded quietly, with GPU memory of earlier cells given back first.

    `options` go to `inference.load_generator`, e.g. attention_slicing=True, vae_tiling=True for less memory.
    """
    from ..inference import load_generator
    from ..threads import use_one_thread_for
    from ..training import quiet_library_logs

    use_one_thread_for(output_dir)  # one trained from a built-in model: by the base model in its summary
    free_gpu_memory()
    print(f"Loading the trained model from {output_dir}...")
    with quiet_library_logs():
        return load_generator(str(output_dir), **options)


@dataclass(frozen=True)
class GenerationSettings:
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    images_per_prompt: int = 2
    seed: int = 1234
    negative_prompt: str = "blurry, low quality, deformed"


def generation_settings(runtime: NotebookRuntime, **chosen: Any) -> GenerationSettings:
    """The notebook's generation values; smoke mode keeps them tiny (2 steps, 1 image per prompt)."""
    settings = GenerationSettings(**chosen)
    if runtime.smoke:
        settings = GenerationSettings(steps=2, guidance_scale=settings.guidance_scale, images_per_prompt=1,
                                      seed=settings.seed, negative_prompt=settings.negative_prompt)
    return settings


def split_prompts(text: str) -> list[str]:
    """Extra prompts typed into one form field, separated by ";" or new lines."""
    return [part.strip() for part in re.split(r"[;\n]", text or "") if part.strip()]


def generate_examples(generator, prompts: Sequence[str], settings: GenerationSettings,
                      out_dir: str | Path | None = None, cell: int = 192):
    """Images for each prompt with the same seeds; returns (grid with a row per prompt, all results)."""
    from ..inference import save_images

    rows, results = [], []
    for prompt in prompts:
        batch = generator.generate(prompt, negative_prompt=settings.negative_prompt,
                                   num_images=settings.images_per_prompt, steps=settings.steps,
                                   guidance_scale=settings.guidance_scale, seed=settings.seed)
        results += batch
        rows.append((f"seed {settings.seed}+: {prompt}", [r.image for r in batch]))  # a cut label keeps the seed
    if out_dir is not None:
        save_images(results, out_dir)
    return labelled_grid(rows, cell=cell), results


DEMO_USER = "friend"  # the user name the notebook's demo asks for when a password is set


def start_demo(model_dir: str | Path, runtime: NotebookRuntime, password: str = "", **options: Any):
    """Launch the Gradio demo for the trained model. In Colab Gradio makes the public share link itself.

    A non-empty `password` protects the page and the REST API (user name DEMO_USER). Smoke mode starts it
    on a free local port, without a share link, and waits until the model is loaded.
    """
    from ..demo import launch_demo
    from ..threads import use_one_thread_for

    use_one_thread_for(model_dir)  # also Gradio's worker threads, which do the generating
    if password:
        options = {"auth": (DEMO_USER, password), **options}
    if runtime.smoke:
        options = {"share": False, "port": 0, **options}
    demo = launch_demo(str(model_dir), **options)
    if runtime.smoke:
        demo.service.wait_until_loaded(timeout=120)
    return demo


def start_app(output_root: str | Path, runtime: NotebookRuntime, requested: bool, password: str = "",
              **options: Any):
    """The whole journey in one web page (app.py) instead of the cells, when asked; None otherwise.

    Its runs, photos and exports live in OUTPUT_ROOT/app (on Drive when it is mounted, so a new session finds
    them). A non-empty `password` protects it (user name DEMO_USER). In Colab, Gradio makes a share link.
    """
    if not requested:
        print("The web app is not started (tick USE_WEB_APP to use it instead of the cells below).")
        return None
    from ..app_launch import launch_app
    from ..config import TOY_MODEL
    from ..threads import use_one_thread_for

    options = {"share": runtime.colab, "port": None, **options}  # Colab cannot open the local address
    if runtime.smoke:
        options = {**options, "share": False, "port": 0, "model": smoke_model()}
    use_one_thread_for(options.get("model") or TOY_MODEL)  # without --model, the app's base model without a GPU
    app = launch_app(Path(output_root) / "app", auth=[f"{DEMO_USER}:{password}"] if password else None, **options)
    print(f"The app runs at {app.share_url or app.url}" + ("" if password else
          " (no password: anyone with the link can use it and this GPU)") + ". Stop it with app.close().")
    return app


def stop_demo(demo, requested: bool, runtime: NotebookRuntime) -> str:
    """Stop the demo when asked (always in smoke mode), freeing its GPU memory."""
    if demo is None:
        return "No demo is running."
    if not (requested or runtime.smoke):
        return "The demo keeps running. Tick STOP_DEMO and run this cell again to stop it."
    demo.close()
    free_gpu_memory()
    return "Demo stopped."


def default_repo_id(token: str, class_noun: str, username: str | None = None) -> str:
    """USER/sks-dog-dreambooth: the user's Hub name (or a placeholder) and the run's name."""
    return f"{username or 'your-hf-name'}/{run_name(token, class_noun)}-dreambooth"


def publish(model_dir: str | Path, settings: NotebookSettings, runtime: NotebookRuntime, *, requested: bool,
            repo_id: str | None = None, private: bool = True, sign_in: bool = False) -> str:
    """Push the trained model with its model card, when asked. Returns what was done.

    Nothing happens unless `requested` (the PUBLISH box), so "Run all" never waits for a login. The
    login happens here, not at the top: a token from the environment or the Colab secret HF_TOKEN, or
    with `sign_in` a sign-in prompt. Smoke mode only stages the upload folder and card.
    """
    from ..hub import CARD_FILE, push_to_hub, stage_for_upload

    if runtime.smoke:
        repo_id = (repo_id or "").strip() or default_repo_id(settings.token, settings.class_noun)
        staging = Path(model_dir).parent / f"{Path(model_dir).name}-hub-upload"
        shutil.rmtree(staging, ignore_errors=True)
        files = stage_for_upload(model_dir, staging, repo_id)
        return (f"Smoke test: nothing pushed. The repository {repo_id} would get {len(files)} files, staged in "
                f"{staging} (model card: {staging / CARD_FILE}).")
    if not requested:
        return "Not published: tick PUBLISH and run this cell again to push the model to the Hugging Face Hub."
    print(hub_login(runtime, sign_in=sign_in))
    repo_id = (repo_id or "").strip() or default_repo_id(settings.token, settings.class_noun, hub_username())
    if repo_id.startswith("your-hf-name/"):
        raise ConfigError("Set HUB_REPO_ID to USER/NAME (your Hugging Face name): the Hub did not say who you are.")
    url = push_to_hub(model_dir, repo_id, private=private)
    return f"Pushed to {url} ({'private' if private else 'public'})."


def evaluation_options(kind: str, requested: bool, runtime: NotebookRuntime, num_prompts: int | None = 25,
                       images_per_prompt: int = 4) -> dict[str, Any] | None:
    """Arguments for `evaluation.evaluate_model`, or None when it should not run.

    It runs when requested (it downloads DINO and CLIP and takes minutes on a T4) and in smoke mode,
    where it uses tiny random encoders, 2 prompts, 1 image, 2 steps. Styles are skipped: the paper's
    protocol measures a subject.
    """
    prompt_set = subject.evaluation_kind(kind)
    if prompt_set is None or not (requested or runtime.smoke):
        return None
    if runtime.smoke:
        return {"prompt_set": prompt_set, "encoders": "tiny", "num_prompts": 2, "images_per_prompt": 1,
                "num_inference_steps": 2}
    return {"prompt_set": prompt_set, "encoders": "paper", "num_prompts": num_prompts,
            "images_per_prompt": images_per_prompt, "num_inference_steps": 25}


def evaluate(generator, selection: ImageSelection, settings: NotebookSettings, output_dir: str | Path,
             requested: bool, runtime: NotebookRuntime, num_prompts: int | None = 25, images_per_prompt: int = 4):
    """The paper's DINO / CLIP-I / CLIP-T scores for the trained model (None, with a message, when skipped).

    A smoke test that did not tick RUN_EVALUATION still runs it, with tiny random encoders, to check the cell
    works; it writes the files but shows no report (its numbers mean nothing), only one line saying so.
    """
    from ..evaluation import evaluate_model
    from ..training import quiet_library_logs

    options = evaluation_options(settings.kind, requested, runtime, num_prompts, images_per_prompt)
    if options is None:
        reason = ("the paper's protocol measures a subject, not a style" if subject.evaluation_kind(settings.kind)
                  is None else "RUN_EVALUATION is off")
        print(f"Evaluation skipped: {reason}.")
        return None
    with quiet_library_logs():
        report = evaluate_model(generator, settings.class_noun, instance_dir=selection.folder,
                                identifier=settings.token, output_dir=output_dir, **options)
    if runtime.smoke and not requested:
        print(f"Evaluation skipped: RUN_EVALUATION is off. (Smoke test: the cell was checked with tiny random "
              f"encoders, files in {output_dir}; no report, its numbers mean nothing.)")
        return None
    return report


def show_evaluation(report) -> None:
    """The evaluation report in the notebook: its tables as Markdown, and its image grid shown inline (a
    Markdown link to a file on the runtime's disk would show as a broken image)."""
    from IPython.display import Markdown, display
    from PIL import Image

    if report is None:
        return
    text = "\n".join(line for line in report.to_markdown().splitlines() if not line.startswith("!["))
    display(Markdown(text))
    if report.grid_path and Path(report.grid_path).is_file():
        with Image.open(report.grid_path) as grid:
            display(grid.convert("RGB"))
