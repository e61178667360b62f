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

import math
from pathlib import Path

import torch

from .errors import ConfigError, ModelLoadError
from .families import SD1, SDXL, UNET_PART, ModelFamily, family_named, family_of
from .files import LORA_WEIGHTS_FILE
from .safe_json import load_json_bounded

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
    if not tensors:
        raise ModelLoadError(f"{path} holds no weights: it is not a LoRA file. Give a LoRA training run's folder.")
    try:
        flat = load_json_bounded(metadata.get("lora_adapter_metadata") or "{}", f"{path}'s LoRA metadata")
    except ValueError as error:  # JSON that is no JSON, too big or too deep
        raise ModelLoadError(f"{path}: its LoRA metadata cannot be read ({error}). Train or download the file "
                             "again.") from None
    if not isinstance(flat, dict):
        raise ModelLoadError(f"{path}: its LoRA metadata is not a table of settings. Train or download the file again.")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        part, _, field = str(key).partition(".")
        configs.setdefault(part, {})[field] = value
    return tensors, configs


def to_webui_layout(tensors: dict[str, torch.Tensor], configs: dict[str, dict], family: ModelFamily,
                    dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
    """Rename a diffusers LoRA state dict (part.module.lora...) to the webui layout, with each module's alpha."""
    converted: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        part, _, rest = key.partition(".")
        if part not in family.kohya_prefixes:
            raise ModelLoadError(f"The LoRA file has weights for {part!r}, which {family.label} has no part "
                                 f"named so ({key}): it is no LoRA file of a {family.label} model.")
        module, kind = _split_matrix(rest, key)
        if part != UNET_PART and not module.startswith(TEXT_MODEL_PREFIX):
            module = TEXT_MODEL_PREFIX + module
        name = f"{family.kohya_prefixes[part]}_{module.replace('.', '_')}"
        pairs.setdefault(name, {"part": part})[kind] = tensor
    for name, pair in pairs.items():
        down, up = _checked_pair(name, pair)
        for kind, tensor in (("lora_down", down), ("lora_up", up)):
            converted[f"{name}.{kind}.weight"] = tensor.to(dtype) if dtype is not None else tensor
        converted[f"{name}.alpha"] = torch.tensor(_alpha(configs.get(pair["part"], {}), down.shape[0], name))
    return converted


FP16_MAX = 65504.0


def _checked_pair(name: str, pair: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's down (rank x in) and up (out x rank) matrices, refused unless a UI could use them as they are."""
    down, up = pair.get("lora_down"), pair.get("lora_up")
    if down is None or up is None:
        raise ModelLoadError(f"The LoRA file has half of {name}'s adapter (no {'down' if down is None else 'up'} "
                             "matrix): the file is damaged. Train or download it again.")
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] < 1 or down.shape[0] != up.shape[1]:
        raise ModelLoadError(f"The LoRA file's {name} matrices do not fit together (down {tuple(down.shape)}, up "
                             f"{tuple(up.shape)}): the file is damaged. Train or download it again.")
    for tensor in (down, up):
        if not bool(torch.isfinite(tensor).all()) or float(tensor.abs().max()) > FP16_MAX:
            raise ModelLoadError(f"The LoRA file's {name} holds NaN/inf or values too large for fp16: the run that "
                                 "wrote it diverged. Use an earlier checkpoint, or train again with a lower rate.")
    return down, up


def _alpha(config: dict, rank: int, name: str) -> float:
    """The alpha a module was trained with (the UIs scale by alpha / rank); diffusers' default, the rank, when the
    file does not say. Per-module patterns and rsLoRA scaling have no place in the webui layout: refused."""
    if config.get("alpha_pattern") or config.get("rank_pattern") or config.get("use_rslora"):
        raise ModelLoadError(f"This LoRA uses per-layer ranks or alphas, or rsLoRA scaling ({name}), which the web "
                             "UIs' layout cannot express. Use pytorch_lora_weights.safetensors with diffusers.")
    alpha = config.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ModelLoadError(f"The LoRA file's metadata gives an alpha of {str(alpha)[:40]!r} ({name}): it must be a "
                             "positive number. The file is damaged; train or download it again.")
    return float(alpha)


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
    shapes = _weight_shapes(file)
    # The file's own weights first: a second text encoder, or cross-attention reading 2048-wide prompt states
    # (SD 1.x's are 768), is SDXL whatever a summary beside it says.
    widths = [shape[1] for key, shape in shapes.items() if "attn2.to_k" in key and len(shape) == 2 and "down" in key]
    if any(key.startswith("text_encoder_2.") for key in shapes) or (widths and max(widths) >= SDXL_CONTEXT_WIDTH):
        return SDXL
    summary = read_training_summary(file.parent) or {}
    if isinstance(summary.get("family"), str):
        return family_named(summary["family"])
    if isinstance(summary.get("base_model"), str):
        return family_of(summary["base_model"])
    return SD1


def _weight_shapes(file: Path) -> dict[str, list[int]]:
    """Each tensor's shape, from the file's header alone (no weight is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except Exception as error:  # safetensors' own error type for a damaged file
        raise ModelLoadError(f"{file} is not a readable LoRA file ({type(error).__name__}): download or train it "
                             "again.") from None


def export_webui_lora(lora: str | Path, out: Path, family: ModelFamily, *, source: str = "") -> Path:
    """Write the LoRA run `lora` to `out` in the webui layout, fp16 (a quarter of fp32 training weights)."""
    from .export import write_safetensors

    source_file = lora_weights_file(lora)
    _refuse_overwriting_the_run(source_file, Path(out))
    tensors, configs = read_lora_file(source_file)
    converted = to_webui_layout(tensors, configs, family)
    # ss_* keys are what kohya's tools and the UIs' info panels read; the rest says where the file came from.
    metadata = {"format": "pt", "source": source, "exported_by": "dreambooth-helpers",
                "ss_network_module": "networks.lora", "ss_base_model_version": family.webui_base_version}
    write_safetensors(converted, out, metadata=metadata)
    return out


def _refuse_overwriting_the_run(source: Path, out: Path) -> None:
    """--out must not replace the LoRA it reads, nor any file of that training run (its checkpoints included)."""
    run = source.parent.resolve()
    target = out.expanduser().resolve()
    if target == source.resolve() or (target.exists() and run in target.parents):
        raise ConfigError(f"--out {str(out)!r} would overwrite a file of the training run {str(run)!r} (the LoRA it "
                          "exports, or a checkpoint). Write the export outside the run's files, e.g. --out "
                          f"{run.name}-webui.safetensors.")
