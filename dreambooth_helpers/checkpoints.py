"""Resumable checkpoints and the final model folder, both written so a crash never corrupts them.

A checkpoint is `OUTPUT_DIR/checkpoints/checkpoint-000500/` holding the trainable weights (a
`unet/` and `text_encoder/` folder, or LoRA adapters), the optimizer, learning-rate scheduler and
loss-scaler states, and `state.json`. It is written into a temporary folder and renamed into place:
a kill during a save leaves the previous checkpoint intact. Only the newest K are kept, so Colab's
disk does not fill.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError, TrainingError

CHECKPOINTS_DIR = "checkpoints"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
SUMMARY_FILE = "training_summary.json"


@dataclass
class TrainingState:
    """Everything a resumed run needs besides the config: models, optimizer, schedulers."""

    unet: Any
    text_encoder: Any | None  # None when the text encoder is not trained
    optimizer: Any
    lr_scheduler: Any
    scaler: Any | None  # the fp16 loss scaler, when there is one
    lora: bool


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


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder `--resume` points to ("latest" may find none: then training starts fresh)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        saved = ", ".join(p.name for p in list_checkpoints(output_dir)) or "none saved yet"
        raise TrainingError(f"--resume {resume!r} is not a complete checkpoint (no state.json). Use --resume latest "
                            f"or one of: {saved}.")
    return path


# ---------------------------------------------------------------------------- saving


def _unwrap(model):
    return getattr(model, "module", model)


def save_trainable_weights(folder: Path, unet, text_encoder, lora: bool) -> None:
    """The weights that training changes: full models with save_pretrained, or LoRA adapters."""
    unet, text_encoder = _unwrap(unet), _unwrap(text_encoder) if text_encoder is not None else None
    if lora:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        unet_layers = get_peft_model_state_dict(unet)
        text_layers = get_peft_model_state_dict(text_encoder) if text_encoder is not None else None
        # Raw peft tensors for resuming, and the diffusers layout that `load_lora_weights` reads.
        save_file({k: v.detach().float().contiguous() for k, v in unet_layers.items()},
                  folder / "lora_unet.safetensors")
        if text_layers:
            save_file({k: v.detach().float().contiguous() for k, v in text_layers.items()},
                      folder / "lora_text_encoder.safetensors")
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=convert_state_dict_to_diffusers(unet_layers),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(text_layers) if text_layers else None,
        )
    else:
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        if text_encoder is not None:
            text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)


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


def _bytes_needed(state: TrainingState) -> int:
    models = [m for m in (state.unet, state.text_encoder) if m is not None]
    trainable = [p for m in models for p in m.parameters() if p.requires_grad]
    weights = sum(p.numel() * 4 for p in trainable)
    return int(weights * 3 + 64 * 2**20)  # weights + up to two fp32 optimizer moments + headroom


def run_bytes_needed(state: TrainingState, frozen_models, checkpoints_kept: int) -> int:
    """Disk a whole run needs: `checkpoints_kept` checkpoints (one more than the limit while the newest is
    written before the oldest goes) and the final model (every part in fp32, or the LoRA file)."""
    final = _bytes_needed(state) // 3 if state.lora else sum(
        p.numel() * 4 for m in (state.unet, state.text_encoder, *frozen_models) if m is not None
        for p in _unwrap(m).parameters())
    return checkpoints_kept * _bytes_needed(state) + final


def check_free_disk(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise TrainingError(
            f"Not enough disk space in {folder} to save: {needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free. "
            "Delete old outputs or checkpoints, lower --checkpoints-total-limit, or use --lora (small files)."
        )


def save_checkpoint(output_dir: str | Path, step: int, state: TrainingState, metadata: dict[str, Any],
                    keep: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`."""
    final = checkpoint_dir(output_dir, step)
    require_finite_weights((state.unet, state.text_encoder), f"checkpoint {step}", output_dir)
    # Half-written checkpoints of runs killed mid-save are never resumed from; their space is needed now.
    for stale in final.parent.glob(".checkpoint-*.partial") if final.parent.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    check_free_disk(final.parent, _bytes_needed(state))
    partial = final.with_name(f".{final.name}.partial")
    partial.mkdir(parents=True)
    save_trainable_weights(partial, state.unet, state.text_encoder, state.lora)
    torch.save(state.optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(state.lr_scheduler.state_dict(), partial / "lr_scheduler.pt")
    if state.scaler is not None:
        torch.save(state.scaler.state_dict(), partial / "scaler.pt")
    # state.json last: its presence is what marks a checkpoint complete.
    (partial / "state.json").write_text(json.dumps({"step": step, "lora": state.lora, **metadata}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, state: TrainingState) -> int:
    """Restore weights and optimizer state from `path`; return the step it was saved at."""
    from safetensors.torch import load_file

    unet, text_encoder = _unwrap(state.unet), _unwrap(state.text_encoder) if state.text_encoder is not None else None
    info = json.loads((path / "state.json").read_text())
    if info.get("lora", False) != state.lora:
        raise TrainingError(f"{path} was saved by a {'LoRA' if info.get('lora') else 'full fine-tuning'} run; "
                            "resume with the same --lora setting, or start a new output folder.")
    if state.lora:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(unet, load_file(path / "lora_unet.safetensors"))
        if text_encoder is not None and (path / "lora_text_encoder.safetensors").is_file():
            set_peft_model_state_dict(text_encoder, load_file(path / "lora_text_encoder.safetensors"))
    else:
        unet.load_state_dict(_load_folder_weights(path / "unet"))
        if text_encoder is not None:
            if not (path / "text_encoder").is_dir():
                raise TrainingError(f"{path} has no text encoder weights: it was saved without "
                                    "--train-text-encoder. Resume with --no-train-text-encoder.")
            text_encoder.load_state_dict(_load_folder_weights(path / "text_encoder"), strict=False)
    state.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    state.lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=False))
    if state.scaler is not None and (path / "scaler.pt").is_file():
        state.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    return int(info["step"])


def _load_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
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
    """A StableDiffusionPipeline with a checkpoint's weights, to look at (or evaluate) a step."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from .models import load_components, make_pipeline

    path = Path(checkpoint)
    if not (path / "state.json").is_file():
        raise ModelLoadError(f"{path} is not a complete checkpoint (no state.json).")
    info = json.loads((path / "state.json").read_text())
    components = load_components(base_model or info["base_model"])
    if info.get("lora"):
        pipe = make_pipeline(components)
        pipe.load_lora_weights(str(path), weight_name=LORA_WEIGHTS)
        return pipe
    unet = UNet2DConditionModel.from_pretrained(path / "unet")
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder") if (path / "text_encoder").is_dir() else None
    return make_pipeline(components, unet=unet, text_encoder=text_encoder)
