"""Publishing: the staged folder, the model card and its front matter, the calls to huggingface_hub, the token."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import requests
import yaml
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from PIL import Image

from dreambooth_helpers import hub
from dreambooth_helpers.cli import main
from dreambooth_helpers.config import short_number
from dreambooth_helpers.errors import ConfigError, ModelLoadError
from dreambooth_helpers.files import LORA_WEIGHTS_FILE
from dreambooth_helpers.subject import recipe
from tests.trained_fixtures import INSTANCE_PROMPT, make_full_output, make_lora_output

# Built at run time so the repository holds no string shaped like a real token.
SECRET = "hf_" + "NeverShowThisToken" + "0123456789abcdef"


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    return make_full_output(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return make_lora_output(tmp_path_factory.mktemp("lora"))


def front_matter(card_text: str) -> dict:
    assert card_text.startswith("---\n")
    yaml_text, body = card_text[4:].split("\n---\n", 1)
    return yaml.safe_load(yaml_text)


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi's network calls: records them, and what upload_folder would send, chosen
    from the folder with huggingface_hub's own pattern matching (the real upload_folder's selection)."""

    calls: list[tuple[str, dict]] = []
    tokens: list[str | None] = []
    uploaded: dict[str, bytes] = {}
    fail_with: Exception | None = None
    fail_upload_with: Exception | None = None

    def __init__(self, token=None):
        FakeHfApi.tokens.append(token)
        self.endpoint = "https://huggingface.co"

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if FakeHfApi.fail_with:
            raise FakeHfApi.fail_with
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs))
        if FakeHfApi.fail_upload_with:
            raise FakeHfApi.fail_upload_with
        folder = Path(kwargs["folder_path"])
        paths = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        ignore = list(kwargs.get("ignore_patterns") or []) + list(DEFAULT_IGNORE_PATTERNS)
        for path in filter_repo_objects(paths, allow_patterns=kwargs.get("allow_patterns"), ignore_patterns=ignore):
            FakeHfApi.uploaded[path] = (folder / path).read_bytes()

    def create_commit(self, **kwargs):
        FakeHfApi.calls.append(("create_commit", kwargs))
        for operation in kwargs["operations"]:
            FakeHfApi.uploaded[operation.path_in_repo] = operation.path_or_fileobj


@pytest.fixture
def fresh_full_dir(full_dir, tmp_path):
    """A copy of the full model that push may write its card into."""
    return Path(shutil.copytree(full_dir, tmp_path / "model"))


def test_full_model_staging_keeps_the_model_and_leaves_training_leftovers(full_dir, tmp_path):
    files = hub.stage_for_upload(full_dir, tmp_path / "stage", "alice/sks-dog")
    assert "model_index.json" in files and "README.md" in files and "grid.png" in files
    for component in ("unet", "vae", "text_encoder"):
        assert any(f.startswith(f"{component}/") and f.endswith(".safetensors") for f in files), component
    assert any(f.startswith("tokenizer/") for f in files) and any(f.startswith("scheduler/") for f in files)
    assert not any(f.startswith(("checkpoint-", "class_images", "samples")) for f in files)
    assert "training_summary.json" not in files  # it holds the uploader's local paths
    assert not any(f.endswith(".bin") for f in files)
    grid = Image.open(tmp_path / "stage" / "grid.png")
    assert grid.size == (4 * 64, 64)  # the four newest samples in a row


