"""Loading Stable Diffusion 1.x, and building models in code.

`load_components(name)` is the one entry point: a Hub id, a local diffusers folder, a single
`.safetensors`/`.ckpt` file, `"tiny"` (a small random Stable Diffusion built from a fixed seed,
used offline and by the tests) or `"sd15-random"` (SD 1.5's exact shapes with random weights, for
memory and speed measurements without a download).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TINY_MODEL, TOY_MODEL
from .errors import ModelLoadError

# "tiny" (random weights, for tests) and "toy": the toy-world model trained by scripts/train_toy_model.py and
# shipped in the package, small but it draws. The names live in config, which validates them.
TOY_MODEL_DIR = Path(__file__).resolve().parent / "toy_model"
SD15_RANDOM = "sd15-random"
TINY_RESOLUTION = 64
TOY_RESOLUTION = 32
SD_RESOLUTION = 512
# What the built-in models draw, known before they load (the demo shows it while loading).
OFFLINE_RESOLUTIONS = {TINY_MODEL: TINY_RESOLUTION, TOY_MODEL: TOY_RESOLUTION}
# Repositories users still type from old tutorials, and where the weights live now.
MOVED_REPOS = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
# SD 1.x noise schedule: 1000 steps, "scaled_linear" betas from 0.00085 to 0.012.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion 1.x model that training and generation need."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any  # DDPM, for adding noise during training
    scheduler: Any  # the model's own inference scheduler
    source: str  # what was loaded, for summaries and model cards
    native_resolution: int = SD_RESOLUTION

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


# ---------------------------------------------------------------------------- models built in code


@contextlib.contextmanager
def _seeded(seed: int):
    """Run with a fixed global seed, then restore the caller's RNG (model constructors use it)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _schedulers(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler, PNDMScheduler

    noise = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, clip_sample=False)
    inference = PNDMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    return noise, inference


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


def load_components(model: str, *, seed: int = 0) -> SDComponents:
    """Load SD 1.x from `model`: "tiny", "sd15-random", a local folder or file, or a Hub id.

    Weights load in fp32: training keeps trainable weights in fp32 and casts frozen ones itself.
    """
    if model == TINY_MODEL:
        return build_tiny_components(seed)
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
        return _load_single_file(path)
    if path.is_dir():
        return _load_diffusers_folder(str(path), local=True)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"--model {model!r}: no such file or folder. Check the path, or give a Hub id "
                             "such as stable-diffusion-v1-5/stable-diffusion-v1-5.")
    if model in MOVED_REPOS:
        raise ModelLoadError(f"--model {model!r} was removed from the Hugging Face Hub in 2024. "
                             f"Use --model {MOVED_REPOS[model]} (the same weights).")
    return _load_diffusers_folder(model, local=False)


def _load_diffusers_folder(where: str, *, local: bool) -> SDComponents:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if local and not Path(where, "unet").is_dir():
        raise ModelLoadError(
            f"{where!r} is not a diffusers model folder (no unet/ inside). Give the folder that holds "
            "model_index.json, unet/, vae/, text_encoder/ and tokenizer/."
        )
    try:
        tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet")
        scheduler_config = DDPMScheduler.load_config(where, subfolder="scheduler")
    except (OSError, ValueError) as error:
        raise ModelLoadError(_load_advice(where, local, error)) from None
    noise_scheduler = DDPMScheduler.from_config(scheduler_config, clip_sample=False)
    scheduler = _inference_scheduler_from_config(scheduler_config)
    resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return SDComponents(tokenizer, text_encoder, vae, unet, noise_scheduler, scheduler,
                        source=where, native_resolution=resolution)


def _inference_scheduler_from_config(config: dict):
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"), diffusers.PNDMScheduler)
    return cls.from_config(config)


def _load_single_file(path: Path) -> SDComponents:
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ModelLoadError(f"--model {str(path)!r}: a single-file model must be .safetensors or .ckpt.")
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None)
    except Exception as error:  # diffusers raises many types here; all mean "could not read this file"
        raise ModelLoadError(
            f"Could not load {str(path)!r} as a Stable Diffusion 1.x checkpoint ({type(error).__name__}: "
            f"{error}). Single files need the model's config from the Hub the first time; offline, convert it "
            "to a diffusers folder elsewhere and pass that folder."
        ) from None
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return SDComponents(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, noise_scheduler, pipe.scheduler,
                        source=str(path))


def _load_advice(where: str, local: bool, error: Exception) -> str:
    if local:
        return (f"Could not read the model in {where!r}: {error}. The folder may be incomplete; "
                "re-download or re-save it.")
    return (
        f"Could not load {where!r} from the Hugging Face Hub ({type(error).__name__}). Check the spelling "
        "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), your network, and for gated models that you are "
        "logged in and accepted the license. Without a network, use --model tiny or a local folder."
    )


def make_pipeline(components: SDComponents, *, unet=None, text_encoder=None):
    """A StableDiffusionPipeline over these components (optionally with trained replacements).

    The safety checker is left out: it turns many harmless images black and adds 1.2 GB.
    """
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=components.vae, text_encoder=text_encoder or components.text_encoder, tokenizer=components.tokenizer,
        unet=unet or components.unet, scheduler=components.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
