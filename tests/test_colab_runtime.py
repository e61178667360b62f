"""Colab's runtime as data (colab/runtime.txt): it parses, our declared versions admit it, and, inside the Colab
environment that scripts/colab_env.sh builds, the notebook's install step leaves Colab's packages as they were.

The first part runs anywhere. The second needs the freezes colab_env.sh records in .venv-colab and is skipped
elsewhere:

    bash scripts/colab_env.sh && .venv-colab/bin/python -m pytest -p no:xdist -q tests/test_colab_runtime.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import colab_runtime  # scripts/, on the path through conftest.py
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from dreambooth_helpers.colab_install import PROTECTED_PACKAGES

REPO = Path(__file__).resolve().parent.parent
RUNTIME = colab_runtime.read_runtime()
normalize = colab_runtime.normalize

# What the issue states of Colab's GPU image of 2026-08-19: the data file must say the same.
ISSUE_VERSIONS = {
    "torch": "2.11.0+cu128", "torchvision": "0.26.0+cu128", "torchaudio": "2.11.0+cu128", "diffusers": "0.39.0",
    "transformers": "5.15.0", "accelerate": "1.14.0", "huggingface_hub": "1.27.0", "peft": "0.20.0",
    "gradio": "6.24.0", "numpy": "2.1.3", "pillow": "11.3.0", "matplotlib": "3.10.0", "ipython": "7.34.0",
    "ipywidgets": "7.7.1",
}
# The library's own dependencies: it must run on Colab's versions of them, not on upgraded ones.
LIBRARIES_AT_COLAB_VERSIONS = ("diffusers", "transformers", "accelerate", "huggingface_hub", "peft", "gradio",
                               "safetensors", "tokenizers", "pillow", "matplotlib", "fastapi", "uvicorn", "tqdm")


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(line) for line in project["dependencies"] + [r for group in extras.values() for r in group]]


def lower_bound(requirement: Requirement) -> Version | None:
    bounds = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
    return max(bounds) if bounds else None


def requirements_txt_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
        if match:
            pins[normalize(match[1])] = match[2]
    return pins


# ------------------------------------------------------------------------------------------ the data, anywhere


def test_runtime_file_names_its_source_image_and_python():
    header = RUNTIME.header
    assert "googlecolab/backend-info" in header["source"] and "pip-freeze.gpu.txt" in header["source"]
    assert header["image"] == "2026-08-19"
    assert header["python"] == "3.13.15"
    assert header["python-stand-in"].startswith("3.11")


def test_runtime_file_has_the_versions_the_issue_states():
    assert {name: RUNTIME.colab_version(name) for name in ISSUE_VERSIONS} == ISSUE_VERSIONS
    for missing_in_colab in ("bitsandbytes", "xformers", "pillow-heif"):
        assert RUNTIME.colab_version(missing_in_colab) is None


def test_stand_ins_are_explained_and_only_where_needed():
    assert RUNTIME.expected_here("torch") == "2.13.0+cpu"  # the CPU build on disk here
    assert RUNTIME.expected_here("torchvision") is None and RUNTIME.expected_here("torchaudio") is None
    assert RUNTIME.expected_here("ipywidgets") == "7.7.1" and RUNTIME.expected_here("numpy") == "2.1.3"
    for pin in RUNTIME.pins.values():
        if pin.stand_in != pin.colab_version:
            # Every departure from Colab says why, on its own line.
            assert pin.note.startswith("stand-in:") and "(" in pin.note, pin
    pins = colab_runtime.pins_text(RUNTIME)
    assert "torch==2.13.0+cpu\n" in pins and "torchvision" not in pins and "ipywidgets==7.7.1\n" in pins


def test_parser_rejects_what_pip_would_misread(tmp_path):
    with pytest.raises(ValueError, match="not a `name==version` line"):
        colab_runtime.parse_pin("numpy>=2")
    with pytest.raises(ValueError, match="stand-in must be"):
        colab_runtime.parse_pin("torch==2.11.0  # stand-in: numpy==2.13.0 (typo)")
    assert colab_runtime.parse_pin("torch==2.11.0+cu128  # stand-in: torch==2.13.0 (why)").stand_in == "2.13.0"
    twice = tmp_path / "runtime.txt"
    twice.write_text("# source: s\n# image: i\n# python: 3.13\n# python-stand-in: 3.11\nnumpy==2.1.3\nNumPy==2.1.3\n")
    with pytest.raises(ValueError, match="listed twice"):
        colab_runtime.read_runtime(twice)
    twice.write_text("numpy==2.1.3\n")
    with pytest.raises(ValueError, match="header lacks source"):
        colab_runtime.read_runtime(twice)


def test_pyproject_admits_colab_and_its_lower_bounds_are_colab_versions():
    """pip must find nothing to upgrade in Colab, and each lower bound is a version the Colab env runs."""
    checked = []
    for requirement in pyproject_requirements():
        colab = RUNTIME.colab_version(requirement.name)
        if colab is None:
            continue
        checked.append(requirement.name)
        assert requirement.specifier.contains(colab, prereleases=True), (requirement, colab)
        bound = lower_bound(requirement)
        assert bound is not None, f"{requirement}: give a lower bound (Colab has {colab})"
        if requirement.name == "torch":
            # Colab's CUDA 2.11 cannot be installed here; the bound admits it, the CPU 2.13 build stands in.
            assert bound == Version("2.11")
        else:
            assert bound == Version(colab), f"{requirement}: the Colab environment runs {colab}"
    assert {"torch", "diffusers", "transformers", "numpy", "ipywidgets", "gradio"} <= set(checked)


def test_pyproject_admits_the_main_environment_the_newest_end():
    pins = requirements_txt_pins()
    for requirement in pyproject_requirements():
        pinned = pins.get(normalize(requirement.name))
        if pinned:
            assert requirement.specifier.contains(pinned, prereleases=True), (requirement, pinned)
            colab = RUNTIME.colab_version(requirement.name)
            if colab and requirement.name != "torch":
                assert Version(pinned) >= Version(colab), f"requirements.txt is the newest end: {requirement.name}"


def test_pyproject_uses_an_spdx_license_and_a_setuptools_that_reads_it():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    setuptools = next(Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools"))
    assert lower_bound(setuptools) >= Version("77")


# ------------------------------------------------------------------------- inside .venv-colab, after colab_env.sh

BEFORE = Path(sys.prefix) / "colab-freeze-before.txt"
AFTER = Path(sys.prefix) / "colab-freeze-after.txt"
INSTALL_LOG = Path(sys.prefix) / "install-step.log"
in_colab_env = pytest.mark.skipif(not (BEFORE.exists() and AFTER.exists()),
                                  reason="needs the Colab environment: bash scripts/colab_env.sh")


def read_freeze(path: Path) -> dict[str, str]:
    """{normalized name: version}; a package installed from a folder or URL maps to its "@ ..." source."""
    found = {}
    for line in path.read_text().splitlines():
        if "==" in line:
            name, _, version = line.partition("==")
        elif " @ " in line:
            name, _, version = line.partition(" @ ")
            version = "@ " + version
        else:
            continue
        found[normalize(name.strip())] = version.strip()
    return found


@in_colab_env
def test_environment_started_as_colab_is():
    before = read_freeze(BEFORE)
    for pin in RUNTIME.pins.values():
        assert before.get(normalize(pin.name)) == pin.stand_in, pin
    assert "dreambooth-helpers" not in before


@in_colab_env
def test_install_step_keeps_colab_torch_numpy_and_frontend_packages():
    """The packages the installer protects (colab_install.PROTECTED_PACKAGES) stay at Colab's versions, and those
    Colab lacks are not brought in (triton with a second torch, a notebook 7 with ipywidgets 8)."""
    before, after = read_freeze(BEFORE), read_freeze(AFTER)
    colab_has = [name for name in PROTECTED_PACKAGES if RUNTIME.colab_version(name)]
    assert {"torch", "numpy", "ipywidgets"} <= set(colab_has)
    for name in colab_has:
        expected = RUNTIME.expected_here(name)
        assert before.get(normalize(name)) == expected, name
        assert after.get(normalize(name)) == expected, f"the install step changed {name}"
    brought_in = {name for name in PROTECTED_PACKAGES if normalize(name) in set(after) - set(before)}
    assert not brought_in, f"the install step added protected packages Colab lacks: {brought_in}"
    assert after["torch"].startswith("2.13.0") and after["ipywidgets"] == "7.7.1"


@in_colab_env
def test_install_step_changes_no_colab_package_and_only_adds_the_library_and_its_missing_dependencies():
    before, after = read_freeze(BEFORE), read_freeze(AFTER)
    changed = {name: (version, after.get(name)) for name, version in before.items() if after.get(name) != version}
    assert changed == {}
    added = set(after) - set(before)
    assert "dreambooth-helpers" in added
    # pillow-heif and bitsandbytes are what the library needs and Colab lacks; nothing Colab has is re-added.
    assert {"pillow-heif", "bitsandbytes"} <= added
    assert not {name for name in added if RUNTIME.colab_version(name)}, added


@in_colab_env
def test_the_installers_constraints_stop_the_upgrade_the_issue_hit(tmp_path):
    """Asked for ipywidgets>=8 (the old `notebook` extra), pip would upgrade Colab's 7.7.1; constrained, it refuses."""
    import subprocess

    from dreambooth_helpers import colab_install

    constraints = tmp_path / "constraints.txt"
    constraints.write_text(colab_install.constraints_text(colab_install.installed_versions()))
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "ipywidgets>=8"]
    unconstrained = subprocess.run(pip, capture_output=True, text=True)
    assert unconstrained.returncode == 0 and "Would install ipywidgets-8" in unconstrained.stdout, unconstrained
    constrained = subprocess.run(pip + ["--constraint", str(constraints)], capture_output=True, text=True)
    assert constrained.returncode != 0
    assert "ipywidgets==7.7.1" in constrained.stdout + constrained.stderr


@in_colab_env
def test_the_library_runs_on_colab_versions_of_its_dependencies():
    import importlib.metadata as metadata

    for name in LIBRARIES_AT_COLAB_VERSIONS:
        assert metadata.version(name) == RUNTIME.colab_version(name), name
    import ipywidgets
    import numpy

    assert ipywidgets.__version__ == "7.7.1" and numpy.__version__ == "2.1.3"


@in_colab_env
def test_install_step_showed_its_plan_and_progress_as_it_went():
    log = INSTALL_LOG.read_text()
    first_lines = log.splitlines()[:3]
    assert any(line.startswith("Keeping the installed ") and "ipywidgets 7.7.1" in line for line in first_lines)
    assert re.search(r"^\[\s*\d+s\] Collecting ", log, re.M), log[:2000]
    assert re.search(r"^\[\s*\d+s\] Successfully installed .*dreambooth-helpers", log, re.M), log[-2000:]
    assert "Requirement already satisfied" not in log  # the condensed view leaves pip's noise out
