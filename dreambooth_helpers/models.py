"""Loading Stable Diffusion 1.x and SDXL, and building models in code.

`load_components(name)` is the one entry point: a Hub id, a local diffusers folder, a single
`.safetensors`/`.ckpt` file, `"tiny"` (a small random Stable Diffusion built from a fixed seed,
used offline and by the tests), `"tiny-sdxl"` (the same for SDXL's shapes: two text encoders and the
`text_time` added embedding), or `"sd15-random"`/`"sdxl-random"` (the real shapes with random weights, for
memory and speed measurements without a download). The family (families/) is detected, never asked.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TINY_MODEL, TOY_MODEL
from .errors import ModelLoadError
from .families import SD1, SDXL, SDXL_RANDOM, TINY_SDXL_MODEL, ModelFamily, TextEncoderPair, family_of, seeded_rng
from .families import sdxl as sdxl_family

# "tiny" (random weights, for tests) and "toy": the toy-world model trained by scripts/train_toy_model.py and
# shipped in the package, small but it draws. The names live in config, which validates them.
TOY_MODEL_DIR = Path(__file__).resolve().parent / "toy_model"
SD15_RANDOM = "sd15-random"
TINY_RESOLUTION = 64
TOY_RESOLUTION = 32
SD_RESOLUTION = 512
# What the built-in models draw, known before they load (the demo shows it while loading).
OFFLINE_RESOLUTIONS = {TINY_MODEL: TINY_RESOLUTION, TOY_MODEL: TOY_RESOLUTION,
                       TINY_SDXL_MODEL: sdxl_family.TINY_SDXL_RESOLUTION}
# Repositories users still type from old tutorials, and where the weights live now.
MOVED_REPOS = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
# SD 1.x noise schedule: 1000 steps, "scaled_linear" betas from 0.00085 to 0.012.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model (any family) that training and generation need."""

    tokenizer: Any
    text_encoder: Any  # SD 1.x: the CLIP text model; SDXL: both encoders as one module (families.TextEncoderPair)
    vae: Any
    unet: Any
    noise_scheduler: Any  # DDPM, for adding noise during training
    scheduler: Any  # the model's own inference scheduler
    source: str  # what was loaded, for summaries and model cards
    native_resolution: int = SD_RESOLUTION
    # The base model's NSFW filter: whether its model_index.json names one, and the parts once loaded
    # (load_safety_checker; only saving a full model and generating need them).
    safety_checker_in_base: bool = False
    safety_checker: Any = None
    feature_extractor: Any = None
    # fp32 weights of frozen parts, kept before training casts them to fp16/bf16 (keep_fp32_originals), so the
    # saved model holds the base model's own weights, not half-precision-rounded copies.
    fp32_originals: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    family: ModelFamily = SD1
    tokenizer_2: Any = None  # SDXL's second tokenizer
    # SDXL's own VAE overflows in fp16 (NaN images): it stays in fp32 unless --vae gave an fp16-safe one.
    vae_needs_fp32: bool = False

    def keep_fp32_originals(self, *names: str) -> None:
        """Remember the current (fp32) weights of the parts `names` ("vae", "text_encoder") before a cast.

        No copy is made: casting a module to another dtype gives it new tensors, and these references keep the
        old ones. Costs their fp32 size in CPU memory (VAE 0.3 GB, text encoder 0.5 GB for SD 1.x).
        """
        for name in names:
            self.fp32_originals[name] = {key: value.detach() for key, value in getattr(self, name).state_dict().items()}

    def restore_fp32_originals(self, pipeline) -> None:
        """Put the kept fp32 weights back into the pipeline's parts of the same names (after pipeline.to(fp32))."""
        for name, weights in self.fp32_originals.items():
            module = getattr(pipeline, name)
            device = next(module.parameters()).device
            module.load_state_dict({key: value.to(device, torch.float32) for key, value in weights.items()})

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution_multiple(self) -> int:
        """Image sizes must be multiples of this, so every UNet downsampling divides evenly."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)


# ---------------------------------------------------------------------------- tokenizer built in code


def _byte_symbols() -> list[str]:
    """One printable character per byte value, as CLIP's byte-level BPE expects.

    Printable Latin-1 bytes stand for themselves; the others are shifted past 255 so no symbol is
    whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


