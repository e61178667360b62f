"""tutorial.ipynb's widget path in a real browser, on the frontend Colab ships: ipywidgets 7.7.1 in the classic
notebook (widgetsnbextension 3.6), driven by headless Chromium.

It runs the notebook's cells from the top to the config cell the way a user does: the photo picker renders,
real photos (one a ~3 MB phone-sized JPEG) go in through its upload button and the browser's file chooser, the
check cell shows the preview grid and names them, and an identifier typed into the settings form reaches the
printed config. Cells are found by what they contain, not by position. Screenshots are kept under
outputs/test-artifacts/notebook-browser/.

The test needs that environment (the Colab-like one CI builds); anywhere else, for example with ipywidgets 8,
it is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "tutorial.ipynb"
ARTIFACTS = REPO / "outputs" / "test-artifacts" / "notebook-browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE_PHOTO_BYTES = 3_000_000  # the size that breaks FileUpload in Colab (ipywidgets #3452); it must work here
SERVER_START_S = 90
CELL_TIMEOUT_MS = 240_000  # the imports cell loads torch and diffusers: seconds normally, more on a busy machine
WIDGET_TIMEOUT_MS = 30_000
NEW_TOKEN = "zwx"
# What the classic frontend shows instead of a widget it could not render.
WIDGET_FAILURES = ("Failed to display Jupyter Widget", "Loading widget...", "could not be displayed",
                   "Error displaying widget", "Error rendering Jupyter widget")


def _missing_frontend() -> str | None:
    """Why this environment cannot run the test, or None when it can."""
    wanted = {"ipywidgets": "7.", "widgetsnbextension": "3.", "notebook": "6."}
    for package, major in wanted.items():
        try:
            found = version(package)
        except PackageNotFoundError:
            return f"{package} is not installed (this test needs ipywidgets 7.x in the classic notebook, as in Colab)"
        if not found.startswith(major):
            return f"needs {package} {major}x (Colab's widget frontend); this environment has {found}"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed"
    if not os.access(CHROMIUM, os.X_OK):
        return "Debian's chromium is not installed (apt-get install chromium)"
    return None


MISSING = _missing_frontend()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


# ---------------------------------------------------------------------------- the photos


def _real_photos() -> dict:
    """Real photographs that installed packages ship, by name: scikit-image's, scikit-learn's, matplotlib's."""
    from PIL import Image

    found = {}
    try:
        from skimage import data

        found.update({name: Image.fromarray(getattr(data, name)()) for name in ("coffee", "astronaut", "chelsea",
                                                                                "rocket")})
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        found.update({name: Image.fromarray(a) for name, a in zip(("china", "flower"), load_sample_images().images)})
    except ImportError:
        pass
    try:
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as file:
            found["grace_hopper"] = Image.open(file).convert("RGB")
    except (ImportError, OSError):
        pass
    return found