def test_full_model_card_content_and_front_matter(full_dir):
    text = str(hub.build_model_card(full_dir, "alice/sks-dog"))
    meta = front_matter(text)
    assert meta["license"] == "apache-2.0"  # the tiny model is the project's own; SD bases: see the next test
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"dreambooth", "stable-diffusion", "text-to-image", "diffusers"} <= set(meta["tags"])
    assert "lora" not in meta["tags"] and "base_model" not in meta  # "tiny" is no Hub id
    assert meta["instance_prompt"] == INSTANCE_PROMPT
    assert meta["widget"][0] == {"text": INSTANCE_PROMPT}
    assert f"`{INSTANCE_PROMPT}`" in text and "`sks`" in text
    assert "![Samples from the end of training](grid.png)" in text
    assert "| Training steps | 10 |" in text and "| Resolution | 64 px |" in text
    # Settings the run left to the subject kind's recipe are stated as the values it used.
    object_recipe = recipe("object")
    assert f"| Prior preservation | yes, {object_recipe.num_class_images} class images, weight 1.0 |" in text
    assert f"| Learning rate | {short_number(object_recipe.learning_rate)} |" in text
    assert 'StableDiffusionPipeline.from_pretrained("alice/sks-dog"' in text
    assert "/home/someone" not in text  # no local paths from the training config


def _with_summary(source: Path, folder: Path, change) -> Path:
    shutil.copytree(source, folder)
    summary = json.loads((folder / "training_summary.json").read_text())
    change(summary)
    (folder / "training_summary.json").write_text(json.dumps(summary))
    return folder


def _card_row(card: str, name: str) -> str | None:
    return next((line for line in card.splitlines() if line.startswith(f"| {name} |")), None)


def test_card_states_the_values_the_run_recorded_not_todays_recipe(lora_dir, tmp_path):
    """A run trained under another recipe (here: a kind this version does not know, other rates and class-image
    count) is described by what its summary recorded; nothing is re-derived or refused."""
    def older_recipe(summary):
        summary["config"].update(kind="creature", learning_rate=None, text_encoder_learning_rate=None,
                                 num_class_images=None)
        summary["identity"] = {"learning_rate": 3e-4, "text_encoder_learning_rate": 7e-5}
        summary["num_class_images"] = 120

    card = str(hub.build_model_card(_with_summary(lora_dir, tmp_path / "older", older_recipe), "alice/sks-dog"))
    assert _card_row(card, "Learning rate") == "| Learning rate | 3e-4 |"
    assert _card_row(card, "Text encoder learning rate") == "| Text encoder learning rate | 7e-5 |"
    assert _card_row(card, "Prior preservation") == "| Prior preservation | yes, 120 class images, weight 1.0 |"

    def top_level_wins(summary):
        summary["learning_rate"], summary["identity"] = 2e-4, {"learning_rate": 9e-4}

    card = str(hub.build_model_card(_with_summary(lora_dir, tmp_path / "top", top_level_wins), "alice/sks-dog"))
    assert _card_row(card, "Learning rate") == "| Learning rate | 2e-4 |"

    def nothing_recorded(summary):  # an older summary: only the config, where the recipe's values are None
        del summary["identity"], summary["num_class_images"]
        summary["config"].update(kind="creature", learning_rate=5e-5)

    card = str(hub.build_model_card(_with_summary(lora_dir, tmp_path / "old", nothing_recorded), "alice/sks-dog"))
    assert _card_row(card, "Learning rate") == "| Learning rate | 5e-5 |"  # the value given when it trained
    assert _card_row(card, "Prior preservation") == "| Prior preservation | yes, class images, weight 1.0 |"
    assert _card_row(card, "Text encoder learning rate") is None  # neither recorded nor given: not guessed


def test_sd_base_model_gets_its_license_and_base_model_metadata(full_dir, tmp_path):
    model = tmp_path / "sd"
    shutil.copytree(full_dir, model)
    summary = (model / "training_summary.json").read_text().replace('"tiny"', '"runwayml/stable-diffusion-v1-5"')
    (model / "training_summary.json").write_text(summary)
    meta = front_matter(str(hub.build_model_card(model, "alice/sks-dog")))
    assert meta["license"] == "creativeml-openrail-m"
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the moved repository's new home


