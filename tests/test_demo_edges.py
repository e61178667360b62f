"""The demo's edges: checks before serving, non-ASCII passwords, one FIFO for page and REST, the API help,
cleanup on SIGTERM, the cap on kept images, strict request types, multipart refusals, the open-demo warning.

Most tests run the real server on loopback with a fake model (tests/demo_fakes.py) so that they are about
the queue and HTTP; the SIGTERM test runs the real command with the tiny model in a subprocess.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from dreambooth_helpers import demo as demo_module
from dreambooth_helpers import demo_api
from dreambooth_helpers.cli import main
from dreambooth_helpers.demo import api_help, free_port, launch_demo, public_without_auth_warning
from dreambooth_helpers.demo_api import DemoLimits, DemoService
from tests.demo_fakes import FakeGenerator, use_generator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
REPO = Path(__file__).resolve().parent.parent


def wait_until(condition, timeout: float = 30, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def fake_demo(monkeypatch, tmp_path):
    """start(generator, **launch options) -> (RunningDemo, url), serving `generator` as the loaded model."""
    started = []

    def start(generator=None, **options):
        generator = generator or FakeGenerator()
        monkeypatch.setattr(demo_api, "load_generator", lambda model, lora=None, **kwargs: generator)
        options = {"share": False, "port": 0, "quiet": True, "output_dir": tmp_path / f"out{len(started)}"} | options
        running = launch_demo("tiny", **options)
        started.append(running)
        running.service.wait_until_loaded(timeout=30)
        return running, running.url.rstrip("/")

    yield start
    for running in started:
        running.close()


# ---------------------------------------------------------------------------- 3. checks before serving


def test_demo_command_with_a_missing_model_exits_2_before_serving(tmp_path, capsys):
    started = time.monotonic()
    assert main(["demo", "--model", str(tmp_path / "no-such-run"), "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert "no such file or folder" in err and "no-such-run" in err
    assert "Demo running at" not in out
    assert time.monotonic() - started < 10  # refused up front, not after loading anything


@pytest.mark.parametrize("arguments, message", [
    (["--port", "70000"], "--port must be from 1 to 65535"),
    (["--host", "no.such.host.invalid"], "is not an address of this machine"),
    (["--auth", "friend"], "USER:PASS"),
    (["--auth", ""], "USER:PASS"),  # an empty --auth must not quietly mean "no password"
    (["--lora", "/no/such/lora"], "no pytorch_lora_weights.safetensors there"),
    (["--model", "not a/hub id!"], "nor a valid Hub id"),
])
def test_demo_command_checks_its_arguments_before_serving(arguments, message, capsys):
    argv = ["demo", "--model", "tiny", "--port", "0", *arguments]
    if "--model" in arguments:
        argv = ["demo", "--port", "0", *arguments]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert message in err and "Demo running at" not in out


def test_demo_command_waits_for_the_model_and_exits_2_when_it_cannot_load(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken-run"
    (broken / "unet").mkdir(parents=True)
    (broken / "model_index.json").write_text("{}")  # a model folder whose weights are missing
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    port = free_port()
    assert main(["demo", "--model", str(broken), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert "could not be loaded" in err and "The demo was stopped" in err
    assert "Demo running at" not in out
    with socket.socket() as probe:  # the server is down again
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    assert not list(temp.glob("dreambooth-demo-*"))  # and its folder is gone


# ---------------------------------------------------------------------------- 4. non-ASCII credentials


def test_non_ascii_user_and_password_work_on_the_rest_api_and_the_page(fake_demo):
    user, password = "frïend", "pässwörd"
    running, url = fake_demo(auth=(user, password))
    assert httpx.get(f"{url}/api/health", auth=(user, password)).status_code == 200
    body = {"prompt": "a dog", "steps": 1, "seed": 1}
    assert httpx.post(f"{url}/api/generate", json=body, auth=(user, password)).status_code == 200
    wrong = [("friend", "password"), (user, "passwörd"), (user, password + "x"), ("", ""), ("frïend", "")]
    for credentials in wrong:
        assert httpx.get(f"{url}/api/health", auth=credentials).status_code == 401, credentials
    # Headers no client should send: not base64, not UTF-8, no colon. Refused, never a server error.
    for header in ("Basic !!!", "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(), "Basic " +
                   base64.b64encode("frïend".encode()).decode(), "Bearer abc", "Basic"):
        assert httpx.get(f"{url}/api/health", headers={"Authorization": header}).status_code == 401, header
    # The page's login form (multipart, as the browser's FormData sends it).
    with httpx.Client() as session:
        refused = session.post(f"{url}/login", files={"username": (None, user), "password": (None, "pässwort")})
        assert refused.status_code == 400
        login = session.post(f"{url}/login", files={"username": (None, user), "password": (None, password)})
        assert login.status_code == 200, login.text
        assert session.get(f"{url}/config").status_code == 200


# ---------------------------------------------------------------------------- 7. names, not paths


def test_a_model_that_fails_to_load_is_named_not_located(tmp_path):
    broken = tmp_path / "my-secret-place" / "broken-run"
    (broken / "unet").mkdir(parents=True)
    service = DemoService(str(broken), output_dir=tmp_path / "out")
    service.start_loading()
    service._loaded.wait(60)
    assert service.state == "failed"
    for text in (service.status_text(), str(service.health())):
        assert "broken-run" in text and "my-secret-place" not in text and str(tmp_path) not in text


# ---------------------------------------------------------------------------- 8. one queue, first come first served


def test_a_burst_of_rest_requests_is_served_in_arrival_order(fake_demo):
    gate = threading.Event()
    generator = FakeGenerator(gate=gate)
    running, url = fake_demo(generator)
    arrived = []
    submit = running.service.submit

    def recording_submit(prompt, *args, **kwargs):  # runs on the server's event loop: the arrival order
        job = submit(prompt, *args, **kwargs)
        arrived.append(prompt)
        return job

    running.service.submit = recording_submit
    answers = {}

    def call(index):
        answers[index] = httpx.post(f"{url}/api/generate", timeout=60,
                                    json={"prompt": f"request {index}", "steps": 1, "seed": index})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(arrived) == 16, what="16 requests in the queue")
    assert httpx.get(f"{url}/api/health").json()["queue"] == {"running": 1, "waiting": 15}
    gate.set()
    for thread in threads:
        thread.join(60)
    assert [answers[i].status_code for i in range(16)] == [200] * 16
    assert generator.ran == arrived  # served exactly in the order they arrived


def test_page_and_rest_requests_wait_in_one_queue_and_the_page_shows_its_true_place(fake_demo):
    from gradio_client import Client

    gate = threading.Event()
    generator = FakeGenerator(gate=gate)
    running, url = fake_demo(generator)
    client = Client(url + "/", verbose=False, download_files=False)
    rest_answers, threads, page_jobs = {}, [], {}

    def rest(index):
        rest_answers[index] = httpx.post(f"{url}/api/generate", timeout=60,
                                         json={"prompt": f"request {index}", "steps": 1, "seed": index})

    for index in range(6):  # REST, page, REST, page, ... each one once the previous is in the queue
        if index % 2 == 0:
            threads.append(threading.Thread(target=rest, args=(index,)))
            threads[-1].start()
        else:
            page_jobs[index] = client.submit(f"request {index}", "", 1, 7.5, 1, 64, str(index), api_name="/generate")
        wait_until(lambda n=index + 1: sum(running.service.queue_counts().values()) == n, what=f"request {index}")

    def page_says(job, text):
        progress = job.status().progress_data or []
        return any(text in (unit.desc or "") for unit in progress)

    # Request 0 runs; the page's request 5 has the five before it ahead, REST requests included.
    wait_until(lambda: page_says(page_jobs[5], "5 request(s) ahead"), what="the page's queue position")
    wait_until(lambda: page_says(page_jobs[1], "1 request(s) ahead"), what="the first page request's position")
    gate.set()
    for thread in threads:
        thread.join(60)
    statuses = {index: job.result(timeout=60)[1] for index, job in page_jobs.items()}
    assert all(status.startswith("Done: 1 image(s)") for status in statuses.values()), statuses
    assert all(rest_answers[i].status_code == 200 for i in (0, 2, 4))
    assert generator.ran == [f"request {i}" for i in range(6)]


def test_use_via_api_lists_only_the_generation_and_the_page_shows_the_rest_api(fake_demo):
    running, url = fake_demo()
    info = httpx.get(f"{url}/gradio_api/info").json()
    assert list(info["named_endpoints"]) == ["/generate"] and not info["unnamed_endpoints"]  # no timers, no load
    config = httpx.get(f"{url}/config").text
    assert "curl -s -X POST" in config and "/api/generate" in config and "/api/health" in config
    help_text = api_help(running.service, "https://abc.gradio.live/", auth=True)
    assert "curl -s -u USER:PASS -X POST https://abc.gradio.live/api/generate" in help_text


# ---------------------------------------------------------------------------- 9. leftovers


def test_sigterm_removes_the_demos_temporary_folders(tmp_path):
    from gradio_client import Client

    temp = tmp_path / "temp"
    temp.mkdir()
    env = os.environ | {"TMPDIR": str(temp), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                        "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "dreambooth_helpers.cli", "demo", "--model", "tiny",
                                "--port", "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line or process.poll() is None, process.stderr.read()
            if line.startswith("Demo running at "):
                url = line.split()[-1].rstrip("/")
        assert url, "the demo did not start in 3 minutes"
        # One image from the page, so the demo's folder holds files when it is stopped.
        Client(url + "/", verbose=False, download_files=False).predict(
            "a photo of sks dog", "", 1, 7.5, 1, 32, "1", api_name="/generate")
        folders = list(temp.glob("dreambooth-demo-*"))
        assert len(folders) == 1 and list(folders[0].rglob("*.png"))
        process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # a second one, as `timeout` and process managers often send
        assert process.wait(60) in (0, -signal.SIGTERM)  # (a late second signal may end it once it is clean)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not list(temp.glob("dreambooth-demo-*")), list(temp.iterdir())
    assert not list(temp.rglob("*.png"))  # (Gradio's own empty folders may stay: they are not the demo's)


def test_the_page_keeps_only_the_newest_images(tmp_path):
    service = DemoService("tiny", limits=DemoLimits(max_saved_images=3), output_dir=tmp_path)
    use_generator(service, FakeGenerator())
    saved = [service.save(service.generate(f"a dog {i}", steps=1, seed=i, num_images=2)) for i in range(4)]
    kept = sorted((tmp_path / "images").glob("*.png"))
    assert kept == sorted([saved[2][1], *saved[3]])  # the three newest of eight
    assert all(path.exists() for path in saved[3]) and not any(path.exists() for path in saved[0] + saved[1])


# ---------------------------------------------------------------------------- 10. strictness


@pytest.mark.parametrize("body, message", [
    ({"prompt": "a dog", "seed": True}, 'seed must be a whole number, "random" or null (got true)'),
    ({"prompt": "a dog", "num_images": True}, "num_images must be a whole number (got true)"),
    ({"prompt": "a dog", "steps": "5"}, 'steps must be a whole number (got "5")'),
    ({"prompt": "a dog", "steps": 2.5}, "steps must be a whole number (got 2.5)"),
    ({"prompt": "a dog", "guidance": False}, "guidance must be a number (got false)"),
    ({"prompt": 7}, "prompt must be a string (got 7)"),
    ({"steps": 5}, "prompt is missing"),
    ({"prompt": "a dog", "num_image": 2}, "unknown field 'num_image'"),
    (["a dog"], "body"),
])
def test_rest_requests_have_strict_types(fake_demo, body, message):
    _, url = fake_demo()
    response = httpx.post(f"{url}/api/generate", json=body)
    assert response.status_code == 422 and message in response.json()["detail"], response.text


def test_rest_requests_must_be_json_and_whole_floats_are_fine(fake_demo):
    _, url = fake_demo()
    response = httpx.post(f"{url}/api/generate", content=b"prompt=a dog", headers={"content-type": "text/plain"})
    assert response.status_code == 400 and "must be JSON" in response.json()["detail"]
    ok = httpx.post(f"{url}/api/generate", json={"prompt": "a dog", "steps": 1, "guidance": 7, "seed": "random"})
    assert ok.status_code == 200 and ok.json()["guidance"] == 7.0


@pytest.mark.parametrize("path", ["/gradio_api/process_recording", "/gradio_api/upload", "/gradio_api/queue/join",
                                  "/gradio_api/component_server", "/api/generate", "/gradio_api/run/generate"])
def test_multipart_bodies_are_refused_everywhere_but_the_login_form(fake_demo, path):
    running, url = fake_demo()
    response = httpx.post(f"{url}{path}", files={"files": ("recording.wav", b"RIFF" + b"\0" * 200, "audio/wav")},
                          data={"prompt": "a dog"})
    assert response.status_code == 403 and response.json()["detail"] == "This demo takes no file uploads."
    assert not any(p.name.endswith(".wav") for p in running.service.output_dir.rglob("*"))


def test_an_open_demo_warns_that_anyone_can_use_it(monkeypatch, capsys):
    monkeypatch.setattr(demo_module.RunningDemo, "wait", lambda running: None)
    monkeypatch.setattr(demo_api, "load_generator", lambda model, lora=None, **kwargs: FakeGenerator())
    assert main(["demo", "--model", "tiny", "--host", "0.0.0.0", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: the demo is open to every network this machine is on (--host 0.0.0.0)" in err
    assert "--auth USER:PASS" in err
    assert main(["demo", "--model", "tiny", "--host", "0.0.0.0", "--port", "0", "--auth", "a:b"]) == 0
    assert main(["demo", "--model", "tiny", "--port", "0"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "public share link" in public_without_auth_warning("127.0.0.1", True, None)
    assert public_without_auth_warning("::1", False, None) is None
    assert public_without_auth_warning("0.0.0.0", True, ("a", "b")) is None


# ---------------------------------------------------------------------------- 11. hostile bodies, abandoned requests


@pytest.mark.parametrize("body", [
    b"[" * 3000,  # nested past Python's recursion limit
    b'{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"prompt": "a dog", "seed": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}",
    b'{"prompt": "a [[[[ dog", "negative_prompt": "\\"[[[{{{"}' + b" " * 10,  # brackets in strings are fine...
])
def test_deeply_nested_json_is_refused_before_it_is_decoded(fake_demo, body):
    running, url = fake_demo()
    response = httpx.post(f"{url}/api/generate", content=body, headers={"content-type": "application/json"})
    if b"[[[[ dog" in body:  # ... as they are text, not nesting
        assert response.status_code == 200, response.text
        assert running.service._generator.ran == ["a [[[[ dog"]
        return
    assert response.status_code == 400 and "nested" in response.json()["detail"], response.text
    assert httpx.get(f"{url}/api/health").status_code == 200  # and the server is fine


@pytest.mark.parametrize("body", [
    b'{"prompt": "a \\ud800 dog"}',  # a lone surrogate: no character, cannot be encoded
    b'{"prompt": "a dog", "negative_prompt": "blurry \\udfff"}',
    b'{"prompt": "a dog", "\\ud800": 1}',
])
def test_a_lone_surrogate_is_refused_not_a_server_error(fake_demo, body):
    running, url = fake_demo()
    response = httpx.post(f"{url}/api/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422) and "surrogate" in response.json()["detail"], response.text
    assert running.service._generator.ran == []
    emoji = httpx.post(f"{url}/api/generate", content=b'{"prompt": "a dog \\ud83d\\ude00", "steps": 1}',
                       headers={"content-type": "application/json"})  # a proper pair is a character: fine
    assert emoji.status_code == 200 and emoji.json()["prompt"] == "a dog \U0001F600"


def test_the_queue_refuses_a_lone_surrogate_from_the_page_too(tmp_path):
    service = DemoService("tiny", output_dir=tmp_path)
    use_generator(service, FakeGenerator())
    with pytest.raises(demo_api.ConfigError, match="surrogate"):
        service.submit("a \ud800 dog")


def test_requests_whose_clients_hung_up_leave_the_queue_and_a_real_user_is_served(fake_demo):
    gate = threading.Event()  # the first request runs until the gate opens: a slow generation
    generator = FakeGenerator(gate=gate)
    running, url = fake_demo(generator)
    assert running.service.limits.max_queue == 32
    host, port = httpx.URL(url).host, httpx.URL(url).port
    abandoned = []
    for index in range(32):  # a burst that fills the queue, from clients that will hang up
        body = f'{{"prompt": "abandoned {index}", "steps": 1}}'.encode()
        connection = socket.create_connection((host, port))
        connection.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        abandoned.append(connection)
        wait_until(lambda n=index + 1: sum(running.service.queue_counts().values()) == n, what=f"request {index}")
    assert running.service.queue_counts() == {"running": 1, "waiting": 31}
    assert httpx.post(f"{url}/api/generate", json={"prompt": "too many"}).status_code == 503  # full, for now
    for connection in abandoned:
        connection.close()
    # The running one cannot be stopped; the 31 waiting are withdrawn as their clients are gone.
    wait_until(lambda: running.service.queue_counts() == {"running": 1, "waiting": 0}, timeout=10,
               what="the abandoned requests to leave the queue")
    answer = {}
    real = threading.Thread(target=lambda: answer.update(
        response=httpx.post(f"{url}/api/generate", timeout=60, json={"prompt": "a real user", "steps": 1})))
    real.start()
    wait_until(lambda: running.service.queue_counts()["waiting"] == 1, what="the real request in the queue")
    started = time.monotonic()
    gate.set()
    real.join(60)
    assert answer["response"].status_code == 200, answer["response"].text
    assert time.monotonic() - started < 10
    assert generator.ran == ["abandoned 0", "a real user"]  # none of the 31 withdrawn ones ever ran


def test_a_request_body_that_never_arrives_does_not_hold_a_connection(fake_demo, monkeypatch):
    """Issue 27 item 10: a client that declares a body and sends part of it (or nothing) is answered 408 and
    disconnected after the body timeout; it does not hold the connection, or anything the app awaits, for ever."""
    from dreambooth_helpers import body_timeout

    monkeypatch.setattr(body_timeout, "BODY_TIMEOUT_S", 1.0)
    _, url = fake_demo()
    host, port = url.removeprefix("http://").split(":")
    for sent in (b'{"prompt": "a ph', b""):
        started = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=20) as connection:
            connection.sendall(b"POST /api/generate HTTP/1.1\r\nHost: demo\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 200\r\n\r\n" + sent)
            answer = b""
            while chunk := connection.recv(4096):  # until the server closes the connection
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"did not arrive in time" in answer and time.monotonic() - started < 10
    assert httpx.post(f"{url}/api/generate", json={"prompt": "a photo of sks dog", "steps": 1}).status_code == 200
