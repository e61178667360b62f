"""Resumable checkpoints and the final model folder, both written so a crash never corrupts them.

A checkpoint is `OUTPUT_DIR/checkpoints/checkpoint-000500/` holding the trainable weights (a
`unet/` and `text_encoder/` folder, or LoRA adapters), the optimizer, learning-rate scheduler and
loss-scaler states, the loss history so far (`history.json`) and `state.json`, which also records the
identity of the run that saved it (training._run_identity: the settings that change the weights, and
the photos). It is written into a temporary folder and renamed into place: a kill during a save leaves
the previous checkpoint intact. Only the run's newest K are kept, so Colab's disk does not fill, and a
run resumes only from its own checkpoints. Every file is loaded without running pickled code (tensors
and plain data only), so a checkpoint from someone else cannot run code here.

`plan_checkpoints` decides, before any model loads, how many checkpoints a run can afford on a disk
where every byte ever written counts (Google Drive keeps deleted files in its trash).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, option_name
from .errors import ModelLoadError, TrainingError
from .families import SD1, UNET_PART, ModelFamily
from .files import LORA_WEIGHTS_FILE
from .speedups import optimizer_state_for

CHECKPOINTS_DIR = "checkpoints"
HISTORY_FILE = "history.json"  # in a checkpoint: the per-step logs up to it, so a resumed run's history is whole
CHECKPOINTS_PER_RUN = 4  # at most, evenly spaced: more rarely pays for the time and disk they take
# bitsandbytes' 8-bit AdamW: two 1-byte moments per parameter, plus one fp32 scale per 256-value block of each
# (tensors under 4096 values keep fp32 moments; SD's are nearly all larger). Plain AdamW: two fp32 moments.
ADAM8_CHECKPOINT_BYTES = 2 * (1 + 4 / 256)
ADAM_CHECKPOINT_BYTES = 8
SMALL_FILES_BYTES = 2**20  # state.json, history.json, the scheduler and scaler states
SD1_SAFETY_CHECKER_BYTES = 1_220_000_000  # safety_checker/model.safetensors of SD 1.x (fp32), saved with a full model


@dataclass
class TrainingState:
    """Everything a resumed run needs besides the config: models, optimizer, schedulers."""

    unet: Any
    text_encoder: Any | None  # None when the text encoder is not trained
    optimizer: Any
    lr_scheduler: Any
    scaler: Any | None  # the fp16 loss scaler, when there is one
    lora: bool
    eight_bit_adam: bool = False  # the optimizer keeps 8-bit moments (bitsandbytes): smaller checkpoints
    family: ModelFamily = SD1  # which text encoders the text module holds, and how LoRA files are written


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"checkpoint-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written temporary folders are not listed)."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / "state.json").is_file()
             and p.name.removeprefix("checkpoint-").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")))


def checkpoint_step(path: str | Path) -> int:
    """The step a complete checkpoint was saved at (read from its state.json, no weights loaded)."""
    return int(_read_state(path)["step"])


def _read_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "state.json").read_text())


def is_checkpoint_step(step: int, max_steps: int, every: int | None) -> bool:
    """Whether step `step` of `max_steps` saves a checkpoint.

    Every `every` steps, but never at the last step (the finished model and training_summary.json stand
    for it) nor when fewer than half an interval remain: a checkpoint a few steps before the end costs a
    full checkpoint's time and disk and saves almost no work.
    """
    return bool(every) and step % every == 0 and step < max_steps and max_steps - step >= every // 2


def checkpoint_steps(max_steps: int, every: int | None) -> list[int]:
    """The steps of a `max_steps` run that save a checkpoint (see is_checkpoint_step)."""
    return [step for step in range(1, max_steps + 1) if is_checkpoint_step(step, max_steps, every)]


def identity_differences(saved: Any, wanted: Any) -> list[str]:
    """What differs between the run identity a checkpoint recorded and this run's, in words ("--learning-rate",
    "the photos"); empty when they are the same run."""
    if saved is None and wanted is not None:
        return ["none recorded: an older version saved it"]
    if not (isinstance(saved, dict) and isinstance(wanted, dict)):
        return [] if saved == wanted else ["the run"]
    return [_setting_words(key) for key in sorted(set(saved) | set(wanted)) if saved.get(key) != wanted.get(key)]


# Schedules whose learning rate at step k does not depend on the run's step count: a run of N steps with one of
# them is, up to step N, the same run as one of M > N steps, so its checkpoints can continue to M.
STEP_COUNT_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def _same_run_up_to(saved: Any, wanted: Any, step: int) -> bool:
    """Whether a checkpoint at `step` of the run `saved` is also a checkpoint of `wanted`: the same identity, or
    one that differs only in the step count (step <= it) under a schedule that does not read the step count."""
    if not (isinstance(saved, dict) and isinstance(wanted, dict)):
        return saved == wanted
    others = {key for key in set(saved) | set(wanted) if saved.get(key) != wanted.get(key)}
    if not others:
        return True
    return others == {"max_train_steps"} and wanted.get("lr_scheduler") in STEP_COUNT_FREE_SCHEDULES \
        and step <= int(wanted["max_train_steps"])


def _setting_words(name: str) -> str:
    """A TrainConfig field as its flag (the notebook rewrites flags in its own words), else "the photos"."""
    return option_name(name) if name in TrainConfig.__dataclass_fields__ else "the " + name.replace("_", " ")


def resolve_resume(resume: str | None, output_dir: str | Path, identity: Any, max_steps: int,
                   say=print) -> Path | None:
    """The checkpoint to resume this run (`identity`, `max_steps` steps) from; None: start from step 0.

    "latest": the newest checkpoint this run saved (the same identity, step <= max_steps); others in the folder
    were saved with other settings or photos, and are passed over with one line through `say` saying so.
    A checkpoint folder: refused (TrainingError) when incomplete or saved by another run, since resuming it
    would continue another run's weights and optimizer under this run's name.
    """
    if resume is None:
        return None
    if resume == "latest":
        found, passed_over, differences = None, [], set()
        for path in reversed(list_checkpoints(output_dir)):  # newest first
            state = _read_state(path)
            different = identity_differences(state.get("identity"), identity)
            if _same_run_up_to(state.get("identity"), identity, int(state["step"])) and int(state["step"]) <= max_steps:
                found = path
                if different:  # only the step count changed: the run continues to its new length
                    say(f"{path.name} was saved by this run with another step count: continuing it to {max_steps} "
                        "steps (the learning-rate schedule does not depend on the step count).")
                break
            passed_over.insert(0, path.name)
            differences.update(different or [f"more than {max_steps} steps"])
        if passed_over:
            one = len(passed_over) == 1
            say(f"{', '.join(passed_over)} {'was' if one else 'were'} saved by a run with other settings "
                f"({', '.join(sorted(differences))}): not resuming from {'it' if one else 'them'}. This run's own "
                f"checkpoints will replace {'it' if one else 'them'}.")
        return found
    path = Path(resume)
    if not (path / "state.json").is_file():
        saved = ", ".join(p.name for p in list_checkpoints(output_dir)) or "none saved yet"
        raise TrainingError(f"--resume {resume!r} is not a complete checkpoint (no state.json). Use --resume latest "
                            f"or one of: {saved}.")
    state = _read_state(path)
    different = identity_differences(state.get("identity"), identity)
    if not _same_run_up_to(state.get("identity"), identity, int(state["step"])) or int(state["step"]) > max_steps:
        what = ", ".join(different) or f"it is at step {state['step']}, past this run's {max_steps}"
        raise TrainingError(f"--resume {resume!r} was saved by a run with other settings ({what}): resuming it would "
                            "continue that run's weights under this run's settings. Resume it with the settings it "
                            "was saved with (its state.json lists them under \"config\"), or train without --resume "
                            "to start this run from step 0.")
    return path


def checkpoints_of(output_dir: str | Path, identity: Any, up_to_step: int) -> list[Path]:
    """The complete checkpoints saved by the run `identity` at steps up to `up_to_step`, oldest first."""
    return [path for path in list_checkpoints(output_dir) if _read_state(path).get("identity") == identity
            and checkpoint_step(path) <= up_to_step]


# ---------------------------------------------------------------------------- saving


def _unwrap(model):
    return getattr(model, "module", model)


def lora_parts(unet, text_encoder, family: ModelFamily = SD1) -> dict[str, Any]:
    """The modules that carry LoRA adapters, by their part name ("unet", "text_encoder", "text_encoder_2")."""
    parts = {UNET_PART: _unwrap(unet)}
    if text_encoder is not None:
        parts.update(family.text_modules(_unwrap(text_encoder)))
    return parts


def raw_lora_file(part: str) -> str:
    """The checkpoint's file of one part's raw peft tensors (what a resume restores)."""
    return f"lora_{part}.safetensors"


def save_trainable_weights(folder: Path, unet, text_encoder, lora: bool, family: ModelFamily = SD1) -> None:
    """The weights that training changes: full models with save_pretrained, or LoRA adapters."""
    unet, text_encoder = _unwrap(unet), _unwrap(text_encoder) if text_encoder is not None else None
    if lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        parts = lora_parts(unet, text_encoder, family)
        layers = {name: get_peft_model_state_dict(module) for name, module in parts.items()}
        layers = {name: weights for name, weights in layers.items() if weights}
        # Raw peft tensors for resuming, and the diffusers layout that `load_lora_weights` reads.
        for name, weights in layers.items():
            save_file({k: v.detach().float().contiguous() for k, v in weights.items()}, folder / raw_lora_file(name))
        # The adapters' configs (rank, alpha, targets) go into the file's metadata: without them diffusers
        # reloads with alpha = rank, and an adapter trained with another alpha would act at the wrong strength.
        family.save_lora(folder, {name: convert_state_dict_to_diffusers(weights) for name, weights in layers.items()},
                         {name: _adapter_config(parts[name]) for name in layers})
    else:
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        if text_encoder is not None:
            text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)


def _adapter_config(model) -> dict[str, Any]:
    """The LoRA config (rank, alpha, target modules) of the model's one adapter, as plain data."""
    config = next(iter(model.peft_config.values())).to_dict()
    # Sets (target modules) are not JSON; diffusers stores this dict as JSON in the safetensors header.
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def load_text_encoder_weights(text_encoder, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Load a saved text encoder's weights strictly, converting between the two CLIP key layouts.

    transformers 4.x names the keys "text_model.encoder...", 5.x "encoder..."; loading one into the other
    non-strictly loads nothing and keeps the base weights without a word. Old files also carry a
    "position_ids" buffer that newer models no longer have.
    """
    wanted = set(text_encoder.state_dict())
    prefix = "text_model."
    if not wanted & set(weights):
        if all(key.startswith(prefix) for key in weights):
            weights = {key.removeprefix(prefix): value for key, value in weights.items()}
        elif all(key.startswith(prefix) for key in wanted):
            weights = {prefix + key: value for key, value in weights.items()}
    weights = {key: value for key, value in weights.items() if key in wanted or not key.endswith("position_ids")}
    try:
        text_encoder.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        missing = sorted(wanted - set(weights))
        unexpected = sorted(set(weights) - wanted)
        detail = "; ".join(part for part in (
            f"missing {len(missing)} (e.g. {missing[0]})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else "") if part)
        raise TrainingError(f"The text encoder weights in {where} do not fit this model ({detail or error}): they "
                            "were saved from another model. Resume with the --model the checkpoint was trained "
                            "from, or train without --resume.") from None


def require_finite_weights(models, what: str, output_dir: str | Path) -> None:
    """Refuse to save NaN/inf weights: such a model draws only noise, and saving it as a checkpoint would
    rotate away the last good one."""
    for model in models:
        if model is None:
            continue
        for name, parameter in _unwrap(model).named_parameters():
            if parameter.requires_grad and not bool(torch.isfinite(parameter.detach()).all()):
                good = list_checkpoints(output_dir)
                kept = f"The last good checkpoint, {good[-1]}, is kept." if good else "No checkpoint was saved yet."
                raise TrainingError(f"Not saving {what}: its weights contain NaN/inf ({name}), so training diverged. "
                                    f"Lower --learning-rate and train again. {kept} Continue from it with "
                                    "--resume latest.")


def checkpoint_bytes(trainable_parameters: int, *, lora: bool, eight_bit_adam: bool) -> int:
    """Disk taken by one checkpoint: the trained weights in fp32 (LoRA: twice, the raw adapters for resuming and
    the diffusers file) and the optimizer's two moments (8-bit AdamW ~2 bytes per parameter, AdamW 8).

    LoRA matrices are mostly under bitsandbytes' 4096-value threshold, so their moments count as fp32.
    """
    weights = 4 * trainable_parameters * (2 if lora else 1)
    per_moment_pair = ADAM8_CHECKPOINT_BYTES if eight_bit_adam and not lora else ADAM_CHECKPOINT_BYTES
    return int(weights + per_moment_pair * trainable_parameters + SMALL_FILES_BYTES)


def _trainable_parameters(state: TrainingState) -> int:
    models = [_unwrap(m) for m in (state.unet, state.text_encoder) if m is not None]
    return sum(p.numel() for m in models for p in m.parameters() if p.requires_grad)


def _state_checkpoint_bytes(state: TrainingState) -> int:
    return checkpoint_bytes(_trainable_parameters(state), lora=state.lora, eight_bit_adam=state.eight_bit_adam)


def run_bytes_needed(state: TrainingState, frozen_models, checkpoints_kept: int) -> int:
    """Disk a whole run needs: `checkpoints_kept` checkpoints at once (one more than the limit while the newest is
    written before the oldest goes) and the final model (every part in fp32, or the LoRA file)."""
    if state.lora:
        final = 4 * _trainable_parameters(state)
    else:
        final = sum(p.numel() * 4 for m in (state.unet, state.text_encoder, *frozen_models) if m is not None
                    for p in _unwrap(m).parameters())
    return checkpoints_kept * _state_checkpoint_bytes(state) + final


def _size_text(size: int) -> str:
    """1.2 GiB, 35 MiB, 12 KiB, 0 bytes: never "0.0 GiB" for a size that is not nothing."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.{1 if size < 10 * scale else 0}f} {unit}"
    return f"{size} bytes"


def check_free_disk(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        full = "The disk is full. " if free < 2**20 else ""
        raise TrainingError(
            f"{full}Not enough disk space in {folder} to save: {_size_text(needed)} needed, {_size_text(free)} free. "
            "Delete old outputs or checkpoints, lower --checkpoints-total-limit, or use --lora (small files)."
        )


def save_checkpoint(output_dir: str | Path, step: int, state: TrainingState, metadata: dict[str, Any],
                    keep: int, history: list[dict[str, Any]] | None = None) -> Path:
    """Write checkpoint `step` atomically, then delete every other checkpoint but this run's newest `keep`.

    `metadata["identity"]` names the run (see resolve_resume). `history` (the per-step logs so far, JSON data) is
    saved with it, so a run resumed from it reports every step.
    """
    final = checkpoint_dir(output_dir, step)
    require_finite_weights((state.unet, state.text_encoder), f"checkpoint {step}", output_dir)
    # Half-written checkpoints of runs killed mid-save are never resumed from; their space is needed now.
    for stale in final.parent.glob(".checkpoint-*.partial") if final.parent.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    check_free_disk(final.parent, _state_checkpoint_bytes(state))
    partial = final.with_name(f".{final.name}.partial")
    partial.mkdir(parents=True)
    save_trainable_weights(partial, state.unet, state.text_encoder, state.lora, state.family)
    torch.save(state.optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(state.lr_scheduler.state_dict(), partial / "lr_scheduler.pt")
    if state.scaler is not None:
        torch.save(state.scaler.state_dict(), partial / "scaler.pt")
    (partial / HISTORY_FILE).write_text(json.dumps(history or [], default=str))
    # state.json last: its presence is what marks a checkpoint complete.
    (partial / "state.json").write_text(json.dumps({"step": step, "lora": state.lora, **metadata}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    # This run's checkpoints are those of its identity up to this step. Any other was saved with other settings
    # or photos, or by an earlier attempt at this run that this one started over from (its steps lie ahead):
    # this run can never resume from it, and it would outrank this run's own by its step number. Removed only
    # now that this run has a checkpoint of its own, so a crash before the first save leaves the folder as it was.
    own = checkpoints_of(output_dir, metadata.get("identity"), step)[-keep:]
    for old in list_checkpoints(output_dir):
        if old not in own:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, state: TrainingState) -> int:
    """Restore weights and optimizer state from `path`; return the step it was saved at."""
    unet, text_encoder = _unwrap(state.unet), _unwrap(state.text_encoder) if state.text_encoder is not None else None
    info = _read_state(path)
    if info.get("lora", False) != state.lora:
        raise TrainingError(f"{path} was saved by a {'LoRA' if info.get('lora') else 'full fine-tuning'} run; "
                            "resume with the same --lora setting, or start a new output folder.")
    if state.lora:
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        for name, module in lora_parts(unet, text_encoder, state.family).items():
            file = path / raw_lora_file(name)
            if not file.is_file():
                raise TrainingError(f"{path} has no {file.name}: it was saved without training {name}'s adapters, "
                                    "or it is damaged. Resume with the settings it was saved with (its state.json), "
                                    "or delete it and resume from an earlier checkpoint.")
            saved = _load_tensors(file)
            if set(saved) != set(get_peft_model_state_dict(module)):  # another model's or another rank's adapters
                raise TrainingError(f"{file} holds other adapters than this run trains ({name}): it was saved by "
                                    "another run or is damaged. Delete that checkpoint and resume from an earlier "
                                    "one, or train without --resume.")
            set_peft_model_state_dict(module, saved)
    else:
        unet.load_state_dict(_load_folder_weights(path / "unet"))
        if text_encoder is not None:
            if not (path / "text_encoder").is_dir():
                raise TrainingError(f"{path} has no text encoder weights: it was saved without "
                                    "--train-text-encoder. Resume with --no-train-text-encoder.")
            load_text_encoder_weights(text_encoder, _load_folder_weights(path / "text_encoder"), path / "text_encoder")
    # The planner may have chosen the other optimizer step this session (speedups.optimizer_state_for).
    optimizer = getattr(state.optimizer, "optimizer", state.optimizer)  # inside accelerate's wrapper
    saved = _load_plain_data(path / "optimizer.pt")
    try:
        state.optimizer.load_state_dict(optimizer_state_for(optimizer, saved))
    except (KeyError, TypeError, StopIteration, ValueError) as error:
        raise TrainingError(f"{path}'s optimizer state does not fit this run's optimizer ({type(error).__name__}: "
                            f"{error}). Resume with the settings it was saved with (its state.json lists them), or "
                            "train without --resume.") from None
    state.lr_scheduler.load_state_dict(_load_plain_data(path / "lr_scheduler.pt"))
    if state.scaler is not None and (path / "scaler.pt").is_file():
        state.scaler.load_state_dict(_load_plain_data(path / "scaler.pt"))
    _carry_loss_scale(path, state, optimizer, saved)
    return int(info["step"])


def _carry_loss_scale(path: Path, state: TrainingState, optimizer, saved: dict) -> None:
    """After a switch between the plain step and the step inside backward, keep the fp16 loss scale the run had
    settled on: the plain step keeps it in the accelerator's GradScaler (scaler.pt), StepInBackward in its own
    state. A fresh scale would overflow again for a few steps."""
    if getattr(optimizer, "loss_scale", None) is not None and "inner" not in saved and (path / "scaler.pt").is_file():
        optimizer.loss_scale = float(_load_plain_data(path / "scaler.pt")["scale"])
    elif state.scaler is not None and saved.get("loss_scale") is not None and not (path / "scaler.pt").is_file():
        state.scaler.load_state_dict({"scale": float(saved["loss_scale"]), "growth_factor": 2.0, "backoff_factor": 0.5,
                                      "growth_interval": 2000, "_growth_tracker": int(saved.get("clean_steps", 0))})


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The per-step logs saved with checkpoint `path` (empty for checkpoints saved before histories were kept)."""
    file = Path(path) / HISTORY_FILE
    return json.loads(file.read_text()) if file.is_file() else []


def _load_plain_data(file: Path) -> Any:
    """torch.load that accepts tensors and plain data only: unpickling anything else could run planted code."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        # A file cut short (a Drive sync or a full disk mid-copy) fails here too, as does a planted pickle.
        raise _unreadable_checkpoint_file(file, "more than tensors and plain data (loading that could run code "
                                          "hidden in it, so it was not loaded)", error) from None


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
        raise _unreadable_checkpoint_file(file, "something other than safetensors weights", error) from None


def _unreadable_checkpoint_file(file: Path, foreign: str, error: Exception) -> TrainingError:
    checkpoint = next((folder for folder in file.parents if (folder / "state.json").is_file()), file.parent)
    return TrainingError(
        f"{file} could not be loaded ({type(error).__name__}): it is corrupt (cut short, say by a Google Drive "
        f"sync or a full disk) or holds {foreign}. Checkpoints written by dreambooth-helpers are neither, so this "
        f"one was damaged or altered. Delete {checkpoint} and run again with --resume latest to continue from an "
        "earlier checkpoint, or train without --resume."
    )


def _load_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(_load_tensors(file))
    return weights


# ---------------------------------------------------------------------------- final model


def replace_atomically(staging: Path, output_dir: Path, marker: str) -> None:
    """Move everything from `staging` into `output_dir`, `marker` last.

    `marker` (model_index.json, or the LoRA weights file) is what makes a folder look like a finished
    model, so it is removed first and moved in last: a crash in between leaves no complete-looking
    model with mixed parts.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / marker).unlink(missing_ok=True)
    for item in sorted(staging.iterdir()):
        if item.name == marker:
            continue
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    os.replace(staging / marker, output_dir / marker)
    staging.rmdir()


def write_json_atomically(path: Path, data: Any) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2, default=str))
    os.replace(partial, path)


def pipeline_from_checkpoint(checkpoint: str | Path, base_model: str | None = None):
    """The family's pipeline with a checkpoint's weights, to look at (or evaluate) a step."""
    from diffusers import UNet2DConditionModel

    from .models import load_components, make_pipeline

    path = Path(checkpoint)
    if not (path / "state.json").is_file():
        raise ModelLoadError(f"{path} is not a complete checkpoint (no state.json).")
    info = _read_state(path)
    components = load_components(base_model or info["base_model"])
    if info.get("lora"):
        pipe = make_pipeline(components)
        pipe.load_lora_weights(str(path), weight_name=LORA_WEIGHTS_FILE)
        return pipe
    unet = UNet2DConditionModel.from_pretrained(path / "unet")
    # Each trained text encoder (the family's part names) into the freshly loaded base's own.
    for part, module in components.family.text_modules(components.text_encoder).items():
        if (path / part).is_dir():
            load_text_encoder_weights(module, _load_folder_weights(path / part), path / part)
    return make_pipeline(components, unet=unet)


# ---------------------------------------------------------------------------- planning, before any model loads


@dataclass(frozen=True)
class CheckpointPlan:
    """How many checkpoints a run can afford in `free_bytes`, counting every byte it will ever write."""

    checkpoint_every: int | None  # None: no checkpoint fits next to the model
    checkpoint_steps: list[int]
    checkpoint_bytes: int  # one checkpoint
    model_bytes: int  # the finished model
    other_bytes: int  # class images, samples, the summary
    total_bytes: int  # all the run writes: every checkpoint, the model and the rest
    free_bytes: int
    fits: bool  # False when even the model and the rest do not fit
    message: str  # one paragraph for the user

    @property
    def checkpoints_written(self) -> int:
        return len(self.checkpoint_steps)


def plan_checkpoints(config, free_bytes: int, size=None, *, steps: int) -> CheckpointPlan:
    """The most checkpoints (up to CHECKPOINTS_PER_RUN, evenly spaced) a run of `config` can write in `free_bytes`.

    Made for Google Drive: a deleted checkpoint stays in Drive's trash and counts against the quota until the
    trash is emptied, so every checkpoint the run writes counts, not only the one kept (use
    checkpoints_total_limit 1). `size` is a memory.ModelSize (default: memory.planning_size(config.model),
    parameter counts without loading weights); `steps` is the run's step count (config.steps_for(photos)).
    """
    from .memory import planning_size

    size = size or planning_size(config.model)
    text_trains = config.train_text_encoder
    if config.lora:
        trainable = config.lora_rank * (size.unet_lora_per_rank + (size.text_lora_per_rank if text_trains else 0))
        model = 4 * trainable
    else:
        trainable = size.unet + (size.text_encoder if text_trains else 0)
        model = 4 * (size.unet + size.text_encoder + size.vae)  # a diffusers folder, every part in fp32
        if config.safety_checker and size.unet > 10**8:  # an SD-sized base: its safety checker is kept
            model += SD1_SAFETY_CHECKER_BYTES
    one = checkpoint_bytes(trainable, lora=config.lora, eight_bit_adam=config.use_8bit_adam)
    # PNGs of generated images: about 2 bytes a pixel (class images, and a round of samples every sample_every).
    resolution = config.resolution or size.native_resolution
    sample_rounds = -(-steps // config.sample_every) if config.sample_every else 0
    prompts = len(config.sample_prompts) or len(config.concepts)
    images = (config.effective_num_class_images if config.with_prior_preservation else 0) + sample_rounds * prompts
    other = images * 2 * resolution**2 + SMALL_FILES_BYTES

    every, chosen = None, []
    for wanted in range(CHECKPOINTS_PER_RUN, 0, -1):
        candidate = max(1, steps // (wanted + 1))
        at = checkpoint_steps(steps, candidate)
        if at and len(at) * one + model + other <= free_bytes:
            every, chosen = candidate, at
            break
    total = len(chosen) * one + model + other
    return CheckpointPlan(every, chosen, one, model, other, total, int(free_bytes), total <= free_bytes,
                          _plan_message(chosen, one, model, other, free_bytes))


def _plan_message(steps: list[int], one: int, model: int, other: int, free: int) -> str:
    def gb(n: int) -> str:
        return f"{n / 1e9:.1f} GB"

    total = len(steps) * one + model + other
    if total > free:
        return (f"This run writes about {gb(total)} (the model alone is {gb(model)}) and only {gb(free)} is free: "
                "free some space (empty Drive's trash too), save to the runtime's own disk, or train LoRA "
                "(a file of a few MB).")
    if not steps:
        return (f"This run writes about {gb(total)}: the model, {gb(model)}, and no checkpoint: one checkpoint "
                f"({gb(one)}) would not fit in the {gb(free)} free, so a disconnect means training again from the "
                "start. Free some space (empty Drive's trash too) for a resumable run.")
    where = ", ".join(str(s) for s in steps)
    plural = "s" if len(steps) > 1 else ""
    return (f"This run writes about {gb(total)} of the {gb(free)} free: {len(steps)} checkpoint{plural} of "
            f"{gb(one)} at step{plural} {where} (only the newest is kept) and the model, {gb(model)}. Deleted "
            "checkpoints stay in Google Drive's trash, which counts against its 15 GB, until you empty it.")

