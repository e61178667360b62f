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
    process = subprocess.Popen([sys.executable, "-m", "dreambooth_helpers", "app", "--auth", "a:pa", "--auth",
                                "b:pb", "--port", "0", "--workdir", str(work / "app")], cwd=work, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url, said = None, []
    deadline = time.monotonic() + 180
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        said.append(line)
        assert line or process.poll() is None, "".join(said)
        if line.startswith("App running at "):
            url = line.split()[3].rstrip("/")
    assert url, "the app did not start in 3 minutes:\n" + "".join(said)
    try:
        yield url, work
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the app and any training it started
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()


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
    assert re.search(r"^running training step \d+/4 loss", said, re.M)  # followed while it trained
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
    finally:
        running.close()


def test_one_user_cannot_queue_more_runs_than_the_limit(tmp_path, monkeypatch):
    import shutil

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
