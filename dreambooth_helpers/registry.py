"""The MLflow model registry: `dreambooth-helpers register`, and serving with `mlflow models serve`.

`register_model(OUTPUT, NAME)` logs a trained output folder as an MLflow model, registers it as a new version of
NAME, points an alias (default "champion") at that version and returns `models:/NAME@ALIAS`, which
`mlflow models serve -m models:/NAME@ALIAS --env-manager local` serves:

    POST /invocations {"inputs": {"prompt": ["a sks toy"]}, "params": {"num_inference_steps": 2}}
    -> {"predictions": [{"image": "<base64 PNG>", "seed": 1234}]}

What the logged model holds:
- a `python_function` model (`DreamBoothModel`) that loads through this library's own `load_generator`, so SD 1.x
  and SDXL, full fine-tunes and LoRA runs, the built-in models and local folders all load as `generate` loads them;
  its signature: the input `prompt` (one or more), the params negative_prompt, num_inference_steps,
  guidance_scale, seed (image i of a request uses seed + i; none: random), width and height (none: the model's);
- artifacts: a full fine-tune's diffusers folder (`model/`); for a LoRA run the weights (`lora/`) and, when the
  base model is a local folder or file, that base too (`base/`), so that serving needs no network. A built-in base
  (toy, tiny, tiny-sdxl) ships with the code; a Hub id stays a reference (`model_config["base_model"]`), read from
  the Hugging Face cache offline (HF_HUB_OFFLINE=1) once it was downloaded;
- this library's code (`code/dreambooth_helpers`, with the toy model's weights only when the toy model is the base),
  so the model loads wherever its pinned pip requirements are installed, this package or not;
- for a LoRA run on a Hub base model, also MLflow's own `diffusers` flavor entry (the adapter weights plus the base
  model's id), so `mlflow.diffusers.load_model(uri).load_pipeline()` gives a plain diffusers pipeline. That flavor's
  pyfunc is not the one served: it has no seed, loads only Hub or absolute-path bases and not this library's
  built-in models;
- the model card (model_card.build_model_card, or the card `push` wrote) as the version's description, and how
  to serve it.

The version is linked to the training run when it was tracked in the same MLflow store (`train --report-to
mlflow` records the run's ids in training_summary.json; older runs are found by name and output folder): the
logged model is an output of that run and the version names it as its run. The tracking URI is --tracking-uri,
else MLFLOW_TRACKING_URI, else sqlite:///OUTPUT/mlflow.db (where `train --report-to mlflow` records by default);
never MLflow's deprecated file store.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from . import tracking
from .config import TINY_MODEL, TOY_MODEL
from .errors import ConfigError, DreamBoothError, ModelLoadError
from .families import SDXL_RANDOM, TINY_SDXL_MODEL
from .files import CARD_FILE, LORA_WEIGHTS_FILE, MODEL_INDEX_FILE, SUMMARY_FILE
from .models import SD15_RANDOM

DEFAULT_ALIAS = "champion"
MODEL_NAME_IN_RUN = "dreambooth"  # the logged model's name in its run or experiment
BUILT_IN_BASES = (TOY_MODEL, TINY_MODEL, TINY_SDXL_MODEL, SDXL_RANDOM, SD15_RANDOM)  # built in code or shipped
PACKAGE_DIR = Path(__file__).resolve().parent
TOY_MODEL_FOLDER = "toy_model"
# The package's own dependencies (pyproject's `dependencies`), pinned to the installed versions; MLflow adds itself.
RUNTIME_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "huggingface_hub",
                    "pillow", "pillow-heif", "numpy", "tqdm")
PARAM_DEFAULTS = {"negative_prompt": "", "num_inference_steps": 25, "guidance_scale": 7.5, "seed": None,
                  "width": None, "height": None}


@dataclass
class RegisteredModel:
    """What `register_model` made: the version of `name` that `alias` now points at."""

    name: str
    version: str
    alias: str
    tracking_uri: str  # as shown: without a password
    model_id: str  # the logged model (models:/<model_id>)
    training_run_id: str | None  # the run the version is linked to, when training was tracked in this store

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


# ---------------------------------------------------------------------------- the served model


class DreamBoothModel(PythonModel):
    """The pyfunc model `mlflow models serve` runs: one prompt in, one PNG (base64) out, per row."""

    def load_context(self, context) -> None:
        from .inference import load_generator
        from .threads import use_one_thread_for

        config = dict(context.model_config or {})
        artifacts = context.artifacts
        if "model" in artifacts:  # a full fine-tune: its own diffusers folder
            model, lora = artifacts["model"], None
        else:  # a LoRA run: the weights on their base model (model_config's reference can point elsewhere)
            model, lora = config.get("base_model") or artifacts["base"], artifacts["lora"]
        use_one_thread_for(model if lora else artifacts["model"])
        self.generator = load_generator(model, lora, device=config.get("device") or None,
                                        safety_checker=bool(config.get("safety_checker", True)))
        # What each PNG's settings name: the model's own parts, not the folders this server unpacked them to.
        self.generator.model = config.get("base_model") or ("base" if lora else "model")
        self.generator.lora = "lora" if lora else None

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        settings = {**PARAM_DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        prompts = prompts_of(model_input)
        seed = None if settings["seed"] is None else int(settings["seed"])
        rows = []
        try:
            for index, prompt in enumerate(prompts):
                [result] = self.generator.generate(
                    prompt, negative_prompt=str(settings["negative_prompt"] or ""),
                    steps=int(settings["num_inference_steps"]), guidance_scale=float(settings["guidance_scale"]),
                    seed=None if seed is None else seed + index,
                    width=None if settings["width"] is None else int(settings["width"]),
                    height=None if settings["height"] is None else int(settings["height"]))
                buffer = io.BytesIO()
                result.image.save(buffer, format="PNG", pnginfo=result.png_info())
                rows.append({"image": base64.b64encode(buffer.getvalue()).decode("ascii"), "seed": result.seed})
        except DreamBoothError as error:  # a setting no generation can use: the server answers 400, not 500
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(rows, columns=["image", "seed"])


def prompts_of(model_input: Any) -> list[str]:
    """The prompts of a request, however MLflow hands them over: a DataFrame with a `prompt` column (a cell may
    hold a list), a dict, a list or one string."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        values = list(model_input[column])
    elif isinstance(model_input, dict):
        values = model_input.get("prompt", [])
    else:
        values = model_input
    prompts = []
    for value in [values] if isinstance(values, str) else list(values):
        value = value.tolist() if hasattr(value, "tolist") else value  # numpy arrays and scalars
        prompts += [str(p) for p in value] if isinstance(value, (list, tuple)) else [str(value)]
    if not prompts or not all(p.strip() for p in prompts):
        raise MlflowException('Give at least one non-empty prompt: {"inputs": {"prompt": ["a photo of sks dog"]}}.',
                              error_code=INVALID_PARAMETER_VALUE)
    return prompts


