"""The web app: the journey through its actions (photos, train, try, publish), the upload limits, users kept
apart, and over HTTP: sign-in on every route and no file served from outside what the page made."""

from __future__ import annotations

import io
import re
import shutil
import zipfile
from pathlib import Path

import httpx
import pytest

from dreambooth_helpers.app import AppLimits, TrainingApp, parse_users
from dreambooth_helpers.app_launch import launch_app, share_warning
from dreambooth_helpers.errors import ConfigError, HubError, ImageDataError
from dreambooth_helpers.jobs import CANCELLED, FINISHED, JobError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "toy_robot"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# A run of seconds on a CPU: what the page does not show, shrunk.
FAST = {"resolution": 32, "num_class_images": 2, "class_images_steps": 2, "class_images_batch_size": 2,
        "sample_every": 2, "sample_steps": 2, "mixed_precision": "no", "checkpoint_every": None}


def make_app(tmp_path: Path, **options) -> TrainingApp:
    return TrainingApp(tmp_path / "work", model="tiny", config_overrides=FAST, environment=ONE_THREAD, **options)


def sample_photos() -> list[Path]:
    return sorted(SAMPLE.glob("*.png"))


@pytest.mark.slow
def test_the_journey_upload_train_watch_try_publish_export(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    app = make_app(tmp_path)
    photos = app.upload(None, sample_photos(), "object")
    assert photos.count == 5 and len(photos.crops) == 5
    assert all(crop.size == (256, 256) for crop in photos.crops)
    assert "5 usable image(s)" in photos.report  # what check-images says, then the doctor's findings
    assert "Memory:" in app.outlook(None, token="sks", class_noun="robot", steps=4)

    job = app.start(None, token="sks", class_noun="robot", steps=4)
    config = job.config()
    assert config.max_train_steps == 4 and config.concepts[0].instance_prompt == "a photo of sks robot"
    assert config.model == "tiny" and config.with_prior_preservation  # the recipe, as in the notebook
    finished = app.runner.wait(job.job_id, timeout=300)
    assert finished.status == FINISHED, finished.log_path.read_text()[-3000:]
    view = app.job_view(None, job.job_id)
    assert "finished" in view.text and "step 4/4" in view.text
    assert [caption for _, caption in view.samples] == ["step-000002-0", "step-000002-1", "step-000004-0",
                                                        "step-000004-1"]
    assert [h["step"] for h in view.history] == [1, 2, 3, 4]

    assert "sks robot" in app.example_prompt(None, job.job_id)
    images = app.generate(None, job.job_id, "a photo of sks robot", steps=2, seed=1)
    assert len(images) == 1 and images[0].size == (32, 32)

    with pytest.raises(HubError, match="No Hugging Face token"):
        app.publish(None, job.job_id, "someone/robot", token="")
    exported = app.export(None, job.job_id)
    assert exported.is_file() and exported.suffix == ".safetensors"
    assert exported.parent.parent == app.exports_dir  # the one folder the page serves files from
    app.close()


def test_uploads_over_the_limits_are_refused_and_hostile_files_skipped(tmp_path):
    app = make_app(tmp_path, limits=AppLimits(max_photos=3, max_file_bytes=2_000_000, max_upload_bytes=3_000_000))
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2_100_000)
    with pytest.raises(ImageDataError, match="more than this page takes"):
        app.upload(None, sample_photos())
    with pytest.raises(ImageDataError, match="big.png: larger than 1.91 MiB"):
        app.upload(None, [big])
    with pytest.raises(ImageDataError, match="Choose some photos"):
        app.upload(None, [])
    # A zip holding more photos than allowed counts its photos, not itself.
    packed = tmp_path / "many.zip"
    with zipfile.ZipFile(packed, "w") as archive:
        for i, photo in enumerate(sample_photos()[:2] * 2):
            archive.writestr(f"p{i}.png", photo.read_bytes() + bytes([i]))
    with pytest.raises(ImageDataError, match="holds 4 photos"):
        app.upload(None, [packed])

    # A name that climbs out of the folder (never used: a dot-file), an odd name, a file pretending to be a photo.
    climbing = tmp_path / "..%2F..%2Fevil.png"
    odd = tmp_path / "my dog; rm -rf ~.png"
    for path in (climbing, odd):
        shutil.copy(sample_photos()[0], path)
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"<?php echo 1; ?>")
    view = app.upload(None, [climbing, odd, fake])
    assert view.count == 1
    assert "fake.jpg" in view.report and "skip" in view.report
    saved = list(app.photos_dir(None).iterdir())
    assert [p.name for p in saved] == ["00_my_dog_rm_-rf.png"]
    assert not list(tmp_path.rglob("evil*"))