def _phone_sized(image, grain_sigma: float = 3.0):
    """`image` as a 12 MP phone camera gives it: cropped to 4:3 (or 3:4), enlarged to 4032x3024, with a little
    sensor-like grain (an enlarged photo alone is too smooth to weigh what a phone's JPEG weighs)."""
    import numpy as np
    from PIL import Image

    size = (4032, 3024) if image.width >= image.height else (3024, 4032)
    aspect = size[0] / size[1]
    width, height = min(image.width, round(image.height * aspect)), min(image.height, round(image.width / aspect))
    left, top = (image.width - width) // 2, (image.height - height) // 2
    enlarged = image.crop((left, top, left + width, top + height)).resize(size, Image.LANCZOS)
    grain = np.random.default_rng(0).normal(0, grain_sigma, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(enlarged, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Four real photographs as JPEGs; the first is phone-sized, about 3 MB, the others as their package ships
    them."""
    found = _real_photos()
    if not found:
        pytest.skip("no package ships a photograph here (scikit-image, scikit-learn or matplotlib)")
    folder = tmp_path_factory.mktemp("photos")
    names = list(found)[:4]
    first = found[names[0]]
    for extra in range(4 - len(names)):  # only matplotlib's photo here: closer crops of it make a usable set
        width, height = round(first.width * (0.85 - 0.15 * extra)), round(first.height * (0.85 - 0.15 * extra))
        names.append(f"{names[0]}_crop{extra + 1}")
        found[names[-1]] = first.crop(((first.width - width) // 2, 0, (first.width + width) // 2, height))
    phone = folder / f"{names[0]}_phone.jpg"
    phone_image = _phone_sized(found[names[0]])
    for quality in (95, 97, 98):  # the smallest quality that gives the size a phone photo has
        phone_image.save(phone, "JPEG", quality=quality)
        if phone.stat().st_size >= PHONE_PHOTO_BYTES:
            break
    assert phone.stat().st_size >= PHONE_PHOTO_BYTES, phone.stat().st_size
    paths = [phone]
    for name in names[1:]:
        found[name].save(folder / f"{name}.jpg", "JPEG", quality=92)
        paths.append(folder / f"{name}.jpg")
    return paths


# ---------------------------------------------------------------------------- the notebook server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_env(home: Path, outputs: Path) -> dict[str, str]:
    """The smoke test's environment (tests/test_notebook.py), with Jupyter's own folders kept in `home`."""
    env = dict(os.environ)
    env.update({
        "DREAMBOOTH_HELPERS_SMOKE": "1",
        "DREAMBOOTH_HELPERS_REPO_DIR": str(REPO),
        "DREAMBOOTH_HELPERS_SMOKE_OUTPUT": str(outputs),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        # The kernel must import this checkout and this interpreter's packages.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # A user's Jupyter and IPython settings must not change what the test sees; the widget extension is
        # enabled in the environment's own config (sys.prefix), which stays on Jupyter's path.
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "IPYTHONDIR": str(home / "ipython"),
    })
    return env


def _get(url: str, timeout: float = 5) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


def _stop(server: subprocess.Popen, url: str, token: str) -> None:
    """Shut the kernels and the server down politely, then make sure they are gone."""
    try:
        request = urllib.request.Request(f"{url}/api/shutdown", method="POST", data=b"",
                                         headers={"Authorization": f"token {token}"})
        urllib.request.urlopen(request, timeout=10).close()
    except OSError:
        pass
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    """A classic notebook server on 127.0.0.1 with token auth, serving a copy of tutorial.ipynb (the browser
    saves what it runs; the repository's copy stays clean). Yields (base url, token, smoke output folder)."""
    work = tmp_path_factory.mktemp("notebook-server")
    home, outputs = work / "jupyter-home", work / "outputs"
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    token, port = secrets.token_hex(24), _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "notebook", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
         f"--NotebookApp.token={token}", "--NotebookApp.password=", f"--notebook-dir={work}",
         "--allow-root"],  # CI runs as root, which the server otherwise refuses
        cwd=work, env=_server_env(home, outputs), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"the notebook server exited ({server.returncode}):\n{_tail(work / 'server.log')}")
            try:
                if _get(f"{url}/api/status?token={token}") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the notebook server did not answer in {SERVER_START_S} s:\n{_tail(work / 'server.log')}")
            time.sleep(0.5)
        yield url, token, outputs
    finally:
        if server.poll() is None:
            _stop(server, url, token)
        log.close()


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------- the browser


BROWSER_ERRORS: list[str] = []  # the page's console errors, quoted when a widget does not render


@pytest.fixture(scope="module")
def page(jupyter):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    url, token, _ = jupyter
    with sync_playwright() as playwright:
        # Playwright gives every launch a fresh, throw-away profile (its own --user-data-dir).
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 1000})
            tab.on("console", lambda message: message.type == "error" and BROWSER_ERRORS.append(message.text))
            tab.on("pageerror", lambda error: BROWSER_ERRORS.append(str(error)))
            tab.goto(f"{url}/notebooks/{NOTEBOOK.name}?token={token}", timeout=60_000)
            tab.wait_for_function("() => window.Jupyter && Jupyter.notebook && Jupyter.notebook.kernel"
                                  " && Jupyter.notebook.kernel.is_connected()", timeout=90_000)
            tab.wait_for_function("() => !Jupyter.notebook.kernel_busy", timeout=60_000)
            try:
                tab.wait_for_function("() => require.defined('nbextensions/jupyter-js-widgets/extension')",
                                      timeout=30_000)
            except PlaywrightTimeout:
                pytest.fail("the notebook page has no widget extension: widgetsnbextension is installed but not "
                            "enabled (jupyter nbextension enable --py widgetsnbextension --sys-prefix)")
            yield tab
        finally:
            browser.close()


# Runs one cell and marks it when the kernel is done with it: the execute reply has come (the prompt shows a
# number) and every output has arrived (finished_execute fires after the kernel's idle status for this cell).
RUN_CELL = """(index) => {
    const cell = Jupyter.notebook.get_cell(index);
    cell.__finished = false;
    const done = (event, data) => {
        if (data.cell === cell) {
            cell.__finished = true;
            Jupyter.notebook.events.off('finished_execute.CodeCell', done);
        }
    };
    Jupyter.notebook.events.on('finished_execute.CodeCell', done);
    cell.execute();
}"""
CELL_FINISHED = """(index) => {
    const cell = Jupyter.notebook.get_cell(index);
    return cell.__finished === true && typeof cell.input_prompt_number === 'number';
}"""


