"""The Hugging Face token never shows up: not in output, logs, files, model cards, notebook output or errors.

A fake token sits in the environment (and in a mocked Colab secret) while the CLI trains and pushes;
every captured stream, log record and written file is then searched for it.
"""

from __future__ import annotations

import logging
import re
import sys
import types
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import HfHubHTTPError

from dreambooth_helpers import hub, widgets
from dreambooth_helpers.cli import main
from dreambooth_helpers.errors import DreamBoothError
from tests.trained_fixtures import make_full_output, make_lora_output

# Built at run time so that no token-shaped literal sits in the source.
FAKE_TOKEN = "hf_" + "FAKE" + "q7" * 17
REPO = Path(__file__).resolve().parents[1]
TOKEN_PATTERN = re.compile(rb"hf_[A-Za-z0-9]{30,}")


def files_containing(folder: Path, secret: str) -> list[Path]:
    needle = secret.encode()
    return [p for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


class RecordingHub:
    """Replaces the two network calls of huggingface_hub.HfApi (the boundary): keeps the uploaded folder."""

    def __init__(self, upload_copy: Path, fail_with: Exception | None = None):
        self.upload_copy, self.fail_with, self.tokens = upload_copy, fail_with, []

    def install(self, monkeypatch) -> None:
        recorder = self
        real_init = huggingface_hub.HfApi.__init__

        def init(api, *args, **kwargs):
            recorder.tokens.append(kwargs.get("token"))
            real_init(api, *args, **kwargs)

        def create_repo(api, repo_id, **kwargs):
            if recorder.fail_with:
                raise recorder.fail_with
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, folder_path, **kwargs):
            import shutil

            shutil.copytree(folder_path, recorder.upload_copy)

        monkeypatch.setattr(hub.HfApi, "__init__", init)
        monkeypatch.setattr(hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(hub.HfApi, "upload_folder", upload_folder)


@pytest.fixture
def token_in_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(hub, "get_token", lambda: FAKE_TOKEN)  # as if also logged in with it
    return FAKE_TOKEN


def test_training_and_publishing_from_the_cli_never_reveal_the_token(instance_dir, tmp_path, token_in_environment,
                                                                    monkeypatch, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    output_dir = tmp_path / "run"
    assert main(["train", "--instance-dir", str(instance_dir), "--instance-prompt", "a photo of sks dog",
                 "--no-prior-preservation", "--output-dir", str(output_dir), "--model", "tiny", "--resolution", "32",
                 "--max-train-steps", "2", "--checkpoint-every", "1", "--mixed-precision", "no"]) == 0
    recorder = RecordingHub(tmp_path / "uploaded")
    recorder.install(monkeypatch)
    assert main(["push", "--model", str(output_dir), "--repo-id", "someone/sks-dog", "--token-from-env"]) == 0
    assert recorder.tokens == [FAKE_TOKEN]  # handed to huggingface_hub, and only there

    captured = capfd.readouterr()
    assert "Published: https://huggingface.co/someone/sks-dog" in captured.out
    assert FAKE_TOKEN not in captured.out + captured.err
    assert FAKE_TOKEN not in caplog.text
    assert (output_dir / "training_summary.json").is_file() and (recorder.upload_copy / "README.md").is_file()
    assert files_containing(tmp_path, FAKE_TOKEN) == []  # summary, checkpoints, samples, model card, weights


def test_publishing_errors_do_not_echo_the_token(tmp_path, token_in_environment, monkeypatch, capsys):
    model_dir = make_lora_output(tmp_path / "lora")
    for status in (401, 403, 500):
        response = types.SimpleNamespace(status_code=status, headers={"authorization": f"Bearer {FAKE_TOKEN}"},
                                         request=None)
        error = HfHubHTTPError(f"{status} error for request with headers Authorization: Bearer {FAKE_TOKEN}",
                               response=response)
        RecordingHub(tmp_path / f"uploaded-{status}", fail_with=error).install(monkeypatch)
        with pytest.raises(DreamBoothError) as caught:
            hub.push_to_hub(model_dir, "someone/sks-dog", token=FAKE_TOKEN)
        assert FAKE_TOKEN not in str(caught.value) and f"{status}" in str(caught.value)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
        assert main(["push", "--model", str(model_dir), "--repo-id", "someone/sks-dog", "--token-from-env"]) == 2
        assert FAKE_TOKEN not in capsys.readouterr().err


def test_the_notebook_login_cell_shows_no_token(monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    logged_in = []
    userdata = types.SimpleNamespace(get=lambda name: f"  {FAKE_TOKEN}\n" if name == "HF_TOKEN" else None)
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
    monkeypatch.delenv(widgets.SMOKE_VARIABLE, raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: logged_in[-1] if logged_in else None)
    monkeypatch.setattr(huggingface_hub, "login", lambda token, **kwargs: logged_in.append(token))
    monkeypatch.setattr(huggingface_hub, "whoami", lambda *args, **kwargs: {"name": "someone"})
    cell_output = widgets.hub_login(widgets.detect_runtime())
    print(cell_output)
    assert logged_in == [FAKE_TOKEN] and cell_output == "Logged in with the Colab secret HF_TOKEN as someone."
    assert FAKE_TOKEN not in capsys.readouterr().out + caplog.text


def test_no_token_is_stored_in_the_notebook_docs_or_package(tmp_path):
    make_full_output(tmp_path / "fixture")  # the fixtures the tests publish from carry none either
    sources = [*REPO.glob("*.ipynb"), *REPO.glob("*.md"), *(REPO / "docs").rglob("*"),
               *(REPO / "dreambooth_helpers").rglob("*.py"), *(tmp_path / "fixture").rglob("*")]
    leaks = [p for p in sources if p.is_file() and TOKEN_PATTERN.search(p.read_bytes())]
    assert leaks == []