# Words that get a token of their own in the tiny tokenizer; anything else is spelled out in bytes.
TINY_WORDS = (
    "a an the of in on at with and photo picture painting drawing style sks zwx toy dog cat person man woman "
    "ball cube car house tree red green blue yellow orange purple white black pink brown gray small big "
    "background jungle snow beach city night left right top bottom center"
).split()


def build_tiny_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer with a small vocabulary: bytes, byte+end-of-word, and TINY_WORDS as merges."""
    from transformers import CLIPTokenizer

    bytes_ = _byte_symbols()
    vocab: dict[str, int] = {}
    for symbol in bytes_ + [b + "</w>" for b in bytes_]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[str] = []
    rank: dict[tuple[str, str], int] = {}
    for word in TINY_WORDS:
        # Replay BPE on the word: apply the best-ranked existing merge, as the tokenizer will; where none
        # applies, add one. Each word then ends as one token, and later words' merges (ranked after) cannot
        # split it ("cat" must not become "c" + "at</w>" because "at" came first).
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pairs = list(zip(pieces, pieces[1:]))
            known = [pair for pair in pairs if pair in rank]
            pair = min(known, key=rank.__getitem__) if known else pairs[0]
            if pair not in rank:
                rank[pair] = len(merges)
                merges.append(" ".join(pair))
                vocab.setdefault("".join(pair), len(vocab))
            merged, i = [], 0
            while i < len(pieces):  # every occurrence, left to right, as BPE merges them
                if tuple(pieces[i:i + 2]) == pair:
                    merged.append("".join(pair))
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            pieces = merged
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    # Files, passed by position, work with both the old (file-based) and new tokenizer constructors.
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length)


SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt")


def write_slow_tokenizer_files(tokenizer, folder: str | Path) -> None:
    """Write vocab.json and merges.txt into `folder` (a saved tokenizer/ folder).

    transformers 5 saves a CLIP tokenizer as tokenizer.json only; transformers 4.x's CLIPTokenizer (the
    "slow" one, still what many scripts and Spaces load) reads only these two files, so a model published
    without them cannot be loaded there. The BPE model behind tokenizer.json holds exactly their content.
    """
    folder = Path(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.model.save(str(folder))
    else:  # a slow tokenizer: it has the files itself
        tokenizer.save_vocabulary(str(folder))
    missing = [name for name in SLOW_TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(f"Could not write the tokenizer's {', '.join(missing)} into {folder}: this tokenizer "
                             f"({type(tokenizer).__name__}) is not a CLIP BPE tokenizer.")


# ---------------------------------------------------------------------------- models built in code


_seeded = seeded_rng  # families/base.py holds it: every family's builders use it


def _schedulers(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler, PNDMScheduler

    noise = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, clip_sample=False)
    inference = PNDMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    return noise, inference


def _sdxl_components(parts: dict[str, Any], tokenizer, source: str) -> SDComponents:
    """SDXL components from built parts (families.sdxl's builders): its scheduler is Euler, "leading" spacing."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    noise = DDPMScheduler(**SD_SCHEDULE, clip_sample=False)
    inference = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading", steps_offset=1)
    return SDComponents(tokenizer, TextEncoderPair(*parts["text_encoders"]), parts["vae"], parts["unet"], noise,
                        inference, source=source, native_resolution=parts["resolution"], family=SDXL,
                        tokenizer_2=tokenizer, vae_needs_fp32=source == SDXL_RANDOM)


def build_tiny_sdxl_components(seed: int = 0) -> SDComponents:
    """A small SDXL (two text encoders, `text_time` conditioning, 64 px) with random weights from `seed`."""
    tokenizer = build_tiny_tokenizer()
    return _sdxl_components(sdxl_family.build_tiny_parts(tokenizer, seed), tokenizer, TINY_SDXL_MODEL)


def build_sdxl_shaped_components(dtype: torch.dtype = torch.float16) -> SDComponents:
    """SDXL base 1.0's architecture with random weights in `dtype` (benchmarks: RAM, file sizes)."""
    tokenizer = build_tiny_tokenizer()
    return _sdxl_components(sdxl_family.build_real_shaped_parts(tokenizer, dtype), tokenizer, SDXL_RANDOM)


def build_tiny_components(seed: int = 0, prediction_type: str = "epsilon") -> SDComponents:
    """A small Stable Diffusion (~1M parameters, 64 px) with random weights from `seed`. No download."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=TINY_RESOLUTION, norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    noise_scheduler, scheduler = _schedulers(prediction_type)
    return SDComponents(tokenizer, text_encoder, vae, unet, noise_scheduler, scheduler,
                        source=TINY_MODEL, native_resolution=TINY_RESOLUTION)


def build_sd15_shaped_components(seed: int = 0) -> SDComponents:
    """SD 1.5's architecture with random weights (UNet 860M, CLIP ViT-L/14 text 123M, VAE 84M).

    Peak memory and step time match the real model, so benchmarks need no download.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    noise_scheduler, scheduler = _schedulers()
    return SDComponents(tokenizer, text_encoder, vae, unet, noise_scheduler, scheduler, source=SD15_RANDOM)


# ---------------------------------------------------------------------------- loading


# The Hub's SD 1.x repositories also hold each part's weights in fp16 ("*.fp16.safetensors"): half the download.
FP16_VARIANT = "fp16"


def base_weights_variant(lora: bool, precision: str) -> str | None:
    """The weight files a run needs: FP16_VARIANT when fp16 weights lose nothing, else None (the fp32 files).

    LoRA under fp16 keeps the whole base model frozen in fp16 and trains new fp32 adapters, so the fp16
    files (2.1 GB for SD 1.5 instead of 4.3 GB) give bit-for-bit the same run. A full fine-tune needs the fp32
    files: its fp32 master weights start from the base model's own values (fp16 rounding is larger than a
    DreamBooth step's update), and the parts it does not train are saved as the base model has them.
    """
    return FP16_VARIANT if lora and precision == "fp16" else None


def load_components(model: str, *, seed: int = 0, variant: str | None = None, vae: str | None = None,
                    dtype: torch.dtype = torch.float32) -> SDComponents:
    """Load a model of any family from `model`: a built-in name, a local folder or file, or a Hub id.

    Weights load in `dtype`, fp32 by default: training keeps trainable weights in fp32 and casts frozen ones
    itself. A LoRA run in half precision passes torch.float16, so no fp32 copy of the frozen base ever sits in
    RAM (SDXL: 6.9 GB in fp16 instead of 13.9 GB, more than free Colab's 12.7 GB). `variant` ("fp16", see
    base_weights_variant) reads a diffusers folder's or Hub repository's fp16 files instead, and only those are
    downloaded; where a part has none, its fp32 files are read. `vae` replaces the model's VAE (a Hub id or a
    folder), e.g. madebyollin/sdxl-vae-fp16-fix, which SDXL needs to encode and decode in fp16 without NaNs.
    """
    components = _load_base(model, seed=seed, variant=variant, dtype=dtype)
    if vae:
        components.vae = _load_vae(vae, dtype)
        components.vae_needs_fp32 = False
    return components


def _load_vae(vae: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    local = Path(vae).expanduser()
    if not local.is_dir() and (vae.startswith((".", "/", "~")) or vae.count("/") != 1):
        raise ModelLoadError(f"--vae {vae!r}: no such folder. Give a diffusers VAE folder or a Hub id such as "
                             "madebyollin/sdxl-vae-fp16-fix.")
    options = {} if local.is_dir() or not _check_hub_model(vae, "config.json", "--vae") else {"local_files_only": True}
    try:
        return AutoencoderKL.from_pretrained(str(local) if local.is_dir() else vae, torch_dtype=dtype, **options)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"--vae {vae!r} could not be loaded as a VAE ({type(error).__name__}: {error}). Give "
                             "a folder holding config.json and diffusion_pytorch_model.safetensors, or a Hub id."
                             ) from None


def _load_base(model: str, *, seed: int, variant: str | None, dtype: torch.dtype) -> SDComponents:
    if model == TINY_MODEL:
        return build_tiny_components(seed)
    if model == TINY_SDXL_MODEL:
        return build_tiny_sdxl_components(seed)
    if model == SDXL_RANDOM:
        return build_sdxl_shaped_components(torch.float16 if dtype == torch.float16 else torch.float32)
    if model == TOY_MODEL:
        if not (TOY_MODEL_DIR / "unet").is_dir():
            raise ModelLoadError(f"The toy model is missing from {TOY_MODEL_DIR}: reinstall the package, or "
                                 "rebuild it with `python scripts/train_toy_model.py`.")
        components = _load_diffusers_folder(str(TOY_MODEL_DIR), local=True)
        components.source = TOY_MODEL
        return components
    if model == SD15_RANDOM:
        return build_sd15_shaped_components(seed)
    path = Path(model).expanduser()
    if path.is_file():
        return _load_single_file(path, dtype)
    if path.is_dir():
        return _load_diffusers_folder(str(path), local=True, variant=variant, dtype=dtype)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"--model {model!r}: no such file or folder. Check the path, or give a Hub id "
                             "such as stable-diffusion-v1-5/stable-diffusion-v1-5.")
    if model in MOVED_REPOS:
        raise ModelLoadError(f"--model {model!r} was removed from the Hugging Face Hub in 2024. "
                             f"Use --model {MOVED_REPOS[model]} (the same weights).")
    return _load_diffusers_folder(model, local=False, variant=variant, dtype=dtype)


