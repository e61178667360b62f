"""dreambooth-helpers: teach Stable Diffusion 1.x a new subject from a few photos, on a free Colab T4."""

from . import library_notes  # noqa: F401  (first: it quiets a transformers note before diffusers is imported)
from .app import AppLimits, TrainingApp
from .app_launch import RunningApp, launch_app
from .config import PRESETS, Concept, TrainConfig
from .data import DatasetReport, load_instance_images, prepare_image, read_images
from .demo import RunningDemo, launch_demo
from .demo_api import DemoLimits
from .doctor import DoctorReport, Finding, check_images, diagnose
from .errors import (
    ConfigError,
    DreamBoothError,
    GenerationError,
    HubError,
    ImageDataError,
    ModelLoadError,
    TrainingError,
)
from .eval_encoders import build_tiny_encoders, load_encoders
from .evaluation import CheckpointComparison, EvaluationReport, choose_checkpoint, evaluate_checkpoints, evaluate_model
from .export import export_single_file
from .hub import build_model_card, push_to_hub, stage_for_upload
from .inference import GeneratedImage, Generator, generate, image_grid, load_generator, save_images
from .jobs import Job, JobError, JobRunner
from .models import SDComponents, build_sd15_shaped_components, build_tiny_components, load_components

__version__ = "0.1.0"

__all__ = [
    "AppLimits",
    "Job",
    "JobError",
    "JobRunner",
    "RunningApp",
    "TrainingApp",
    "launch_app",
    "CheckpointComparison",
    "DoctorReport",
    "EvaluationReport",
    "Finding",
    "build_tiny_encoders",
    "choose_checkpoint",
    "diagnose",
    "evaluate_checkpoints",
    "evaluate_model",
    "load_encoders",
    "DemoLimits",
    "GeneratedImage",
    "GenerationError",
    "Generator",
    "HubError",
    "RunningDemo",
    "build_model_card",
    "export_single_file",
    "generate",
    "image_grid",
    "launch_demo",
    "load_generator",
    "push_to_hub",
    "save_images",
    "stage_for_upload",
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