def test_several_users_see_only_their_own_photos_and_runs(tmp_path):
    app = make_app(tmp_path, users=["alice", "bob"])
    app.upload("alice", sample_photos()[:3])
    assert app.photos_view("alice").count == 3
    assert app.photos_view("bob").count == 0
    assert app.photos_dir("alice") != app.photos_dir("bob")
    with pytest.raises(ImageDataError, match="Upload photos"):
        app.start("bob", token="sks", class_noun="robot", steps=2)
    job = app.start("alice", token="sks", class_noun="robot", steps=40)
    try:
        assert [j.job_id for j in app.jobs("alice")] == [job.job_id]
        assert app.jobs("bob") == []
        for action in (app.job_view, app.cancel, app.resume):
            with pytest.raises(JobError, match="No training run"):
                action("bob", job.job_id)
        with pytest.raises(ConfigError, match="Sign in"):
            app.jobs("mallory")
        for bad in ("../../etc", "..", job.job_id + "/../.."):
            with pytest.raises(JobError):
                app.job_view("alice", bad)
    finally:
        app.runner.cancel(job.job_id)
        assert app.runner.wait(job.job_id, timeout=120).status == CANCELLED


def test_settings_the_page_refuses(tmp_path):
    app = make_app(tmp_path)
    with pytest.raises(ImageDataError, match="Photos tab first"):
        app.make_config(None)
    app.upload(None, sample_photos()[:3])
    with pytest.raises(ConfigError, match="Steps must be"):
        app.make_config(None, steps=10**6)
    with pytest.raises(ConfigError, match="Preset"):
        app.make_config(None, preset="fastest")
    with pytest.raises(ConfigError, match="kind"):
        app.make_config(None, kind="landscape")
    with pytest.raises(JobError, match="Choose a run"):
        app.job_view(None, "")


def test_the_base_model_choice_sets_the_model_and_preset_and_shows_what_it_means(tmp_path):
    """The Train form's base-model dropdown: choices.py's outlook for the user's photos, updated on change."""
    from dreambooth_helpers import choices
    from dreambooth_helpers.app import build_ui
    from dreambooth_helpers.config import SDXL_BASE_MODEL, SDXL_FP16_VAE

    app = TrainingApp(tmp_path / "work", model="tiny", environment=ONE_THREAD)
    try:
        assert app.model_outlook(None, "sdxl-lora") == (choices.outlook("sdxl-lora", 5).text()
                                                        + "\n(No photos yet: counted for 5.)")
        app.upload(None, sample_photos()[:3])
        assert app.model_outlook(None, "sd15-lora", kind="person", preset="low-memory", steps=500) == \
            choices.outlook("sd15-lora", 3, kind="person", preset="low-memory", max_train_steps=500).text()
        ui = build_ui(app)
        handlers = {fn.name: fn.fn for fn in ui.fns.values()}
        dropdown = next(block for block in ui.blocks.values() if getattr(block, "elem_id", None) == "base-model")
        assert dropdown.value is None  # "tiny" is none of the choices: the model box says what trains
        assert [value for _, value in dropdown.choices] == [choice.key for choice in choices.CHOICES]
        model, preset, text = handlers["on_base_model"]("sdxl-lora", "object", 0, None)
        assert (model, preset) == (SDXL_BASE_MODEL, "t4-sdxl")
        assert text == choices.outlook("sdxl-lora", 3).text() and "1024 px" in text and "GPU on a T4" in text
        assert "System RAM" in handlers["on_outlook"]("toy", "style", "t4", 0, None)
        assert handlers["on_outlook"]("toy", "style", "no-such-preset", 0, None).startswith("Error:")
        assert handlers["on_outlook"](None, "object", "t4", 0, None) == ""
        # What the choice set is what trains: SDXL with its fp16-safe VAE and frozen text encoders.
        config = app.make_config(None, model=SDXL_BASE_MODEL, preset="t4-sdxl")
        assert (config.vae, config.lora, config.train_text_encoder) == (SDXL_FP16_VAE, True, False)
        assert app.make_config(None, model="tiny-sdxl", preset="t4-sdxl").vae is None
    finally:
        app.close()
    on_gpu = TrainingApp(tmp_path / "gpu", model=choices.SD15_MODEL, environment=ONE_THREAD)
    try:
        dropdown = next(block for block in build_ui(on_gpu).blocks.values()
                        if getattr(block, "elem_id", None) == "base-model")
        assert dropdown.value == "sd15-full"
    finally:
        on_gpu.close()


