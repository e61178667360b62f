"""Experiment tracking (--report-to): TensorBoard, MLflow or Weights & Biases, through accelerate's trackers.

The training loop talks to one `RunTracker`: `log_step` after each step, `finish` at the end. With tracking off it
does nothing, so the loop reads the same either way. What is tracked:

- parameters: every setting of the run's config, flattened ("concepts.0.instance_prompt"), and the values the recipe
  filled in (steps, learning rates, class images) and the machine chose (device, precision, 8-bit Adam);
- per step: train/loss, train/instance_loss, train/prior_loss (with prior preservation), train/lr;
- the sample images at each sample step;
- at the end: peak GPU memory (GiB, with a GPU) and wall time (s); with MLflow also the finished model (the diffusers
  folder, or the LoRA weights) and training_summary.json, as the run's artifacts under "model/".

Where the records go:
- tensorboard: event files in OUTPUT_DIR/logs/dreambooth (`tensorboard --logdir OUTPUT_DIR/logs`).
- mlflow: MLFLOW_TRACKING_URI when set (a server, `sqlite:///...`, or a `file:` folder, which MLflow 3 only opens with
  MLFLOW_ALLOW_FILE_STORE=true); else MLflow's own database backend in OUTPUT_DIR/mlflow.db, which the full `mlflow`
  package brings (not mlflow-skinny). The experiment is MLFLOW_EXPERIMENT_NAME, else "dreambooth" (in a sqlite
  database its artifacts go to mlartifacts/ beside the database); the run is named after the output folder, and its
  ids are recorded in training_summary.json ("mlflow"), for `register` (registry.py). A URI MLflow refuses, or a
  server that does not answer, stops the run with one paragraph before the model loads (check_mlflow_uri).
- wandb: the "dreambooth" project (WANDB_PROJECT overrides it), its files in OUTPUT_DIR/wandb; WANDB_MODE=offline
  records without an account (`wandb sync` uploads later).

Only the main process records (accelerate's trackers run there alone; the sample images are drawn there).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import REPORT_TO_CHOICES  # noqa: F401  (the choices, for callers)
from .errors import ConfigError
from .files import LORA_WEIGHTS_FILE, MODEL_INDEX_FILE, SUMMARY_FILE

PROJECT_NAME = "dreambooth"
LOGS_DIR = "logs"  # TensorBoard's folder in the output folder
MLFLOW_DATABASE = "mlflow.db"
MODEL_ARTIFACT_DIR = "model"
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
_STEP_METRICS = {"loss": "train/loss", "instance_loss": "train/instance_loss", "prior_loss": "train/prior_loss",
                 "lr": "train/lr"}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_report_to(report_to: str) -> str | None:
    """The tracker this run uses (None: none), refusing (ConfigError) one whose package is not installed.

    "auto" is TensorBoard when the tensorboard package is installed (Colab has it), else no tracking: the default
    adds no dependency, and a run with tracking asked for explicitly fails now, not after loading the model.
    """
    if report_to == "none":
        return None
    if report_to == "auto":
        return "tensorboard" if _installed("tensorboard") else None
    if report_to not in _PACKAGES:
        raise ConfigError(f"--report-to {report_to!r} is not a tracker; choose one of: auto, "
                          f"{', '.join(_PACKAGES)}, none.")
    if not _installed(_PACKAGES[report_to]):
        raise ConfigError(f"--report-to {report_to} needs the {_PACKAGES[report_to]} package: "
                          f"`pip install {_PACKAGES[report_to]}`, or pass --report-to none.")
    return report_to


def mlflow_tracking_uri(output_dir: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else a database in the output folder (MLflow's default backend)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if not _installed("sqlalchemy"):
        raise ConfigError("--report-to mlflow without MLFLOW_TRACKING_URI keeps the runs in a database in the output "
                          "folder, which needs the full mlflow package (`pip install mlflow`; mlflow-skinny lacks "
                          "it). Or set MLFLOW_TRACKING_URI to your MLflow server.")
    return f"sqlite:///{(output_dir / MLFLOW_DATABASE).resolve()}"


def shown_uri(uri: str) -> str:
    """`uri` without a password (http://user:secret@host -> http://user:***@host), for messages and records."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def check_mlflow_uri(uri: str, source: str = "MLFLOW_TRACKING_URI") -> None:
    """Refuse (ConfigError, one paragraph) a tracking URI that MLflow will not open, before any model loads.

    A server is asked once, quickly (its /health page; any answer counts, MLflow handles logins): MLflow's own
    client would retry a refused connection for minutes and end in a traceback. Any other URI is opened by
    MLflow itself, which refuses the old file store (`file:` or a plain folder) unless MLFLOW_ALLOW_FILE_STORE
    is true, and creates a sqlite database that is not there yet. `source` names where the URI came from.
    """
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    scheme, shown = urlsplit(uri).scheme.lower(), shown_uri(uri)
    start = ("Start one (`mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`), "
             "check the address, or leave the URI out to keep everything in OUTPUT/mlflow.db.")
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
                return
        except urllib.error.HTTPError:
            return  # something answered: a server behind a login or a proxy; MLflow says the rest
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise ConfigError(f"No MLflow server answers at {shown} ({source}): {reason}. {start}") from None
    sqlite = "sqlite:///OUTPUT_DIR/mlflow.db (what is used when no URI is given)"
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:  # MlflowException, SQLAlchemy's errors, an unknown scheme
        if scheme in ("", "file"):
            raise ConfigError(f"MLflow will not use the file store {shown} ({source}): MLflow 3 keeps runs and "
                              "registered models in a database and opens the old `file:`/folder store only with "
                              f"MLFLOW_ALLOW_FILE_STORE=true. Use a database file such as {sqlite}, or an MLflow "
                              "server (http://HOST:5000).") from None
        detail = (str(error).strip() or type(error).__name__).splitlines()[0]
        if len(detail) > 300:  # MLflow's longer messages: their first sentences
            detail = detail[:300].rsplit(". ", 1)[0]
        detail = detail.rstrip(".")
        raise ConfigError(f"MLflow cannot use the tracking URI {shown} ({source}): {detail}. Use a server "
                          f"(http://HOST:5000) or a database file such as {sqlite}.") from None


def mlflow_experiment_id(uri: str) -> str:
    """The experiment the runs and registered models go to (MLFLOW_EXPERIMENT_NAME, else "dreambooth"), made when
    missing. In a sqlite database its artifacts are kept beside the database (mlartifacts/), not in whatever folder
    the command happened to run from (MLflow's default, ./mlruns)."""
    from mlflow.tracking import MlflowClient

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT_NAME
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.lower().startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if str(database) != ":memory:":
            location = (database.resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def accelerator_arguments(kind: str | None, output_dir: Path) -> dict[str, Any]:
    """What `Accelerator(...)` needs to record to `kind`: nothing when tracking is off."""
    if kind is None:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": kind, "project_config": ProjectConfiguration(project_dir=str(output_dir),
                                                                     logging_dir=str(output_dir / LOGS_DIR))}


