"""The demo: its REST API over HTTP on loopback, its limits and messages, and the page in a real browser."""

import base64
import io
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_helpers.demo import launch_demo
from dreambooth_helpers.demo_api import DemoLimits, DemoService, parse_auth, parse_seed
from dreambooth_helpers.errors import ConfigError, DreamBoothError, GenerationError
from tests.trained_fixtures import make_full_output

torch.set_num_threads(1)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def wait_ready(url: str, auth=None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/api/health", auth=auth, timeout=10).json()
        if health["status"] != "loading" or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    return make_full_output(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def demo(trained_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("demo-output")
    running = launch_demo(str(trained_dir), share=False, port=0, quiet=True, output_dir=output,
                          limits=DemoLimits(max_steps=30, max_images=3))
    url = running.url.rstrip("/")
    assert url.startswith("http://127.0.0.1:")
    assert wait_ready(url)["status"] == "ready"
    yield running, url
    running.close()


def decode(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["png_base64"])))


def test_health_reports_the_model_and_limits(demo, trained_dir):
    _, url = demo
    health = httpx.get(f"{url}/api/health").json()
    assert health["status"] == "ready" and health["model"] == trained_dir.name and health["resolution"] == 64
    assert health["limits"]["max_images"] == 3 and health["limits"]["max_resolution"] == 96
    assert "Ready" in health["message"]


def test_generate_returns_pngs_with_seeds_and_is_reproducible(demo):
    _, url = demo
    request = {"prompt": "a photo of sks dog", "negative_prompt": "blurry", "steps": 3, "guidance": 6,
               "seed": 21, "num_images": 2}
    first = httpx.post(f"{url}/api/generate", json=request, timeout=60)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["seeds"] == [21, 22] and [i["seed"] for i in body["images"]] == [21, 22]
    assert body["width"] == body["height"] == 64 and body["scheduler"] == "dpm++"
    images = [decode(item) for item in body["images"]]
    assert images[0].size == (64, 64) and images[0].format == "PNG"
    assert images[0].text["prompt"] == "a photo of sks dog" and images[0].text["seed"] == "21"
    again = httpx.post(f"{url}/api/generate", json=request, timeout=60).json()
    assert np.array_equal(np.asarray(images[0]), np.asarray(decode(again["images"][0])))


def test_no_local_path_reaches_a_visitor(demo, trained_dir):
    """Health, answers, the page's config and status, and every PNG's metadata name the model, never its path."""
    from gradio_client import Client

    running, url = demo
    local_path = str(trained_dir)
    texts = [httpx.get(f"{url}/api/health").text, httpx.get(f"{url}/config").text,
             httpx.get(f"{url}/gradio_api/info").text, running.service.status_text()]
    answer = httpx.post(f"{url}/api/generate", json={"prompt": "a photo of sks dog", "steps": 2, "seed": 4},
                        timeout=60)
    texts.append(answer.text)
    rest_png = decode(answer.json()["images"][0])
    assert answer.json()["model"] == trained_dir.name and rest_png.text["model"] == trained_dir.name
    texts += rest_png.text.values()
    before = set((running.service.output_dir / "images").glob("*.png"))
    _, status = Client(url + "/", verbose=False, download_files=False).predict(
        "a photo of sks dog", "", 2, 7.5, 1, 64, "4", api_name="/generate")
    page_png = Image.open(next(iter(set((running.service.output_dir / "images").glob("*.png")) - before)))
    assert page_png.text["model"] == trained_dir.name and f"Model: {trained_dir.name}" in page_png.text["parameters"]
    texts += [status, *page_png.text.values()]
    assert trained_dir.name in texts[0] and trained_dir.name in texts[1]
    leaks = [text[:200] for text in texts if local_path in text]
    assert not leaks, leaks


def test_random_seed_and_size(demo):
    _, url = demo
    body = httpx.post(f"{url}/api/generate", json={"prompt": "a red ball", "steps": 2, "seed": "random",
                                                   "width": 96, "height": 64}, timeout=60).json()
    assert isinstance(body["seeds"][0], int) and decode(body["images"][0]).size == (96, 64)


@pytest.mark.parametrize("request_body, message", [
    ({"prompt": "x" * 501}, "at most 500"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": "a dog", "steps": 31}, "steps must be from 1 to 30"),
    ({"prompt": "a dog", "num_images": 4}, "num_images must be from 1 to 3"),
    ({"prompt": "a dog", "width": 512}, "width must be from 8 to 96"),
    ({"prompt": "a dog", "guidance": 25}, "guidance"),
    ({"prompt": "a dog", "seed": "lucky"}, "not a whole number"),
])
def test_requests_beyond_the_limits_are_refused(demo, request_body, message):
    _, url = demo
    response = httpx.post(f"{url}/api/generate", json=request_body, timeout=30)
    assert response.status_code == 422 and message in response.json()["detail"]


def test_concurrent_requests_wait_their_turn(demo):
    _, url = demo

    def call(seed):
        return httpx.post(f"{url}/api/generate", json={"prompt": "a blue cube", "steps": 2, "seed": seed},
                          timeout=120)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(call, range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["seeds"][0] for r in responses] == [0, 1, 2, 3]


def test_no_file_outside_the_demo_folder_is_served(demo):
    _, url = demo
    for path in ("/etc/passwd", "/proc/self/environ"):
        assert httpx.get(f"{url}/gradio_api/file={path}").status_code in (403, 404)


def test_auth_protects_page_and_api(tmp_path):
    running = launch_demo("tiny", share=False, port=0, quiet=True, auth=("friend", "s3cret"),
                          output_dir=tmp_path / "out")
    try:
        url = running.url.rstrip("/")
        assert httpx.get(f"{url}/api/health").status_code == 401
        assert httpx.get(f"{url}/api/health", auth=("friend", "wrong")).status_code == 401
        assert wait_ready(url, auth=("friend", "s3cret"))["status"] == "ready"
        response = httpx.post(f"{url}/api/generate", auth=("friend", "s3cret"), timeout=60,
                              json={"prompt": "a dog", "steps": 2, "seed": 1})
        assert response.status_code == 200
        assert "s3cret" not in httpx.get(f"{url}/", follow_redirects=True).text
    finally:
        running.close()
    assert not (tmp_path / "out").exists() or (tmp_path / "out").is_dir()  # a given folder is kept


def test_loading_and_failure_messages(tmp_path):
    service = DemoService(str(tmp_path / "no-such-model"))
    assert service.state == "loading" and "Loading" in service.status_text()
    with pytest.raises(DreamBoothError, match="could not be loaded.*no such file or folder"):
        service.generate("a dog", steps=2)
    assert service.state == "failed" and "could not be loaded" in service.status_text()
    with pytest.raises(ConfigError, match="from 1 to 4 in this demo"):
        service.check_request("a dog", "", 2, 7.5, 9, None, None)
    owned = service.output_dir
    service.cleanup()
    assert not owned.exists()  # a folder the demo made for itself goes away with it


def test_running_out_of_gpu_memory_says_what_to_change_and_the_demo_keeps_serving(tmp_path):
    service = DemoService("tiny", output_dir=tmp_path)
    generator = service.wait_until_loaded(timeout=60)
    working = generator.pipeline

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    generator.pipeline = out_of_memory
    with pytest.raises(GenerationError, match="ran out of memory generating 2 image.*fewer images at once"):
        service.generate("a dog", steps=2, num_images=2, seed=1)
    generator.pipeline = working  # the failed request released its place in the queue
    assert [r.seed for r in service.generate("a dog", steps=2, seed=1)] == [1]


def test_demo_command_passes_attention_slicing_and_vae_tiling_to_the_generator(monkeypatch):
    """The flags the out-of-memory advice names work on `demo` too, and reach the loaded pipeline."""
    from dreambooth_helpers import demo as demo_module
    from dreambooth_helpers.cli import main

    loaded = []

    def wait_for_the_model_instead_of_ctrl_c(running):
        loaded.append(running.service.wait_until_loaded(timeout=60))

    monkeypatch.setattr(demo_module.RunningDemo, "wait", wait_for_the_model_instead_of_ctrl_c)
    assert main(["demo", "--model", "tiny", "--port", "0", "--attention-slicing", "--vae-tiling"]) == 0
    pipeline = loaded[0].pipeline
    assert pipeline.vae.use_tiling
    assert {type(p).__name__ for p in pipeline.unet.attn_processors.values()} == {"SlicedAttnProcessor"}


def test_form_parsing():
    assert parse_auth("friend:s3:cret") == ("friend", "s3:cret")
    for bad in ("friend", ":x", "friend:"):
        with pytest.raises(ConfigError, match="USER:PASS"):
            parse_auth(bad)
    assert parse_seed("random") is None and parse_seed(" ") is None and parse_seed("42") == 42
    with pytest.raises(ConfigError):
        parse_seed("4.2")


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_page_in_a_real_browser_generates_an_image(demo):
    from playwright.sync_api import expect, sync_playwright

    running, url = demo
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/", timeout=60_000)
            expect(page.locator("#status")).to_contain_text("Ready", timeout=60_000)
            # Example prompts come from the trained token and class in training_summary.json.
            expect(page.get_by_text("a photo of sks dog on the beach").first).to_be_visible()
            # The REST API section's curl line carries the address this page was opened at.
            page.get_by_text("REST API").first.click()
            expect(page.locator("#rest-api")).to_contain_text(f"curl -s -X POST {url}/api/generate", timeout=30_000)
            page.locator("#prompt textarea").fill("a photo of sks dog in the snow")
            page.locator("#generate").click()
            expect(page.locator("#gallery img").first).to_be_visible(timeout=90_000)
            expect(page.locator("#status")).to_contain_text("Done: 1 image(s)", timeout=30_000)
            src = page.locator("#gallery img").first.get_attribute("src")
            assert src and str(running.service.output_dir.name) in src
            image = httpx.get(src if src.startswith("http") else url + src, timeout=30)
            assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (64, 64)
        finally:
            browser.close()
    saved = list((running.service.output_dir / "images").glob("*.png"))
    assert any(Image.open(p).text.get("prompt") == "a photo of sks dog in the snow" for p in saved)


def test_threads_are_not_left_behind(demo):
    running, _ = demo
    assert running.service._load_thread is not None and not running.service._load_thread.is_alive()
    assert threading.active_count() < 50