def model_signature():
    """prompt in (string, one per row); negative prompt, steps, guidance, seed and size as params; image out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    kinds = {"negative_prompt": DataType.string, "num_inference_steps": DataType.long,
             "guidance_scale": DataType.double, "seed": DataType.long, "width": DataType.long,
             "height": DataType.long}
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "prompt")]),
        outputs=Schema([ColSpec(DataType.string, "image"), ColSpec(DataType.long, "seed")]),
        params=ParamSchema([ParamSpec(name, kinds[name], PARAM_DEFAULTS[name]) for name in kinds]))


def pip_requirements() -> list[str]:
    """This package's dependencies, pinned to the versions installed here (MLflow adds its own pin)."""
    pinned = []
    for package in RUNTIME_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            pinned.append(f"{package}=={metadata.version(package)}")
    return pinned


# ---------------------------------------------------------------------------- what a run folder holds


@dataclass
class _Plan:
    """What the logged model is made of, read from the output folder."""

    lora: bool
    base: str | None  # a LoRA run's base model as its summary names it
    base_kind: str | None  # "built-in", "folder", "file" or "hub"
    summary: dict[str, Any]


def _plan(output_dir: Path) -> _Plan:
    from .inference import read_training_summary

    if not output_dir.is_dir():
        raise ModelLoadError(f"--model {str(output_dir)!r}: no such folder. Pass the --output-dir of a finished "
                             "`train` run.")
    summary = read_training_summary(output_dir) or {}
    if (output_dir / MODEL_INDEX_FILE).is_file():
        return _Plan(False, None, None, summary)
    if not (output_dir / LORA_WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{str(output_dir)!r} holds no trained model: neither {MODEL_INDEX_FILE} (a full "
                             f"fine-tune) nor {LORA_WEIGHTS_FILE} (a LoRA run). Pass the --output-dir of a finished "
                             "`train` run.")
    base = summary.get("base_model") or (summary.get("config") or {}).get("model")
    if not base:
        raise ModelLoadError(f"{str(output_dir)!r} holds LoRA weights but no {SUMMARY_FILE} naming their base "
                             "model, so the registered model could not be loaded.")
    path = Path(base).expanduser()
    kind = ("built-in" if base in BUILT_IN_BASES else "folder" if path.is_dir() else "file" if path.is_file()
            else "hub" if re.fullmatch(r"[\w.-]+/[\w.-]+", base) else None)
    if kind is None:
        raise ModelLoadError(f"The base model of this LoRA run, {base!r}, is no longer there (not a folder, file, "
                             "built-in model or Hub id), and the registry would need it to serve the model. Put it "
                             f"back, or edit base_model in {output_dir / SUMMARY_FILE}.")
    return _Plan(True, base, kind, summary)


def _link_or_copy(source: str, target: str) -> str:
    """A hard link where the file system allows it (a 4 GB model is not copied just to be logged), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def _stage_model_files(source: Path, target: Path) -> Path:
    """A diffusers folder's model files (model_index.json and the component folders it names), nothing else."""
    from .tracking import model_files

    target.mkdir(parents=True)
    for path in model_files(source, lora=False):
        if path.is_dir():
            shutil.copytree(path, target / path.name, copy_function=_link_or_copy,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            _link_or_copy(str(path), str(target / path.name))
    return target


def _stage(output_dir: Path, plan: _Plan, staging: Path) -> tuple[dict[str, str], dict[str, Any], Path]:
    """(artifacts, model_config, code folder) for the logged model, as files under `staging`."""
    artifacts: dict[str, str] = {}
    config: dict[str, Any] = {}
    if not plan.lora:
        artifacts["model"] = str(_stage_model_files(output_dir, staging / "model"))
    else:
        lora = staging / "lora"
        lora.mkdir(parents=True)
        for name in (LORA_WEIGHTS_FILE, SUMMARY_FILE):
            if (output_dir / name).is_file():
                _link_or_copy(str(output_dir / name), str(lora / name))
        artifacts["lora"] = str(lora)
        if plan.base_kind == "folder":
            artifacts["base"] = str(_stage_model_files(Path(plan.base).expanduser(), staging / "base"))
        elif plan.base_kind == "file":
            artifacts["base"] = str(Path(plan.base).expanduser().resolve())
        else:
            config["base_model"] = plan.base
    skip = ["__pycache__", "*.pyc"] + ([] if plan.lora and plan.base == TOY_MODEL else [TOY_MODEL_FOLDER])
    code = staging / "code" / PACKAGE_DIR.name
    shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns(*skip))
    return artifacts, config, code


MODEL_CODE = '''# The model `mlflow models serve` loads (MLflow's "models from code"); see registry.py.
import mlflow

from dreambooth_helpers.registry import DreamBoothModel

mlflow.models.set_model(DreamBoothModel())
'''


# ---------------------------------------------------------------------------- the description


def model_card_text(output_dir: Path, name: str, alias: str) -> str:
    """The version's description: the run's model card without its Hub front matter and Hub usage, plus how to
    serve it from the registry."""
    from .model_card import build_model_card

    card_file = output_dir / CARD_FILE
    if card_file.is_file():  # the card `push` wrote
        text = card_file.read_text()
    else:
        text = str(build_model_card(output_dir, f"dreambooth-helpers/{_card_name(name)}", has_grid=False))
    text = re.sub(r"\A---\n.*?\n---\n+", "", text, flags=re.S)  # the Hub's YAML front matter
    text = re.sub(r"^## Usage\n.*?(?=^## |\Z)", "", text, flags=re.S | re.M)  # Hub downloads: not how it is used here
    text = re.sub(r"^!\[[^\]]*\]\([^)]*\)\n", "", text, flags=re.M)  # the sample grid stays on the Hub
    uri = f"models:/{name}@{alias}"
    serve = ("## Serving from the MLflow registry\n\n```bash\n"
             f"mlflow models serve -m {uri} --env-manager local --port 5001\n"
             "curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\\n"
             "  -d '{\"inputs\": {\"prompt\": [\"a photo of sks dog\"]}, \"params\": {\"num_inference_steps\": 25, "
             "\"seed\": 0}}'\n```\n\n"
             "The answer is `{\"predictions\": [{\"image\": BASE64_PNG, \"seed\": 0}]}`; the params are "
             "negative_prompt, num_inference_steps, guidance_scale, seed, width and height. In Python: "
             f"`mlflow.pyfunc.load_model(\"{uri}\").predict({{\"prompt\": [...]}}, params={{...}})`.\n")
    return text.rstrip() + "\n\n" + serve


def _card_name(name: str) -> str:
    slug = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "model"
    return slug[:96] if slug[0].isalnum() else f"m{slug}"[:96]


# ---------------------------------------------------------------------------- registering


def resolve_tracking_uri(output_dir: Path, tracking_uri: str | None) -> tuple[str, str]:
    """(URI, where it came from): --tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///OUTPUT/mlflow.db."""
    if tracking_uri:
        return tracking_uri, "--tracking-uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    return tracking.mlflow_tracking_uri(output_dir), "the default, OUTPUT/mlflow.db"


@contextlib.contextmanager
def _using(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URI set to `uri` for a while, then put back (MLflow also mirrors
    them, and the active experiment, into environment variables; those are put back too). The active experiment
    stays the one registered to."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(None)  # back to following the tracking URI (or MLFLOW_REGISTRY_URI)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _training_run(client, output_dir: Path, summary: dict[str, Any]) -> tuple[str | None, Any]:
    """(the run id training recorded, that run when it is in this store), else (None, a run found by name).

    Runs trained before training_summary.json recorded the id are found by their name (the output folder's) and
    their output_dir parameter.
    """
    from mlflow.exceptions import MlflowException

    recorded = (summary.get("mlflow") or {}).get("run_id")
    if recorded:
        try:
            run = client.get_run(recorded)
        except MlflowException:  # tracked in another store: the version gets its id as a tag instead
            return recorded, None
        return recorded, run if run.info.lifecycle_stage == "active" else None
    given = (summary.get("config") or {}).get("output_dir")
    experiment = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME") or tracking.PROJECT_NAME)
    if not given or experiment is None or "'" in output_dir.name:
        return None, None
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{output_dir.name}'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    run = next((r for r in runs if r.data.params.get("output_dir") == given and r.info.status == "FINISHED"), None)
    return (run.info.run_id if run else None), run


class _Flavor:
    """What `Model.log` calls to write the model: pyfunc's save_model, then for a LoRA run on a Hub base the
    `diffusers` flavor's entry, pointing at the same weights (mlflow.diffusers.load_model reads it)."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(path, mlflow_model, diffusers_flavor=None, validate_serving_input=None, **kwargs):
        from mlflow.models import Model
        from mlflow.models.model import MLMODEL_FILE_NAME

        mlflow_model = Model() if mlflow_model is None else mlflow_model
        mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)
        if diffusers_flavor:
            mlflow_model.add_flavor("diffusers", **diffusers_flavor)
            mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


def _diffusers_flavor(plan: _Plan) -> dict[str, Any] | None:
    if not plan.lora or plan.base_kind != "hub":
        return None
    import diffusers

    return {"base_model": plan.base, "adapter_type": "lora", "adapter_weights": "artifacts/lora",
            "diffusers_version": diffusers.__version__}


def _model_arguments(output_dir: Path, plan: _Plan, staging: Path) -> dict[str, Any]:
    """What pyfunc's save_model (through `_Flavor`) gets: the code, artifacts, signature, example, requirements."""
    artifacts, config, code = _stage(output_dir, plan, staging)
    model_code = staging / "dreambooth_model.py"
    model_code.write_text(MODEL_CODE)
    prompt = (plan.summary.get("instance_prompts") or ["a photo of sks dog"])[0]
    return dict(python_model=str(model_code), artifacts=artifacts, model_config=config or None,
                code_paths=[str(code)], signature=model_signature(),
                input_example=({"prompt": [prompt]}, {"num_inference_steps": PARAM_DEFAULTS["num_inference_steps"],
                                                      "seed": 0}),
                pip_requirements=pip_requirements(), diffusers_flavor=_diffusers_flavor(plan),
                metadata={"dreambooth_helpers": {"lora": plan.lora, "base_model": plan.base}})


def save_model(model_dir: str | Path, path: str | Path) -> Path:
    """Write the trained model in `model_dir` as an MLflow model folder at `path`, without a tracking server or a
    registry: what `register` logs. `mlflow models serve -m PATH --env-manager local` serves it."""
    output_dir, path = Path(model_dir).expanduser(), Path(path)
    plan = _plan(output_dir)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix=".register-", dir=output_dir) as staging:
        warnings.simplefilter("ignore", UserWarning)  # MLflow's notes on pickling and type hints
        _Flavor.save_model(str(path), mlflow_model=None, **_model_arguments(output_dir, plan, Path(staging)))
    return path


def register_model(model_dir: str | Path, name: str, *, alias: str = DEFAULT_ALIAS,
                   tracking_uri: str | None = None) -> RegisteredModel:
    """Log the trained model in `model_dir` to MLflow, register it as a new version of `name` and point `alias` at
    it. Nothing is loaded: the folder and the tracking URI are checked first (ModelLoadError, ConfigError). MLflow's
    active experiment is left at the one registered to."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    output_dir = Path(model_dir).expanduser()
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("--name is empty: the registered model's name, e.g. sks-dog.")
    if not isinstance(alias, str) or not alias.strip():
        raise ConfigError(f"--alias is empty: a name for this version, e.g. {DEFAULT_ALIAS}.")
    plan = _plan(output_dir)
    uri, source = resolve_tracking_uri(output_dir, tracking_uri)
    tracking.check_mlflow_uri(uri, source)
    shown = tracking.shown_uri(uri)
    description = model_card_text(output_dir, name, alias)
    try:
        with _using(uri), warnings.catch_warnings(), \
                tempfile.TemporaryDirectory(prefix=".register-", dir=output_dir) as staging:
            warnings.simplefilter("ignore", UserWarning)
            client = MlflowClient(uri, registry_uri=uri)
            recorded_run, run = _training_run(client, output_dir, plan.summary)
            mlflow.set_experiment(experiment_id=run.info.experiment_id if run else tracking.mlflow_experiment_id(uri))
            # Not validated by running the example: that would load the model (minutes for SD, and the base
            # model's download) just to register it. The tests serve it for real.
            info = Model.log(artifact_path=None, name=MODEL_NAME_IN_RUN, flavor=_Flavor, flavor_name="pyfunc",
                             run_id=run.info.run_id if run else None, validate_serving_input=False,
                             **_model_arguments(output_dir, plan, Path(staging)))
            tags = {"dreambooth.lora": str(plan.lora), **({"dreambooth.base_model": plan.base} if plan.base else {})}
            if recorded_run and run is None:  # tracked in another store: say where
                tags.update({"dreambooth.training_run_id": recorded_run,
                             "dreambooth.training_tracking_uri": (plan.summary.get("mlflow") or {}).get(
                                 "tracking_uri", "")})
            version = mlflow.register_model(info.model_uri, name, tags=tags)
            client.update_model_version(name, version.version, description=description)
            client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as error:  # a name or alias MLflow refuses, a store that failed midway
        raise ConfigError(f"MLflow refused to register {str(output_dir)!r} as {name!r} at {shown}: "
                          f"{error.message}") from None
    return RegisteredModel(name, str(version.version), alias, shown, info.model_id, run.info.run_id if run else None)
