"""What prior preservation protects, measured: DIV and PRES of the class prompt's images, before and after.

Prior preservation is meant to keep the class itself ("a photo of dog") as the base model drew it. The
DreamBooth paper (Table 3) measures that with two numbers on class-prompt samples: PRES, the mean DINO
similarity between them and the subject's photos (lower: ordinary dogs look less like yours), and DIV, the
mean pairwise LPIPS between them (higher: more varied). Here both are measured on the base model (before) and
the trained one (after), with the same seeds: `class_prior_scores`, whose `ClassPriorScores.verdict` says
whether the class is collapsing; `class_comparison_grid` draws the two side by side.

DIV's distance: LPIPS (`LpipsDistance`) needs the `lpips` package and AlexNet's weights; when it cannot load,
an offline colour-histogram + SSIM stand-in (`HistogramSsimDistance`) takes its place
(`load_perceptual_distance`). PRES uses eval_encoders.py's DINO; evaluation.py puts both in its report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError, ModelLoadError
from .eval_encoders import Encoders, default_device, mean_cosine
from .grids import labelled_grid

# Table 3 of the paper (Imagen).
PAPER_PRIOR_FIGURES: dict[str, dict[str, float]] = {
    "DreamBooth (Imagen) with prior preservation, paper": {"pres": 0.493, "div": 0.391},
    "DreamBooth (Imagen) without prior preservation, paper": {"pres": 0.664, "div": 0.371},
}
DEFAULT_CLASS_SAMPLES = 16  # class-prompt images per model: 120 pairs for DIV
DISTANCE_CHOICES = ("auto", "lpips", "histogram-ssim")
# Below this share of the base model's DIV, the report says the class is collapsing (see docs/evaluation.md).
DIV_COLLAPSE_RATIO = 0.8
_STAND_IN_SIZE = 64  # the stand-in compares 64 px copies: colours and layout, not texture


class LpipsDistance:
    """LPIPS (Zhang et al. 2018, AlexNet), the paper's DIV distance: needs the `lpips` package, whose wheel ships
    its linear layers, and torchvision's ImageNet AlexNet, which downloads once."""

    name = "LPIPS (AlexNet)"

    def __init__(self, device=None):
        import lpips  # optional: pip install lpips

        self.device = torch.device(device) if device is not None else default_device()
        self.model = lpips.LPIPS(net="alex", verbose=False).to(self.device).eval()

    @torch.inference_mode()
    def pairwise(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = torch.stack([torch.from_numpy(np.asarray(image.convert("RGB").resize((256, 256)), np.float32))
                              for image in images]).permute(0, 3, 1, 2) / 127.5 - 1.0
        pixels = pixels.to(self.device)
        n = len(images)
        distances = np.zeros((n, n))
        for i in range(n - 1):  # image i against every later one, in one batch
            row = self.model(pixels[i:i + 1].expand(n - i - 1, -1, -1, -1), pixels[i + 1:]).flatten().float().cpu()
            distances[i, i + 1:] = distances[i + 1:, i] = row.numpy()
        return distances


class HistogramSsimDistance:
    """The offline stand-in for LPIPS: half colour, half structure, each from 0 (same) to 1.

    - colour: total-variation distance between the two images' RGB histograms (8 levels per channel);
    - structure: (1 - SSIM) / 2 of their grey 64 px copies (SSIM with 7 px windows, Wang et al. 2004).
    It needs no weights, so it runs anywhere; it sees colour and layout, not texture or identity, so its numbers
    are not on LPIPS's scale: compare before with after, not with the paper.
    """

    name = "colour histogram + SSIM (offline stand-in for LPIPS)"
    BINS = 8

    def _features(self, image: Image.Image) -> tuple[np.ndarray, torch.Tensor]:
        small = np.asarray(image.convert("RGB").resize((_STAND_IN_SIZE, _STAND_IN_SIZE), Image.Resampling.BILINEAR))
        cells = (small.reshape(-1, 3).astype(np.int64) * self.BINS) // 256
        index = (cells[:, 0] * self.BINS + cells[:, 1]) * self.BINS + cells[:, 2]
        histogram = np.bincount(index, minlength=self.BINS**3) / index.size
        grey = torch.from_numpy(small.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0)
        return histogram, grey[None, None]

    @staticmethod
    def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
        """Mean SSIM of two (1, 1, H, W) images in [0, 1], uniform windows, the usual constants."""
        c1, c2 = 0.01**2, 0.03**2
        mean = torch.nn.functional.avg_pool2d
        mu_a, mu_b = mean(a, window, 1), mean(b, window, 1)
        var_a = mean(a * a, window, 1) - mu_a**2
        var_b = mean(b * b, window, 1) - mu_b**2
        cov = mean(a * b, window, 1) - mu_a * mu_b
        ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        return float(ssim.mean())

    def distance(self, a: Image.Image, b: Image.Image) -> float:
        (hist_a, grey_a), (hist_b, grey_b) = self._features(a), self._features(b)
        colour = 0.5 * np.abs(hist_a - hist_b).sum()
        structure = (1.0 - self.ssim(grey_a, grey_b)) / 2.0
        return float(0.5 * colour + 0.5 * structure)

    def pairwise(self, images: Sequence[Image.Image]) -> np.ndarray:
        features = [self._features(image) for image in images]
        n = len(images)
        distances = np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                colour = 0.5 * np.abs(features[i][0] - features[j][0]).sum()
                structure = (1.0 - self.ssim(features[i][1], features[j][1])) / 2.0
                distances[i, j] = distances[j, i] = 0.5 * colour + 0.5 * structure
        return distances


def load_perceptual_distance(which: str = "auto", *, device=None):
    """The DIV distance: "lpips" (the paper's; fails with a clear error when it cannot load), "histogram-ssim"
    (the offline stand-in), or "auto": LPIPS when the `lpips` package and its backbone's weights load, else the
    stand-in (the report names the one used)."""
    if which not in DISTANCE_CHOICES:
        raise ConfigError(f"--diversity-distance {which!r}: choose one of {', '.join(DISTANCE_CHOICES)}.")
    if which == "histogram-ssim":
        return HistogramSsimDistance()
    try:
        return LpipsDistance(device)
    except Exception as error:  # ImportError without the package; a network or file error for AlexNet's weights
        if which == "lpips":
            raise ModelLoadError(
                f"LPIPS could not be loaded ({type(error).__name__}: {error}). It needs `pip install lpips` and "
                "torchvision's ImageNet AlexNet weights, which download once. Offline, use --diversity-distance "
                "histogram-ssim (or auto, which falls back to it)."
            ) from None
        return HistogramSsimDistance()


def diversity(images: Sequence[Image.Image], distance) -> float:
    """DIV: the mean `distance` over every distinct pair of `images` (higher: more varied)."""
    if len(images) < 2:
        raise ConfigError(f"Diversity needs at least 2 class images (got {len(images)}); use --class-samples 2 or "
                          "more (16 by default).")
    pairwise = distance.pairwise(images)
    n = len(images)
    return float(pairwise[np.triu_indices(n, k=1)].mean())


def preservation_score(class_images: Sequence[Image.Image], real_images: Sequence[Image.Image],
                       encoders: Encoders) -> float:
    """PRES: mean DINO cosine similarity between class-prompt images and the subject's photos (lower: ordinary
    members of the class look less like your subject)."""
    return mean_cosine(encoders.dino.embed_images(class_images), encoders.dino.embed_images(real_images))


@dataclass
class ClassPriorScores:
    """DIV and PRES of the class prompt's images, on the base model (before) and the trained model (after)."""

    class_prompt: str
    num_samples: int
    distance: str  # which DIV distance: LPIPS or the stand-in
    div_after: float
    pres_after: float | None
    div_before: float | None = None  # None when the base model is unknown or not loaded
    pres_before: float | None = None
    base_model: str | None = None

    @property
    def div_ratio(self) -> float | None:
        """DIV after over DIV before: 1 means the class kept its variety; under DIV_COLLAPSE_RATIO it is collapsing."""
        if self.div_before is None or self.div_before <= 0:
            return None
        return self.div_after / self.div_before

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "div_ratio": self.div_ratio}

    def verdict(self) -> str:
        ratio = self.div_ratio
        if ratio is None:
            return "No base model to compare with: DIV and PRES are shown for this model only."
        if ratio < DIV_COLLAPSE_RATIO:
            return (f"The class is collapsing: its images are {ratio:.2f}x as varied as the base model's (under "
                    f"{DIV_COLLAPSE_RATIO}x). Stop text-encoder training early (--stop-text-encoder-training-at), "
                    "lower the learning rate, or train fewer steps; see docs/evaluation.md.")
        return f"The class kept its variety: {ratio:.2f}x the base model's DIV."

    def markdown_lines(self, cell, grid_path: str | None = None) -> list[str]:
        """The report's section on the class prior; `cell` formats a number, `grid_path` is
        `class_comparison_grid`'s image once saved."""
        lines = [f"## What prior preservation protects: \"{self.class_prompt}\"", "",
                 f"{self.num_samples} images of the class prompt per model, the same seeds before and after. "
                 "PRES: DINO similarity of the class images to your photos (lower: ordinary members of the class "
                 f"look less like your subject). DIV: mean pairwise distance between them, {self.distance} "
                 "(higher: more varied).", "", "| | PRES | DIV |", "| --- | --- | --- |"]
        if self.div_before is not None:
            lines.append(f"| base model `{self.base_model}` (before) | {cell(self.pres_before)} | "
                         f"{cell(self.div_before)} |")
        lines.append(f"| **this model** (after) | {cell(self.pres_after)} | {cell(self.div_after)} |")
        lines += [f"| {name} | {v['pres']:.3f} | {v['div']:.3f} |" for name, v in PAPER_PRIOR_FIGURES.items()]
        lines += ["", self.verdict()]
        if "LPIPS" not in self.distance:
            lines.append("DIV here uses the offline stand-in, not LPIPS: compare before with after, not with the "
                         "paper's DIV.")
        if grid_path:
            lines += ["", f"![class images before and after]({Path(grid_path).name})"]
        return lines


def class_prior_scores(after: Sequence[Image.Image], class_prompt: str, *, before: Sequence[Image.Image] = (),
                       real_images: Sequence[Image.Image] = (), encoders: Encoders | None = None, distance=None,
                       base_model: str | None = None) -> ClassPriorScores:
    """DIV (and PRES, given `encoders` and `real_images`) of the trained model's class images `after`, and of
    the base model's `before` (same seeds) when given."""
    distance = distance or load_perceptual_distance()
    with_pres = encoders is not None and len(real_images) > 0
    return ClassPriorScores(
        class_prompt, len(after), distance.name, diversity(after, distance),
        preservation_score(after, real_images, encoders) if with_pres else None,
        diversity(before, distance) if before else None,
        preservation_score(before, real_images, encoders) if with_pres and before else None, base_model)


def class_comparison_grid(before: Sequence[Image.Image], after: Sequence[Image.Image], class_prompt: str,
                          cell: int = 128) -> Image.Image:
    """The class prompt's images before and after training, one row each; column j of both rows comes from
    the same seed, so each column shows what training did to one picture."""
    return labelled_grid([(f'before training: "{class_prompt}"', list(before)),
                          (f'after training: "{class_prompt}"', list(after))], cell=cell)
