"""Shared fixtures: small photo sets drawn in code, and a fast config for the tiny model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The toy-world tooling (scripts/toyworld.py) is not part of the installed package; tests import it as
# `toyworld`, the way the scripts next to it do.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))


def draw_subject(path: Path, index: int, size: tuple[int, int] = (96, 96)) -> Path:
    """A red disc with a black bar on a coloured background: distinct per index, sharp edges."""
    image = Image.new("RGB", size, (40 + 50 * (index % 4), 140, 210 - 30 * (index % 3)))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w * 0.2 + 3 * index, h * 0.2, w * 0.7 + 3 * index, h * 0.7), fill=(210, 30, 30))
    draw.rectangle((w * 0.05, h * 0.1, w * 0.15, h * 0.9), fill=(0, 0, 0))
    draw.line((0, h - 1 - 5 * index, w, 5 * index), fill=(255, 255, 0), width=3)
    image.save(path)
    return path


@pytest.fixture
def instance_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "instance"
    folder.mkdir()
    for i in range(4):
        draw_subject(folder / f"photo{i}.png", i)
    return folder


@pytest.fixture
def make_config(tmp_path: Path, instance_dir: Path):
    """A TrainConfig for the tiny model that trains in a few seconds on a CPU."""
    from dreambooth_helpers import Concept, TrainConfig

    def make(**overrides):
        settings = dict(
            concepts=[Concept(str(instance_dir), "a photo of sks dog", "a photo of dog")],
            output_dir=str(tmp_path / "out"), model="tiny", resolution=32, num_class_images=2,
            class_images_steps=2, max_train_steps=4, mixed_precision="no", sample_steps=2,
        )
        preset = overrides.pop("preset", "t4")
        settings.update(overrides)
        return TrainConfig.from_preset(preset, **settings)

    return make


@pytest.fixture
def fake_api(monkeypatch):
    """The Hub client replaced by tests/test_hub.py's FakeHfApi (calls, tokens and uploads recorded), no token."""
    from dreambooth_helpers import hub
    from tests.test_hub import FakeHfApi

    FakeHfApi.calls, FakeHfApi.tokens, FakeHfApi.uploaded = [], [], {}
    FakeHfApi.fail_with = FakeHfApi.fail_upload_with = None
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return FakeHfApi
