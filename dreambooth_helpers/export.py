"""Export a model to one `.safetensors` file in the original Stable Diffusion (CompVis/LDM) layout.

AUTOMATIC1111, ComfyUI and most other UIs load single checkpoints whose keys follow the original
code base: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.transformer.*` (CLIP text encoder). Diffusers names the same tensors differently;
this module renames them. The rules follow the structure of the two code bases:

UNet (`ldm.modules.diffusionmodules.openaimodel.UNetModel`): down blocks are flattened into
`input_blocks`, each entry a list [resnet, attention] or [downsampler]; block 0 is `conv_in`. With
L resnets per down block, down block i's resnet j is `input_blocks.{(L+1)i + j + 1}.0` and its
downsampler `input_blocks.{(L+1)(i+1)}.0.op`. Up blocks have L+1 resnets; up block i's resnet j is
`output_blocks.{(L+1)i + j}.0`, its upsampler the entry after the last layer of that block's last
`output_blocks` item. Resnets rename norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut to
in_layers.0/in_layers.2/emb_layers.1/out_layers.0/out_layers.3/skip_connection. Attention
(transformer) blocks keep their names.

VAE (`ldm.modules.diffusionmodules.model.Encoder/Decoder`): `down_blocks.i.resnets.j` ->
`down.i.block.j`, decoder up blocks are numbered from the bottom (`up_blocks.i` -> `up.{n-1-i}`),
the mid block is `mid.block_1`, `mid.attn_1`, `mid.block_2`, `conv_shortcut` -> `nin_shortcut`,
`conv_norm_out` -> `norm_out`, and the mid attention's linear q/k/v/out become 1x1 convolutions
`q`/`k`/`v`/`proj_out` with `norm` for `group_norm`.

A LoRA run is merged into its base model first, so the file is a complete model.

Memory: the converted state dict holds the models' own tensors (renaming keys copies nothing) and the file is
written tensor by tensor (fp16 conversion included), so the peak is the loaded model plus one tensor: 4.4 GiB RSS
for an fp32 SD 1.5, where cloning every tensor took 8.4 GiB (benchmarks/export_memory.py measures both).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, ModelLoadError
from .export_lora import export_webui_lora, lora_family
from .families import family_of
from .inference import apply_lora, resolve_model
from .models import load_components, make_pipeline
from .output_paths import check_output_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

RESNET_RENAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                  ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION_RENAMES = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                         ("to_out.0", "proj_out"))


# ---------------------------------------------------------------------------- UNet


def unet_key_map(unet_config) -> dict[str, str]:
    """Diffusers UNet module prefix -> original module prefix, for every block of this configuration."""
    per_block = unet_config.layers_per_block
    if not isinstance(per_block, int):
        raise ConfigError("Single-file export needs the same number of layers in every UNet block "
                          f"(layers_per_block={per_block!r}).")
    num_blocks = len(unet_config.block_out_channels)
    mapping = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i in range(num_blocks):
        for j in range(per_block):
            entry = (per_block + 1) * i + j + 1
            mapping[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{entry}.0"
            mapping[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{entry}.1"
        if i < num_blocks - 1:
            mapping[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(per_block + 1) * (i + 1)}.0.op"
        for j in range(per_block + 1):
            entry = (per_block + 1) * i + j
            mapping[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{entry}.0"
            mapping[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{entry}.1"
        if i < num_blocks - 1:
            # The upsampler joins the block's last entry, after its resnet (and attention, if any).
            has_attention = unet_config.up_block_types[i].startswith("CrossAttn")
            last = (per_block + 1) * i + per_block
            mapping[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{last}.{2 if has_attention else 1}"
    return mapping


def _rename_by_prefix(key: str, mapping: dict[str, str], what: str) -> tuple[str, str]:
    """(original prefix, rest of the key) for the longest diffusers prefix of `key` in `mapping`."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in mapping:
            return mapping[prefix], ".".join(parts[cut:])
    raise ConfigError(f"The {what} has a weight this exporter cannot place ({key!r}); it only knows Stable "
                      "Diffusion 1.x architectures.")


