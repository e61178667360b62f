"""dreambooth-helpers: teach Stable Diffusion 1.x a new subject from a few photos, on a free Colab T4."""

from .config import PRESETS, Concept, TrainConfig
from .data import DatasetReport, check_images, load_instance_images, prepare_image, read_images
from .errors import ConfigError, DreamBoothError, ImageDataError, ModelLoadError, TrainingError
from .models import SDComponents, build_sd15_shaped_components, build_tiny_components, load_components

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Concept",
    "ConfigError",
    "DatasetReport",
    "DreamBoothError",
    "ImageDataError",
    "ModelLoadError",
    "SDComponents",
    "TrainConfig",
    "TrainingError",
    "build_sd15_shaped_components",
    "build_tiny_components",
    "check_images",
    "load_components",
    "load_instance_images",
    "prepare_image",
    "read_images",
]
