"""The encoders behind the DreamBooth paper's subject numbers, and those numbers: DINO, CLIP-I and CLIP-T.

The paper (Ruiz et al. 2022, section 4.1) compares generated images with the subject's real photos and prompts:

- DINO: mean cosine similarity between DINO ViT-S/16 embeddings of generated and real subject images.
  DINO is trained without labels, so it tells apart two dogs of one breed: the paper's preferred
  subject-fidelity metric.
- CLIP-I: the same with CLIP image embeddings (subject fidelity, coarser).
- CLIP-T: mean cosine similarity between each image and the CLIP embedding of its prompt (prompt fidelity).

The encoders sit behind two small classes (`DinoImageEncoder`, `ClipEncoder`), bundled as `Encoders`, so tests
and offline runs use tiny random ones (`build_tiny_encoders`) and Colab uses the real Hub models
(`load_encoders("paper")`). `score_images` and `real_image_scores` compute the numbers; evaluation.py runs the
protocol around them and eval_diversity.py measures the class prior (DIV and PRES) with the same DINO.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError, ModelLoadError

DINO_MODEL = "facebook/dino-vits16"
# The paper does not name its CLIP variant; ViT-B/32 is the usual choice when its table is reproduced.
# Larger CLIPs give lower raw CLIP-T, so compare numbers only between runs that used the same encoder.
CLIP_MODEL = "openai/clip-vit-base-patch32"
ENCODER_CHOICES = ("paper", "tiny")
DEFAULT_ENCODERS = "paper"  # the real DINO and CLIP; "tiny" tests the pipeline offline

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------- encoders


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _pixels(images: Sequence[Image.Image], crop: int, resize: int, mean, std) -> torch.Tensor:
    """Resize the shorter side to `resize` (bicubic), centre-crop to `crop`, normalise: (N, 3, crop, crop)."""
    batch = []
    for image in images:
        image = image.convert("RGB")
        scale = resize / min(image.size)
        w, h = max(crop, round(image.width * scale)), max(crop, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - crop) // 2, (h - crop) // 2
        batch.append(np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0)
    array = (np.stack(batch) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _prepare(model: torch.nn.Module, device, dtype) -> tuple[torch.nn.Module, torch.device, torch.dtype]:
    """Put an encoder on `device`; fp16 on a GPU (half the memory, ~2x faster), fp32 on the CPU."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), device, dtype


class DinoImageEncoder:
    """DINO ViT image embeddings: the [CLS] token of the last layer, L2-normalised."""

    def __init__(self, model: torch.nn.Module, *, name: str, device=None, dtype=None, batch_size: int = 32):
        self.model, self.device, self.dtype = _prepare(model, device, dtype)
        self.name, self.batch_size = name, batch_size
        self.crop = int(model.config.image_size)
        self.resize = round(self.crop * 256 / 224)  # DINO's evaluation transform: resize 256, crop 224

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = _pixels(images[start:start + self.batch_size], self.crop, self.resize, IMAGENET_MEAN, IMAGENET_STD)
            hidden = self.model(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
            chunks.append(hidden[:, 0].float().cpu())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


class ClipEncoder:
    """CLIP image and text embeddings in the shared projection space, L2-normalised."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, name: str, device=None, dtype=None, batch_size: int = 32):
        self.model, self.device, self.dtype = _prepare(model, device, dtype)
        self.tokenizer, self.name, self.batch_size = tokenizer, name, batch_size
        self.crop = int(model.config.vision_config.image_size)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = _pixels(images[start:start + self.batch_size], self.crop, self.crop, CLIP_MEAN, CLIP_STD)
            # vision_model + visual_projection directly: get_image_features changed its return type in
            # transformers 5, these two did not.
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
            chunks.append(self.model.visual_projection(pooled).float().cpu())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size]), padding="max_length", truncation=True,
                                    max_length=self.tokenizer.model_max_length, return_tensors="pt")
            pooled = self.model.text_model(input_ids=tokens.input_ids.to(self.device),
                                           attention_mask=tokens.attention_mask.to(self.device)).pooler_output
            chunks.append(self.model.text_projection(pooled).float().cpu())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


@dataclass
class Encoders:
    """What the metrics need: DINO for DINO, CLIP for CLIP-I and CLIP-T."""

    dino: DinoImageEncoder
    clip: ClipEncoder
    weights: str  # "paper" (real Hub models) or "tiny" (random weights: tests the pipeline, numbers mean nothing)

    @property
    def description(self) -> str:
        return f"DINO {self.dino.name}, CLIP {self.clip.name} on {self.dino.device} ({str(self.dino.dtype)[6:]})"


def build_tiny_encoders(seed: int = 0, *, device=None, dtype=None, image_size: int = 32) -> Encoders:
    """Small random DINO-shaped ViT and CLIP models built in code: no download, for tests and offline runs."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from .models import _seeded, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    with _seeded(seed):
        # ViT-S/16's layout (patch tokens + [CLS], no pooler), scaled down.
        dino = ViTModel(ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64), add_pooling_layer=False)
        clip = CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4),
            projection_dim=32,
        ))
    return Encoders(DinoImageEncoder(dino, name="tiny-random-dino", device=device, dtype=dtype),
                    ClipEncoder(clip, tokenizer, name="tiny-random-clip", device=device, dtype=dtype), weights="tiny")


