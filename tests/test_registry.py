"""`register` and serving through MLflow (registry.py), with the real processes: `mlflow server` on 127.0.0.1 with a
sqlite backend for tracking and the registry, a toy LoRA run trained with `--report-to mlflow` into it, `register`,
and `mlflow models serve -m models:/sks-toy@champion --env-manager local` answering POST /invocations with a PNG.

The module trains, registers and serves once (module fixtures); each server runs in a session of its own, which its
fixture stops with everything it started, and nothing else."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tomllib
from PIL import Image

pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")  # the full mlflow package: `mlflow server` and its sqlite backend

from dreambooth_helpers import registry, training  # noqa: E402
from dreambooth_helpers.cli import main  # noqa: E402
from dreambooth_helpers.config import Concept, TrainConfig  # noqa: E402
from dreambooth_helpers.files import LORA_WEIGHTS_FILE, SUMMARY_FILE  # noqa: E402

from .trained_fixtures import make_full_output, make_lora_output, write_summary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "sample_data" / "toy_robot"
NAME = "sks-toy"
BIN = Path(sys.executable).parent  # the venv's mlflow and uvicorn, which `mlflow models serve` runs by name


# ---------------------------------------------------------------------------- real processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_TRACKING_URI")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"), "MLFLOW_ENABLE_TELEMETRY": "false",
            "DO_NOT_TRACK": "true", **extra}


class _Server:
    """A command in a session of its own (it starts workers), logging to a file; `stop` ends that session."""

    def __init__(self, argv: list[str], log: Path, cwd: Path, env: dict[str, str]):
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_ready(self, url: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.log.name} exited with {self.process.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        return
            time.sleep(0.3)
        pytest.fail(f"{url} did not answer in {timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)  # the group this fixture started: the server and its workers
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _png(prediction: dict) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(prediction["image"])))
    assert image.format == "PNG"
    image.load()
    return image


@contextlib.contextmanager
def _serving(command, log: Path, env: dict[str, str]):
    """A server started from `command(port)` on a free port of 127.0.0.1 (its `url` set), stopped afterwards."""
    port = _free_port()
    server = _Server(command(port), log, log.parent, env)
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a sqlite backend (tracking and registry) and its own artifact folder,
    started and not waited for: it boots while the tests before the first one that needs it run."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with _serving(lambda port: [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--uvicorn-opts", "--timeout-graceful-shutdown 2"],  # idle connections end the wait
            root / "server.log", _env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")) as server:  # no GenAI jobs
        yield server


@pytest.fixture(scope="module")
def tracking_server(mlflow_server) -> str:
    mlflow_server.wait_ready(f"{mlflow_server.url}/health")
    return mlflow_server.url


@pytest.fixture(scope="module")
def registered(tracking_server, tmp_path_factory):
    """A toy LoRA run trained with --report-to mlflow into the server, then `register --name sks-toy` (the URI by
    --tracking-uri): (output folder, what register printed, its exit code)."""
    import mlflow

    out = tmp_path_factory.mktemp("runs") / "sks-toy-run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_server)
        patch.setenv("HF_HUB_OFFLINE", "1")
        config = TrainConfig.from_preset(
            "t4", concepts=[Concept(str(PHOTOS), "a sks toy", "a toy")], output_dir=str(out), model="toy",
            lora=True, resolution=32, max_train_steps=2, with_prior_preservation=False, mixed_precision="no",
            report_to="mlflow")
        training.train(config, progress=False)
        patch.delenv("MLFLOW_TRACKING_URI")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main(["register", "--model", str(out), "--name", NAME, "--tracking-uri", tracking_server])
        mlflow.set_tracking_uri(None)  # training set MLflow's process-wide URI; later tests start from none
    return out, printed.getvalue(), code


@pytest.fixture(scope="module")
def model_server_starting(tracking_server, registered, tmp_path_factory):
    """`mlflow models serve -m models:/sks-toy@champion --env-manager local`, offline; not waited for."""
    root = tmp_path_factory.mktemp("model-server")
    with _serving(lambda port: [
            sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
            "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            root / "serve.log", _env(MLFLOW_TRACKING_URI=tracking_server)) as server:
        yield server


@pytest.fixture(scope="module")
def model_server(model_server_starting) -> str:
    model_server_starting.wait_ready(f"{model_server_starting.url}/ping")
    return model_server_starting.url


# ---------------------------------------------------------------------------- refused before anything loads


@pytest.fixture
def lora_run(tmp_path) -> Path:
    return make_lora_output(tmp_path / "lora-run")


def _no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(training, "_load_model", refuse)
    monkeypatch.setattr(registry, "_stage", refuse)


def test_register_refuses_the_file_store_in_one_paragraph(lora_run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    _no_model_loads(monkeypatch)
    code = main(["register", "--model", str(lora_run), "--name", NAME, "--tracking-uri", f"file://{tmp_path}/mlruns"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: MLflow will not use the file store") and "Traceback" not in err
    assert "--tracking-uri" in err and "sqlite:///" in err and len(err.strip().splitlines()) == 1


def test_register_refuses_a_uri_mlflow_does_not_know(lora_run, monkeypatch, capsys):
    _no_model_loads(monkeypatch)
    assert main(["register", "--model", str(lora_run), "--name", NAME, "--tracking-uri", "mlfow://typo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MLflow cannot use the tracking URI mlfow://typo (--tracking-uri): ")
    assert "unsupported URI" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_register_refuses_a_server_that_does_not_answer_at_once(lora_run, monkeypatch, capsys):
    _no_model_loads(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    started = time.monotonic()
    code = main(["register", "--model", str(lora_run), "--name", NAME])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: No MLflow server answers at http://127.0.0.1:")
    assert "(MLFLOW_TRACKING_URI)" in err and "mlflow server" in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - started < 10  # not MLflow's minutes of retries


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "http://127.0.0.1:{port}", "http://user:secret@127.0.0.1:{port}"])
def test_train_report_to_mlflow_refuses_such_a_uri_before_the_model_loads(uri, tmp_path, monkeypatch, capsys):
    _no_model_loads(monkeypatch)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(port=_free_port()))
    code = main(["train", "--instance-dir", str(PHOTOS), "--instance-prompt", "a sks toy", "--class-prompt", "a toy",
                 "--output-dir", str(tmp_path / "out"), "--max-train-steps", "1", "--no-prior-preservation",
                 "--report-to", "mlflow"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(("error: MLflow will not use the file store", "error: No MLflow server answers"))
    assert "secret" not in err  # a password in the URI is not printed


def test_register_refuses_a_folder_without_a_trained_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["register", "--model", str(tmp_path / "empty"), "--name", NAME]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no trained model" in err


def test_register_refuses_a_lora_whose_base_folder_is_gone(lora_run, capsys):
    write_summary(lora_run, lora=True, base_model="/nowhere/sd15")
    assert main(["register", "--model", str(lora_run), "--name", NAME]) == 2
    assert "'/nowhere/sd15', is no longer there" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the parts


def test_the_description_is_the_model_card_with_how_to_serve(lora_run):
    text = registry.model_card_text(lora_run, "my dog", "champion")
    assert text.startswith("# my-dog") and "## Prompt" in text and "a photo of sks dog" in text
    assert "## Usage" not in text and "hf download" not in text and "![" not in text
    assert "mlflow models serve -m models:/my dog@champion --env-manager local" in text
    (lora_run / "README.md").write_text("---\nlicense: mit\n---\n\n# pushed card\n\n## Usage\n\nhub stuff\n\n## End\n")
    assert registry.model_card_text(lora_run, "x", "a").startswith("# pushed card\n\n## End")


def test_requirements_are_the_packages_dependencies_pinned_as_installed():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for d in dependencies}
    assert {p.lower() for p in registry.RUNTIME_PACKAGES} == names
    from importlib import metadata

    assert f"torch=={metadata.version('torch')}" in registry.pip_requirements()
    assert all("==" in r for r in registry.pip_requirements())


def test_prompts_arrive_in_any_shape_mlflow_hands_over():
    import pandas as pd

    assert registry.prompts_of(pd.DataFrame({"prompt": ["a", "b"]})) == ["a", "b"]
    assert registry.prompts_of(pd.DataFrame({"prompt": [["a", "b"]]})) == ["a", "b"]  # one row holding the list
    assert registry.prompts_of(pd.DataFrame({"prompt": [np.array(["a", "b"])]})) == ["a", "b"]
    assert registry.prompts_of({"prompt": "a"}) == ["a"] and registry.prompts_of(["a", "b"]) == ["a", "b"]
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="non-empty prompt"):
        registry.prompts_of({"prompt": [" "]})


def test_staging_takes_the_model_files_only_and_a_local_base_along(tmp_path):
    full = make_full_output(tmp_path / "full")  # with a checkpoint and class images beside the model
    plan = registry._plan(full)
    artifacts, config, code = registry._stage(full, plan, tmp_path / "s1")
    assert config == {} and not (code / "toy_model").exists() and (code / "registry.py").is_file()
    assert not list(code.rglob("__pycache__"))
    assert sorted(p.name for p in Path(artifacts["model"]).iterdir()) == sorted(
        ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae", SUMMARY_FILE])
    # A LoRA trained on a local folder: that folder's model files go along, so serving needs no network.
    lora = make_lora_output(tmp_path / "lora")
    write_summary(lora, lora=True, base_model=str(full))
    artifacts, config, _ = registry._stage(lora, registry._plan(lora), tmp_path / "s2")
    assert config == {} and sorted(artifacts) == ["base", "lora"]
    assert not (Path(artifacts["base"]) / "checkpoint-5").exists() and (Path(artifacts["base"]) / "unet").is_dir()
    assert sorted(p.name for p in Path(artifacts["lora"]).iterdir()) == [LORA_WEIGHTS_FILE, SUMMARY_FILE]


# ---------------------------------------------------------------------------- without a server
# Each asks for mlflow_server only to let it boot meanwhile: the tests after them use it.


@pytest.mark.slow
def test_without_a_uri_register_uses_the_output_folders_database_and_a_full_model_predicts(mlflow_server, tmp_path,
                                                                                           monkeypatch, capsys):
    """The default store, sqlite:///OUTPUT/mlflow.db, keeps its artifacts beside it (not in the working folder);
    a full fine-tune (tiny) loads back through pyfunc and draws at its resolution."""
    import mlflow

    out = make_full_output(tmp_path / "full")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["register", "--model", str(out), "--name", "tiny-full", "--alias", "prod"]) == 0
    assert capsys.readouterr().out.strip() == "models:/tiny-full@prod"
    assert (out / "mlflow.db").is_file() and (out / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    assert not list(out.glob(".register-*"))  # the staging folder is gone
    path = sys.path[:]
    try:
        mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
        model = mlflow.pyfunc.load_model("models:/tiny-full@prod")
        answer = model.predict({"prompt": ["a photo of sks dog"]}, params={"num_inference_steps": 2, "seed": 3})
    finally:
        mlflow.set_tracking_uri(None)
        sys.path[:] = path  # the model's copy of this package went first
    assert list(answer["seed"]) == [3] and _png(answer.iloc[0]).size == (64, 64)
    artifacts = Path(model._model_impl.context.artifacts["model"])  # the diffusers folder, nothing else of the run
    assert sorted(p.name for p in artifacts.iterdir()) == sorted(
        ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae", SUMMARY_FILE])


@pytest.mark.slow
def test_an_sdxl_lora_loads_through_the_librarys_own_loader(mlflow_server, tmp_path):
    """tiny-sdxl (built in code, offline): saved as the registry would log it, loaded by pyfunc, drawn at the
    run's size through load_generator's SDXL path."""
    import mlflow

    config = TrainConfig.from_preset(
        "t4", concepts=[Concept(str(PHOTOS), "a sks toy", "a toy")], output_dir=str(tmp_path / "xl"),
        model="tiny-sdxl", lora=True, lora_rank=4, resolution=32, max_train_steps=1, with_prior_preservation=False,
        mixed_precision="no", report_to="none")
    run = Path(training.train(config, progress=False).output_dir)
    saved = registry.save_model(run, tmp_path / "xl-model")
    path = sys.path[:]
    try:
        model = mlflow.pyfunc.load_model(str(saved))
        answer = model.predict({"prompt": ["a sks toy"]}, params={"num_inference_steps": 2, "seed": 1})
    finally:
        sys.path[:] = path
    assert type(model._model_impl.python_model.generator.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert _png(answer.iloc[0]).size == (32, 32)
    assert not (saved / "code" / "dreambooth_helpers" / "toy_model").exists()  # only a toy base needs the toy


# ---------------------------------------------------------------------------- served for real
# In this order: the model server boots during the first two.


@pytest.mark.slow
def test_the_version_is_linked_to_its_training_run_with_card_signature_and_pinned_requirements(
        tracking_server, registered, model_server_starting, tmp_path):
    from mlflow.tracking import MlflowClient

    out, _, _ = registered
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["mlflow"]["tracking_uri"] == tracking_server  # what training recorded for register
    client = MlflowClient(tracking_server, registry_uri=tracking_server)
    version = client.get_model_version_by_alias(NAME, "champion")
    assert version.run_id == summary["mlflow"]["run_id"]
    run = client.get_run(version.run_id)
    assert run.info.run_name == "sks-toy-run" and run.data.params["lora"] == "True"
    assert version.tags["dreambooth.base_model"] == "toy" and version.tags["dreambooth.lora"] == "True"
    # The model card, without the Hub's front matter and download instructions, and how to serve the model.
    assert version.description.startswith(f"# {NAME}") and "a sks toy" in version.description
    assert "---" not in version.description.splitlines()[0] and "## Usage" not in version.description
    assert f"mlflow models serve -m models:/{NAME}@champion --env-manager local" in version.description

    from mlflow.models import Model

    model_dir = Path(mlflow_download(f"models:/{NAME}@champion", tracking_server, tmp_path / "model"))
    mlmodel = Model.load(str(model_dir / "MLmodel"))
    params = {p.name: p.default for p in mlmodel.signature.params.params}
    assert params == {"negative_prompt": "", "num_inference_steps": 25, "guidance_scale": 7.5, "seed": None,
                      "width": None, "height": None}
    assert [c.name for c in mlmodel.signature.inputs.inputs] == ["prompt"]
    assert mlmodel.flavors["python_function"]["config"] == {"base_model": "toy"}
    assert "diffusers" not in mlmodel.flavors  # a built-in base: MLflow's diffusers flavor could not load it
    requirements = (model_dir / "requirements.txt").read_text().split()
    for package in ("torch", "diffusers", "transformers", "peft", "mlflow"):
        assert any(r.startswith(f"{package}==") for r in requirements), requirements
    assert (model_dir / "artifacts" / "lora" / LORA_WEIGHTS_FILE).read_bytes() == (out / LORA_WEIGHTS_FILE).read_bytes()
    assert (model_dir / "code" / "dreambooth_helpers" / "toy_model" / "unet").is_dir()  # the toy base ships along
    assert json.loads((model_dir / "input_example.json").read_text()) == {
        "inputs": {"prompt": ["a sks toy"]}, "params": {"num_inference_steps": 25, "seed": 0}}


def mlflow_download(uri: str, tracking_uri: str, dst: Path) -> str:
    import mlflow

    dst.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        try:
            return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri)
        finally:
            mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_a_lora_on_a_hub_base_also_gets_mlflows_diffusers_flavor_and_moves_the_alias(tracking_server, registered,
                                                                                      tmp_path, monkeypatch):
    """Registering loads nothing: a LoRA run whose base is a Hub id registers offline, the Hub id as a reference,
    which mlflow.diffusers.load_model reads back; registering again makes version 2 and moves the alias."""
    import mlflow

    run = make_lora_output(tmp_path / "hub-lora")
    write_summary(run, lora=True, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    first = registry.register_model(run, "sks-hub")
    second = registry.register_model(run, "sks-hub")
    assert (first.version, second.version, second.uri) == ("1", "2", "models:/sks-hub@champion")
    assert first.training_run_id is None  # never tracked: a version without a run
    try:
        (tmp_path / "dl").mkdir()
        adapter = mlflow.diffusers.load_model(second.uri, dst_path=str(tmp_path / "dl"))
        pyfunc_config = mlflow.models.get_model_info(second.uri).flavors["python_function"]["config"]
    finally:
        mlflow.set_tracking_uri(None)
    assert adapter.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and adapter.adapter_type == "lora"
    assert (Path(adapter.adapter_path) / LORA_WEIGHTS_FILE).is_file()
    assert pyfunc_config == {"base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_prompt_with_the_trained_models_png(registered, model_server):
    out, printed, code = registered
    assert code == 0 and printed.strip() == f"models:/{NAME}@champion"
    status, answer = _post(f"{model_server}/invocations",
                           {"inputs": {"prompt": ["a sks toy"]}, "params": {"num_inference_steps": 2}})
    assert status == 200, answer
    [prediction] = answer["predictions"]
    image = _png(prediction)
    assert image.size == (32, 32)  # the run's resolution, from its summary
    assert image.text["prompt"] == "a sks toy" and image.text["steps"] == "2"
    assert image.text["model"] == "toy" and image.text["lora"] == "lora"  # no server paths in the image

    # Two prompts with a seed: seeds 7 and 8, and seed 7 is the image this process makes from the run's folder.
    body = {"inputs": {"prompt": ["a sks toy", "a sks toy"]}, "params": {"num_inference_steps": 2, "seed": 7}}
    status, answer = _post(f"{model_server}/invocations", body)
    assert status == 200 and [p["seed"] for p in answer["predictions"]] == [7, 8]
    from dreambooth_helpers.inference import load_generator

    [local] = load_generator(str(out)).generate("a sks toy", steps=2, seed=7)
    served = np.asarray(_png(answer["predictions"][0]), dtype=float)
    assert np.abs(served - np.asarray(local.image, dtype=float)).mean() < 2.0  # the same LoRA on the same toy

    # A setting no generation can use is the client's mistake (400) with the library's sentence, not a 500.
    status, answer = _post(f"{model_server}/invocations",
                           {"inputs": {"prompt": ["a sks toy"]}, "params": {"num_inference_steps": 2, "width": 30}})
    assert status == 400 and "multiple of 8" in json.dumps(answer)