def _check_hub_model(repo: str, marker: str = "model_index.json", flag: str = "--model") -> bool:
    """Ask the Hub about `repo` once, quickly, before loading; True: load from the local cache only.

    Without this an unreachable Hub (no network, a proxy, a wrong HF_ENDPOINT) shows up as minutes of retries
    per file. Unreachable but cached: load the cached copy. Unreachable and not cached, or no such repository:
    a ModelLoadError that says which, and that no local folder of that name exists either.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(repo, marker), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ModelLoadError(f"{flag} {repo!r}: no local folder of that name, and offline mode (HF_HUB_OFFLINE) "
                                 "is on with no copy of that Hub model in the cache. Check the path, download the "
                                 f"model once with a network, or {_offline_choice(flag)}.")
        return True
    try:
        HfApi().model_info(repo, timeout=15)
    except GatedRepoError:
        return False  # loading says what to do (log in, accept the license)
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{flag} {repo!r}: no local folder of that name, and no such model on the Hugging Face "
                             "Hub (or it is private: log in with `hf auth login`). Check the spelling, e.g. "
                             "stable-diffusion-v1-5/stable-diffusion-v1-5, or the folder's path.") from None
    except Exception as error:  # connection refused, DNS, timeout, proxy, 5xx: the Hub cannot be asked
        if cached:
            return True
        raise ModelLoadError(f"{flag} {repo!r}: no local folder of that name, and the Hugging Face Hub at "
                             f"{constants.ENDPOINT} could not be reached ({type(error).__name__}) with no copy in the "
                             f"cache. Check your network (or HF_ENDPOINT), or {_offline_choice(flag)}.") from None
    return False


def _offline_choice(flag: str) -> str:
    """What works offline instead of the Hub model named with `flag`."""
    if flag == "--vae":
        return "pass --vae none to keep the model's own VAE (run in fp32), or a local VAE folder"
    return "use --model toy (SD 1.x) or --model tiny-sdxl (SDXL's structure), which work offline"


def _from_pretrained_variant(cls, where: str, subfolder: str, variant: str | None, dtype: torch.dtype = torch.float32,
                             **options: Any):
    """`cls.from_pretrained` of one part in `dtype` (fp32 by default), from its `variant` files when it has them.

    The dtype is asked for explicitly: transformers 5 otherwise loads in the dtype config.json names, which is
    float16 in folders saved from a half-precision model.
    """
    from transformers import PreTrainedModel

    options = {"dtype" if issubclass(cls, PreTrainedModel) else "torch_dtype": dtype, **options}
    if variant is not None:
        try:
            return cls.from_pretrained(where, subfolder=subfolder, variant=variant, **options)
        except (OSError, ValueError):  # no files of that variant for this part: read the plain ones
            pass
    return cls.from_pretrained(where, subfolder=subfolder, **options)


def _load_diffusers_folder(where: str, *, local: bool, variant: str | None = None,
                           dtype: torch.dtype = torch.float32) -> SDComponents:
    """SD 1.x or SDXL from a diffusers folder or Hub repository: the family says which parts there are."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if local and not Path(where, "unet").is_dir():
        raise ModelLoadError(
            f"{where!r} is not a diffusers model folder (no unet/ inside). Give the folder that holds "
            "model_index.json, unet/, vae/, text_encoder/ and tokenizer/."
        )
    cache_only = {"local_files_only": True} if not local and _check_hub_model(where) else {}
    family = family_of(where, hub_options=cache_only)
    missing = [part for part in ("unet", "vae", *family.text_parts, *family.tokenizer_folders)
               if local and not Path(where, part).is_dir()]
    if missing:
        raise ModelLoadError(f"{where!r} is a {family.label} folder without {', '.join(f'{m}/' for m in missing)}: it "
                             "is incomplete. Download or save the whole model again.")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **cache_only)
        text_encoder = _from_pretrained_variant(CLIPTextModel, where, "text_encoder", variant, dtype, **cache_only)
        tokenizer_2 = None
        if family is SDXL:
            tokenizer_2 = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer_2", **cache_only)
            text_encoder = TextEncoderPair(text_encoder, _from_pretrained_variant(
                CLIPTextModelWithProjection, where, "text_encoder_2", variant, dtype, **cache_only))
        vae = _from_pretrained_variant(AutoencoderKL, where, "vae", variant, dtype, **cache_only)
        unet = _from_pretrained_variant(UNet2DConditionModel, where, "unet", variant, dtype, **cache_only)
        scheduler_config = DDPMScheduler.load_config(where, subfolder="scheduler", **cache_only)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_load_advice(where, local, error)) from None
    noise_scheduler = DDPMScheduler.from_config(scheduler_config, clip_sample=False)
    scheduler = _inference_scheduler_from_config(scheduler_config)
    resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return SDComponents(tokenizer, text_encoder, vae, unet, noise_scheduler, scheduler,
                        source=where, native_resolution=resolution,
                        safety_checker_in_base=_names_safety_checker(where, local, **cache_only), family=family,
                        tokenizer_2=tokenizer_2, vae_needs_fp32=bool(vae.config.get("force_upcast", False)))