def test_the_warning_for_a_page_anyone_can_use_and_the_users_flag():
    assert "ANYONE WITH THE PUBLIC LINK" in share_warning(True, "127.0.0.1", None)
    assert "--auth USER:PASS" in share_warning(True, "127.0.0.1", None)
    assert "0.0.0.0" in share_warning(False, "0.0.0.0", None)
    assert share_warning(False, "127.0.0.1", None) is None
    assert share_warning(True, "127.0.0.1", [("a", "b")]) is None
    assert parse_users(["a:1", "b:2:3"]) == [("a", "1"), ("b", "2:3")]
    with pytest.raises(ConfigError, match="same user twice"):
        parse_users(["a:1", "a:2"])
    with pytest.raises(ConfigError, match="names a folder"):
        parse_users(["../x:1"])


def test_over_http_every_route_needs_a_sign_in_and_no_other_file_is_served(tmp_path):
    running = launch_app(tmp_path / "work", auth=["alice:pw1", "bob:pw2"], port=0, model="tiny", quiet=True,
                         config_overrides=FAST)
    try:
        url = running.url.rstrip("/")
        photo = running.app.upload("alice", sample_photos()[:2])
        assert photo.count == 2
        inside = next(running.app.photos_dir("alice").iterdir())
        anonymous = [httpx.get(f"{url}/config"), httpx.get(f"{url}/gradio_api/info"),
                     httpx.get(f"{url}/gradio_api/file={inside}"),
                     httpx.post(f"{url}/gradio_api/queue/join", json={"data": [None], "fn_index": 0,
                                                                      "session_hash": "x1"}),
                     httpx.post(f"{url}/gradio_api/upload", files={"files": ("a.png", b"x")})]
        assert [r.status_code for r in anonymous] == [401] * len(anonymous)
        with httpx.Client() as session:
            assert session.post(f"{url}/login", data={"username": "alice", "password": "pw2"}).status_code in (400,
                                                                                                             401)
            assert session.get(f"{url}/config").status_code == 401
            assert session.post(f"{url}/login", data={"username": "alice", "password": "pw1"}).status_code == 200
            assert session.get(f"{url}/config").status_code == 200
            # Signed in, still nothing but what the page made: not the photos, not the jobs, not the system.
            escapes = (inside, running.app.workdir / "jobs", "/etc/passwd", f"{inside.parent}/../../../../etc/passwd")
            for path in escapes:
                response = session.get(f"{url}/gradio_api/file={path}")
                assert response.status_code in (403, 404), (path, response.status_code)
                assert b"root:" not in response.content
            # An upload bigger than the limit is refused by the server itself.
            too_big = io.BytesIO(b"\0" * (running.app.limits.max_file_bytes + 1))
            response = session.post(f"{url}/gradio_api/upload", files={"files": ("big.png", too_big)})
            assert response.status_code in (400, 413)
    finally:
        running.close()