def test_lora_staging_and_card(lora_dir, tmp_path):
    files = hub.stage_for_upload(lora_dir, tmp_path / "stage", "alice/sks-dog-lora")
    assert files == ["README.md", "grid.png", "pytorch_lora_weights.safetensors"]
    text = (tmp_path / "stage" / "README.md").read_text()
    meta = front_matter(text)
    assert "lora" in meta["tags"]
    # weight_name: diffusers before 0.42 (Colab's 0.39) will not guess it from the Hub's cache offline.
    assert 'pipe.load_lora_weights("alice/sks-dog-lora", weight_name="pytorch_lora_weights.safetensors")' in text
    assert "LoRA rank 8" in text


def test_push_creates_the_repo_and_uploads_from_the_model_folder(fresh_full_dir, fake_api, capsys, caplog):
    url = hub.push_to_hub(fresh_full_dir, "alice/sks-dog", private=True, token=SECRET)
    assert url == "https://huggingface.co/alice/sks-dog"
    (create, create_args), (upload, upload_args) = fake_api.calls
    assert create == "create_repo" and create_args == {"repo_id": "alice/sks-dog", "private": True,
                                                       "repo_type": "model", "exist_ok": True}
    assert upload == "upload_folder" and upload_args["repo_id"] == "alice/sks-dog"
    assert Path(upload_args["folder_path"]) == fresh_full_dir  # the model folder itself, no staging copy
    assert fake_api.tokens == [SECRET]
    assert "README.md" in fake_api.uploaded and "unet/diffusion_pytorch_model.safetensors" in fake_api.uploaded
    assert fake_api.uploaded["README.md"] == (fresh_full_dir / "README.md").read_bytes()  # written whole, in place
    assert not list(fresh_full_dir.glob(".*.tmp"))
    # The token is handed to huggingface_hub and nowhere else.
    output = capsys.readouterr()
    assert SECRET not in output.out + output.err + caplog.text
    for name, data in fake_api.uploaded.items():
        assert SECRET.encode() not in data, name