def flat_parameters(values: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested settings as flat key-value pairs every tracker stores: lists and dicts by index or key, None as "None"."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_parameters(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            if value and all(isinstance(item, dict) for item in value):
                for index, item in enumerate(value):
                    flat.update(flat_parameters(item, f"{name}.{index}."))
            else:
                flat[name] = json.dumps(list(value), default=str)
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class RunTracker:
    """The run's experiment tracking; every method does nothing when `kind` is None (tracking off)."""

    def __init__(self, accelerator, kind: str | None, output_dir: Path):
        self.accelerator, self.kind, self.output_dir = accelerator, kind, Path(output_dir)
        self.active = kind is not None and accelerator.is_main_process
        self.mlflow_run: dict[str, str] | None = None  # the MLflow run's ids, once it is open

    @classmethod
    def begin(cls, accelerator, kind: str | None, output_dir: Path, parameters: dict[str, Any]) -> RunTracker:
        """Open the run in `kind` (made by `accelerator_arguments`) and record `parameters`."""
        tracker = cls(accelerator, kind, output_dir)
        if kind is None:
            return tracker
        init_kwargs: dict[str, Any] = {}
        if kind == "mlflow" and accelerator.is_main_process:
            import mlflow

            uri = mlflow_tracking_uri(Path(output_dir))
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                Path(output_dir).mkdir(parents=True, exist_ok=True)  # the default database lives there
            check_mlflow_uri(uri)  # a refused store or an unreachable server: one paragraph, before the model loads
            mlflow.set_tracking_uri(uri)
            mlflow_experiment_id(uri)  # made here, so that a sqlite database keeps its artifacts beside it
            if mlflow.active_run() is not None:  # left open by a run that failed earlier in this process
                mlflow.end_run(status="FAILED")
            init_kwargs["mlflow"] = {"run_name": Path(output_dir).name}
        if kind == "wandb" and accelerator.is_main_process:
            import wandb

            if wandb.run is not None:  # the same: a notebook's earlier run that stopped with an error
                wandb.run.finish(exit_code=1)
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            init_kwargs["wandb"] = {"dir": str(output_dir), "name": Path(output_dir).name}
        # The project: TensorBoard's folder, MLflow's experiment (its tracker reads MLFLOW_EXPERIMENT_NAME first).
        project = os.environ.get("WANDB_PROJECT", PROJECT_NAME) if kind == "wandb" else PROJECT_NAME
        accelerator.init_trackers(project, config=flat_parameters(parameters), init_kwargs=init_kwargs)
        if kind == "mlflow" and accelerator.is_main_process:
            import mlflow

            run = mlflow.active_run()  # what `register` links the registered model to (registry.py)
            tracker.mlflow_run = {"tracking_uri": shown_uri(mlflow.get_tracking_uri()),
                                  "experiment_id": run.info.experiment_id, "run_id": run.info.run_id}
        return tracker

    def summary_fields(self) -> dict[str, Any]:
        """What training_summary.json records about the tracked run: {"mlflow": {tracking_uri, experiment_id,
        run_id}} with MLflow, else nothing."""
        return {"mlflow": self.mlflow_run} if self.mlflow_run else {}

    def log_step(self, step: int, logs: dict[str, Any]) -> None:
        """The step's loss and learning rate, and the sample images it drew (logs["samples"])."""
        if not self.active:
            return
        metrics = {name: float(logs[key]) for key, name in _STEP_METRICS.items() if logs.get(key) is not None}
        self.accelerator.log(metrics, step=step)
        if logs.get("samples"):
            self._log_samples(step, logs["samples"])

    def _log_samples(self, step: int, paths: Sequence[str | Path]) -> None:
        from PIL import Image

        images = [Image.open(path).convert("RGB") for path in paths]
        if self.kind == "tensorboard":
            import numpy as np

            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            for index, image in enumerate(images):
                writer.add_image(f"samples/{index}", np.asarray(image), global_step=step, dataformats="HWC")
            writer.flush()
        elif self.kind == "wandb":
            self.accelerator.get_tracker("wandb").log_images({"samples": images}, step=step)
        elif self.kind == "mlflow":
            import mlflow

            for path in paths:  # named step-000050-0.png: the step is in the name
                mlflow.log_artifact(str(path), artifact_path="samples")

    def finish(self, *, wall_time_s: float, peak_gpu_memory_gib: float | None, step: int, lora: bool) -> None:
        """The end of the run: its time and peak memory; with MLflow the saved model's files as artifacts; then
        close. Called once the model and the summary are in the output folder."""
        if self.kind is None:
            return
        if self.active:
            metrics = {"wall_time_s": wall_time_s}
            if peak_gpu_memory_gib is not None:
                metrics["peak_gpu_memory_gib"] = peak_gpu_memory_gib
            self.accelerator.log(metrics, step=step)
            if self.kind == "mlflow":
                import mlflow

                for path in model_files(self.output_dir, lora):  # a folder (unet/, vae/) keeps its name in model/
                    if path.is_dir():
                        mlflow.log_artifacts(str(path), artifact_path=f"{MODEL_ARTIFACT_DIR}/{path.name}")
                    else:
                        mlflow.log_artifact(str(path), artifact_path=MODEL_ARTIFACT_DIR)
        # Each tracker's own finish, not accelerator.end_training(): that also tears down the process group, which
        # a notebook or a launched script may still use after train() returns.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()
        self.active = False


def model_files(output_dir: Path, lora: bool) -> list[Path]:
    """The finished model's files in `output_dir`, without checkpoints, samples, class images or logs.

    The LoRA weights, or model_index.json with the component folders it names; training_summary.json either way.
    """
    output_dir = Path(output_dir)
    if lora:
        files = [output_dir / LORA_WEIGHTS_FILE]
    else:
        index = json.loads((output_dir / MODEL_INDEX_FILE).read_text())
        components = [output_dir / name for name, value in index.items()
                      if not name.startswith("_") and isinstance(value, list) and (output_dir / name).is_dir()]
        files = [output_dir / MODEL_INDEX_FILE, *components]
    return [path for path in [*files, output_dir / SUMMARY_FILE] if path.exists()]
