"""Experiment tracking (--report-to): what TensorBoard, MLflow and W&B hold after a run, read back from their files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreambooth_helpers import tracking, training
from dreambooth_helpers.cli import _config_from_args, build_parser
from dreambooth_helpers.errors import ConfigError
from dreambooth_helpers.files import LORA_WEIGHTS_FILE, SUMMARY_FILE

STEPS = 4


def test_auto_is_tensorboard_when_installed_else_none_and_a_missing_package_is_refused(monkeypatch):
    monkeypatch.setattr(tracking, "_installed", lambda package: package != "wandb")
    assert tracking.resolve_report_to("auto") == "tensorboard"
    assert tracking.resolve_report_to("none") is None
    assert tracking.resolve_report_to("mlflow") == "mlflow"
    with pytest.raises(ConfigError, match=r"--report-to wandb needs the wandb package: `pip install wandb`"):
        tracking.resolve_report_to("wandb")
    monkeypatch.setattr(tracking, "_installed", lambda package: False)
    assert tracking.resolve_report_to("auto") is None


def test_mlflow_without_a_tracking_uri_keeps_its_database_in_the_output_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "_installed", lambda package: True)
    assert tracking.mlflow_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setattr(tracking, "_installed", lambda package: package != "sqlalchemy")  # mlflow-skinny
    with pytest.raises(ConfigError, match=r"full mlflow package.*MLFLOW_TRACKING_URI"):
        tracking.mlflow_tracking_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.mlflow_tracking_uri(tmp_path) == "http://mlflow.example:5000"


def test_parameters_are_flattened_to_values_every_tracker_stores():
    flat = tracking.flat_parameters({"lora": True, "seed": 3, "learning_rate": None, "sample_prompts": ["a", "b"],
                                     "concepts": [{"instance_prompt": "sks dog", "class_dir": None}],
                                     "effective": {"max_train_steps": 8}})
    assert flat == {"lora": True, "seed": 3, "learning_rate": "None", "sample_prompts": '["a", "b"]',
                    "concepts.0.instance_prompt": "sks dog", "concepts.0.class_dir": "None",
                    "effective.max_train_steps": 8}


def test_report_to_flag_reaches_the_config_and_a_bad_value_is_refused(tmp_path, make_config):
    args = build_parser().parse_args(["train", "--instance-dir", str(tmp_path), "--instance-prompt", "a photo of sks",
                                      "--class-prompt", "a photo", "--output-dir", str(tmp_path / "out"),
                                      "--report-to", "mlflow"])
    assert _config_from_args(args).report_to == "mlflow"
    assert make_config().report_to == "auto"
    with pytest.raises(ConfigError, match="--report-to 'comet'"):
        make_config(report_to="comet").validate()


def test_tracking_off_writes_no_logs(make_config):
    result = training.train(make_config(max_train_steps=1, report_to="none", with_prior_preservation=False),
                            progress=False)
    assert not (result.output_dir / tracking.LOGS_DIR).exists()


@pytest.mark.slow
def test_tensorboard_holds_parameters_losses_learning_rate_samples_and_the_end(make_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = training.train(make_config(max_train_steps=STEPS, sample_every=2, report_to="auto"), progress=False)
    [run_dir] = [p for p in (result.output_dir / tracking.LOGS_DIR).iterdir() if p.is_dir()]
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    summary = json.loads(result.summary_path.read_text())
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx([h["loss"] for h in summary["history"]], rel=1e-5)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([h["lr"] for h in summary["history"]])
    assert len(events.Scalars("train/prior_loss")) == STEPS
    assert [e.step for e in events.Images("samples/0")] == [2, 4]
    assert events.Scalars("wall_time_s")[0].step == STEPS
    hparams = next(run_dir.glob("*/hparams.yml")).read_text()  # accelerate's copy of the parameters
    assert "effective.max_train_steps: 4" in hparams and "concepts.0.instance_prompt: a photo of sks dog" in hparams


@pytest.mark.slow
def test_mlflow_run_holds_parameters_metrics_samples_and_the_lora_as_an_artifact(make_config, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 opens a file store only when told to
    config = make_config(max_train_steps=STEPS, sample_every=2, report_to="mlflow", lora=True,
                         output_dir=str(tmp_path / "chair-lora"))
    training.train(config, progress=False)
    client = MlflowClient(store)
    [experiment] = [e for e in client.search_experiments() if e.name == tracking.PROJECT_NAME]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "chair-lora" and run.info.status == "FINISHED"
    assert run.data.params["lora"] == "True" and run.data.params["effective.max_train_steps"] == str(STEPS)
    assert run.data.params["concepts.0.instance_prompt"] == "a photo of sks dog"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert "wall_time_s" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert artifacts == {f"model/{LORA_WEIGHTS_FILE}", f"model/{SUMMARY_FILE}"}
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert samples == {"samples/step-000002-0.png", "samples/step-000004-0.png"}
    # The artifact is the trained LoRA, byte for byte.
    local = Path(client.download_artifacts(run.info.run_id, f"model/{LORA_WEIGHTS_FILE}", str(tmp_path / "dl")))
    assert local.read_bytes() == (Path(config.output_dir) / LORA_WEIGHTS_FILE).read_bytes()


@pytest.mark.slow
def test_mlflow_logs_a_full_model_as_its_diffusers_folder_without_checkpoints_or_samples(make_config, tmp_path,
                                                                                            monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    training.train(make_config(max_train_steps=2, report_to="mlflow", checkpoint_every=1, sample_every=1,
                               with_prior_preservation=False), progress=False)
    client = MlflowClient(store)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    top = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model_index.json", "model/unet", "model/text_encoder", "model/vae", "model/tokenizer",
            f"model/{SUMMARY_FILE}"} <= top
    assert not any("checkpoint" in path or "samples" in path for path in top)


@pytest.mark.slow
def test_wandb_offline_run_holds_parameters_losses_samples_and_the_end(make_config, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = training.train(make_config(max_train_steps=STEPS, sample_every=2, report_to="wandb"), progress=False)
    [run_dir] = (result.output_dir / "wandb").glob("offline-run-*")
    # wandb keeps an offline run as protobuf records in one .wandb file (uploaded later by `wandb sync`); its keys
    # and JSON values are stored as plain bytes, which is enough to read back what was logged.
    [records] = run_dir.glob("*.wandb")
    data = records.read_bytes()
    for key in (b"effective.max_train_steps", b"concepts.0.instance_prompt", b"a photo of sks dog", b"train/lr",
                b"train/prior_loss", b"wall_time_s"):
        assert key in data, key
    for step in json.loads(result.summary_path.read_text())["history"]:
        assert json.dumps(step["loss"]).encode() in data  # each step's loss, as logged
    images = sorted(p.name.split("_")[1] for p in (run_dir / "files" / "media" / "images").glob("samples_*.png"))
    assert images == ["2", "4"]  # the samples of steps 2 and 4
