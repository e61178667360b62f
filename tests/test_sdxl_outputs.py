"""What comes after training, for SDXL: publish (the model card and the upload set), the demo, evaluation and the
training app's Try it / Publish / Export, each on one tiny-sdxl LoRA run with both text encoders trained (trained
once for the module, at 32 px rather than tiny-sdxl's native 64, so a tool that ignores the run's size shows)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dreambooth_helpers import evaluation, hub
from dreambooth_helpers.cli import main
from dreambooth_helpers.families import SDXL
from dreambooth_helpers.files import LORA_WEIGHTS_FILE, SUMMARY_FILE
from tests.test_hub import (
    SECRET,
    _AnsweringHub,
    _assert_one_error_paragraph,
    _no_copies,
    _push_in_a_fresh_process,
    front_matter,
)
from tests.trained_fixtures import make_lora_output

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "sample_data" / "toy_robot"
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks toy", "a photo of toy"
RESOLUTION = 32  # the run's size; tiny-sdxl's own is 64
REPO_ID = "alice/sks-toy-xl"
XL_SNIPPET_IMPORT = "from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline"


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory) -> Path:
    """A finished tiny-sdxl LoRA run (UNet and both text encoders), with samples, class images and a checkpoint
    at step 2 of 4: what `train --model tiny-sdxl --lora --train-text-encoder` leaves."""
    from dreambooth_helpers import Concept, TrainConfig
    from dreambooth_helpers.training import train

    config = TrainConfig.from_preset(
        "t4", concepts=[Concept(str(PHOTOS), INSTANCE_PROMPT, CLASS_PROMPT)],
        output_dir=str(tmp_path_factory.mktemp("sdxl") / "run"), model="tiny-sdxl", lora=True, lora_rank=4,
        learning_rate=1e-2, train_text_encoder=True, resolution=RESOLUTION, num_class_images=2,
        class_images_steps=2, max_train_steps=4, mixed_precision="no", sample_every=2, sample_steps=2,
        checkpoint_every=2, checkpoints_total_limit=3)
    run = Path(train(config, progress=False).output_dir)
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["family"] == "sdxl" and summary["resolution"] == RESOLUTION
    return run


def _on_base(run: Path, folder: Path, base: str) -> Path:
    """A copy of `run` whose summary names `base` as the model it was trained from."""
    shutil.copytree(run, folder)
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    summary["base_model"] = summary["config"]["model"] = base
    (folder / SUMMARY_FILE).write_text(json.dumps(summary))
    return folder


def _code_block(card: str, language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", card, re.S).group(1)


def _key_prefixes(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return {key.split("_", 2)[0] + "_" + key.split("_", 2)[1] for key in handle.keys()}


# ---------------------------------------------------------------------------- push


def test_sdxl_card_names_the_sdxl_base_its_tags_pipeline_and_the_webui_export(sdxl_run, tmp_path):
    on_hub_base = _on_base(sdxl_run, tmp_path / "xl", SDXL.example_hub_id)
    card = str(hub.build_model_card(on_hub_base, REPO_ID))
    meta = front_matter(card)
    assert meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert meta["license"] == "openrail++"  # SDXL base 1.0's, inherited
    assert set(SDXL.hub_tags) <= set(meta["tags"]) and {"lora", "dreambooth", "diffusers"} <= set(meta["tags"])
    assert "stable-diffusion" not in meta["tags"]  # the SD 1.x listing
    assert meta["instance_prompt"] == INSTANCE_PROMPT
    assert XL_SNIPPET_IMPORT in card
    assert 'pipe = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0"' in card
    assert f'pipe.load_lora_weights("{REPO_ID}", weight_name="{LORA_WEIGHTS_FILE}")' in card
    assert f"height={RESOLUTION}, width={RESOLUTION}" in card
    assert "StableDiffusionPipeline" not in card and "Stable Diffusion 1.x" not in card
    assert "[stabilityai/stable-diffusion-xl-base-1.0](https://huggingface.co/stabilityai/" in card
    assert "AUTOMATIC1111 or ComfyUI" in card
    assert "dreambooth-helpers export-single-file --lora ./sks-toy-xl --out sks-toy-xl.safetensors" in card
    assert "| Text encoder trained | yes |" in card and "| Resolution | 32 px |" in card

    # As trained, on the built-in tiny-sdxl: the project's license, no Hub base, still the SDXL pipeline.
    built_in = str(hub.build_model_card(sdxl_run, REPO_ID))
    meta = front_matter(built_in)
    assert meta["license"] == "apache-2.0" and "base_model" not in meta
    assert "tiny SDXL-shaped test model" in built_in and XL_SNIPPET_IMPORT in built_in
    assert "# Use the Stable Diffusion XL model these weights were trained on." in built_in

    # One template: an SD 1.x LoRA run gets its own pipeline class, tags and the same webui line.
    sd1 = str(hub.build_model_card(make_lora_output(tmp_path / "sd1"), "alice/sks-dog-lora"))
    assert "from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline" in sd1
    assert "StableDiffusionXLPipeline" not in sd1 and "stable-diffusion-xl" not in front_matter(sd1)["tags"]
    assert "export-single-file --lora ./sks-dog-lora --out sks-dog-lora.safetensors" in sd1


def test_the_sdxl_cards_snippet_and_webui_command_work_as_written(sdxl_run, tmp_path, monkeypatch):
    """The card's Python runs (on a local copy of the base, on the CPU) and loads all three LoRA parts; its
    export-single-file command writes the kohya/webui layout with both SDXL text encoders."""
    from dreambooth_helpers.models import load_components

    components = load_components("tiny-sdxl")
    components.family.pipeline(components).save_pretrained(tmp_path / "base")
    card = str(hub.build_model_card(_on_base(sdxl_run, tmp_path / "xl", SDXL.example_hub_id), REPO_ID))
    code = _code_block(card, "python")
    for hub_name, here in ((f'"{SDXL.example_hub_id}"', repr(str(tmp_path / "base"))),
                           (f'"{REPO_ID}"', repr(str(sdxl_run))), ('.to("cuda")', ""),
                           ("torch.float16", "torch.float32"), ("num_inference_steps=25", "num_inference_steps=2")):
        assert hub_name in code
        code = code.replace(hub_name, here)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "model-card-snippet", "exec"), namespace)
    pipe = namespace["pipe"]
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        assert getattr(part, "peft_config", None), type(part).__name__  # each trained part's LoRA loaded
    assert Image.open(tmp_path / "out.png").size == (RESOLUTION, RESOLUTION)

    command = next(line for line in _code_block(card.split("AUTOMATIC1111", 1)[1], "bash").splitlines()
                   if "export-single-file" in line).split()
    assert command[:2] == ["dreambooth-helpers", "export-single-file"]
    out = tmp_path / "webui.safetensors"
    arguments = [str(sdxl_run) if a == "./sks-toy-xl" else str(out) if a.endswith(".safetensors") else a
                 for a in command[1:]]
    assert main(arguments) == 0
    assert _key_prefixes(out) == {"lora_unet", "lora_te1", "lora_te2"}


def test_sdxl_lora_push_sends_the_weights_card_and_grid_without_loading_a_model_or_copying(sdxl_run, tmp_path,
                                                                                          fake_api, monkeypatch):
    model = Path(shutil.copytree(sdxl_run, tmp_path / "run"))  # with its checkpoints, class images, samples, logs
    staged = hub.stage_for_upload(model, tmp_path / "stage", REPO_ID)  # the notebook's look before publishing
    assert staged == ["README.md", "grid.png", LORA_WEIGHTS_FILE]

    def no_model(*args, **kwargs):
        raise AssertionError("push built a model: publishing a LoRA run needs none")

    monkeypatch.setattr(torch.nn.Module, "__init__", no_model)  # no base model, no text encoder, nothing
    _no_copies(monkeypatch)
    url = hub.push_to_hub(model, REPO_ID, token=SECRET)
    assert url == f"https://huggingface.co/{REPO_ID}"
    _, upload = fake_api.calls[1]
    assert Path(upload["folder_path"]) == model  # uploaded from the run folder itself
    assert sorted(fake_api.uploaded) == ["README.md", "grid.png", LORA_WEIGHTS_FILE]
    assert set(hub.published_files(model)) == set(fake_api.uploaded)
    assert fake_api.uploaded[LORA_WEIGHTS_FILE] == (sdxl_run / LORA_WEIGHTS_FILE).read_bytes()
    readme = fake_api.uploaded["README.md"].decode()
    assert XL_SNIPPET_IMPORT in readme and "stable-diffusion-xl" in front_matter(readme)["tags"]
    # The grid: the last sampled step's images (one prompt, step 4), at the run's size.
    assert Image.open(io.BytesIO(fake_api.uploaded["grid.png"])).size == (RESOLUTION, RESOLUTION)


def test_sdxl_push_with_the_real_client_reaches_the_hub_with_the_token_and_is_one_error(sdxl_run, tmp_path):
    answering = _AnsweringHub(503)
    try:
        done = _push_in_a_fresh_process(Path(shutil.copytree(sdxl_run, tmp_path / "run")), tmp_path,
                                        HF_ENDPOINT=answering.url, OMP_NUM_THREADS="1")
    finally:
        answering.close()
    _assert_one_error_paragraph(done, "HTTP 503", "Try again")
    assert f"Bearer {SECRET}" in answering.authorizations


# ---------------------------------------------------------------------------- demo


def _png(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["png_base64"])))


@pytest.mark.slow
def test_demo_serves_the_sdxl_run_at_its_resolution_over_http(sdxl_run, tmp_path):
    """`demo --model RUN` in its own process: health, POST /api/generate and the page make the run's images (its
    LoRA on tiny-sdxl, at its 32 px), the same as generating in this process."""
    from gradio_client import Client

    from dreambooth_helpers.inference import load_generator

    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                        "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "dreambooth_helpers", "demo", "--model", str(sdxl_run),
                                "--port", "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = None, time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line or process.poll() is None, process.stderr.read()[-3000:]
            if line.startswith("Demo running at "):
                url = line.split()[-1].rstrip("/")
        assert url, "the demo did not start in 3 minutes"
        health = httpx.get(f"{url}/api/health", timeout=10).json()
        assert health["status"] == "ready" and health["model"] == sdxl_run.name  # `demo` waits for the model
        assert health["resolution"] == RESOLUTION and health["limits"]["max_resolution"] == RESOLUTION * 3 // 2
        answer = httpx.post(f"{url}/api/generate", json={"prompt": INSTANCE_PROMPT, "steps": 2, "seed": 3},
                            timeout=120)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["width"] == body["height"] == RESOLUTION and body["seeds"] == [3]
        served = _png(body["images"][0])
        assert served.size == (RESOLUTION, RESOLUTION)
        assert served.text["model"] == "tiny-sdxl" and served.text["lora"] == sdxl_run.name

        _, status = Client(url + "/", verbose=False, download_files=False).predict(
            INSTANCE_PROMPT, "", 2, 7.5, 1, RESOLUTION, "3", api_name="/generate")
        assert status.startswith("Done: 1 image(s)"), status
        page_image = next(tmp_path.glob("dreambooth-demo-*/images/*.png"))
        assert Image.open(page_image).size == (RESOLUTION, RESOLUTION)
    finally:
        process.terminate()
        process.wait(60)
    # The demo drew with the run's LoRA: as this process draws the run, and unlike the bare base model.
    here = np.asarray(load_generator(str(sdxl_run)).generate(INSTANCE_PROMPT, steps=2, seed=3)[0].image, int)
    base = np.asarray(load_generator("tiny-sdxl").generate(INSTANCE_PROMPT, steps=2, seed=3, width=RESOLUTION,
                                                           height=RESOLUTION)[0].image, int)
    served = np.asarray(served, int)
    assert np.abs(served - here).max() <= 2
    assert np.abs(served - base).mean() > 0.5


def test_the_demo_page_is_sized_for_sdxl_before_the_model_loads(sdxl_run, tmp_path):
    """The page (its size slider) is built while the model loads: an SDXL model without a run's summary is sized
    for SDXL's 1024 px, not SD 1.x's 512; a run, by the size it trained at."""
    from dreambooth_helpers.demo_api import DemoService

    for name, pipeline, native in (("xl", "StableDiffusionXLPipeline", 1024), ("sd", "StableDiffusionPipeline", 512)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        service = DemoService(str(tmp_path / name), output_dir=tmp_path / f"{name}-out")  # not loaded
        assert service.state == "loading" and service.resolution == native and service.max_resolution == native * 3 // 2
    assert DemoService(str(sdxl_run), output_dir=tmp_path / "run-out").resolution == RESOLUTION


# ---------------------------------------------------------------------------- evaluate


@pytest.mark.slow
def test_evaluate_scores_the_sdxl_run_and_its_checkpoints(sdxl_run, tmp_path, monkeypatch, capsys):
    sizes: list[tuple[int, int]] = []
    score = evaluation.score_images

    def spy(generated, *args, **kwargs):
        sizes.extend(image.size for row in generated for image in row)
        return score(generated, *args, **kwargs)

    monkeypatch.setattr(evaluation, "score_images", spy)
    common = ["--class-noun", "toy", "--encoders", "tiny", "--num-prompts", "2", "--prompts-per-image", "1",
              "--steps", "2"]
    assert main(["evaluate", "--model", str(sdxl_run), *common, "--class-samples", "2",
                 "--out", str(tmp_path / "final")]) == 0
    report = json.loads((tmp_path / "final" / "evaluation.json").read_text())
    assert report["scores"]["num_images"] == 2 and len(report["scores"]["per_prompt"]) == 2
    assert report["class_prior"] is not None
    assert "base model `tiny-sdxl` (before)" in (tmp_path / "final" / "evaluation.md").read_text()
    assert sizes == [(RESOLUTION, RESOLUTION)] * 2

    sizes.clear()
    assert main(["evaluate", "--model", str(sdxl_run), *common, "--checkpoints",
                 "--out", str(tmp_path / "steps")]) == 0, capsys.readouterr().err
    steps = json.loads((tmp_path / "steps" / "checkpoints.json").read_text())
    assert [point["step"] for point in steps["checkpoints"]] == [2, 4]  # the checkpoint, then the final LoRA
    assert sizes == [(RESOLUTION, RESOLUTION)] * 4


def test_an_sdxl_checkpoint_opens_as_an_sdxl_pipeline_with_every_trained_part(sdxl_run):
    from dreambooth_helpers.checkpoints import list_checkpoints, pipeline_from_checkpoint

    (checkpoint,) = list_checkpoints(sdxl_run)
    pipe = pipeline_from_checkpoint(checkpoint)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        assert getattr(part, "peft_config", None), type(part).__name__


# ---------------------------------------------------------------------------- the training app


def test_the_apps_try_publish_and_export_work_on_a_finished_sdxl_run(sdxl_run, tmp_path, fake_api):
    from dreambooth_helpers.app import TrainingApp
    from dreambooth_helpers.jobs import FINISHED, JOBS_DIR, OUTPUT_DIR, STATE_FILE

    job_id = "20250101-000000-sks-toy-0000"
    folder = tmp_path / "work" / JOBS_DIR / job_id
    shutil.copytree(sdxl_run, folder / OUTPUT_DIR)
    (folder / STATE_FILE).write_text(json.dumps({"status": FINISHED, "created": time.time()}))
    app = TrainingApp(tmp_path / "work", model="tiny-sdxl")
    try:
        assert app.example_prompt(None, job_id) == INSTANCE_PROMPT
        images = app.generate(None, job_id, INSTANCE_PROMPT, steps=2, seed=1)
        assert len(images) == 1 and images[0].size == (RESOLUTION, RESOLUTION)
        assert app.publish(None, job_id, REPO_ID, token=SECRET) == f"https://huggingface.co/{REPO_ID}"
        assert sorted(fake_api.uploaded) == ["README.md", "grid.png", LORA_WEIGHTS_FILE]
        assert XL_SNIPPET_IMPORT in fake_api.uploaded["README.md"].decode()
        exported = app.export(None, job_id)
        assert exported.parent.parent == app.exports_dir
        assert _key_prefixes(exported) == {"lora_unet", "lora_te1", "lora_te2"}  # the webui LoRA layout
    finally:
        app.close()