def load_encoders(which: str = DEFAULT_ENCODERS, *, device=None, dtype=None, dino_model: str = DINO_MODEL,
                  clip_model: str = CLIP_MODEL, batch_size: int = 32) -> Encoders:
    """The metric encoders: "paper" downloads DINO ViT-S/16 and CLIP from the Hub; "tiny" builds random ones."""
    if which == "tiny":
        return build_tiny_encoders(device=device, dtype=dtype)
    if which != "paper":
        raise ConfigError(f"--encoders {which!r}: choose one of {', '.join(ENCODER_CHOICES)}.")
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

    try:
        dino = ViTModel.from_pretrained(dino_model, add_pooling_layer=False)
        clip = CLIPModel.from_pretrained(clip_model)
        tokenizer = CLIPTokenizer.from_pretrained(clip_model)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"Could not load the evaluation encoders ({dino_model}, {clip_model}) from the Hugging Face Hub "
            f"({type(error).__name__}). They download once (~0.7 GB) and need a network; on Colab this works. "
            "Offline, pass --encoders tiny (encoders=\"tiny\") to test the evaluation end to end: its numbers "
            "are meaningless."
        ) from None
    return Encoders(DinoImageEncoder(dino, name=dino_model, device=device, dtype=dtype, batch_size=batch_size),
                    ClipEncoder(clip, tokenizer, name=clip_model, device=device, dtype=dtype, batch_size=batch_size),
                    weights="paper")


def as_encoders(encoders: Encoders | str | None) -> Encoders:
    """`encoders` as given, or loaded by name ("paper", "tiny"; None: DEFAULT_ENCODERS)."""
    if isinstance(encoders, Encoders):
        return encoders
    return load_encoders(encoders or DEFAULT_ENCODERS)


# ---------------------------------------------------------------------------- the subject numbers: DINO, CLIP-I, CLIP-T


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt to generate from, and the text CLIP-T compares the image with (identifier removed:
    CLIP has never seen "sks", so keeping it would only add noise)."""

    prompt: str
    clip_text: str


def mean_cosine(a: torch.Tensor, b: torch.Tensor, *, exclude_diagonal: bool = False) -> float:
    """Mean cosine similarity over all pairs of rows of `a` and `b` (both already L2-normalised).

    With `exclude_diagonal`, `a` and `b` are the same set and self-pairs (always 1.0) are left out.
    """
    sims = (a @ b.T).clamp(-1, 1)
    if exclude_diagonal:
        n = sims.shape[0]
        if n < 2:
            return float("nan")
        return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))
    return float(sims.mean())


@dataclass
class PromptScores:
    prompt: str
    dino: float
    clip_i: float
    clip_t: float


@dataclass
class SubjectScores:
    """The paper's three numbers for one model (each a mean over all images), and per prompt."""

    dino: float
    clip_i: float
    clip_t: float
    num_images: int
    num_real_images: int
    per_prompt: list[PromptScores] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_images(generated: Sequence[Sequence[Image.Image]], prompts: Sequence[EvalPrompt],
                 real_images: Sequence[Image.Image], encoders: Encoders) -> SubjectScores:
    """DINO, CLIP-I and CLIP-T for `generated[i]`, the images made from `prompts[i]`.

    Every image is embedded once, in batches; similarities are plain matrix products.
    """
    if len(generated) != len(prompts):
        raise ValueError(f"{len(generated)} image groups for {len(prompts)} prompts")
    if not real_images:
        raise ConfigError("No real images to compare with: give the folder with your subject's photos.")
    flat = [image for group in generated for image in group]
    if not flat:
        raise ConfigError("No generated images to score: images per prompt must be at least 1.")
    owner = torch.tensor([i for i, group in enumerate(generated) for _ in group])
    real_dino, real_clip = encoders.dino.embed_images(real_images), encoders.clip.embed_images(real_images)
    gen_dino, gen_clip = encoders.dino.embed_images(flat), encoders.clip.embed_images(flat)
    texts = encoders.clip.embed_texts([p.clip_text for p in prompts])
    # Clamped: float rounding can put the cosine of identical unit vectors a hair above 1.
    dino_per_image = (gen_dino @ real_dino.T).clamp(-1, 1).mean(dim=1)  # each generated image vs every real one
    clip_i_per_image = (gen_clip @ real_clip.T).clamp(-1, 1).mean(dim=1)
    clip_t_per_image = (gen_clip * texts[owner]).sum(dim=1).clamp(-1, 1)  # each image against its own prompt
    per_prompt = []
    for i, prompt in enumerate(prompts):
        mine = owner == i
        if mine.any():
            per_prompt.append(PromptScores(prompt.prompt, float(dino_per_image[mine].mean()),
                                           float(clip_i_per_image[mine].mean()), float(clip_t_per_image[mine].mean())))
    return SubjectScores(float(dino_per_image.mean()), float(clip_i_per_image.mean()), float(clip_t_per_image.mean()),
                         num_images=len(flat), num_real_images=len(real_images), per_prompt=per_prompt)


def real_image_scores(real_images: Sequence[Image.Image], encoders: Encoders) -> dict[str, float | None]:
    """Your photos compared with each other (distinct pairs): this subject's ceiling, like the paper's
    "real images" row. Needs at least two photos."""
    if len(real_images) < 2:
        return {"dino": None, "clip_i": None}
    return {"dino": mean_cosine(*(2 * [encoders.dino.embed_images(real_images)]), exclude_diagonal=True),
            "clip_i": mean_cosine(*(2 * [encoders.clip.embed_images(real_images)]), exclude_diagonal=True)}
