"""The app's REST API (app_rest.py) against a live `dreambooth-helpers app --auth a:pa --auth b:pb`, a separate
process, with the real client (httpx): the journey docs/app.md and the README show, run exactly as written; each
user's runs their own; strict bodies; bounded uploads. And runs that resume by themselves when the app starts."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
A, B = ("a", "pa"), ("b", "pb")
pytestmark = pytest.mark.slow


def documented_example() -> str:
    """The Python block of docs/app.md's REST section; the README carries the same one."""
    blocks = re.findall(r"```python\n(# The whole journey over the app's REST API.*?)```", (REPO / "docs" / "app.md")
                        .read_text(), re.S)
    readme = re.findall(r"```python\n(# The whole journey over the app's REST API.*?)```", (REPO / "README.md")
                        .read_text(), re.S)
    assert len(blocks) == 1 and readme == blocks, "docs/app.md and README.md must show the same REST example"
    return blocks[0]


@pytest.fixture(scope="module")
def live_app(tmp_path_factory):
    """`dreambooth-helpers app --auth a:pa --auth b:pb` in its own process, as a user starts it (toy model)."""
    work = tmp_path_factory.mktemp("rest")
    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                        "PYTHONPATH": str(REPO)}
    log = open(work / "app.log", "w")  # a file, not a pipe: nobody reads a pipe once the app has started
    process = subprocess.Popen([sys.executable, "-m", "dreambooth_helpers", "app", "--auth", "a:pa", "--auth",
                                "b:pb", "--port", "0", "--workdir", str(work / "app")], cwd=work, env=env,
                               stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url, deadline = None, time.monotonic() + 180
    while url is None and time.monotonic() < deadline:
        said = (work / "app.log").read_text()
        assert process.poll() is None, said
        found = re.search(r"^App running at (\S+)", said, re.M)
        url = found.group(1).rstrip("/") if found else time.sleep(0.2)
    assert url, "the app did not start in 3 minutes:\n" + (work / "app.log").read_text()
    try:
        yield url, work
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the app and any training it started
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def journey(live_app):
    """The documented example, run unchanged as its own program: (its output, user a's finished run)."""
    url, work = live_app
    (work / "sample_data").symlink_to(REPO / "sample_data")
    script = work / "journey.py"
    script.write_text(documented_example())
    done = subprocess.run([sys.executable, str(script)], cwd=work, env=os.environ | {"APP_URL": url},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    with httpx.Client(base_url=url, auth=A) as a:
        jobs = a.get("/api/jobs").raise_for_status().json()
    assert len(jobs) == 1 and jobs[0]["state"] == "finished"
    return done.stdout, jobs[0], work


def test_the_documented_journey_uploads_trains_follows_and_generates(journey, live_app):
    said, job, work = journey
    assert said.startswith("5 photos kept;")
    assert re.search(r"^running \w+ step \d+/4 loss", said, re.M)  # followed while it ran
    assert "finished None step 4/4" in said
    png = (work / "zwx-robot.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert job["step"] == job["max_steps"] == 4 and isinstance(job["loss"], float) and job["seconds_left"] is None
    url, _ = live_app
    with httpx.Client(base_url=url, auth=A) as a:
        sample = a.get(job["samples"][-1])
        assert sample.status_code == 200 and sample.headers["content-type"] == "image/png"
        assert sample.content.startswith(b"\x89PNG")
        again = a.post(f"/api/jobs/{job['id']}/generate", json={"prompt": "a photo of zwx robot on the beach",
                                                                 "seed": 1})
        assert again.content == png and again.headers["x-seed"] == "1"  # the same seed, the same image
        photos = a.get("/api/photos").json()
        assert photos["count"] == 5 and {p["name"] for p in photos["photos"]} == {
            p.name for p in (work / "app" / "users" / "a" / "photos").iterdir()}


def test_another_user_gets_404_for_a_run_and_anonymous_gets_401(journey, live_app):
    url, _ = live_app
    job_id = journey[1]["id"]
    with httpx.Client(base_url=url, auth=B) as b:
        unknown = b.get("/api/jobs/20261206-000000-zwx-robot-AAAAAAAAAAAAAAAA")
        for response in (b.get(f"/api/jobs/{job_id}"), b.post(f"/api/jobs/{job_id}/generate", json={"prompt": "x"}),
                         b.post(f"/api/jobs/{job_id}/cancel"), b.post(f"/api/jobs/{job_id}/resume"),
                         b.get(f"/api/jobs/{job_id}/samples/step-000004-0.png"), unknown):
            assert response.status_code == 404, response.text
            assert response.json()["detail"].startswith("No training run")  # the same answer for both
        assert b.get("/api/jobs").json() == [] and b.get("/api/photos").json()["count"] == 0
        assert b.get("/api/photos").json()["report"].startswith("No photos yet: upload 3-20 photos")
        no_photos = b.post("/api/jobs", json={"identifier": "zwx", "class_noun": "robot", "kind": "object"})
        assert no_photos.status_code == 422 and "Upload photos" in no_photos.json()["detail"]
    routes = [("GET", "/api/jobs"), ("GET", f"/api/jobs/{job_id}"), ("POST", "/api/jobs"), ("GET", "/api/photos"),
              ("POST", "/api/photos"), ("DELETE", "/api/photos/x.png"), ("POST", f"/api/jobs/{job_id}/generate")]
    for method, route in routes:
        for auth in (None, ("a", "wrong"), ("c", "pa")):
            response = httpx.request(method, url + route, auth=auth, json={})
            assert response.status_code == 401, (method, route, auth, response.text)
            assert response.headers["www-authenticate"].startswith("Basic")
    schema = httpx.get(url + "/openapi.json").json()
    assert {"/api/jobs", "/api/jobs/{id}", "/api/photos", "/api/jobs/{id}/generate"} <= set(schema["paths"])
    body = schema["paths"]["/api/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"identifier", "class_noun", "kind", "base_model", "preset",
                                       "max_train_steps", "num_class_images"}
    assert "files" in json.dumps(schema["paths"]["/api/photos"]["post"]["requestBody"])


@pytest.mark.parametrize("body, status, said", [
    ({"identifier": "zwx", "class_noun": "robot", "kind": "object", "steps": 4}, 422, "unknown field 'steps'"),
    ({"identifier": "zwx", "class_noun": "robot", "kind": "object", "max_train_steps": "4"}, 422,
     "max_train_steps must be a whole number"),
    ({"identifier": "zwx", "class_noun": "robot", "kind": "object", "max_train_steps": True}, 422,
     "max_train_steps must be a whole number"),
    ({"identifier": "zwx", "class_noun": "robot", "kind": "cat"}, 422, "kind must be one of object, person, style"),
    ({"identifier": "zwx", "class_noun": "robot"}, 422, "kind is missing"),
    ({"identifier": "zwx", "class_noun": "robot", "kind": "object", "max_train_steps": 10**9}, 422,
     "max_train_steps must be from 1 to"),
    ({"identifier": "zwx", "class_noun": "robot", "kind": "object", "num_class_images": 10**6}, 422,
     "Class images must be from 0"),
    ({"identifier": "two words", "class_noun": "robot", "kind": "object"}, 422, "Identifier token"),
    ({"identifier": "zwx", "class_noun": "robot", "kind": "object", "base_model": "/etc"}, 422, ""),
    ({"identifier": "zwx", "class_noun": "robot", "kind": "object", "preset": "huge"}, 422, "Preset 'huge'"),
    (["identifier"], 422, "the body must be one JSON object"),
    ("[" * 5000 + "]" * 5000, 400, "nested deeper"),
    ('{"identifier": "\\ud800"}', 400, "lone surrogate"),
    ("not json", 400, "must be JSON"),
    ("x" * 20_000, 413, "over 16 KB"),
])
def test_job_bodies_are_strict_and_never_a_500(live_app, journey, body, status, said):
    url, _ = live_app
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(url + "/api/jobs", content=content, auth=A, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert said in response.json()["detail"]
    assert "/tmp" not in response.text and str(REPO) not in response.text  # no server path


def test_generate_bodies_and_run_states(live_app, journey):
    url, _ = live_app
    job_id = journey[1]["id"]
    with httpx.Client(base_url=url, auth=A) as a:
        cases = [({"prompt": "x", "steps": "3"}, "steps must be a whole number"),
                 ({"prompt": "x", "guidance": "high"}, "guidance must be a number"),
                 ({"prompt": "x", "size": 5}, "unknown field 'size'"),
                 ({}, "prompt is missing"),
                 ({"prompt": "x", "steps": 10_000}, "Steps must be from 1 to"),
                 ({"prompt": "x" * 301}, "longer than 300"),
                 ({"prompt": "   "}, "Write a prompt")]
        for body, said in cases:
            response = a.post(f"/api/jobs/{job_id}/generate", json=body)
            assert response.status_code == 422 and said in response.json()["detail"], (body, response.text)
        for action in ("cancel", "resume"):  # a finished run: nothing to cancel or resume
            assert a.post(f"/api/jobs/{job_id}/{action}").status_code == 409
        for name in ("..%2F..%2Fconfig.json", "config.json", "step-999999-0.png"):
            assert a.get(f"/api/jobs/{job_id}/samples/{name}").status_code == 404


def test_photo_uploads_are_bounded_and_each_users_own(live_app, journey):
    url, work = live_app
    robot = (REPO / "sample_data" / "toy_robot" / "robot_1.png").read_bytes()
    with httpx.Client(base_url=url, auth=B) as b:
        wrong_type = b.post("/api/photos", files=[("files", ("notes.txt", b"hello"))])
        assert wrong_type.status_code == 415 and "notes.txt" in wrong_type.text
        wrong_field = b.post("/api/photos", files=[("photo", ("robot.png", robot))])
        assert wrong_field.status_code == 422 and "'files'" in wrong_field.json()["detail"]
        too_many = b.post("/api/photos", files=[("files", (f"r{i}.png", robot)) for i in range(31)])
        assert too_many.status_code == 413
        assert b.post("/api/photos", files=[("files", ("r.png", robot))], data={"kind": "cat"}).status_code == 422
        broken = b.post("/api/photos", files=[("files", ("robot 1.png", robot)), ("files", ("broken.png", b"xx"))])
        assert broken.status_code == 400 and "broken.png" in broken.json()["detail"]  # the door reads every photo
        kept = b.post("/api/photos", files=[("files", ("robot 1.png", robot))])
        assert kept.status_code == 200, kept.text
        answer = kept.json()
        assert answer["count"] == 1 and answer["skipped"] == []
        assert answer["report"].startswith("Warnings (") and "1 usable image(s) to train on:" in answer["report"]
        assert any(f["check"] == "count" for f in answer["findings"])  # one photo: the doctor says more are needed
        name = answer["photos"][0]["name"]
        for stranger in ("..", "..%2Fusers%2Fa%2Fphotos%2F00_robot_1.png", "missing.png"):
            assert b.delete(f"/api/photos/{stranger}").status_code == 404
        assert b.delete(f"/api/photos/{name}").json()["count"] == 0
    assert len(list((work / "app" / "users" / "a" / "photos").iterdir())) == 5  # a's photos untouched


def test_an_interrupted_run_resumes_by_itself_once_unless_told_not_to(tmp_path, monkeypatch):
    """launch_app (the `app` command) resumes a run an earlier stop interrupted; --no-auto-resume leaves it."""
    from dreambooth_helpers.app_launch import launch_app
    from dreambooth_helpers.cli import build_parser
    from dreambooth_helpers.config import Concept, TrainConfig
    from dreambooth_helpers.jobs import INTERRUPTED, JobRunner

    assert build_parser().parse_args(["app", "--no-auto-resume"]).auto_resume is False
    assert build_parser().parse_args(["app"]).auto_resume is True
    work = tmp_path / "app"
    runner = JobRunner(work)
    monkeypatch.setattr(runner, "_launch", lambda job: None)
    # A run whose training died with the machine: it resumes into a run that fails at once (no photos there),
    # which is enough to see that it was started again, by itself, once.
    job = runner.submit(TrainConfig(concepts=[Concept(str(tmp_path / "gone"), "a photo of zwx robot")], model="tiny",
                                    output_dir="unused", with_prior_preservation=False), name="robot")
    state = work / "jobs" / job.job_id / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "status": "running", "pid": 2**22 + 12345}))
    waiting = launch_app(work, port=0, quiet=True, auto_resume=False)
    try:
        assert waiting.app.runner.job(job.job_id).status == INTERRUPTED
    finally:
        waiting.close()
    resuming = launch_app(work, port=0, quiet=True, environment={"OMP_NUM_THREADS": "1"})
    try:
        stopped = resuming.app.runner.wait(job.job_id, timeout=120)
        assert json.loads(state.read_text())["auto_resumed"]
        assert json.loads((work / "jobs" / job.job_id / "config.json").read_text())["resume"] == "latest"
        assert stopped.status == "failed" and "gone" in stopped.error  # it ran again: its photos are missing
    finally:
        resuming.close()
    # Interrupted again after its automatic resume (dead before it could say how): it waits for a click.
    (work / "jobs" / job.job_id / "result.json").unlink()
    state.write_text(json.dumps({**json.loads(state.read_text()), "status": "running", "pid": 2**22 + 12345}))
    again = launch_app(work, port=0, quiet=True)
    try:
        time.sleep(1.0)
        assert again.app.runner.job(job.job_id).status == INTERRUPTED
    finally:
        again.close()


def test_generation_shares_the_pages_queue_and_a_client_that_hangs_up_leaves_it(tmp_path):
    import socket
    import threading

    from dreambooth_helpers.app_launch import launch_app
    from dreambooth_helpers.demo_api import DemoService

    sys.path.insert(0, str(REPO / "tests"))
    from demo_fakes import FakeGenerator, use_generator

    running = launch_app(tmp_path / "app", port=0, quiet=True)
    try:
        folder = running.app.runner.jobs_dir / "20261206-000000-zwx-robot-AAAAAAAAAAAAAAAA"
        (folder / "output").mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"status": "finished", "created": time.time()}))
        gate = threading.Event()  # the page's request runs until the gate opens: a slow generation
        generator = FakeGenerator(gate=gate)
        service = DemoService("tiny", output_dir=tmp_path / "tried")
        use_generator(service, generator)
        running.app._services[folder.name] = service  # the run's model, as loaded for the Try it tab
        page = threading.Thread(target=running.app.generate, args=(None, folder.name, "from the page"))
        page.start()
        url = httpx.URL(running.url)
        body = b'{"prompt": "abandoned", "steps": 1}'
        connection = socket.create_connection((url.host, url.port))
        connection.sendall(b"POST /api/jobs/%s/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (folder.name.encode(), len(body), body))
        deadline = time.monotonic() + 30
        while service.queue_counts() != {"running": 1, "waiting": 1}:  # behind the page's request: one queue
            assert time.monotonic() < deadline, service.queue_counts()
            time.sleep(0.05)
        connection.close()
        while service.queue_counts()["waiting"]:
            assert time.monotonic() < deadline, "the hung-up request stayed in the queue"
            time.sleep(0.05)
        gate.set()
        page.join(30)
        answer = httpx.post(f"{running.url.rstrip('/')}/api/jobs/{folder.name}/generate", timeout=30,
                            json={"prompt": "a real user", "seed": 7})
        assert answer.status_code == 200 and answer.headers["x-seed"] == "7", answer.text
        assert generator.ran == ["from the page", "a real user"]  # the abandoned one never ran

        # Another run's request while this model still has work: it waits its turn instead of dropping that work.
        other = running.app.runner.jobs_dir / "20261206-000000-zwx-robot-BBBBBBBBBBBBBBBB"
        (other / "output").mkdir(parents=True)
        (other / "state.json").write_text(json.dumps({"status": "finished", "created": time.time()}))
        gate.clear()
        page = threading.Thread(target=running.app.generate, args=(None, folder.name, "still running"))
        page.start()
        while service.queue_counts()["running"] == 0:
            assert time.monotonic() < deadline + 30
            time.sleep(0.05)
        busy = httpx.post(f"{running.url.rstrip('/')}/api/jobs/{other.name}/generate", timeout=30,
                          json={"prompt": "the other run"})
        assert busy.status_code == 503 and "Another run's model" in busy.text and busy.headers["retry-after"]
        gate.set()
        page.join(30)
        assert generator.ran[-1] == "still running" and folder.name in running.app._services
    finally:
        running.close()


def test_one_user_cannot_queue_more_runs_than_the_limit(tmp_path, monkeypatch):
    import shutil
    import threading

    from dreambooth_helpers.app import AppLimits, TrainingApp
    from dreambooth_helpers.jobs import TooManyRuns

    app = TrainingApp(tmp_path / "app", model="toy", limits=AppLimits(max_active_runs=2))
    monkeypatch.setattr(app.runner, "_launch", lambda job: None)  # they wait in the queue
    shutil.copytree(REPO / "sample_data" / "toy_robot", app.photos_dir(None))
    settings = dict(token="zwx", class_noun="robot", kind="object", steps=4)
    first, _ = app.start(None, **settings), app.start(None, **settings)
    with pytest.raises(TooManyRuns, match="2 runs waiting or training"):
        app.start(None, **settings)
    app.cancel(None, first.job_id)
    assert app.start(None, **settings).status == "queued"
    with pytest.raises(TooManyRuns):  # a resume counts as a start
        app.resume(None, first.job_id)
    # Many at once: counted and queued one at a time, so no more pass than the limit.
    for job in app.jobs(None):
        if job.status == "queued":
            app.cancel(None, job.job_id)
    outcomes = []

    def start() -> None:
        try:
            outcomes.append(app.start(None, **settings).status)
        except TooManyRuns:
            outcomes.append("refused")

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["queued"] * 2 + ["refused"] * 6


def test_a_runs_json_says_its_phase_and_its_class_images(tmp_path):
    from dreambooth_helpers.app_rest import _json_of
    from dreambooth_helpers.job_progress import CLASS_IMAGES_PHASE
    from dreambooth_helpers.jobs import Job

    making = Job("r1", tmp_path, "running", 0.0, 8, progress={"phase": CLASS_IMAGES_PHASE,
                                                              "class_images": {"made": 40, "total": 50}})
    assert (_json_of(making, tmp_path)["phase"], _json_of(making, tmp_path)["class_images"]) == (
        "class_images", {"made": 40, "total": 50})
    training = Job("r1", tmp_path, "running", 0.0, 8, progress={"step": 3, "seconds_left": 2.3300000000000005,
                                                                "history": [{"step": 3, "loss": 0.5}]})
    assert {k: _json_of(training, tmp_path)[k] for k in ("phase", "step", "seconds_left")} == {
        "phase": "training", "step": 3, "seconds_left": 2.3}
    assert _json_of(Job("r1", tmp_path, "running", 0.0, 8), tmp_path)["phase"] == "starting"
    assert _json_of(Job("r1", tmp_path, "finished", 0.0, 8), tmp_path)["phase"] is None


def test_bodies_are_bounded_before_they_are_read_and_other_sites_pages_are_refused(live_app, journey):
    """Attack findings: Gradio's routes read a whole body before their sign-in check, a declared length stretched
    the body deadline to days, a cross-site form could act with a browser's cached credentials, a NUL in a run id
    was a 500, and a seed out of range was refused only when its turn came."""
    import socket

    url, _ = live_app
    host, port = httpx.URL(url).host, httpx.URL(url).port
    job_id = journey[1]["id"]

    def raw(request: bytes) -> bytes:
        """The whole answer: the server closes these connections once it has answered."""
        with socket.create_connection((host, port), timeout=10) as connection:
            connection.sendall(request)
            answer = b""
            while chunk := connection.recv(4096):
                answer += chunk
            return answer

    for path in (b"/gradio_api/reset", b"/gradio_api/queue/join", b"/api/jobs", b"/login"):
        answer = raw(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 99999999999\r\n\r\n{" % path)  # and nothing more: answered at once
        assert answer.startswith(b"HTTP/1.1 413"), (path, answer[:200])
    unsized = raw(b"POST /gradio_api/reset HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
    assert unsized.startswith(b"HTTP/1.1 411"), unsized[:200]
    big_upload = raw(b"POST /api/photos HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 999999999\r\n\r\n--b")
    assert big_upload.startswith(b"HTTP/1.1 413") and b"choose fewer or smaller photos" in big_upload
    # No body and no Content-Length (curl -X POST): an empty body, as HTTP says, not refused.
    empty = raw(b"POST /api/jobs/%s/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Basic YTpwYQ==\r\n"
                b"Connection: close\r\n\r\n" % job_id.encode())
    assert empty.startswith(b"HTTP/1.1 409"), empty[:300]  # (finished: nothing to cancel)
    with httpx.Client(base_url=url, auth=A) as a:
        form = a.post(f"/api/jobs/{job_id}/generate", content=b'{"prompt": "a photo of zwx robot"}',
                      headers={"content-type": "text/plain"})  # what an HTML form with enctype=text/plain sends
        assert form.status_code == 415
        robot = (REPO / "sample_data" / "toy_robot" / "robot_1.png").read_bytes()
        for headers in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"}):
            assert a.post("/api/photos", files=[("files", ("x.png", robot))], headers=headers).status_code == 403
            assert a.post(f"/api/jobs/{job_id}/generate", json={"prompt": "x"}, headers=headers).status_code == 403
        assert a.get("/api/photos").json()["count"] == 5  # untouched
        same = a.get("/api/photos", headers={"origin": url, "sec-fetch-site": "same-origin"})
        assert same.status_code == 200
        for stranger in ("%00", f"{job_id}%00", "A" * 300, f"{'A' * 300}/samples/x.png"):
            answer = a.get(f"/api/jobs/{stranger}")
            assert answer.status_code == 404, (stranger, answer.text)
        seed = a.post(f"/api/jobs/{job_id}/generate", json={"prompt": "a photo of zwx robot", "seed": 2**40})
        assert seed.status_code == 422 and "seed" in seed.json()["detail"]


def test_a_run_cancelled_while_its_process_starts_stops_before_training(tmp_path, monkeypatch):
    """A Cancel that lands before the training process has installed its handler (an app started with SIGINT
    ignored passes that on) is read from state.json instead of being lost."""
    from dreambooth_helpers import jobs, training
    from dreambooth_helpers.config import Concept, TrainConfig

    folder = tmp_path / "job"
    folder.mkdir()
    config = TrainConfig(concepts=[Concept(str(REPO / "sample_data" / "toy_robot"), "a zwx toy")],
                         output_dir=str(folder / "output"))
    (folder / jobs.CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    (folder / jobs.STATE_FILE).write_text(json.dumps({"status": "running", "cancel_requested": time.time()}))
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("a cancelled run must not train"))
    monkeypatch.setattr(jobs.signal, "signal", lambda *a: None)  # leave pytest's own handlers alone
    assert jobs.run_job(folder) == 1
    assert json.loads((folder / jobs.RESULT_FILE).read_text())["outcome"] == "cancelled"
    assert "default_int_handler" in json.dumps(jobs.JobRunner._launch.__code__.co_consts)  # SIGINT back on


def test_a_run_keeps_its_photos_and_a_stray_folder_or_a_damaged_run_stops_nothing(tmp_path, monkeypatch, caplog):
    """Review findings: a queued run trained on whatever the folder held when it started; a folder copied into
    jobs/ by hand made every run list fail; a damaged interrupted run stopped the app from starting."""
    import shutil

    from dreambooth_helpers.app import TrainingApp
    from dreambooth_helpers.app_launch import launch_app
    from dreambooth_helpers.jobs import JobRunner

    app = TrainingApp(tmp_path / "app", model="toy")
    monkeypatch.setattr(app.runner, "_launch", lambda job: None)
    robots = sorted((REPO / "sample_data" / "toy_robot").glob("*.png"))
    shutil.copytree(REPO / "sample_data" / "toy_robot", app.photos_dir(None))
    job = app.start(None, token="zwx", class_noun="robot", kind="object", steps=4)
    app.keep_photos(None, robots[:2])  # a new upload replaces the photos while the run waits
    kept = Path(job.config().concepts[0].instance_dir)
    assert kept == job.folder / "photos" and len(list(kept.iterdir())) == 5
    assert len(list(app.photos_dir(None).iterdir())) == 2

    (app.runner.jobs_dir / "backup copy").mkdir()
    (app.runner.jobs_dir / "backup copy" / "state.json").write_text("{}")
    assert [j.job_id for j in app.jobs(None)] == [job.job_id]

    state = job.folder / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "status": "running", "pid": 2**22 + 12345}))
    (job.folder / "config.json").write_text("{not json")
    running = launch_app(tmp_path / "app", port=0, quiet=True)
    try:
        assert running.app.runner.job(job.job_id).status == "interrupted"  # it waits for a click
        assert "was not resumed" in caplog.text
    finally:
        running.close()
    assert JobRunner(tmp_path / "app").job(job.job_id).status == "interrupted"