def convert_unet(state_dict: dict[str, torch.Tensor], unet_config) -> dict[str, torch.Tensor]:
    mapping = unet_key_map(unet_config)
    converted = {}
    for key, tensor in state_dict.items():
        target, rest = _rename_by_prefix(key, mapping, "UNet")
        if ".resnets." in key:
            for old, new in RESNET_RENAMES:
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
        converted[f"{target}.{rest}"] = tensor
    return converted


# ---------------------------------------------------------------------------- VAE


def vae_key_map(vae_config) -> dict[str, str]:
    num_blocks = len(vae_config.block_out_channels)
    per_block = vae_config.layers_per_block
    mapping = {}
    for side in ("encoder", "decoder"):
        mapping[f"{side}.conv_in"] = f"{side}.conv_in"
        mapping[f"{side}.conv_out"] = f"{side}.conv_out"
        mapping[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        mapping[f"{side}.mid_block.resnets.0"] = f"{side}.mid.block_1"
        mapping[f"{side}.mid_block.attentions.0"] = f"{side}.mid.attn_1"
        mapping[f"{side}.mid_block.resnets.1"] = f"{side}.mid.block_2"
    for i in range(num_blocks):
        for j in range(per_block):
            mapping[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        mapping[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        level = num_blocks - 1 - i  # the original decoder counts levels from the lowest resolution
        for j in range(per_block + 1):
            mapping[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{level}.block.{j}"
        mapping[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{level}.upsample"
    mapping["quant_conv"] = "quant_conv"
    mapping["post_quant_conv"] = "post_quant_conv"
    return mapping


def convert_vae(state_dict: dict[str, torch.Tensor], vae_config) -> dict[str, torch.Tensor]:
    mapping = vae_key_map(vae_config)
    converted = {}
    for key, tensor in state_dict.items():
        target, rest = _rename_by_prefix(key, mapping, "VAE")
        if ".resnets." in key and rest.startswith("conv_shortcut."):
            rest = "nin_shortcut" + rest[len("conv_shortcut"):]
        if ".attentions." in key:
            for old, new in VAE_ATTENTION_RENAMES:
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            # The original attention uses 1x1 convolutions where diffusers uses linear layers.
            if rest.endswith(".weight") and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        converted[f"{target}.{rest}"] = tensor
    return converted


# ---------------------------------------------------------------------------- whole model


def convert_to_original_layout(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One state dict with the original Stable Diffusion key names, from the three diffusers models.

    The values are the models' own tensors (or views of them: the VAE's 1x1 convolutions), never copies, so
    converting costs no memory; the writer reads each one as it goes.
    """
    checkpoint = {}
    checkpoint.update({UNET_PREFIX + k: v for k, v in convert_unet(unet.state_dict(), unet.config).items()})
    checkpoint.update({VAE_PREFIX + k: v for k, v in convert_vae(vae.state_dict(), vae.config).items()})
    checkpoint.update({TEXT_ENCODER_PREFIX + k: v for k, v in convert_text_encoder(text_encoder.state_dict()).items()})
    return checkpoint


def convert_text_encoder(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel names as the original checkpoints have them: everything under `text_model.`.

    The original code wraps transformers' CLIPTextModel, whose weights lived under `text_model.`;
    transformers 5 dropped that level from the state dict (and adds it back when loading old files).
    """
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------- writing, one tensor at a time

# The safetensors format: an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape
# and byte range, then the tensors' bytes back to back.
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, *, metadata: dict[str, str] | None = None,
                      dtype: torch.dtype | None = None) -> int:
    """Write `tensors` as a .safetensors file, streaming: each tensor's bytes go straight from its own memory to
    the file, and with `dtype` (fp16) floating-point tensors are converted one at a time. Peak memory is the
    tensors themselves plus one converted tensor, where safetensors' save_file needs every tensor in its final
    dtype and contiguous at once (a second model in RAM for an fp16 export). Returns the bytes written.

    The file appears whole or not at all (written beside `path`, then renamed): an export cut short or out of
    disk space leaves no truncated checkpoint for a UI to choke on.
    """
    def stored_dtype(tensor: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype

    # Widest types first, as safetensors orders them, so every tensor starts aligned to its element size.
    names = sorted(tensors, key=lambda name: (-stored_dtype(tensors[name]).itemsize, name))
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in names:
        tensor = tensors[name]
        kind = stored_dtype(tensor)
        if kind not in SAFETENSORS_DTYPES:
            raise ConfigError(f"Cannot store {name!r} ({kind}) in a .safetensors file.")
        size = tensor.numel() * kind.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[kind], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # checked writable before anything loaded (output_paths)
    _require_free_space(path, 8 + len(header_bytes) + offset)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as file:
            file.write(struct.pack("<Q", len(header_bytes)))
            file.write(header_bytes)
            for name in names:
                tensor = tensors[name].detach()
                if tensor.device.type != "cpu" or tensor.dtype != stored_dtype(tensor):
                    tensor = tensor.to("cpu", stored_dtype(tensor))  # this tensor only, freed after writing
                # A contiguous tensor is written from its own memory (a byte view, no copy).
                file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        os.replace(partial, path)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise ConfigError(f"The disk filled up while writing {str(path)!r}. Free some space (the file needs "
                              f"{_gib(8 + len(header_bytes) + offset)}), or write elsewhere with --out.") from None
        raise
    return 8 + len(header_bytes) + offset


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def _require_free_space(path: Path, size: int) -> None:
    free = shutil.disk_usage(path.parent).free
    if free < size:
        raise ConfigError(f"Not enough disk space for {str(path)!r}: it needs {_gib(size)}, {_gib(free)} are free. "
                          "Free some space, write elsewhere with --out, or use --half (half the size).")


def export_single_file(model: str | None, out: str | Path, *, lora: str | None = None,
                       half_precision: bool = False) -> Path:
    """Write `model` (trained folder, LoRA run, diffusers folder, Hub id or "tiny") as one .safetensors file; with
    `lora`, those LoRA weights merged into it (for a LoRA run whose summary does not name its base model).

    Without `model`, the LoRA run `lora` alone is written in the webui layout (export_lora.py), which the UIs load
    on top of their own copy of the base model. Families without a single-file converter here (SDXL) always get
    that for a LoRA run. `out` is checked before the model loads. Memory: the loaded model plus one tensor (see
    write_safetensors).
    """
    out = check_output_file(out, "--out", ".safetensors")
    if model is None:
        if lora is None:
            raise ConfigError("Give --model (a model to write as one checkpoint) or --lora (a LoRA run to write in "
                              "the AUTOMATIC1111/ComfyUI LoRA layout).")
        return export_webui_lora(lora, out, lora_family(lora), source=Path(lora).name)
    base, lora_path, _ = resolve_model(model, lora)
    family = family_of(base)
    if lora_path is not None and lora_family(lora_path) is not family:
        raise ConfigError(f"--lora {lora_path!r} was trained for {lora_family(lora_path).label}, and --model {base!r} "
                          f"is {family.label}: LoRA weights only fit the family they were trained on. Give the base "
                          "model it was trained from, or leave --model out to export the LoRA alone.")
    if not family.single_file_export:
        if lora_path is None:
            raise ConfigError(f"{model!r} is a full {family.label} model: writing it as one checkpoint is not "
                              "supported yet. Its diffusers folder loads in ComfyUI and diffusers as it is; LoRA "
                              "runs export with: export-single-file --lora RUN_FOLDER --out FILE.safetensors.")
        return export_webui_lora(lora_path, out, family, source=Path(lora_path).name)
    components = load_components(base)
    if lora_path:
        pipeline = make_pipeline(components)
        apply_lora(pipeline, lora_path)
        pipeline.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
        del pipeline
    return write_checkpoint(components, out, half_precision=half_precision, source=str(Path(model).name or model))


def write_checkpoint(components, out: str | Path, *, half_precision: bool = False, source: str = "") -> Path:
    """Write loaded components (their UNet, VAE and text encoder) to `out` in the original layout, streaming."""
    if any("lora_" in key or "base_layer" in key for key in components.unet.state_dict()):
        raise ModelLoadError("The UNet still carries LoRA adapter layers after merging; export a full model.")
    checkpoint = convert_to_original_layout(components.unet, components.vae, components.text_encoder)
    metadata = {"format": "pt", "source": source, "exported_by": "dreambooth-helpers"}
    with torch.no_grad():
        write_safetensors(checkpoint, out, metadata=metadata, dtype=torch.float16 if half_precision else None)
    return Path(out)
