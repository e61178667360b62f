"""Noise a newcomer sees and can do nothing about (issue 30, item 6): transformers' torchvision notes when a
pipeline is imported, and setuptools' warning when scripts/install.sh installs the project."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dreambooth_helpers.library_notes import TRANSFORMERS_IMPORT_LOGGER, drop_torchvision_fallback_notes

ROOT = Path(__file__).resolve().parent.parent


def test_only_the_torchvision_fallback_note_is_dropped():
    drop_torchvision_fallback_notes()
    drop_torchvision_fallback_notes()  # idempotent: one filter
    logger = logging.getLogger(TRANSFORMERS_IMPORT_LOGGER)
    assert len([f for f in logger.filters if type(f).__name__ == "_DropTorchvisionFallback"]) == 1
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                       "`CLIPImageProcessorPil` for backward compatibility.")
        logger.warning("Some other transformers warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Some other transformers warning"]


@pytest.mark.slow  # a fresh interpreter importing diffusers' pipelines: ~10 s
def test_importing_the_pipelines_through_the_package_prints_no_torchvision_notes(tmp_path):
    code = ("import dreambooth_helpers\n"
            "from dreambooth_helpers.families import family_of\n"
            "import diffusers, transformers\n"
            "diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline\n"
            "from transformers import CLIPImageProcessor\n")
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "requires torchvision" not in done.stderr + done.stdout


@pytest.mark.slow  # builds the editable wheel as scripts/install.sh does: ~5 s
def test_the_editable_install_builds_without_a_setuptools_warning(tmp_path):
    """scripts/install.sh's `pip install -e .` printed setuptools' "Editable installation ... Please be careful with
    folders in your working directory" warning; pyproject's package-dir makes it a plain .pth entry instead."""
    source = tmp_path / "source"
    (source / "dreambooth_helpers").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copy(ROOT / "dreambooth_helpers" / "__init__.py", source / "dreambooth_helpers" / "__init__.py")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-e", str(source), "--target", str(tmp_path / "installed")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    output = (done.stdout + done.stderr).replace("WARNING: Location", "")  # a machine's unused index, not setuptools
    assert "Warning" not in output and "careful" not in output, output
    [pth] = (tmp_path / "installed").glob("__editable__.*.pth")
    assert pth.read_text().strip() == str(source)