@pytest.mark.slow
def test_the_page_api_signed_in_trains_shows_progress_and_refuses_to_publish_without_a_token(tmp_path,
                                                                                             monkeypatch):
    """Through the page's own endpoints (what its buttons call), as a signed-in user."""
    import time

    from gradio_client import Client, handle_file

    monkeypatch.delenv("HF_TOKEN", raising=False)
    running = launch_app(tmp_path / "work", auth=["alice:pw1"], port=0, model="tiny", quiet=True,
                         config_overrides=FAST, environment=ONE_THREAD)
    try:
        client = Client(running.url, auth=("alice", "pw1"), verbose=False)
        crops, report = client.predict([handle_file(str(p)) for p in sample_photos()], "object", api_name="/upload")
        assert len(crops) == 5 and "5 usable image(s)" in report
        outlook = client.predict("object", "sks", "robot", "tiny", "t4", 4, api_name="/check")
        assert "Memory:" in outlook and "sks robot" in outlook
        queued, run_list, _, _ = client.predict("object", "sks", "robot", "tiny", "t4", 4, api_name="/start")
        job_id = run_list["value"]
        assert queued == f"Queued {job_id}."
        deadline = time.monotonic() + 300
        while True:
            text, samples, _ = client.predict(job_id, api_name="/view")
            if ": finished" in text or ": failed" in text:
                break
            assert time.monotonic() < deadline, text
            time.sleep(1)
        assert "step 4/4" in text and "Finished" in text, text
        assert len(samples) == 4
        images, status = client.predict(job_id, "a photo of sks robot", 2, "7", api_name="/generate")
        assert len(images) == 1 and status == "Done: 1 image(s)."
        message, token_field = client.predict(job_id, "alice/robot", True, "", api_name="/publish")
        assert "No Hugging Face token" in message and token_field == ""
        # A token typed in is never echoed back, whatever happens to the upload (here: offline, no such user).
        message, token_field = client.predict(job_id, "alice/robot", True, "hf_secretsecret", api_name="/publish")
        assert "hf_secretsecret" not in message and token_field == ""
        assert "hf_secretsecret" not in "".join(p.read_text(errors="ignore") for p in
                                                (tmp_path / "work").rglob("*") if p.is_file() and p.suffix in
                                                (".json", ".txt", ".md"))
        path, status = client.predict(job_id, api_name="/export")
        assert Path(path).stat().st_size > 0 and status.startswith("Exported")
        # Another tab, or a reload: the run is listed and shown from disk.
        assert [job.job_id for job in running.app.jobs("alice")] == [job_id]
    finally:
        running.close()


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_in_a_real_browser_upload_train_cancel_resume_reload_generate_and_publish_refused(tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.delenv("HF_TOKEN", raising=False)
    running = launch_app(tmp_path / "work", port=0, model="tiny", quiet=True, environment=ONE_THREAD,
                         config_overrides={**FAST, "checkpoint_every": 5, "sample_every": 10, "num_class_images": 0,
                                           "with_prior_preservation": False})
    url = running.url.rstrip("/")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url + "/", timeout=60_000)
                page.locator("#upload input[type=file]").set_input_files([str(p) for p in sample_photos()])
                page.locator("#use-photos").click()
                expect(page.locator("#photo-report textarea")).to_have_value(
                    re.compile("5 usable image"), timeout=60_000)
                expect(page.locator("#crops img").first).to_be_visible(timeout=30_000)

                page.get_by_role("tab", name="2. Train").click()
                page.locator("#class-noun textarea, #class-noun input").first.fill("robot")
                page.locator("#steps input").first.fill("60")
                page.locator("#start").click()
                expect(page.locator("#outlook")).to_contain_text("Queued", timeout=30_000)
                # A sample image appears while it trains; then cancel keeps its checkpoints.
                expect(page.locator("#samples img").first).to_be_visible(timeout=180_000)
                page.locator("#cancel").click()
                expect(page.locator("#run-status")).to_contain_text("cancelled", timeout=120_000)
                page.locator("#resume").click()
                expect(page.locator("#run-status")).to_contain_text("finished", timeout=240_000)
                expect(page.locator("#run-status")).to_contain_text("step 60/60")

                page.reload()  # a reload finds the run, and offers it to try (with its own prompt) and publish
                page.get_by_role("tab", name="2. Train").click()
                expect(page.locator("#run-status")).to_contain_text("finished", timeout=60_000)
                page.get_by_role("tab", name="3. Try it").click()
                expect(page.locator("#prompt textarea, #prompt input").first).to_have_value(
                    re.compile("sks robot"), timeout=30_000)
                page.locator("#generate").click()
                expect(page.locator("#try-status")).to_contain_text("Done: 1 image(s)", timeout=120_000)
                expect(page.locator("#images img").first).to_be_visible()

                page.get_by_role("tab", name="4. Publish").click()
                page.locator("#repo-id textarea, #repo-id input").first.fill("someone/robot")
                page.locator("#publish").click()
                expect(page.locator("#publish-status")).to_contain_text("No Hugging Face token", timeout=30_000)
            finally:
                browser.close()
        job = running.app.jobs(None)[0]
        assert job.status == FINISHED and "Resuming from" in job.log_path.read_text()
    finally:
        running.close()


def test_the_command_line_refuses_bad_users_before_serving(tmp_path, capsys):
    from dreambooth_helpers.cli import main

    assert main(["app", "--workdir", str(tmp_path / "w"), "--auth", "a:1", "--auth", "a:2", "--port", "0"]) == 2
    assert "same user twice" in capsys.readouterr().err
    assert main(["app", "--workdir", str(tmp_path / "w"), "--auth", "nopassword", "--port", "0"]) == 2
    assert "USER:PASS" in capsys.readouterr().err