def _inference_scheduler_from_config(config: dict):
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"), diffusers.PNDMScheduler)
    return cls.from_config(config)


def _load_single_file(path: Path, dtype: torch.dtype = torch.float32) -> SDComponents:
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ModelLoadError(f"--model {str(path)!r}: a single-file model must be .safetensors or .ckpt.")
    from diffusers import DDPMScheduler

    family = family_of(str(path))
    options = {"safety_checker": None} if family is SD1 else {}
    try:
        pipe = family.pipeline_class().from_single_file(str(path), torch_dtype=dtype, **options)
    except Exception as error:  # diffusers raises many types here; all mean "could not read this file"
        raise ModelLoadError(
            f"Could not load {str(path)!r} as a {family.label} checkpoint ({type(error).__name__}: "
            f"{error}). Single files need the model's config from the Hub the first time; offline, convert it "
            "to a diffusers folder elsewhere and pass that folder."
        ) from None
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    text_encoder = pipe.text_encoder if family is SD1 else TextEncoderPair(pipe.text_encoder, pipe.text_encoder_2)
    return SDComponents(pipe.tokenizer, text_encoder, pipe.vae, pipe.unet, noise_scheduler, pipe.scheduler,
                        source=str(path), native_resolution=family.native_resolution, family=family,
                        tokenizer_2=getattr(pipe, "tokenizer_2", None),
                        vae_needs_fp32=bool(pipe.vae.config.get("force_upcast", False)))


