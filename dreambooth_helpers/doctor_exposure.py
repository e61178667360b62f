"""Exposure, judged where it matters (the dataset doctor's `exposure` check, doctor.py).

High-key and low-key photography is deliberate: a yellow clock on white bed sheets lit to burn out, a cat before a
dark garden. Judging the whole frame calls those "too bright" or "too dark" although the subject is well exposed.
So, in this order:
1. a subject cut out of its set (doctor_regions.subject_region: one confident blob of colours the border does not
   have): that subject is judged, and only it. Its clipping counts only where it destroys detail: pixels with two
   or more channels at the maximum (a saturated yellow or red with one channel at its maximum keeps its detail in
   the others; a washed-out one has lost it).
2. otherwise the frame, without a plain backdrop (a studio's white or black), and its centre of interest
   (centre-weighted, as a camera meters): the photo is too dark or too bright only when both are, so a dark or
   white set around a centred subject that was not cut out is not enough.
The finding says which it is: the subject itself, or the whole photo. Thresholds and measured rates: docs/doctor.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .doctor_regions import BACKDROP_TOLERANCE, _rgb_thumbnail, centre_weights, plain_backdrop, subject_region

# Too dark: mean luminance AND the brightest 1% below these (0-255), for the subject or the whole photo alike.
# Good photos, night shots included, have highlights over 150; 2 EV less light brings the set's photos to 110-135.
DARK_MEAN, DARK_HIGHLIGHT = 80.0, 145.0
# A subject cut out of its set is too dark only when even its brightest 1% stays below this: a black product or a
# dark animal, well exposed, still shows its sheen and reflections above it. The regression set's subjects measure
# 138-251; 2.5 EV darker, 76-113.
SUBJECT_DARK_HIGHLIGHT = 125.0
# The subject burnt out: this share of it with two or more channels clipped (>= 250). Well-exposed subjects on
# white, black, grey and busy sets measure 0-1%; the same subjects 2 EV brighter 17-65%.
SUBJECT_BURNT_FRACTION = 0.1
# The whole photo too bright: mean luminance above BRIGHT_MEAN, or BLOWN_FRACTION of the pixels pure white, or
# COLOUR_CLIPPED_FRACTION with a colour channel at its maximum, both on the frame and at its centre. Good photos
# reach 0.38 of the latter with a bright sky; 2 EV too much light gives 0.5-0.75.
BRIGHT_MEAN, BLOWN_FRACTION, COLOUR_CLIPPED_FRACTION = 185.0, 0.3, 0.5
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass
class Exposure:
    """What was judged ("subject" or "frame"), its numbers (0-255 and shares of it), and the verdict."""

    judged: str
    brightness: float  # mean luminance
    highlight: float  # the brightest 1%
    burnt: float  # share with two or more channels clipped (>= 250)
    white_clipped: float  # share burnt to pure white (luminance >= 250)
    colour_clipped: float  # share with a colour channel clipped (>= 252)
    subject_area: float = 0.0  # the judged subject's share of the frame (0 for the frame)
    backdrop: float = 0.0  # share of the frame left out as a plain backdrop
    verdict: str | None = None  # "dark", "bright" or None

    def measurements(self) -> dict[str, float | str | None]:
        return {"exposure_judged": self.judged, "brightness": round(self.brightness, 1),
                "highlight": round(self.highlight, 1), "burnt": round(self.burnt, 3),
                "white_clipped": round(self.white_clipped, 3), "colour_clipped": round(self.colour_clipped, 3),
                "subject_area": round(self.subject_area, 3), "backdrop": round(self.backdrop, 3),
                "exposure": self.verdict}

    def message(self) -> str:
        """One sentence saying what is wrong and with what (empty when nothing is)."""
        if self.verdict == "dark" and self.judged == "subject":
            return (f"The subject itself is too dark (mean brightness {self.brightness:.0f}/255 on the subject; its "
                    f"brightest parts reach only {self.highlight:.0f}).")
        whole = "Everything but the plain backdrop" if self.backdrop else "The whole photo"
        if self.verdict == "dark":
            return (f"{whole} is too dark (mean brightness {self.brightness:.0f}/255, even its brightest parts reach "
                    f"only {self.highlight:.0f}).")
        if self.verdict == "bright" and self.judged == "subject":
            return (f"The subject itself is burnt out ({self.burnt:.0%} of it clipped to white or nearly, mean "
                    f"brightness {self.brightness:.0f}/255 on the subject).")
        if self.verdict == "bright":
            clipped = [f"{share:.0%} {what}" for share, what in ((self.white_clipped, "of it burnt to white"),
                                                                (self.colour_clipped, "with a colour burnt out"))
                       if share >= 0.01]
            details = "".join(f"; {part}" for part in clipped)
            return f"{whole} is too bright (mean brightness {self.brightness:.0f}/255{details})."
        return ""

    def advice(self) -> str:
        if self.verdict == "dark":
            return ("Retake it with more light on the subject, or brighten it; a dark set is fine, but a dark subject "
                    "is learned as a dark, noisy subject." if self.judged == "subject" else
                    "Retake it in better light or brighten it; dark photos teach a dark, noisy subject.")
        return ("Retake it with less light on the subject or a lower exposure; a white set is fine, but burnt-out "
                "detail is learned as the subject's." if self.judged == "subject" else
                "Retake it with less light or lower exposure; washed-out colours are learned as the subject's.")


def _weighted_stats(rgb: np.ndarray, luminance: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    weights = weights / weights.sum()
    flat, order = luminance.ravel(), np.argsort(luminance.ravel())
    cumulative = np.cumsum(weights.ravel()[order])
    highest = np.sort(rgb, axis=2)

    def share(mask: np.ndarray) -> float:
        return float((weights * mask).sum())

    return {"brightness": float((weights * luminance).sum()),
            "highlight": float(flat[order][min(int(np.searchsorted(cumulative, 0.99)), flat.size - 1)]),
            "burnt": share(highest[..., 1] >= 250), "white_clipped": share(luminance >= 250),
            "colour_clipped": share(highest[..., 2] >= 252)}


def _dark(stats: dict[str, float]) -> bool:
    return stats["brightness"] < DARK_MEAN and stats["highlight"] < DARK_HIGHLIGHT


def _bright(stats: dict[str, float]) -> bool:
    return (stats["brightness"] > BRIGHT_MEAN or stats["white_clipped"] > BLOWN_FRACTION
            or stats["colour_clipped"] > COLOUR_CLIPPED_FRACTION)


def exposure(image: Image.Image) -> Exposure:
    """How the photo is exposed where it matters: its subject when one stands out of the set, else the frame
    (without a plain backdrop) and its centre of interest. See the module's docstring."""
    rgb = _rgb_thumbnail(image, 256)
    luminance = rgb @ _LUMA
    region = subject_region(image)
    if region is not None and region.trusted:
        inside, spanned = region.interior(luminance.shape), region.extent(luminance.shape)
        if inside.any():
            # Each verdict on the region that makes it hardest to give: dark across all the subject spans (with its
            # parts in the set's colours: a white belly, a cup's rim), burnt on the pixels certainly its own. When
            # the whole frame, set included, is as bad, that is what the finding says.
            stats, whole = (_weighted_stats(rgb, luminance, m.astype(np.float64)) for m in (inside, spanned))
            verdict = "dark" if whole["brightness"] < DARK_MEAN and whole["highlight"] < SUBJECT_DARK_HIGHLIGHT \
                else "bright" if stats["burnt"] > SUBJECT_BURNT_FRACTION else None
            if verdict:
                frame = _weighted_stats(rgb, luminance, np.ones(luminance.shape))
                if (_dark if verdict == "dark" else _bright)(frame):
                    return Exposure("frame", **frame, verdict=verdict)
            return Exposure("subject", **(whole if verdict == "dark" else stats), subject_area=region.area,
                            verdict=verdict)
    judged = np.ones(luminance.shape, dtype=bool)
    backdrop, backdrop_share = plain_backdrop(rgb), 0.0
    if backdrop is not None:
        # Twice the tolerance: a lit backdrop darkens towards its edges, and near-backdrop pixels say little.
        judged = np.linalg.norm(rgb - backdrop, axis=2) >= 2 * BACKDROP_TOLERANCE
        backdrop_share = float(1 - judged.mean())
        if judged.mean() < 0.005:  # nothing but backdrop: judge it all
            judged[:], backdrop_share = True, 0.0
    frame = _weighted_stats(rgb, luminance, judged.astype(np.float64))
    centre = _weighted_stats(rgb, luminance, judged * centre_weights(luminance.shape))
    verdict = "dark" if _dark(frame) and _dark(centre) else "bright" if _bright(frame) and _bright(centre) else None
    return Exposure("frame", **frame, backdrop=backdrop_share, verdict=verdict)
