"""Model families: what differs between Stable Diffusion 1.x and SDXL, behind one small interface (base.py).

Training, generation, export, publishing and the memory planner ask `family_of(model)` (before loading: from
the name, a folder's model_index.json, a single file's keys, or the Hub's model_index.json) or
`components.family` (after) and call its methods; no other module branches on the family.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from ..errors import ModelLoadError
from ..safe_json import read_json_file
from .base import LORA_TARGETS_TEXT, LORA_TARGETS_UNET, UNET_PART, Conditioning, ModelFamily, seeded_rng
from .sd import SD1
from .sdxl import SDXL, SDXL_RANDOM, TINY_SDXL_MODEL, TextEncoderPair

FAMILIES = {family.name: family for family in (SD1, SDXL)}
# Built-in models of each family (the SD 1.x ones, tiny/toy/sd15-random, are models.py's and default to SD1).
BUILT_IN_FAMILY = {TINY_SDXL_MODEL: SDXL, SDXL_RANDOM: SDXL}
# SDXL-architecture models whose names do not say "XL" (distilled SSD-1B, Segmind Vega, Playground v2/2.5).
SDXL_NAMES_WITHOUT_XL = ("ssd-1b", "segmind-vega", "playground-v2")
# A single-file checkpoint's keys that only SDXL has: its second text encoder (OpenCLIP bigG).
SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1."

__all__ = ["FAMILIES", "LORA_TARGETS_TEXT", "LORA_TARGETS_UNET", "SD1", "SDXL", "SDXL_RANDOM", "TINY_SDXL_MODEL",
           "UNET_PART", "Conditioning", "ModelFamily", "TextEncoderPair", "family_named", "family_of",
           "family_of_index", "seeded_rng"]


def family_named(name: str | None) -> ModelFamily:
    """The family recorded under `name` in a summary or checkpoint; SD 1.x for records older than families."""
    return FAMILIES.get(name or SD1.name, SD1)


def family_of_index(index: dict, where: str = "model_index.json") -> ModelFamily:
    """The family of a diffusers model_index.json's contents; a ModelLoadError for what is neither family."""
    if not isinstance(index, dict):
        raise ModelLoadError(f"{where} is not a diffusers model index (a JSON object naming the model's parts).")
    class_name = str(index.get("_class_name", ""))
    if "transformer" in index:  # SD3, FLUX, PixArt...: a diffusion transformer, no UNet
        raise ModelLoadError(f"{where} describes a {class_name or 'transformer-based'} model: only Stable Diffusion "
                             "1.x and SDXL (UNet models) can be trained here.")
    return SDXL if "XL" in class_name or "text_encoder_2" in index else SD1


def family_of(model: str, *, hub_options: dict | None = None) -> ModelFamily:
    """Which family `model` is, known before its weights load: never asked of the user.

    Built-in names are known; a folder says so in model_index.json (or, without one, its unet/config.json's
    "text_time" added embedding); a single .safetensors file by its keys (read from the header, no tensor
    loads); a Hub id by its model_index.json, one small download (or the cache). Anything unreadable is SD 1.x,
    whose loader then says what is wrong with it.
    """
    if model in BUILT_IN_FAMILY:
        return BUILT_IN_FAMILY[model]
    path = Path(model).expanduser()
    if path.is_dir():
        return _family_of_folder(path)
    if path.is_file():
        return _family_of_file(path)
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return _family_of_hub_id(model, hub_options or {})
    return SD1


def _family_of_folder(path: Path) -> ModelFamily:
    """model_index.json's word, checked against the UNet's own config (a folder mixing parts of two models would
    otherwise fail mid-training); without an index, the UNet's "text_time" embedding says SDXL."""
    index, unet = _folder_json(path / "model_index.json"), _folder_json(path / "unet" / "config.json")
    by_unet = None if unet is None else SDXL if unet.get("addition_embed_type") == "text_time" else SD1
    if index is None:
        return by_unet or SD1
    by_index = family_of_index(index, str(path / "model_index.json"))
    if by_unet is not None and by_unet is not by_index:
        raise ModelLoadError(f"{path}: model_index.json describes {by_index.label}, but unet/config.json is "
                             f"{by_unet.label}'s. The folder mixes two models: download or save it again whole.")
    return by_index


def _folder_json(file: Path) -> dict | None:
    """A model folder's JSON file (None when absent), refused with a ModelLoadError when it is no JSON object."""
    if not file.is_file():
        return None
    try:
        data = read_json_file(file)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{file} cannot be read ({error}). The model folder is damaged: download or save it "
                             "again.") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} is not a JSON object of settings. The model folder is damaged: download or "
                             "save it again.")
    return data


def _family_of_file(path: Path) -> ModelFamily:
    if path.suffix != ".safetensors":
        return SD1  # .ckpt files are pickles: never opened to look (models.py refuses what it cannot read safely)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = handle.keys()
    except Exception as error:  # safetensors raises its own error type for a damaged header
        raise ModelLoadError(f"--model {str(path)!r} is not a readable .safetensors file ({type(error).__name__}): "
                             "it may be cut short or not a model. Download it again.") from None
    return SDXL if any(key.startswith(SDXL_SINGLE_FILE_KEY) for key in keys) else SD1


def _family_of_hub_id(repo: str, hub_options: dict) -> ModelFamily:
    """The Hub model's model_index.json, from the cache when it is there; else the name (SDXL models carry "XL" in
    it: ...-xl-base-1.0, sdxl-turbo, Juggernaut-XL), which offline is all there is; else one small download."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "model_index.json")
    if isinstance(cached, str):
        try:
            return family_of_index(read_json_file(cached))
        except (OSError, ValueError, ModelLoadError):
            pass
    name = repo.split("/")[-1].lower()
    if re.search(r"xl(?![a-z])", name) or name.startswith(SDXL_NAMES_WITHOUT_XL):
        return SDXL
    if constants.HF_HUB_OFFLINE or hub_options.get("local_files_only"):
        return SD1
    return _family_from_hub(repo)


@functools.lru_cache(maxsize=32)
def _family_from_hub(repo: str) -> ModelFamily:
    """Asked once per process (the planner and the loader both ask)."""
    try:
        from diffusers import DiffusionPipeline

        return family_of_index(DiffusionPipeline.load_config(repo))
    except Exception:  # unreachable, unknown repository, gated: the loader says which, with advice
        return SD1
