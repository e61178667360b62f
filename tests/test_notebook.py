"""tutorial.ipynb: committed clean, and executed end to end in smoke mode (tiny model, sample photos, CPU)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "tutorial.ipynb"
SMOKE_TIME_LIMIT_S = 600  # the whole run takes about a minute on 2 CPU cores; this only catches a hang


def _notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def _code(notebook) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_notebook_is_valid_nbformat_4_with_cleared_outputs():
    notebook = _notebook()
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"committed with outputs: {cell.source[:60]!r}"
            assert cell.execution_count is None, f"committed with an execution count: {cell.source[:60]!r}"
    assert notebook.metadata["kernelspec"]["name"] == "python3"


def test_repository_url_is_one_marked_variable_at_the_top():
    code = _code(_notebook())
    assert re.search(r'^REPO_URL = "https://github\.com/[^"]+/dreambooth-helpers"', code[0], re.M), code[0]
    assert sum("REPO_URL =" in cell for cell in code) == 1
    assert "{REPO_URL}" in code[1]  # the install cell reads it


def test_install_never_touches_torch():
    code = "\n".join(_code(_notebook()))
    assert not re.search(r"pip[^\n]*install[^\n]*\btorch", code), "the notebook installs torch"
    assert not re.search(r"pip[^\n]*install[^\n]*xformers", code), "xformers must go through the installer"
    assert "colab_install.py" in code
    # The troubleshooting text may warn about "pip install xformers", but never tells anyone to install torch.
    assert "pip install torch" not in NOTEBOOK.read_text()


def test_no_token_like_strings():
    text = NOTEBOOK.read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text)
    assert not re.search(r"print\([^)]*token\s*\)", text, re.I)


def test_login_is_opt_in_and_never_blocks_run_all():
    """No cell logs in by itself: only publishing does, and only with PUBLISH ticked (off by default)."""
    code = _code(_notebook())
    assert not any("login" in cell for cell in code), "a cell logs in: 'Run all' would wait for a sign-in"
    publish = [cell for cell in code if "widgets.publish(" in cell]
    assert len(publish) == 1
    assert re.search(r"^PUBLISH = False  #@param", publish[0], re.M) and "requested=PUBLISH" in publish[0]
    assert re.search(r"^SIGN_IN_HERE = False  #@param", publish[0], re.M) and "sign_in=SIGN_IN_HERE" in publish[0]


def test_every_code_cell_is_short_and_preceded_by_an_explanation():
    notebook = _notebook()
    for previous, cell in zip(notebook.cells, notebook.cells[1:]):
        if cell.cell_type != "code":
            continue
        assert len(cell.source.splitlines()) <= 10, f"long cell: {cell.source[:80]!r}"
        assert "def " not in cell.source and "class " not in cell.source, "logic belongs in the library"
        if previous.cell_type == "code":  # two code cells in a row: the second is a direct continuation
            continue
        assert len(previous.source) > 80, f"no explanation before: {cell.source[:60]!r}"


def test_the_base_model_words_quote_the_recipe_and_the_planner():
    """Section 4 explains each base-model choice with numbers: they are choices.py's outlook (the memory planner's
    estimates on a T4, the RAM estimate, the native resolution), so a planner change shows here as a failure."""
    from dreambooth_helpers import choices
    from dreambooth_helpers.memory import GIB

    text = next(cell.source for cell in _notebook().cells
                if cell.cell_type == "markdown" and "**Base model**" in cell.source)
    bullets = {match.group(1): match.group(2) for match in re.finditer(r"^  - \*([^*]+)\*:(.*?)(?=^  - |^- )", text,
                                                                       re.M | re.S)}
    for key in ("sd15-full", "sd15-lora", "sdxl-lora"):
        outlook = choices.outlook(key, 5)
        words = " ".join(bullets[outlook.choice.label].split())
        assert f"~{outlook.gpu_peak_allocated / GIB:.1f} GiB of GPU memory" in words, (key, words)
        assert f"{outlook.resolution} px" in words or key == "sd15-lora", (key, words)
    sdxl = choices.outlook("sdxl-lora", 5)
    assert f"~{sdxl.ram_needed / GIB:.1f} GiB of system RAM" in " ".join(bullets["SDXL LoRA"].split())
    assert sdxl.gpu_settings == "gradient checkpointing" and "gradient checkpointing" in bullets["SDXL LoRA"]
    extra = choices.outlook("sdxl-lora", 5, train_text_encoder=True).gpu_peak_allocated - sdxl.gpu_peak_allocated
    assert f"~{extra / GIB:.1f} GiB more" in text
    assert f"{choices.COLAB_RAM_GIB:g} GiB" in text
    assert "*Toy model* and *Tiny SDXL*" in text


def test_colab_badge_in_the_notebook_and_the_docs():
    badge = "https://colab.research.google.com/github/OWNER/dreambooth-helpers/blob/main/tutorial.ipynb"
    assert badge in NOTEBOOK.read_text()
    assert badge in (REPO / "docs" / "notebook.md").read_text()


def _ensure_kernel() -> str:
    """The name of a kernelspec that runs this interpreter (the test's own venv)."""
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().get_all_specs()
    python3 = specs.get("python3")
    if python3 is not None:
        argv0 = python3["spec"]["argv"][0]
        if argv0 in ("python", "python3") or Path(argv0).resolve() == Path(sys.executable).resolve():
            return "python3"
    from ipykernel.kernelspec import install

    install(user=True, kernel_name="dreambooth-helpers-test", display_name="dreambooth-helpers tests")
    return "dreambooth-helpers-test"


@pytest.mark.slow
def test_notebook_runs_end_to_end_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_HELPERS_SMOKE", "1")
    monkeypatch.setenv("DREAMBOOTH_HELPERS_REPO_DIR", str(REPO))
    monkeypatch.setenv("DREAMBOOTH_HELPERS_SMOKE_OUTPUT", str(tmp_path / "outputs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    # The kernel must import this checkout (also when it is not pip-installed) and this interpreter's packages.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    notebook = _notebook()
    client = nbclient.NotebookClient(notebook, kernel_name=_ensure_kernel(), timeout=SMOKE_TIME_LIMIT_S,
                                     resources={"metadata": {"path": str(tmp_path)}})
    started = time.time()
    client.execute()  # raises CellExecutionError naming the cell on any error
    elapsed = time.time() - started
    outputs = {i: "".join(o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", ""))
                          for o in cell.get("outputs", []))
               for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert "Dry run: would run" in text and "Keeping the installed torch" in text
    assert "No GPU found" in text or "GPU:" in text
    assert "Smoke test: nothing pushed" in text
    assert "Demo stopped." in text
    run = tmp_path / "outputs" / "sks-toy"
    assert (run / "training_summary.json").is_file()
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["history"]) == 4
    assert list((run / "samples").glob("step-*.png")), "no samples were drawn during training"
    assert list((run / "generated").glob("*.png")), "the generate section saved nothing"
    assert (tmp_path / "outputs" / "sks-toy-hub-upload" / "README.md").is_file()
    assert (run / "evaluation" / "evaluation.json").is_file()
    # Images were displayed (the preview, class images, samples, loss plot, generated grid).
    images = sum(1 for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    assert images >= 5, images
    print(f"notebook smoke run: {elapsed:.1f} s")