def _cells(page) -> list[tuple[str, str]]:
    return page.evaluate("() => Jupyter.notebook.get_cells().map(c => [c.cell_type, c.get_text()])")


def _find(cells: list[tuple[str, str]], marker: str) -> int:
    found = [i for i, (kind, text) in enumerate(cells) if kind == "code" and marker in text]
    assert found, f"tutorial.ipynb has no code cell containing {marker!r}"
    return found[0]


def _outputs(page, index: int) -> list[dict]:
    return page.evaluate("(i) => JSON.parse(JSON.stringify(Jupyter.notebook.get_cell(i).output_area.outputs))", index)


def _output_text(outputs: list[dict]) -> str:
    """Everything a cell printed or displayed as text, errors and tracebacks included."""
    parts = []
    for output in outputs:
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
        if output.get("output_type") == "error":
            parts.append(f"{output.get('ename')}: {output.get('evalue')}\n" + "\n".join(output.get("traceback", [])))
    text = "\n".join(p if isinstance(p, str) else "".join(p) for p in parts)
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # IPython colours its tracebacks


def _cell(page, index: int):
    return page.locator("#notebook-container > .cell").nth(index)


def _shoot(page, index: int, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    _cell(page, index).screenshot(path=str(path))
    return path


def _run(page, index: int, cells) -> str:
    """Run cell `index`, wait for it, and return its text output; fails on any error it shows."""
    page.evaluate(RUN_CELL, index)
    page.wait_for_function(CELL_FINISHED, arg=index, timeout=CELL_TIMEOUT_MS, polling=200)
    outputs = _outputs(page, index)
    text = _output_text(outputs)
    first_line = cells[index][1].strip().splitlines()[0]
    # An error output, a traceback, or a DreamBoothError that show_errors_plainly printed as "SomeError: ...".
    problems = [line for line in text.splitlines() if re.match(r"\s*\w*(Error|Exception)\b", line)]
    if any(o.get("output_type") == "error" for o in outputs) or "Traceback" in text or problems:
        _shoot(page, index, f"failed-cell-{index}.png")
        pytest.fail(f"cell {index} ({first_line!r}) failed:\n{text[-3000:]}")
    return text


def _expect_widgets_rendered(page, index: int) -> None:
    from playwright.sync_api import expect

    area = _cell(page, index).locator(".output_area")
    try:
        expect(area.locator(".jupyter-widgets").first).to_be_attached(timeout=WIDGET_TIMEOUT_MS)
    except AssertionError:
        raise AssertionError(f"cell {index} displayed no widget; its output reads:\n"
                             f"{_cell(page, index).locator('.output').inner_text()[:2000]}\n"
                             f"browser errors: {BROWSER_ERRORS[-5:]}") from None
    shown = _cell(page, index).locator(".output").inner_text()
    for failure in WIDGET_FAILURES:
        assert failure not in shown, f"cell {index}: {failure!r}: {shown[:1000]}"


# ---------------------------------------------------------------------------- the test


def test_widget_path_in_a_real_browser(page, jupyter, photos):
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # only this run's screenshots
    ARTIFACTS.mkdir(parents=True)
    started = time.monotonic()
    try:
        screenshots = _use_the_notebook(page, jupyter[2], photos)
    except BaseException:
        # What the page showed, and every cell's output, for whoever reads the failed CI run.
        page.screenshot(path=str(ARTIFACTS / "failure.png"))
        _save_outputs(page)
        print(f"\nfailed; see {ARTIFACTS}")
        raise
    _save_outputs(page)
    print(f"\nnotebook in the browser: {time.monotonic() - started:.1f} s; screenshots:")
    for path in screenshots:
        print(f"  {path}")


def _save_outputs(page) -> None:
    cells = _cells(page)
    shown = {f"{i}: {text.strip()[:60]}": _output_text(_outputs(page, i))
             for i, (kind, text) in enumerate(cells) if kind == "code"}
    (ARTIFACTS / "outputs.json").write_text(json.dumps(shown, indent=1))


def _use_the_notebook(page, outputs: Path, photos: list[Path]) -> list[Path]:
    """Run the notebook to its config cell as a user would; returns the screenshots taken on the way."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    cells = _cells(page)
    picker_cell = _find(cells, "ImagePicker(")
    check_cell = _find(cells, "picker.collect(")
    form_cell = _find(cells, "SettingsForm")
    config_cell = _find(cells, "to_config(")
    assert picker_cell < check_cell < form_cell < config_cell, (picker_cell, check_cell, form_cell, config_cell)
    code_cells = [i for i, (kind, _) in enumerate(cells) if kind == "code" and i <= config_cell]
    printed: dict[int, str] = {}

    for index in [i for i in code_cells if i <= picker_cell]:
        printed[index] = _run(page, index, cells)

    # The picker renders on ipywidgets 7.7.1; its upload button opens the browser's file chooser. (7.x keeps
    # its <input type="file"> out of the page, so the photos go in the way a user gives them: click, choose.)
    _expect_widgets_rendered(page, picker_cell)
    picker = _cell(page, picker_cell)
    upload_button = picker.locator(".output_area .widget-upload")
    expect(upload_button).to_have_count(1, timeout=WIDGET_TIMEOUT_MS)
    with page.expect_file_chooser(timeout=WIDGET_TIMEOUT_MS) as opened:
        upload_button.click()
    chooser = opened.value
    assert chooser.is_multiple(), "the upload button takes one file at a time"
    assert "image/*" in (chooser.element.get_attribute("accept") or ""), chooser.element.get_attribute("accept")
    chooser.set_files([str(p) for p in photos])
    # The button counts the files once the browser has read them and sent them to the kernel.
    expect(upload_button).to_contain_text(f"({len(photos)})", timeout=60_000)
    screenshots = [_shoot(page, picker_cell, "1-after-upload.png")]

    for index in [i for i in code_cells if picker_cell < i <= form_cell]:
        printed[index] = _run(page, index, cells)

    # The check cell: the preview grid is an image, and the report names every uploaded photo (the upload won
    # over the sample subject that smoke mode pre-ticks).
    check_outputs = _outputs(page, check_cell)
    assert any("image/png" in o.get("data", {}) for o in check_outputs), _output_text(check_outputs)
    expect(_cell(page, check_cell).locator(".output_area img").first).to_be_visible(timeout=WIDGET_TIMEOUT_MS)
    report = printed[check_cell]
    for photo in photos:
        assert photo.stem in report, f"{photo.name} is not in the check cell's report:\n{report}"
    assert f"{len(photos)} usable image(s)" in report, report
    screenshots.append(_shoot(page, check_cell, "2-after-check.png"))
    # The 3 MB photo arrived whole: what was saved for training is that photo (scaled down, if at all).
    saved = list(outputs.rglob(f"*{photos[0].stem}*.png"))
    assert len(saved) == 1, saved
    with Image.open(photos[0]) as original, Image.open(saved[0]) as kept:
        assert abs(kept.width / kept.height - original.width / original.height) < 0.01, (original.size, kept.size)
        expected = np.asarray(original.convert("L").resize(kept.size, Image.LANCZOS), dtype=np.float32)
        difference = np.abs(expected - np.asarray(kept.convert("L"), dtype=np.float32)).mean()
        assert difference < 4, f"the uploaded phone photo arrived damaged (mean difference {difference:.1f})"

    # The settings form renders; its first field is the identifier token; a new one reaches the kernel.
    _expect_widgets_rendered(page, form_cell)
    form = _cell(page, form_cell)
    first_field = form.locator(".output_area .widget-text").first
    expect(first_field.locator("label")).to_have_text("Identifier token")
    first_field.locator("input").fill(NEW_TOKEN)
    first_field.locator("input").press("Tab")
    screenshots.append(_shoot(page, form_cell, "3-form.png"))

    for index in [i for i in code_cells if form_cell < i <= config_cell]:
        printed[index] = _run(page, index, cells)
    summary = printed[config_cell]
    prompt = re.search(r"^instance prompt:\s+(.*)$", summary, re.M)
    assert prompt, f"no 'instance prompt:' line in the config cell's output:\n{summary}"
    assert re.search(rf"\b{NEW_TOKEN}\b", prompt.group(1)), prompt.group(0)
    screenshots.append(_shoot(page, config_cell, "4-config.png"))

    # Nothing failed anywhere, and no widget stood in for an error message.
    everything = "\n".join(printed.values())
    assert "Traceback" not in everything and "AttributeError" not in everything
    page_text = page.locator("#notebook-container").inner_text()
    for failure in WIDGET_FAILURES:
        assert failure not in page_text, failure
    return screenshots
