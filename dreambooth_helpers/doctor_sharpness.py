"""Blur, judged on the sharpest region of the photo (the dataset doctor's `blur` check, doctor.py).

A portrait with its background deliberately out of focus (bokeh) is sharp where it matters: the subject. So the
measure looks at the 32 px tiles with the most fine detail (the in-focus region), not the frame's average, where
a large soft background pulls a sharp dog below the threshold. Thresholds and measured rates: docs/doctor.md.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Fine-to-coarse detail ratio (sharpness()) below which a photo is soft at the training size. The real photos of
# the regression set measure 1.05-2.2 (also mirrored, re-encoded, +-0.5 EV, downscaled from 2048 px, and with the
# background alone blurred); blurred by radius 2 at that size they measure 0.5-0.6, and a 2048 px photo blurred by
# radius 3 measures 0.65-0.8 at 512.
BLUR_THRESHOLD = 0.85
TILE = 32  # px at the training size
SHARPEST_SHARE = 0.1  # of the tiles: the sharpest region judged (a subject of a tenth of the frame fills it)


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur of a 2-D array, edges repeated (numpy only: no SciPy at runtime)."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(a.dtype)
    rows = np.pad(a, ((radius, radius), (0, 0)), mode="edge")
    a = sum(t * rows[k:k + a.shape[0]] for k, t in enumerate(taps))
    columns = np.pad(a, ((0, 0), (radius, radius)), mode="edge")
    return sum(t * columns[:, k:k + a.shape[1]] for k, t in enumerate(taps))


def _tile_means(a: np.ndarray, tile: int) -> np.ndarray:
    rows, cols = a.shape[0] // tile, a.shape[1] // tile
    return a[:rows * tile, :cols * tile].reshape(rows, tile, cols, tile).mean(axis=(1, 3)).ravel()


def sharpness(image: Image.Image, resolution: int = 512) -> float:
    """How much of the finest detail survives in the sharpest region, at the size training sees the photo (its
    short side at `resolution`; a smaller photo at its own size, where the resolution check speaks for it).

    Per 32 px tile, the energy of the finest band (the photo minus a radius-1 blur) and of the next band (radius 1
    minus radius 2). The tiles with real structure (coarse energy at least the median's) are ranked by their fine
    energy, and the ratio sqrt(fine / coarse) is taken over the top SHARPEST_SHARE of all tiles: in focus, edges
    carry both bands; blurred, the finest is gone. A ratio, so a darker or low-contrast photo measures the same;
    ranked by the finest band, so a subject in focus before a soft background decides (bokeh is a feature), while
    a photo soft all over has no sharp tiles to find. Noise-only tiles, flat in the coarse band, are never ranked.
    0 for a featureless image."""
    grey = image.convert("L")
    scale = resolution / min(grey.size)
    if scale < 0.999:
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))),
                           Image.Resampling.LANCZOS)
    a = np.asarray(grey, dtype=np.float32)
    if min(a.shape) < TILE:
        return 0.0
    once = _gaussian_blur(a, 1.0)
    twice = _gaussian_blur(once, 3 ** 0.5)  # blurs add in quadrature: 1 then sqrt(3) is a blur of 2
    fine, coarse = _tile_means((a - once) ** 2, TILE), _tile_means((once - twice) ** 2, TILE)
    structured = np.nonzero(coarse >= np.median(coarse))[0]
    sharpest = structured[np.argsort(fine[structured])[::-1][:max(4, round(SHARPEST_SHARE * fine.size))]]
    if coarse[sharpest].sum() < 1e-3:
        return 0.0
    return float(np.sqrt(fine[sharpest].sum() / coarse[sharpest].sum()))
