"""Which run is this: what makes two runs the same model (the settings that change the weights, and the photos),
saved with every checkpoint and in the summary, so a run resumes only its own checkpoints and reuses only its own
finished model (`find_finished_run`, what the notebook calls to skip training it has done)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import captions
from .config import MEMORY, OUTPUTS, TrainConfig
from .data import DatasetReport, read_images, require_usable
from .errors import DreamBoothError
from .files import LORA_WEIGHTS_FILE, MODEL_INDEX_FILE, SUMMARY_FILE
from .memory import process_count

# Settings left out of a run's identity because they do not change the trained weights: where outputs go, samples,
# checkpoints and resuming (the OUTPUTS group), and how memory and speed are traded for the same weights (the
# MEMORY group: memory plan, precision, attention, caches, channels-last, the step inside backward). `preset` and
# `kind` only choose defaults for other settings, which count through their effective values; the photos count by
# their bytes, not their folder; the class images' batch size is how many are drawn at once, each from its own seed.
# `captions` (the mode) counts through the captions themselves, which are part of the photos' digest.
IDENTITY_EXCLUDED_GROUPS = (MEMORY, OUTPUTS)


IDENTITY_EXCLUDED_SETTINGS = ("output_dir", "preset", "kind", "concepts", "class_images_batch_size", "captions")


@dataclass
class TrainResult:
    output_dir: Path
    summary_path: Path
    sample_images: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    global_step: int = 0
    peak_memory_gib: float | None = None
    reused: bool = False  # True when the output folder already held this finished run and nothing was trained


def _read_photos(config: TrainConfig) -> list[DatasetReport]:
    """Each concept's usable photos, decoded once at full size (ImageDataError when a folder has none), each with
    its caption from the folder (captions.attach_captions; None: the instance prompt)."""
    return [captions.attach_captions(require_usable(read_images(concept.instance_dir)), concept.instance_dir,
                                     concept.instance_prompt, concept.class_prompt, config.captions)
            for concept in config.concepts]


def _run_identity(config: TrainConfig, max_steps: int, photos: list[DatasetReport]) -> dict[str, Any]:
    """What makes two runs the same model, as JSON data: the settings (_settings_identity) and a "photos" digest.

    Saved in every checkpoint and in the summary: a run resumes only its own checkpoints, and reuses only its own
    finished model. The photos count by their bytes in reading order, so other or replaced photos make another
    run, whatever their folder is called. Under accelerate launch the process count counts too: with it the
    global batch, the stream of examples and the learning-rate schedule's step count change.
    """
    processes = {"num_processes": process_count()} if process_count() > 1 else {}  # one process: as before
    return {**_settings_identity(config, max_steps), **processes, "photos": _photos_digest(photos)}


def _settings_identity(config: TrainConfig, max_steps: int) -> dict[str, Any]:
    """Every setting of `config` but those that do not change the trained weights (IDENTITY_EXCLUDED_GROUPS and
    _SETTINGS), with the effective step count, learning rates and class-image count (so a changed recipe counts
    as a change; hub.py's model card reads the rates from here), and each concept's prompts and class folder."""
    groups = {option.name: option.metadata.get("group") for option in dataclasses.fields(TrainConfig)}
    settings = {name: value for name, value in config.to_dict().items()
                if groups[name] not in IDENTITY_EXCLUDED_GROUPS and name not in IDENTITY_EXCLUDED_SETTINGS}
    settings.update(max_train_steps=max_steps, learning_rate=config.effective_learning_rate,
                    text_encoder_learning_rate=config.effective_text_encoder_learning_rate,
                    num_class_images=config.effective_num_class_images,
                    prompts=[{"instance_prompt": c.instance_prompt, "class_prompt": c.class_prompt,
                              "class_dir": c.class_dir} for c in config.concepts])
    return json.loads(json.dumps(settings, default=str))  # as it reads back from a summary (tuples become lists)


def _photos_digest(photos: list[DatasetReport]) -> str:
    """The photos' bytes, in reading order, and the captions they train on: another caption is another run.
    A photo without a caption counts by its bytes alone, as before captions existed."""
    digests = [[record.digest if record.caption is None else [record.digest, record.caption]
                for record in report.images] for report in photos]
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()


def find_finished_run(config: TrainConfig, *, max_steps: int | None = None) -> TrainResult | None:
    """The finished run of `config` in `config.output_dir`, or None: then training it is needed.

    Finished: the model (model_index.json, or the LoRA weights) and training_summary.json are there, and the
    summary's run identity is this config's (_run_identity: every setting that changes the weights, and the
    photos). The notebook calls it to skip training unless asked to train again. `max_steps`, the step count for
    the photos (config.steps_for), spares reading the photos unless every setting matches.
    """
    output_dir = Path(config.output_dir)
    summary = _finished_summary(output_dir, config.lora)
    recorded = summary.get("identity") if summary is not None else None
    if not isinstance(recorded, dict):
        return None
    try:
        photos = None
        if max_steps is None:
            photos = _read_photos(config)
            max_steps = config.steps_for(sum(len(report.images) for report in photos))
        # The settings first: the photos are decoded only when nothing else tells the runs apart.
        if {key: value for key, value in recorded.items() if key != "photos"} != _settings_identity(config, max_steps):
            return None
        photos = photos or _read_photos(config)
    except DreamBoothError:  # the photos cannot be read: training will say why
        return None
    return _reused_result(output_dir, summary) if recorded.get("photos") == _photos_digest(photos) else None


def _finished_summary(output_dir: Path, lora: bool) -> dict[str, Any] | None:
    """The summary of the finished run in `output_dir`: None unless it and the model's marker file are there."""
    summary_path = output_dir / SUMMARY_FILE
    marker = LORA_WEIGHTS_FILE if lora else MODEL_INDEX_FILE
    if not (summary_path.is_file() and (output_dir / marker).is_file()):
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except ValueError:  # a summary cut short by hand or by a foreign tool: not a finished run
        return None
    return summary if isinstance(summary, dict) else None


def _reused_result(output_dir: Path, summary: dict[str, Any]) -> TrainResult:
    history = summary.get("history") or []
    samples = [Path(path) for h in history for path in h.get("samples") or []]
    return TrainResult(output_dir, output_dir / SUMMARY_FILE, samples, [h["loss"] for h in history],
                       summary.get("steps", len(history)), summary.get("peak_gpu_memory_gib"), reused=True)


def _finished_run(config: TrainConfig, identity: dict[str, Any], say) -> TrainResult | None:
    """With --resume latest, this run already finished in the output folder: returned as it is, nothing rewritten.

    A checkpoint of this run at its last step without the model (a crash between the two) is no finished run:
    the run resumes from it, trains no step, and saves the model and the summary.
    """
    if config.resume != "latest":
        return None
    summary = _finished_summary(Path(config.output_dir), config.lora)
    if summary is None or summary.get("identity") != identity:
        return None
    say(f"{config.output_dir} already holds this run, finished ({summary.get('steps')} steps): reusing it. To train "
        "it again, run without --resume, or into a new --output-dir.")
    return _reused_result(Path(config.output_dir), summary)
