"""Library notes that ask the user for nothing, dropped where they are logged.

transformers 5 names its torchvision image processors `CLIPImageProcessor`, `SiglipImageProcessor`, ...; without
torchvision, looking such a name up falls back to the PIL class and warns ("`CLIPImageProcessor` requires
torchvision (not installed); falling back to `CLIPImageProcessorPil` ... Install torchvision"). diffusers looks
both names up as soon as a Stable Diffusion pipeline is imported, so every `generate`, sample and class image
printed two such lines, although the PIL class is exactly right here: the only image processor this project uses
is the safety checker's, on a few images at a time. Installing torchvision (a second large download that must
match torch's build) is not the answer, so only that one note is filtered out, on the one logger that writes it;
every other transformers warning still shows.

`drop_torchvision_fallback_notes()` runs when this module is imported, which the package does first
(dreambooth_helpers/__init__.py), before anything imports diffusers: a logging filter needs no import of
transformers to be installed.
"""

from __future__ import annotations

import logging

TRANSFORMERS_IMPORT_LOGGER = "transformers.utils.import_utils"
TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_FALLBACK not in record.getMessage()


def drop_torchvision_fallback_notes() -> None:
    """Filter transformers' "requires torchvision (not installed); falling back to ...Pil" warning (idempotent)."""
    logger = logging.getLogger(TRANSFORMERS_IMPORT_LOGGER)
    if not any(isinstance(existing, _DropTorchvisionFallback) for existing in logger.filters):
        logger.addFilter(_DropTorchvisionFallback())


drop_torchvision_fallback_notes()
