"""Publishing: the staged folder, the model card and its front matter, the calls to huggingface_hub, the token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dreambooth_helpers import hub
from dreambooth_helpers.cli import main
from dreambooth_helpers.config import short_number
from dreambooth_helpers.errors import ConfigError, ModelLoadError
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
    """Stands in for huggingface_hub.HfApi: records calls and keeps a copy of what would be uploaded."""

    calls: list[tuple[str, dict]] = []
    tokens: list[str | None] = []
    uploaded: Path | None = None
    fail_with: Exception | None = None

    def __init__(self, token=None):
        FakeHfApi.tokens.append(token)

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if FakeHfApi.fail_with:
            raise FakeHfApi.fail_with
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs))
        shutil.copytree(kwargs["folder_path"], FakeHfApi.uploaded)


@pytest.fixture
def fake_api(monkeypatch, tmp_path):
    FakeHfApi.calls, FakeHfApi.tokens, FakeHfApi.fail_with = [], [], None
    FakeHfApi.uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return FakeHfApi


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
    assert 'pipe.load_lora_weights("alice/sks-dog-lora")' in text
    assert "LoRA rank 8" in text


def test_push_creates_the_repo_and_uploads_the_staged_folder(full_dir, fake_api, capsys, caplog):
    url = hub.push_to_hub(full_dir, "alice/sks-dog", private=True, token=SECRET)
    assert url == "https://huggingface.co/alice/sks-dog"
    (create, create_args), (upload, upload_args) = fake_api.calls
    assert create == "create_repo" and create_args == {"repo_id": "alice/sks-dog", "private": True,
                                                       "repo_type": "model", "exist_ok": True}
    assert upload == "upload_folder" and upload_args["repo_id"] == "alice/sks-dog"
    assert fake_api.tokens == [SECRET]
    uploaded = sorted(str(p.relative_to(fake_api.uploaded)) for p in fake_api.uploaded.rglob("*") if p.is_file())
    assert "README.md" in uploaded and "unet/diffusion_pytorch_model.safetensors" in uploaded
    assert not Path(upload_args["folder_path"]).exists()  # the staging folder is cleaned up
    # The token is handed to huggingface_hub and nowhere else.
    output = capsys.readouterr()
    assert SECRET not in output.out + output.err + caplog.text
    for file in fake_api.uploaded.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


def test_push_refuses_when_not_logged_in(full_dir, fake_api):
    with pytest.raises(hub.HubError, match="Not logged in.*hf auth login"):
        hub.push_to_hub(full_dir, "alice/sks-dog")
    assert fake_api.calls == []


def test_push_uses_the_saved_login(full_dir, fake_api, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: SECRET)
    hub.push_to_hub(full_dir, "alice/sks-dog")
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


def test_push_cli_with_token_from_env(full_dir, fake_api, monkeypatch, capsys):
    assert main(["push", "--model", str(full_dir), "--repo-id", "alice/sks-dog", "--token-from-env"]) == 2
    assert "HF_TOKEN is not set" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert main(["push", "--model", str(full_dir), "--repo-id", "alice/sks-dog", "--private",
                 "--token-from-env"]) == 0
    output = capsys.readouterr()
    assert "https://huggingface.co/alice/sks-dog" in output.out
    assert SECRET not in output.out + output.err
    assert fake_api.tokens == [SECRET] and fake_api.calls[0][1]["private"] is True
