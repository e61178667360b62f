"""Export LoRA weights in the layout AUTOMATIC1111, ComfyUI, Forge and kohya's sd-scripts read ("webui" layout).

diffusers writes `pytorch_lora_weights.safetensors` with keys such as
`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora.down.weight`; the web UIs do not load those
("lora key not loaded"). They read kohya's names: the part's prefix (`lora_unet`, `lora_te` for SD 1.x's text
encoder, `lora_te1`/`lora_te2` for SDXL's two), then the module's path with dots turned into underscores, then
`.lora_down.weight` / `.lora_up.weight`, and one `.alpha` per module: the UI scales each update by alpha / rank,
so the alpha the adapter was trained with must be written, not assumed equal to the rank. Text-encoder paths
start at `text_model.`, as the UIs' CLIP models name them. diffusers' own `lora_state_dict` reads this layout back
(a test draws the same images from both files).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ModelLoadError
from .families import SD1, SDXL, UNET_PART, ModelFamily, family_named, family_of
from .files import LORA_WEIGHTS_FILE

# Endings of one LoRA matrix in the layouts diffusers writes (and peft's own), with the webui name for each.
_MATRIX_ENDINGS = ((".lora.down.weight", "lora_down"), (".lora.up.weight", "lora_up"),
                   (".lora_linear_layer.down.weight", "lora_down"), (".lora_linear_layer.up.weight", "lora_up"),
                   (".lora_A.weight", "lora_down"), (".lora_B.weight", "lora_up"))
TEXT_MODEL_PREFIX = "text_model."
SDXL_CONTEXT_WIDTH = 2048


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors of a diffusers LoRA file and its adapters' configs by part (rank, alpha), from its metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors' own error type for a damaged file
        raise ModelLoadError(f"{path} is not a readable LoRA file ({type(error).__name__}): download or train it "
                             "again.") from None
    flat = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        part, _, field = key.partition(".")
        configs.setdefault(part, {})[field] = value
    return tensors, configs


def to_webui_layout(tensors: dict[str, torch.Tensor], configs: dict[str, dict], family: ModelFamily,
                    dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
    """Rename a diffusers LoRA state dict (part.module.lora...) to the webui layout, with each module's alpha."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        part, _, rest = key.partition(".")
        if part not in family.kohya_prefixes:
            raise ModelLoadError(f"The LoRA file has weights for {part!r}, which {family.label} has no part "
                                 f"named so: it was trained for another model family ({key}).")
        module, kind = _split_matrix(rest, key)
        if part != UNET_PART and not module.startswith(TEXT_MODEL_PREFIX):
            module = TEXT_MODEL_PREFIX + module
        name = f"{family.kohya_prefixes[part]}_{module.replace('.', '_')}"
        converted[f"{name}.{kind}.weight"] = tensor.to(dtype) if dtype is not None else tensor
        if kind == "lora_down":
            rank = tensor.shape[0]
            alpha = configs.get(part, {}).get("lora_alpha") or rank  # no record: diffusers' own default
            converted[f"{name}.alpha"] = torch.tensor(float(alpha))
    return converted


def _split_matrix(rest: str, key: str) -> tuple[str, str]:
    for ending, kind in _MATRIX_ENDINGS:
        if rest.endswith(ending):
            return rest[: -len(ending)], kind
    raise ModelLoadError(f"Unknown key in the LoRA file: {key!r}. Only LoRA files written by diffusers or "
                         "dreambooth-helpers can be converted.")


def lora_weights_file(lora: str | Path) -> Path:
    """The diffusers LoRA file of a training run's folder, or the file itself."""
    path = Path(lora).expanduser()
    file = path / LORA_WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ModelLoadError(f"--lora {str(lora)!r}: no {LORA_WEIGHTS_FILE} there. Give the output folder of a "
                             "LoRA training run (or the .safetensors file itself).")
    return file


def lora_family(lora: str | Path) -> ModelFamily:
    """The family a LoRA run was trained for: its summary says so; a bare file by its parts and widths."""
    from .inference import read_training_summary

    file = lora_weights_file(lora)
    summary = read_training_summary(file.parent) or {}
    if summary.get("family"):
        return family_named(summary["family"])
    if summary.get("base_model"):
        return family_of(summary["base_model"])
    tensors, _ = read_lora_file(file)
    if any(key.startswith("text_encoder_2.") for key in tensors):
        return SDXL
    # SDXL's cross-attention reads 2048-wide prompt states, SD 1.x's 768.
    widths = [t.shape[1] for key, t in tensors.items() if "attn2.to_k" in key and t.ndim == 2 and "down" in key]
    return SDXL if widths and max(widths) >= SDXL_CONTEXT_WIDTH else SD1


def export_webui_lora(lora: str | Path, out: Path, family: ModelFamily, *, source: str = "") -> Path:
    """Write the LoRA run `lora` to `out` in the webui layout, fp16 (a quarter of fp32 training weights)."""
    from .export import write_safetensors

    tensors, configs = read_lora_file(lora_weights_file(lora))
    converted = to_webui_layout(tensors, configs, family)
    # ss_* keys are what kohya's tools and the UIs' info panels read; the rest says where the file came from.
    metadata = {"format": "pt", "source": source, "exported_by": "dreambooth-helpers",
                "ss_network_module": "networks.lora", "ss_base_model_version": family.webui_base_version}
    write_safetensors(converted, out, metadata=metadata)
    return out