def _no_copies(monkeypatch):
    """Fail on any way of duplicating a file."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a file was copied or linked: {args[:2]}")

    for name in ("copy", "copy2", "copyfile", "copytree", "copyfileobj"):
        monkeypatch.setattr(shutil, name, refuse)
    monkeypatch.setattr(os, "link", refuse)
    monkeypatch.setattr(os, "symlink", refuse)


def test_push_uploads_exactly_the_model_by_patterns_and_copies_nothing(fresh_full_dir, fake_api, monkeypatch):
    model = fresh_full_dir
    pipeline_files = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()
                      and p.parts[len(model.parts)] in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    pipeline_files |= {"model_index.json"}
    # What a run and the user leave beside the model: none of it is published.
    leftovers = ["checkpoint-5/unet/diffusion_pytorch_model.safetensors", "checkpoint-5/optimizer.bin",
                 "checkpoints/checkpoint-9/random_states_0.pkl", "samples/step-000005-0.png", "class_images/1.png",
                 "evaluation/evaluation.json", "unet/diffusion_pytorch_model.bin", "unet/.partial.safetensors",
                 "unet/checkpoint-3/diffusion_pytorch_model.safetensors", ".saving/unet/config.json",
                 "lr_scheduler.pt", "notes.txt", "photos/dog.jpg"]
    for leftover in leftovers:
        (model / leftover).parent.mkdir(parents=True, exist_ok=True)
        (model / leftover).write_bytes(b"leftover")
    _no_copies(monkeypatch)
    hub.push_to_hub(model, "alice/sks-dog", token=SECRET)
    _, upload_args = fake_api.calls[1]
    assert set(fake_api.uploaded) == pipeline_files | {"README.md", "grid.png"}
    assert "training_summary.json" not in upload_args["allow_patterns"]
    assert set(hub.published_files(model)) == set(fake_api.uploaded)
    grid = Image.open(model / "grid.png")
    assert grid.size == (4 * 64, 64)


def test_lora_push_uploads_the_weights_card_and_grid(lora_dir, tmp_path, fake_api, monkeypatch):
    model = Path(shutil.copytree(lora_dir, tmp_path / "lora"))
    (model / "checkpoint-2").mkdir()
    (model / "checkpoint-2" / "pytorch_lora_weights.safetensors").write_bytes(b"older")
    _no_copies(monkeypatch)
    hub.push_to_hub(model, "alice/sks-dog-lora", token=SECRET)
    assert sorted(fake_api.uploaded) == ["README.md", "grid.png", "pytorch_lora_weights.safetensors"]
    assert fake_api.uploaded["pytorch_lora_weights.safetensors"] == (lora_dir / LORA_WEIGHTS_FILE).read_bytes()


def test_push_from_a_read_only_model_folder_adds_the_card_in_a_second_commit(fresh_full_dir, fake_api, monkeypatch):
    def read_only(path, data):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(hub, "_write_atomically", read_only)
    hub.push_to_hub(fresh_full_dir, "alice/sks-dog", token=SECRET)
    assert [name for name, _ in fake_api.calls] == ["create_repo", "upload_folder", "create_commit"]
    assert not (fresh_full_dir / "README.md").exists()
    assert fake_api.uploaded["README.md"].startswith(b"---\n") and fake_api.uploaded["grid.png"][:4] == b"\x89PNG"


def test_push_refuses_when_not_logged_in(full_dir, fake_api):
    with pytest.raises(hub.HubError, match="Not logged in.*hf auth login"):
        hub.push_to_hub(full_dir, "alice/sks-dog")
    assert fake_api.calls == []


def test_push_uses_the_saved_login(fresh_full_dir, fake_api, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: SECRET)
    hub.push_to_hub(fresh_full_dir, "alice/sks-dog")
    assert fake_api.tokens == [SECRET]


def test_push_explains_a_rejected_token(full_dir, fake_api):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    response = httpx.Response(401, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    fake_api.fail_with = HfHubHTTPError("401 Unauthorized", response=response)
    with pytest.raises(hub.HubError, match="refused the token") as caught:
        hub.push_to_hub(full_dir, "alice/sks-dog", token=SECRET)
    assert SECRET not in str(caught.value)


def test_bad_inputs_are_refused_before_any_call(tmp_path, full_dir, fake_api):
    with pytest.raises(ConfigError, match="USER/NAME"):
        hub.push_to_hub(full_dir, "just-a-name", token=SECRET)
    with pytest.raises(ModelLoadError, match="not a trained model folder"):
        hub.push_to_hub(tmp_path, "alice/x", token=SECRET)
    assert fake_api.calls == []


def test_push_cli_with_token_from_env(fresh_full_dir, fake_api, monkeypatch, capsys):
    assert main(["push", "--model", str(fresh_full_dir), "--repo-id", "alice/sks-dog", "--token-from-env"]) == 2
    assert "HF_TOKEN is not set" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert main(["push", "--model", str(fresh_full_dir), "--repo-id", "alice/sks-dog", "--private",
                 "--token-from-env"]) == 0
    output = capsys.readouterr()
    assert "https://huggingface.co/alice/sks-dog" in output.out
    assert SECRET not in output.out + output.err
    assert fake_api.tokens == [SECRET] and fake_api.calls[0][1]["private"] is True


# ---------------------------------------------------------------------------- the card states what ran


def test_card_states_the_effective_values_not_the_requested_config(lora_dir, tmp_path):
    """Asked: lr 2e-6, fp16, 8-bit Adam, 800 steps, rank 4. Ran (on a machine without a GPU, stopped by the
    recipe at 400 steps, rank 8 from the preset): lr 1e-4, fp32, plain AdamW. The card says what ran."""
    def asked_one_thing_ran_another(summary):
        summary["config"].update(learning_rate=2e-6, mixed_precision="fp16", use_8bit_adam=True,
                                 max_train_steps=800, lora_rank=4)
        summary["identity"] = {"learning_rate": 1e-4, "text_encoder_learning_rate": 5e-5, "lora_rank": 8,
                               "max_train_steps": 400}
        summary.update(learning_rate=1e-4, mixed_precision="no", optimizer="AdamW", use_8bit_adam=False, steps=400,
                       history=[{"step": 399, "samples": []}, {"step": 400, "samples": []}])

    card = str(hub.build_model_card(_with_summary(lora_dir, tmp_path / "ran", asked_one_thing_ran_another),
                                    "alice/sks-dog"))
    assert _card_row(card, "Learning rate") == "| Learning rate | 1e-4 |"
    assert _card_row(card, "Mixed precision") == "| Mixed precision | no (fp32) |"
    assert _card_row(card, "Optimizer") == "| Optimizer | AdamW |"
    assert _card_row(card, "Training steps") == "| Training steps | 400 |"
    assert _card_row(card, "Method") == "| Method | DreamBooth, LoRA rank 8 |"
    assert "fp16" not in card and "8-bit" not in card and "2e-6" not in card and "800" not in card

    def eight_bit_in_backward(summary):
        summary.update(mixed_precision="fp16", optimizer="StepInBackward", use_8bit_adam=True)

    card = str(hub.build_model_card(_with_summary(lora_dir, tmp_path / "gpu", eight_bit_in_backward), "a/b"))
    assert _card_row(card, "Optimizer") == "| Optimizer | 8-bit AdamW (bitsandbytes), stepped inside backward |"
    assert _card_row(card, "Mixed precision") == "| Mixed precision | fp16 |"

    def older_summary(summary):  # records the optimizer's class but not the flag
        summary.update(optimizer="AdamW8bit")

    card = str(hub.build_model_card(_with_summary(lora_dir, tmp_path / "older8", older_summary), "a/b"))
    assert _card_row(card, "Optimizer") == "| Optimizer | 8-bit AdamW (bitsandbytes) |"
    # Nothing recorded: no row, rather than the config's request presented as fact.
    card = str(hub.build_model_card(lora_dir, "a/b"))
    assert _card_row(card, "Mixed precision") is None and _card_row(card, "Optimizer") is None


def _draw_samples(model: Path, steps_and_colours: list[tuple[str, str]], mtimes: list[float]) -> None:
    samples = model / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    samples.mkdir()
    for (name, colour), mtime in zip(steps_and_colours, mtimes, strict=True):
        Image.new("RGB", (64, 64), colour).save(samples / name)
        os.utime(samples / name, (mtime, mtime))


def _grid_colours(model: Path, tmp_path: Path) -> list[tuple[int, int, int]]:
    hub.stage_for_upload(model, tmp_path / "stage", "alice/sks-dog")
    grid = Image.open(tmp_path / "stage" / "grid.png").convert("RGB")
    return [grid.getpixel((64 * i + 32, 32)) for i in range(grid.width // 64)]


def test_grid_shows_the_final_steps_samples_by_the_recorded_step_not_the_file_date(lora_dir, tmp_path):
    def with_history(summary):
        summary["steps"] = 400
        summary["history"] = [{"step": 200, "samples": ["/content/run/samples/step-000200-0.png",
                                                        "/content/run/samples/step-000200-1.png"]},
                              {"step": 300, "samples": []},
                              {"step": 400, "samples": ["/content/run/samples/step-000400-0.png",
                                                        "/content/run/samples/step-000400-1.png"]}]

    model = _with_summary(lora_dir, tmp_path / "run", with_history)
    # The step-200 files are the NEWEST by date (copied later, say), and a file from another run is newest of all.
    _draw_samples(model, [("step-000400-0.png", "blue"), ("step-000400-1.png", "green"),
                          ("step-000200-0.png", "red"), ("step-000200-1.png", "red"), ("step-000800-0.png", "red")],
                  [1000, 1001, 5000, 5001, 9000])
    assert _grid_colours(model, tmp_path / "a") == [(0, 0, 255), (0, 128, 0)]
    assert [p.name for p in hub.final_samples(model)] == ["step-000400-0.png", "step-000400-1.png"]

    # A summary without history: the file names' step numbers decide (numerically: 10 comes after 9).
    plain = _with_summary(lora_dir, tmp_path / "plain", lambda summary: summary.pop("steps"))
    _draw_samples(plain, [("step-10-0.png", "blue"), ("step-9-0.png", "red"), ("step-9-1.png", "red")],
                  [1000, 5000, 5001])
    assert _grid_colours(plain, tmp_path / "b") == [(0, 0, 255)]

    def no_samples_this_run(summary):
        summary["history"] = [{"step": 1, "samples": []}, {"step": 2, "samples": []}]

    quiet = _with_summary(lora_dir, tmp_path / "quiet", no_samples_this_run)  # old files from another run stay out
    assert hub.final_samples(quiet) == []
    assert "No sample images were saved during training." in str(hub.build_model_card(quiet, "a/b", has_grid=False))


# ---------------------------------------------------------------------------- when the Hub cannot be reached


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _AnsweringHub:
    """A local HTTP server that answers every request with one status, as the Hub does when it refuses."""

    def __init__(self, status: int):
        import http.server
        import threading

        seen = self.authorizations = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                seen.append(self.headers.get("authorization"))
                body = json.dumps({"error": "Invalid credentials in Authorization header"
                                   if status == 401 else "Service unavailable"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _push_in_a_fresh_process(model: Path, tmp_path: Path, **env: str):
    """`dreambooth-helpers push` with the real huggingface_hub client, configured by environment variables (read
    when huggingface_hub is imported, hence the fresh process)."""
    environment = {name: value for name, value in os.environ.items() if name != "HF_ENDPOINT"}
    environment.update({"HF_TOKEN": SECRET, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
                        "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env})
    return subprocess.run([sys.executable, "-m", "dreambooth_helpers", "push", "--model", str(model), "--repo-id",
                           "alice/sks-dog", "--token-from-env"], capture_output=True, text=True, env=environment,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])


def _assert_one_error_paragraph(done, *phrases: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and SECRET not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert done.stderr.rstrip().endswith(errors[0]) and "\n\n" not in done.stderr.strip()
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def test_push_offline_with_the_real_client_is_one_error(lora_dir, tmp_path):
    done = _push_in_a_fresh_process(lora_dir, tmp_path, HF_HUB_OFFLINE="1")
    _assert_one_error_paragraph(done, "offline mode", "HF_HUB_OFFLINE", "push again")


def test_push_to_an_unreachable_hub_with_the_real_client_is_one_error(lora_dir, tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    done = _push_in_a_fresh_process(lora_dir, tmp_path, HF_ENDPOINT=endpoint)
    _assert_one_error_paragraph(done, f"Could not reach the Hugging Face Hub at {endpoint}", "Nothing was published",
                                "internet connection")


@pytest.mark.parametrize("status, phrase", [(401, "refused the token (401)"), (503, "HTTP 503")])
def test_push_refused_by_the_hub_with_the_real_client_is_one_error(lora_dir, tmp_path, status, phrase):
    answering = _AnsweringHub(status)
    try:
        done = _push_in_a_fresh_process(lora_dir, tmp_path, HF_ENDPOINT=answering.url)
    finally:
        answering.close()
    _assert_one_error_paragraph(done, phrase)
    assert f"Bearer {SECRET}" in answering.authorizations  # the token goes to the Hub, and only there


@pytest.mark.parametrize("make_error, phrase", [
    (lambda: httpx.ConnectTimeout("timed out"), "timed out"),
    (lambda: httpx.ConnectError("[Errno -3] Temporary failure in name resolution"), "name resolution"),
    (lambda: TimeoutError("The read operation timed out"), "timed out"),
    (lambda: ConnectionResetError(104, "Connection reset by peer"), "ConnectionResetError"),
    (lambda: requests.ConnectionError("Max retries exceeded"), "Max retries exceeded"),
])
def test_every_way_of_not_reaching_the_hub_is_a_hub_error(fresh_full_dir, fake_api, make_error, phrase, capsys,
                                                          monkeypatch):
    fake_api.fail_with = make_error()
    with pytest.raises(hub.HubError, match="Could not reach the Hugging Face Hub") as caught:
        hub.push_to_hub(fresh_full_dir, "alice/sks-dog", token=SECRET)
    assert phrase in str(caught.value) and "Nothing was published" in str(caught.value)
    assert caught.value.__cause__ is None
    # Cut off during the upload: the repository exists and is said to be incomplete.
    fake_api.fail_with, fake_api.fail_upload_with = None, make_error()
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert main(["push", "--model", str(fresh_full_dir), "--repo-id", "alice/sks-dog", "--token-from-env"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "may exist but is incomplete" in err and SECRET not in err


def test_a_model_file_gone_during_the_upload_is_not_called_a_network_error(fresh_full_dir, fake_api):
    missing = str(fresh_full_dir / "unet" / "diffusion_pytorch_model.safetensors")
    fake_api.fail_upload_with = FileNotFoundError(2, "No such file or directory", missing)
    with pytest.raises(hub.HubError, match="Google Drive still mounted") as caught:
        hub.push_to_hub(fresh_full_dir, "alice/sks-dog", token=SECRET)
    assert missing in str(caught.value) and "Could not reach" not in str(caught.value)


def test_hub_error_texts_never_carry_the_token(fresh_full_dir, fake_api):
    from huggingface_hub.errors import HfHubHTTPError

    fake_api.fail_with = httpx.ConnectError(f"failed with headers Authorization: Bearer {SECRET}")
    with pytest.raises(hub.HubError) as caught:
        hub.push_to_hub(fresh_full_dir, "alice/sks-dog", token=SECRET)
    assert SECRET not in str(caught.value)
    response = httpx.Response(500, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    fake_api.fail_with = HfHubHTTPError("500", response=response, server_message=f"echo {SECRET}")
    with pytest.raises(hub.HubError, match="HTTP 500") as caught:
        hub.push_to_hub(fresh_full_dir, "alice/sks-dog", token=SECRET)
    assert SECRET not in str(caught.value)


def test_push_without_exist_ok_leaves_an_existing_repository_alone(fresh_full_dir, fake_api):
    from huggingface_hub.errors import HfHubHTTPError

    from dreambooth_helpers.errors import RepoExistsError

    response = httpx.Response(409, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    fake_api.fail_with = HfHubHTTPError("409 Conflict: You already created this model repo", response=response)
    with pytest.raises(RepoExistsError, match="'alice/sks-dog' already exists on the Hub: nothing was uploaded"):
        hub.push_to_hub(fresh_full_dir, "alice/sks-dog", token=SECRET, exist_ok=False)
    assert fake_api.calls == [("create_repo", {"repo_id": "alice/sks-dog", "private": False, "repo_type": "model",
                                               "exist_ok": False})]
    assert fake_api.uploaded == {} and not (fresh_full_dir / "README.md").exists()


# ---------------------------------------------------------------------------- the card's code, quoted

HOSTILE_NOUNS = ['dog" $(touch PWNED) "', "dog `touch PWNED` ``` x", "dog'; touch PWNED; echo '",
                 "dog\n```\n$(touch PWNED)\n---\n<img src=x>"]


def _hostile_run(source: Path, folder: Path, prompt: str) -> Path:
    def hostile(summary):
        summary["instance_prompts"] = [prompt]
        summary["config"]["concepts"][0].update(instance_prompt=prompt, class_prompt="a photo of dog")

    return _with_summary(source, folder, hostile)


def _markdown_tokens(card: str) -> list:
    from markdown_it import MarkdownIt

    body = card.split("\n---\n", 1)[1]
    tokens = []
    for token in MarkdownIt("commonmark").enable("table").parse(body):
        tokens += [token, *(token.children or [])]
    return tokens


@pytest.mark.parametrize("noun", HOSTILE_NOUNS)
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_the_cards_code_quotes_a_hostile_prompt_for_each_language(full_dir, lora_dir, tmp_path, noun, kind):
    """A class noun such as `dog" $(touch X) "` lands in the card's bash lines, Python snippet, Markdown and front
    matter; in each it stays the text it is: running the card's commands creates no file."""
    import ast

    pytest.importorskip("markdown_it")
    prompt = f"a photo of sks {noun}"
    model = _hostile_run(full_dir if kind == "full" else lora_dir, tmp_path / "run", prompt)
    card = str(hub.build_model_card(model, "alice/sks-dog"))
    assert front_matter(card)["instance_prompt"] == prompt  # YAML
    tokens = _markdown_tokens(card)
    fences = [(token.info, token.content) for token in tokens if token.type == "fence"]
    assert [info for info, _ in fences] == ["python", "bash"] + (["bash"] if kind == "lora" else [])
    # Markdown: the prompt is shown whole in a code span (one line), and none of it leaks out as Markdown.
    assert " ".join(prompt.split()) in [token.content for token in tokens if token.type == "code_inline"]
    assert not [t.content for t in tokens if t.type in ("text", "html_inline", "html_block") and "PWNED" in t.content]
    # Python: it compiles, and the strings are the prompt and the repository, as given.
    python = fences[0][1]
    tree = ast.parse(compile(python, "card-snippet", "exec", ast.PyCF_ONLY_AST))
    calls = {ast.unparse(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert ast.literal_eval(calls["pipe"].args[0]) == prompt
    loaded = calls["pipe.load_lora_weights" if kind == "lora" else f"{'StableDiffusionPipeline'}.from_pretrained"]
    assert ast.literal_eval(loaded.args[0]) == "alice/sks-dog"
    # Bash: valid, and run as written (with a stand-in dreambooth-helpers) it passes the prompt as one argument.
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    fake = bin_dir / "dreambooth-helpers"
    fake.write_text('#!/bin/sh\nprintf "%s\\0" "$@" >> "$ARGS_FILE"\nprintf "\\n\\0" >> "$ARGS_FILE"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "ARGS_FILE": str(tmp_path / "args")}
    for _, script in fences[1:]:
        assert subprocess.run(["bash", "-n", "-c", script], capture_output=True).returncode == 0, script
        done = subprocess.run(["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert not list(tmp_path.rglob("PWNED")) and not list(Path.cwd().glob("PWNED"))
    calls_made = [c.split("\0")[:-1] for c in (tmp_path / "args").read_text().split("\n\0") if c]
    generate = next(arguments for arguments in calls_made if arguments[0] == "generate")
    assert generate[generate.index("--prompt") + 1] == prompt
    assert generate[generate.index("--model") + 1] == ("alice/sks-dog" if kind == "full" else
                                                       "stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_the_cards_markdown_keeps_backticks_and_pipes_of_recorded_values_inside_their_code(full_dir, tmp_path):
    from dreambooth_helpers import model_card

    pytest.importorskip("markdown_it")

    def odd_values(summary):
        summary["config"]["lr_scheduler"] = "constant | <b>bold</b> `x`"
        summary["base_model"] = str(tmp_path / "my `base` <img src=x> model")

    card = str(hub.build_model_card(_with_summary(full_dir, tmp_path / "run", odd_values), "alice/sks-dog",
                                    license="my `license` <i>"))
    tokens = _markdown_tokens(card)
    rows = [t for t in tokens if t.type == "tr_open"]
    assert len(rows) == 1 + len(model_card._settings_rows(model_card.describe_training(tmp_path / "run")))
    assert not [t.content for t in tokens if t.type in ("html_inline", "html_block")]  # no HTML gets through
    codes = [t.content for t in tokens if t.type == "code_inline"]
    assert "my `base` <img src=x> model" in codes and "my `license` <i>" in codes
