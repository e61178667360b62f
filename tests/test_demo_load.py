"""The demo under load and under attack, on loopback with the tiny model.

20 concurrent requests are all answered (REST and Gradio's queue) with memory that stays flat; a full
queue says "busy" instead of dropping a request; oversized bodies and uploads are refused with a message;
--auth closes the page's API, the REST API and the file route; no file outside the output folder is served.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch

from dreambooth_helpers.demo import launch_demo
from dreambooth_helpers.demo_api import DemoLimits, DemoService
from dreambooth_helpers.errors import DreamBoothError
from tests.demo_fakes import FakeGenerator, use_generator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
REQUESTS = 20


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def wait_ready(url: str, auth=None) -> None:
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/api/health", auth=auth, timeout=10).json()["status"] == "loading":
        assert time.monotonic() < deadline, "the tiny model did not load in 2 minutes"
        time.sleep(0.2)


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written: no client-side normalising of `..` or percent-escapes."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    status_line, _, body = response.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    torch.set_num_threads(1)  # twenty requests share the CPU; one thread each keeps them from thrashing
    root = tmp_path_factory.mktemp("demo")
    running = launch_demo("tiny", share=False, port=0, quiet=True, output_dir=root / "demo-output",
                          limits=DemoLimits(max_steps=10, max_images=2))
    url = running.url.rstrip("/")
    wait_ready(url)
    yield running, url, root
    running.close()


def generate(url: str, seed: int) -> httpx.Response:
    return httpx.post(f"{url}/api/generate", timeout=300,
                      json={"prompt": f"a photo of sks dog number {seed}", "steps": 1, "seed": seed,
                            "width": 32, "height": 32})


def test_twenty_concurrent_rest_requests_are_all_answered_and_memory_stays_flat(demo):
    _, url, _ = demo
    threads_before = threading.active_count()
    waves = []
    for wave in range(2):
        seeds = range(wave * 1000, wave * 1000 + REQUESTS)
        with ThreadPoolExecutor(REQUESTS) as pool:
            responses = list(pool.map(lambda seed: generate(url, seed), seeds))
        assert [r.status_code for r in responses] == [200] * REQUESTS, [r.text for r in responses if r.is_error]
        assert [r.json()["seeds"] for r in responses] == [[seed] for seed in seeds]  # each got its own answer
        waves.append(rss_bytes())
    # The first wave warms caches and thread pools; a second wave of the same size must not add to it.
    assert waves[1] - waves[0] < 64 * 2**20, f"RSS grew by {(waves[1] - waves[0]) / 2**20:.0f} MiB"
    assert threading.active_count() < threads_before + 60


def test_twenty_concurrent_page_requests_wait_in_gradios_queue(demo):
    from gradio_client import Client

    _, url, _ = demo
    client = Client(url + "/", verbose=False, download_files=False)
    jobs = [client.submit("a photo of sks dog", "", 1, 7.5, 1, 32, str(seed), api_name="/generate")
            for seed in range(REQUESTS)]
    results = [job.result(timeout=300) for job in jobs]
    statuses = [status for _, status in results]
    assert all(status.startswith("Done: 1 image(s)") for status in statuses), statuses
    assert sorted(int(status.rsplit("seeds ", 1)[1].rstrip(".")) for status in statuses) == list(range(REQUESTS))
    # An oversized prompt through the page's API comes back as a message in the status line.
    _, status = client.predict("x" * 2000, "", 1, 7.5, 1, 32, "1", api_name="/generate")
    assert status == "Generation failed: The prompt is 2000 characters; this demo takes at most 500."


def test_a_full_queue_says_busy_instead_of_dropping_requests(tmp_path):
    service = DemoService("tiny", limits=DemoLimits(max_queue=3), output_dir=tmp_path)
    release = threading.Event()
    use_generator(service, FakeGenerator(gate=release))
    outcomes = []

    def call(index):
        try:
            outcomes.append(("answered", service.generate(f"a dog {index}", steps=1)))
        except DreamBoothError as error:
            outcomes.append(("refused", str(error)))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while sum(kind == "refused" for kind, _ in outcomes) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    release.set()
    for thread in threads:
        thread.join(30)
    assert sorted(kind for kind, _ in outcomes) == ["answered"] * 3 + ["refused"] * 3
    assert {message for kind, message in outcomes if kind == "refused"} == {
        "The demo is busy (too many requests waiting); try again in a minute."}


def test_oversized_bodies_and_uploads_are_refused_with_a_message(demo):
    running, url, _ = demo
    padded = b'{"prompt": "a dog", "negative_prompt": "' + b"x" * 100_000 + b'"}'
    response = httpx.post(f"{url}/api/generate", content=padded, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over 64 KB" in response.json()["detail"]
    too_long = httpx.post(f"{url}/api/generate", json={"prompt": "a dog " * 1000, "steps": 1}, timeout=60)
    assert too_long.status_code == 422 and "at most 500" in too_long.json()["detail"]
    upload = httpx.post(f"{url}/gradio_api/upload", files={"files": ("big.bin", b"\0" * 1000)})
    assert upload.status_code == 403 and upload.json()["detail"] == "This demo takes no file uploads."

    def chunks():
        yield b'{"prompt": "a dog"}'

    chunked = httpx.post(f"{url}/api/generate", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 411
    assert not any(p.name == "big.bin" for p in running.service.output_dir.rglob("*"))


def test_no_file_outside_the_output_folder_is_served(demo):
    running, url, root = demo
    output = running.service.output_dir
    # A generated image is served (the control), from inside the output folder.
    results = running.service.generate("a photo of sks dog", steps=1, seed=5, width=32, height=32)
    image_path = running.service.save(results)[0]
    status, body = raw_get(url, f"/gradio_api/file={image_path}")
    assert status == 200 and body.startswith(b"\x89PNG")
    # Next to it: a file whose path only shares the folder's prefix, and a link out of the folder.
    (root / f"{output.name}-secret.txt").write_text("root:x:0:0:secret")
    (output / "images" / "passwd-link.txt").symlink_to("/etc/passwd")
    attempts = [
        "/file=/etc/passwd", "/gradio_api/file=/etc/passwd", "/gradio_api/file=%2fetc%2fpasswd",
        f"/gradio_api/file={output}/../../etc/passwd", f"/gradio_api/file={output}/..%2f..%2f..%2fetc%2fpasswd",
        f"/gradio_api/file={output}%2f..%2f..%2f..%2fetc%2fpasswd", "/gradio_api/file=..%2f..%2f..%2fetc%2fpasswd",
        f"/gradio_api/file={root}/{output.name}-secret.txt", f"/gradio_api/file={output}/images/passwd-link.txt",
        "/gradio_api/file=/proc/self/environ", "/static/../../../../etc/passwd", "/assets/..%2f..%2f..%2fetc%2fpasswd",
        "/gradio_api/static/..%2f..%2f..%2f..%2fetc%2fpasswd", f"/gradio_api/file={Path(__file__).resolve()}",
    ]
    for path in attempts:
        status, body = raw_get(url, path)
        assert status in (400, 403, 404), (path, status)
        assert b"root:" not in body and b"HF_" not in body, path


def test_auth_closes_the_page_api_the_rest_api_and_the_files(tmp_path):
    running = launch_demo("tiny", share=False, port=0, quiet=True, auth=("friend", "s3cret"),
                          output_dir=tmp_path / "out")
    try:
        url = running.url.rstrip("/")
        wait_ready(url, auth=("friend", "s3cret"))
        image = running.service.save(running.service.generate("a dog", steps=1, seed=1, width=32, height=32))[0]
        anonymous = [httpx.get(f"{url}/config"), httpx.get(f"{url}/gradio_api/info"),
                     httpx.get(f"{url}/gradio_api/file={image}"), httpx.get(f"{url}/api/health"),
                     httpx.post(f"{url}/api/generate", json={"prompt": "a dog", "steps": 1}),
                     httpx.post(f"{url}/gradio_api/queue/join", json={"data": ["a dog", "", 1, 7.5, 1, 32, "1"],
                                                                       "fn_index": 0, "session_hash": "x1"})]
        assert [r.status_code for r in anonymous] == [401] * len(anonymous)
        wrong = httpx.Client()
        assert wrong.post(f"{url}/login", data={"username": "friend", "password": "guess"}).status_code in (400, 401)
        assert wrong.get(f"{url}/config").status_code == 401
        with httpx.Client() as session:
            assert session.post(f"{url}/login", data={"username": "friend", "password": "s3cret"}).status_code == 200
            assert session.get(f"{url}/config").status_code == 200
            served = session.get(f"{url}/gradio_api/file={image}")
            assert served.status_code == 200 and served.content.startswith(b"\x89PNG")
    finally:
        running.close()