def _load_advice(where: str, local: bool, error: Exception) -> str:
    if local:
        return (f"Could not read the model in {where!r}: {error}. The folder may be incomplete; "
                "re-download or re-save it.")
    return (
        f"Could not load {where!r} from the Hugging Face Hub ({type(error).__name__}). Check the spelling "
        "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), your network, and for gated models that you are "
        "logged in and accepted the license. Without a network, use --model toy or a local folder."
    )


def make_pipeline(components: SDComponents, *, unet=None, text_encoder=None, safety_checker: bool = False):
    """The family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline) over these components
    (optionally with trained replacements).

    `safety_checker`: include the base model's NSFW filter (loaded with load_safety_checker), which blacks out
    images it flags. Without it, a pipeline of a base that has one keeps `requires_safety_checker` true, so
    diffusers says the filter is off whenever the pipeline is built or a saved copy is loaded: leaving it out
    is never silent. Training's sample images and class images are made without it (previews on the
    user's own disk; the filter would black out some at random and cost 0.6 GB of GPU memory).
    """
    checker = components.safety_checker if safety_checker else None
    if safety_checker and components.safety_checker_in_base and checker is None:
        raise ModelLoadError("The safety checker was asked for but not loaded: call load_safety_checker first.")
    return components.family.pipeline(components, unet=unet, text_encoder=text_encoder, safety_checker=checker,
                                      feature_extractor=components.feature_extractor)


SAFETY_CHECKER_DIR, FEATURE_EXTRACTOR_DIR = "safety_checker", "feature_extractor"


def safety_checker_note(components: SDComponents, used: bool) -> str | None:
    """What to tell whoever sees the images when they are not filtered; None when they are (or for the built-in
    toy models, which draw coloured shapes)."""
    if used or components.source in (TINY_MODEL, TOY_MODEL, TINY_SDXL_MODEL):
        return None
    if components.safety_checker_in_base:
        return "Safety checker off: images are not filtered for NSFW content."
    return "This model has no safety checker: images are not filtered for NSFW content."


def _names_safety_checker(where: str, local: bool, **hub_options: Any) -> bool:
    """Whether the diffusers model at `where` declares a safety checker in its model_index.json."""
    from diffusers import DiffusionPipeline

    try:
        index = json.loads(Path(where, "model_index.json").read_text()) if local else DiffusionPipeline.load_config(
            where, **hub_options)
    except (OSError, ValueError):  # no index (a bare folder of parts): nothing declared
        return False
    entry = index.get(SAFETY_CHECKER_DIR)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def load_safety_checker(components: SDComponents, *, variant: str | None = None) -> bool:
    """Load the safety checker and its feature extractor of the model `components` came from, once.

    Returns whether there is one (False for models without: the built-in ones, or a base saved without it).
    `variant` "fp16" downloads its 0.6 GB of fp16 weights instead of 1.2 GB, for half-precision generation.
    """
    if components.safety_checker is not None or not components.safety_checker_in_base:
        return components.safety_checker is not None
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    try:
        components.safety_checker = _from_pretrained_variant(StableDiffusionSafetyChecker, components.source,
                                                             SAFETY_CHECKER_DIR, variant)
        components.feature_extractor = CLIPImageProcessor.from_pretrained(components.source,
                                                                          subfolder=FEATURE_EXTRACTOR_DIR)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"Could not load the safety checker of {components.source!r} ({type(error).__name__}: {error}). "
            "Check your network and disk space, or turn it off knowingly (--no-safety-checker): images are then "
            "not filtered for NSFW content."
        ) from None
    return True
