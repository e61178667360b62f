"""The web app: the journey through its actions (photos, train, try, publish), the upload limits, users kept
apart, and over HTTP: sign-in on every route and no file served from outside what the page made."""

from __future__ import annotations

import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import httpx
import pytest

from dreambooth_helpers import hub
from dreambooth_helpers.app import AppLimits, TrainingApp
from dreambooth_helpers.app_access import check_base_model, parse_users
from dreambooth_helpers.app_launch import launch_app, share_warning
from dreambooth_helpers.app_page import message as _message
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
    assert "- **memory**: " in app.outlook(None, token="sks", class_noun="robot", steps=4)

    job = app.start(None, token="sks", class_noun="robot", steps=4)
    config = job.config()
    assert config.max_train_steps == 4 and config.concepts[0].instance_prompt == "a photo of sks robot"
    assert config.model == "tiny" and config.with_prior_preservation  # the recipe, as in the notebook
    finished = app.runner.wait(job.job_id, timeout=300)
    assert finished.status == FINISHED, finished.log_path.read_text()[-3000:]
    view = app.job_view(None, job.job_id)
    assert "finished" in view.text and "step 4/4" in view.text
    captions = [caption for _, caption in view.samples]  # each sample's step and prompt (from its PNG's text)
    assert [caption.split(": ")[0] for caption in captions] == ["step 2", "step 2", "step 4", "step 4"]
    assert captions[0] == "step 2: a photo of sks robot"
    assert all(image.size == (256, 256) for image, _ in view.samples)  # the 32 px samples enlarged, sharply
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
    from dreambooth_helpers.app_page import build_ui
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
        config = app.make_config(None, class_noun="robot", model=SDXL_BASE_MODEL, preset="t4-sdxl")
        assert (config.vae, config.lora, config.train_text_encoder) == (SDXL_FP16_VAE, True, False)
        assert app.make_config(None, class_noun="robot", model="tiny-sdxl", preset="t4-sdxl").vae is None
        # Without a preset, the model's own (choices.preset_for_model): SDXL's LoRA one, never the full fine-tune's.
        assert app.make_config(None, class_noun="robot", model="tiny-sdxl").preset == "t4-sdxl"
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
        assert "- **memory**: " in outlook and "sks robot" in outlook
        queued, run_list, _, _ = client.predict("object", "sks", "robot", "tiny", "t4", 4, api_name="/start")
        job_id = run_list["value"]
        assert queued == f"Run {job_id} submitted: its state shows below."
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
                expect(page.locator("#outlook")).to_contain_text("submitted", timeout=30_000)
                # A sample image appears while it trains; then cancel keeps its checkpoints.
                expect(page.locator("#samples img").first).to_be_visible(timeout=180_000)
                page.locator("#cancel").click()
                expect(page.locator("#run-status")).to_contain_text("cancelled", timeout=120_000)
                page.locator("#resume").click()
                expect(page.locator("#run-status")).to_contain_text("finished", timeout=240_000)
                expect(page.locator("#run-status")).to_contain_text("step 60/60")
                expect(page.locator("#run-status")).not_to_contain_text(re.compile(r"(?<![0-9.])0 s elapsed"))
                page.get_by_role("tab", name="3. Try it").click()  # offered without a reload (its own prompt)
                expect(page.locator("#prompt textarea, #prompt input").first).to_have_value(
                    re.compile("sks robot"), timeout=30_000)

                page.reload()  # a reload finds the run, and offers it to try (with its own prompt) and publish
                page.get_by_role("tab", name="2. Train").click()
                expect(page.locator("#run-status")).to_contain_text("finished", timeout=60_000)
                page.get_by_role("tab", name="3. Try it").click()
                expect(page.locator("#prompt textarea, #prompt input").first).to_have_value(
                    re.compile("sks robot"), timeout=30_000)
                page.locator("#generate").click()
                expect(page.locator("#try-status")).to_contain_text("Done: 1 image(s)", timeout=120_000)
                expect(page.locator("#images img").first).to_be_visible()
                # The whole image shows: scaled to fit the gallery, not cropped to its width.
                page.wait_for_function(
                    "() => { const img = document.querySelector('#images img');"
                    " return img && getComputedStyle(img).objectFit == 'contain' && img.getBoundingClientRect().height"
                    " <= document.querySelector('#images').getBoundingClientRect().height; }", timeout=15_000)

                page.get_by_role("tab", name="4. Publish").click()
                page.locator("#repo-id textarea, #repo-id input").first.fill("someone/robot")
                page.locator("#publish").click()
                expect(page.locator("#publish-status")).to_contain_text("No Hugging Face token", timeout=30_000)
                links = page.locator("#publish-status a").evaluate_all("links => links.map(a => a.href)")
                assert "https://huggingface.co/settings/tokens" in links, links  # the link, without the ")"
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


# ---------------------------------------------------------------------------- what a visitor may reach (issue 27)

OLD_ID = "20240101-120000-sks-robot-ab12"  # a run id of the earlier, 16-bit kind


def run_on_disk(app: TrainingApp, job_id: str, owner: str | None, status: str = "cancelled", model: Path | None = None,
                **state) -> Path:
    folder = app.runner.jobs_dir / job_id
    if model is not None:
        shutil.copytree(model, folder / "output")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text(json.dumps({"status": status, "created": 1.0, "owner": owner, **state}))
    return folder


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory) -> Path:
    from tests.trained_fixtures import make_lora_output

    return make_lora_output(tmp_path_factory.mktemp("lora"))


@pytest.fixture
def models_dir(tmp_path) -> Path:
    """An operator's --models-dir: one model folder (a model_index.json is all the checks read)."""
    folder = tmp_path / "models"
    (folder / "mine").mkdir(parents=True)
    shutil.copy(REPO / "dreambooth_helpers" / "toy_model" / "model_index.json", folder / "mine")
    return folder


class FakeHub:
    """huggingface_hub.HfApi as push_to_hub calls it: calls and tokens recorded; a repository in `existing` answers
    create_repo(exist_ok=False) with the Hub's 409 Conflict."""

    existing: set[str] = set()
    calls: list[tuple[str, str, bool | None]] = []
    tokens: list[str | None] = []

    def __init__(self, token=None):
        FakeHub.tokens.append(token)
        self.endpoint = "https://huggingface.co"

    def create_repo(self, repo_id, **options):
        from huggingface_hub.errors import HfHubHTTPError

        FakeHub.calls.append(("create_repo", repo_id, options.get("exist_ok")))
        if repo_id in FakeHub.existing and not options.get("exist_ok"):
            response = httpx.Response(409, request=httpx.Request("POST", f"{self.endpoint}/api/repos/create"))
            raise HfHubHTTPError("409 Conflict: You already created this model repo", response=response)
        return f"{self.endpoint}/{repo_id}"

    def upload_folder(self, **options):
        FakeHub.calls.append(("upload_folder", options["repo_id"], None))

    def create_commit(self, **options):
        FakeHub.calls.append(("create_commit", options["repo_id"], None))


@pytest.fixture
def fake_hub(monkeypatch):
    """The host is logged in (HF_TOKEN and a saved login): neither may publish for a visitor unless allowed."""
    FakeHub.existing, FakeHub.calls, FakeHub.tokens = {"hostowner/precious-model"}, [], []
    monkeypatch.setattr(hub, "HfApi", FakeHub)
    monkeypatch.setattr(hub, "get_token", lambda: "hf_host_saved_login")
    monkeypatch.setenv("HF_TOKEN", "hf_host_environment")
    return FakeHub


def test_the_base_model_is_a_hub_id_a_built_in_model_or_a_model_in_an_allowed_folder(tmp_path, models_dir,
                                                                                       monkeypatch):
    app = make_app(tmp_path, users=["alice", "bob"], models_dir=[models_dir])
    alice_output = run_on_disk(app, OLD_ID, "alice", "finished") / "output"
    alice_output.mkdir()
    (models_dir / "escape").symlink_to(alice_output)  # a link in the allowed folder that leads out of it
    (models_dir / "system").symlink_to("/etc")
    (models_dir / "inside").symlink_to(models_dir / "mine")
    app.upload("bob", sample_photos()[:3])
    monkeypatch.chdir(app.workdir)  # "jobs/<id>" is shaped like a Hub id, and names a folder here
    refused = ["/etc/passwd", "/root", str(alice_output), str(alice_output.parent), str(app.photos_dir("alice")),
               str(models_dir / "escape"), "escape", str(models_dir / "system" / "passwd"), "../work/jobs",
               "mine/../../work", "~/x", f"jobs/{OLD_ID}", "users/bob", "sd15-random", "a/b/c"]
    for model in refused:
        with pytest.raises(ConfigError) as caught:
            app.make_config("bob", class_noun="robot", model=model)
        message = str(caught.value)
        assert "Hub id (OWNER/NAME" in message and "(toy, tiny, tiny-sdxl)" in message, model
        assert "model folders (inside, mine)" in message  # their names, never the server's paths
        assert str(tmp_path) not in _message(caught.value)  # what the page shows: not even the path typed in
    for model in ("toy", "tiny", "tiny-sdxl", "someone/some-model"):
        assert app.make_config("bob", class_noun="robot", model=model).model == model
    for model in ("mine", str(models_dir / "mine"), "inside", f" {models_dir}/inside "):
        assert app.make_config("bob", class_noun="robot", model=model).model == str((models_dir / "mine").resolve())
    assert "- **model**: …/mine" in app.outlook("bob", class_noun="robot", model="mine")
    # Without --models-dir no folder at all, and the message says how the operator allows some.
    plain = make_app(tmp_path, users=["alice", "bob"])
    with pytest.raises(ConfigError, match="not offered .*--models-dir"):
        plain.make_config("bob", model=str(models_dir / "mine"))
    assert check_base_model("/srv/operators-choice", (), "/srv/operators-choice") == "/srv/operators-choice"
    # An allowed folder may not hold, or lie in, the users' photos and runs.
    for overlapping in (tmp_path / "work" / "jobs", tmp_path, tmp_path / "work" / "users" / "bob"):
        overlapping.mkdir(parents=True, exist_ok=True)
        with pytest.raises(ConfigError, match="overlaps the work folder"):
            make_app(tmp_path, users=["alice", "bob"], models_dir=[overlapping])


def test_one_answer_for_a_run_not_yours_or_missing_and_no_server_path_in_what_the_app_says(tmp_path):
    app = make_app(tmp_path, users=["alice", "bob"])
    run_on_disk(app, OLD_ID, "alice")
    assert app.job("alice", OLD_ID).owner == "alice"  # runs with the earlier ids still load
    answers = []
    for job_id in (OLD_ID, OLD_ID[:-1] + "3", "../../etc", f"x/../{OLD_ID}"):
        with pytest.raises(JobError) as caught:
            app.job_view("bob", job_id)
        answers.append(str(caught.value).replace(repr(job_id), "'X'"))
    assert answers == ["No training run 'X'."] * 4

    app.upload("bob", sample_photos()[:3])
    outlook = app.outlook("bob", token="sks", class_noun="robot", steps=2)
    assert "- **photos**: photos \\(3\\)" in outlook  # relative to the user's own space
    photos = app.photos_view("bob")
    failed = f"No images found in {app.photos_dir('bob')}; see /usr/lib/python3/dist-packages/x.py"
    run_on_disk(app, "20240102-120000-sks-robot-failedrunid12345", "bob", "failed", error=failed)
    view = app.job_view("bob", "20240102-120000-sks-robot-failedrunid12345")
    assert "Training failed: No images found in photos; see …/x.py" in view.text
    error = _message(ImageDataError(f"{app.photos_dir('bob')}/x.png: unreadable"))
    assert error == "**Error:** …/x.png: unreadable"
    for text in (outlook, photos.report, view.text, error):
        assert str(tmp_path) not in text and "/users/" not in text, text


def test_publishing_never_uses_the_host_token_unless_allowed_and_never_overwrites_unasked(tmp_path, fake_hub,
                                                                                          lora_model, monkeypatch):
    app = make_app(tmp_path)
    run_on_disk(app, OLD_ID, None, "finished", model=lora_model)
    with pytest.raises(HubError, match="No Hugging Face token.*--publish-with-host-token"):
        app.publish(None, OLD_ID, "visitor/robot", token="")
    assert fake_hub.tokens == [] and fake_hub.calls == []  # the Hub was never asked
    assert app.publish(None, OLD_ID, "visitor/robot", token=" hf_visitor ") == "https://huggingface.co/visitor/robot"
    assert fake_hub.tokens == ["hf_visitor"]
    assert fake_hub.calls == [("create_repo", "visitor/robot", False), ("upload_folder", "visitor/robot", None)]

    fake_hub.calls.clear()  # a repository that exists: left alone unless the user says to overwrite it
    with pytest.raises(HubError, match="already exists on the Hub.*tick \"Overwrite existing repository\""):
        app.publish(None, OLD_ID, "hostowner/precious-model", token="hf_visitor")
    assert fake_hub.calls == [("create_repo", "hostowner/precious-model", False)]
    app.publish(None, OLD_ID, "hostowner/precious-model", token="hf_visitor", overwrite=True)
    assert fake_hub.calls[1:] == [("create_repo", "hostowner/precious-model", True),
                                  ("upload_folder", "hostowner/precious-model", None)]

    host = make_app(tmp_path, publish_with_host_token=True)  # the operator allows the host's token
    host.publish(None, OLD_ID, "hostowner/new-model", token="")
    monkeypatch.delenv("HF_TOKEN")
    host.publish(None, OLD_ID, "hostowner/newer-model", token="")
    assert fake_hub.tokens[-2:] == ["hf_host_environment", "hf_host_saved_login"]


def test_over_http_models_runs_and_publishing_follow_the_access_rules(tmp_path, models_dir, fake_hub, lora_model):
    from gradio_client import Client

    running = launch_app(tmp_path / "work", auth=["alice:pw1", "bob:pw2"], port=0, model="tiny", quiet=True,
                         config_overrides=FAST, models_dir=[models_dir])
    try:
        app = running.app
        alice_run = run_on_disk(app, OLD_ID, "alice", "finished", model=lora_model)
        bob_run = "20240102-120000-sks-robot-bobsrunid1234567"
        run_on_disk(app, bob_run, "bob", "finished", model=lora_model)
        bob = Client(running.url, auth=("bob", "pw2"), verbose=False)
        for model in (str(alice_run / "output"), "/etc/passwd", "/root"):
            answer = bob.predict("object", "sks", "robot", model, "t4", 4, api_name="/check")
            assert answer.startswith("**Error:** Base model") and "OWNER/NAME" in answer, answer
            assert str(tmp_path) not in answer
        app.upload("bob", sample_photos()[:3])
        answer = bob.predict("object", "sks", "robot", "mine", "t4", 4, api_name="/check")
        assert "- **model**: …/mine" in answer and "- **photos**: photos \\(3\\)" in answer, answer
        assert str(tmp_path) not in answer
        not_yours, missing = (bob.predict(job_id, api_name="/view")[0].replace(job_id, "X")
                              for job_id in (OLD_ID, OLD_ID[:-1] + "3"))
        assert not_yours == missing == "**Error:** No training run 'X'."

        message, token_field = bob.predict(bob_run, "bob/robot", True, "", api_name="/publish")
        assert "No Hugging Face token" in message and "--publish-with-host-token" in message and token_field == ""
        assert fake_hub.tokens == []
        message, _ = bob.predict(bob_run, "hostowner/precious-model", True, "hf_bob", False, api_name="/publish")
        assert "already exists" in message and fake_hub.calls == [("create_repo", "hostowner/precious-model", False)]
        message, _ = bob.predict(bob_run, "hostowner/precious-model", True, "hf_bob", overwrite=True,
                                 api_name="/publish")
        assert message == "Published: https://huggingface.co/hostowner/precious-model"
        assert fake_hub.tokens == ["hf_bob", "hf_bob"]
    finally:
        running.close()


def test_the_command_line_takes_models_folders_and_the_host_token_flag(tmp_path, capsys):
    from dreambooth_helpers.cli import build_parser, main

    args = build_parser().parse_args(["app", "--models-dir", "a", "--models-dir", "b", "--publish-with-host-token"])
    assert args.models_dir == ["a", "b"] and args.publish_with_host_token
    defaults = build_parser().parse_args(["app"])
    assert defaults.models_dir is None and not defaults.publish_with_host_token
    assert main(["app", "--workdir", str(tmp_path / "w"), "--models-dir", str(tmp_path / "none"), "--port", "0"]) == 2
    assert "--models-dir" in capsys.readouterr().err


# ---------------------------------------------------------------------------- uploads: bombs, the door, the cache

MEMORY_PROBE = r'''
import json, resource, struct, sys, zipfile, zlib
from pathlib import Path

from PIL import Image

from dreambooth_helpers.app import TrainingApp

def flat_png(side, mark):
    """A 1-bit side x side PNG, streamed: never side*side bytes in memory, a few hundred bytes compressed."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = bytes(1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    rows = [packer.compress(b"\0" + bytes([mark]) + row[2:])] + [packer.compress(row) for _ in range(side - 1)]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(rows) + packer.flush()) + chunk(b"IEND", b""))

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

work = Path(sys.argv[1])
zips = {}
for side in (9400, 6000):  # 88 MP each: over the app's 70 MP per photo; 36 MP each: under it
    zips[side] = work / f"four-{side}.zip"
    with zipfile.ZipFile(zips[side], "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(4):
            archive.writestr(f"p{i}.png", flat_png(side, i + 1))
Image.new("RGB", (256, 256), (200, 30, 30)).save(work / "warm-up.png")
app = TrainingApp(work / "app", model="tiny")
app.upload(None, [work / "warm-up.png"])  # everything the upload imports, imported
result = {"baseline_mb": peak_mb(), "zip_bytes": zips[9400].stat().st_size}
for side, packed in zips.items():
    try:
        result[f"outcome_{side}"] = app.upload(None, [packed]).report
    except Exception as error:
        result[f"outcome_{side}"] = f"{type(error).__name__}: {error}"
    result[f"peak_after_{side}_mb"] = peak_mb()
result["saved_sizes"] = [Image.open(p).size for p in sorted(app.photos_dir(None).iterdir())]
print(json.dumps(result))
'''


def test_a_decompression_bomb_upload_is_refused_from_headers_and_photos_decode_once_at_the_size_kept(tmp_path):
    """Issue 27 item 4: a ~1 KB zip of four 1-bit 9400x9400 PNGs took the app from 0.27 to 3.4 GB (peak RSS); four
    6000x6000 ones to 1.6 GB. Measured in a fresh process, as its peak RSS (ru_maxrss) over a warmed-up baseline."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, **ONE_THREAD}, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["zip_bytes"] < 2000
    refused = result["outcome_9400"]
    assert refused.startswith("ImageDataError: No usable image in the upload")
    assert "four-9400.zip/p0.png: 9400x9400 (88 megapixels)" in refused and "70 megapixels per photo" in refused
    assert result["peak_after_9400_mb"] - result["baseline_mb"] < 50, result  # refused from the headers alone
    assert "4 usable image(s)" in result["outcome_6000"]
    assert result["peak_after_6000_mb"] - result["baseline_mb"] < 350, result  # decoded one by one, kept at 2048
    assert result["saved_sizes"] == [[2048, 2048]] * 4


def gps_jpeg(colour=(200, 40, 40), fmt: str = "JPEG") -> bytes:
    """A phone photo stored sideways, with its camera and GPS position in EXIF (and a comment in a JPEG)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "SecretCam"
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (52.0, 31.0, 7.5)
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), colour).save(buffer, fmt, exif=exif, **({"comment": b"our home"} if fmt == "JPEG"
                                                                       else {}))
    return buffer.getvalue()


def flat_png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (9, 99, 199)).save(buffer, "PNG")
    return buffer.getvalue()


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def signed_in(url: str, user: str, password: str) -> httpx.Client:
    session = httpx.Client(timeout=60)
    assert session.post(f"{url}/login", data={"username": user, "password": password}).status_code == 200
    return session


def run_page_action(session: httpx.Client, url: str, api_name: str, data: list) -> list:
    """Call one of the page's actions as its browser does (queue/join, then the event stream), raw FileData and all."""
    config = session.get(f"{url}/config").json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)
    session_hash = f"test{fn_index}{len(data)}"
    joined = session.post(f"{url}/gradio_api/queue/join", json={"data": data, "fn_index": fn_index,
                                                                   "session_hash": session_hash})
    assert joined.status_code == 200, joined.text
    with session.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session_hash}) as events:
        for line in events.iter_lines():
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                return message["output"].get("data") or [message["output"].get("error")]
    raise AssertionError("the action never completed")


def test_the_upload_door_keeps_each_users_uploads_to_himself_and_strips_their_gps(tmp_path):
    from PIL import Image

    running = launch_app(tmp_path / "work", auth=["alice:pw1", "bob:pw2"], port=0, model="tiny", quiet=True,
                         config_overrides=FAST)
    try:
        url, app = running.url.rstrip("/"), running.app
        alice, bob = signed_in(url, "alice", "pw1"), signed_in(url, "bob", "pw2")
        packed = io.BytesIO()
        with zipfile.ZipFile(packed, "w") as archive:
            archive.writestr("trip/dog.jpg", gps_jpeg((0, 90, 200)))
        response = alice.post(f"{url}/gradio_api/upload", files=[("files", ("dog.jpg", gps_jpeg())),
                                                                  ("files", ("trip.zip", packed.getvalue())),
                                                                  ("files", ("cat.webp", gps_jpeg(fmt="WEBP")))])
        assert response.status_code == 200, response.text
        photo, zipped, webp = (Path(p) for p in response.json())
        assert photo.parent.parent == app.uploads_dir("alice") and photo.name == "dog.jpg"
        # EXIF (camera, GPS) and comments are gone at the door, in the zip's photos too; the orientation is kept.
        with zipfile.ZipFile(zipped) as archive:
            member = archive.read("trip/dog.jpg")
        for kept in (photo.read_bytes(), member):
            assert b"SecretCam" not in kept and b"our home" not in kept
            with Image.open(io.BytesIO(kept)) as image:
                assert image.getexif().get(0x0112) == 6 and not image.getexif().get_ifd(0x8825)
        # Any other format is decoded once, turned upright and kept as a JPEG without metadata.
        assert webp.name == "cat.jpg" and b"SecretCam" not in webp.read_bytes()
        with Image.open(webp) as image:
            assert image.size == (64, 96) and not image.getexif()
        # Served back to alice only: not to bob, not to anyone signed out, however the path is spelled.
        assert alice.get(f"{url}/gradio_api/file={photo}").content == photo.read_bytes()
        spellings = (photo, f"{photo.parent}/../{photo.parent.name}/{photo.name}", f"{app.uploads_dir('bob')}/../"
                     f"alice/{photo.parent.name}/{photo.name}")
        for session in (bob, httpx.Client()):
            for spelled in spellings:
                for route in ("/gradio_api/file=", "/gradio_api/file/", "/file="):
                    fetched = session.get(f"{url}{route}{spelled}")
                    assert fetched.status_code in (401, 403, 404), (route, spelled, fetched.status_code)
                    assert b"JFIF" not in fetched.content
        # Bob hands in alice's cached path as the FileData of his own upload: refused, nothing lands in his folder.
        file_data = {"path": str(photo), "orig_name": "dog.jpg", "meta": {"_type": "gradio.FileData"}}
        _, report = run_page_action(bob, url, "upload", [[file_data], "object"])
        assert "not a file you uploaded" in report
        assert app.photos_view("bob").count == 0 and photo.is_file()
        # Alice uses her upload: her photos hold it, and the upload itself is removed.
        _, report = run_page_action(alice, url, "upload", [[file_data], "object"])
        assert "1 usable image(s)" in report, report
        assert app.photos_view("alice").count == 1 and not photo.exists()
        saved = next(app.photos_dir("alice").iterdir())
        assert b"SecretCam" not in saved.read_bytes()
        with Image.open(saved) as image:
            assert image.size == (64, 96)  # turned upright from the orientation the door kept
    finally:
        running.close()


def test_raw_uploads_get_the_pages_limits_and_unused_ones_are_removed(tmp_path):
    import os
    import time

    from dreambooth_helpers import uploads

    limits = AppLimits(max_photos=3, max_file_bytes=200_000, max_upload_bytes=300_000, max_photo_pixels=1_000_000,
                       max_upload_pixels=1_500_000)
    running = launch_app(tmp_path / "work", port=0, model="tiny", quiet=True, limits=limits)
    try:
        url, folder = running.url.rstrip("/"), running.app.uploads_dir(None)
        upload = f"{url}/gradio_api/upload"

        def post(*files, **options):
            return httpx.post(upload, files=[("files", file) for file in files], timeout=60, **options)

        photo = ("a.png", noise_png(60, 50))
        refused = {
            "count": post(*[(f"p{i}.png", flat_png(8, 8)) for i in range(250)]),
            "per file": post(("big.png", b"\0" * 200_001)),
            "in all": post(*[(f"n{i}.png", noise_png(200, 190, i)) for i in range(3)]),
            "type": post(("page.html", b"<script>alert(1)</script>")),
            "no type": post(("notes", b"hello")),
            "fake photo": post(("fake.jpg", b"<?php echo 1; ?>")),
            "pixels per photo": post(("wide.jpg", gps_jpeg()), ("huge.png", flat_png(1100, 1000))),
            "pixels in all": post(("a.png", flat_png(900, 900)), ("b.png", flat_png(900, 900))),
            "zipped bomb": post(("z.zip", _zip({"in/huge.png": flat_png(1100, 1000)}))),
            "no length": httpx.post(upload, content=iter([b"--x\r\n"]), timeout=60,
                                    headers={"content-type": "multipart/form-data; boundary=x"}),
        }
        statuses = {what: response.status_code for what, response in refused.items()}
        assert statuses == {"count": 413, "per file": 413, "in all": 413, "type": 415, "no type": 415,
                            "fake photo": 400, "pixels per photo": 413, "pixels in all": 413, "zipped bomb": 413,
                            "no length": 411}, {w: r.text for w, r in refused.items()}
        assert "huge.png: 1100x1000 (1 megapixels) is over this page's limit of 1 megapixels" in \
            refused["pixels per photo"].text
        assert "page.html: this page takes only photos" in refused["type"].text
        assert "More files than this page takes (3)" in refused["count"].text
        assert not folder.exists() or not any(folder.iterdir())  # nothing refused was kept

        first = Path(post(photo).json()[0])
        assert first.is_file() and first.parent.parent == folder
        # An upload never used is removed after UPLOAD_TTL_S, and a user's unused uploads are capped in bytes.
        old = time.time() - uploads.UPLOAD_TTL_S - 60
        os.utime(first.parent, (old, old))
        second = [Path(p) for p in post(("b.png", noise_png(250, 240, 7))).json()]
        assert not first.exists() and all(p.is_file() for p in second)
        third = [Path(p) for p in post(("c.png", noise_png(250, 240, 8))).json()]
        assert not any(p.exists() for p in second) and all(p.is_file() for p in third)  # 2 x 180 KB > 300 KB cap
    finally:
        running.close()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_a_failed_runs_message_shows_as_text_not_as_html_or_markdown(tmp_path):
    app = make_app(tmp_path)
    error = ('ValueError: <img src="http://127.0.0.1:9/seen.png"> ![x](http://127.0.0.1:9/seen2.png) '
             '<a href="http://127.0.0.1:9/">click</a> **bold**')
    run_on_disk(app, "20240103-120000-sks-robot-htmlrunid1234567", None, "failed", error=error)
    text = app.job_view(None, "20240103-120000-sks-robot-htmlrunid1234567").text
    assert "<img" not in text and "<a " not in text and "](http" not in text and "**bold**" not in text
    assert "&lt;img src=" in text and "\\!\\[x\\]\\(<http://127.0.0.1:9/seen2.png>\\)" in text
    shown = _message(ConfigError('class noun "<img src=x onerror=alert(1)>"'))
    assert shown.startswith("**Error:** ") and "<img" not in shown


def test_an_unexpected_error_is_logged_and_shown_with_its_whole_chain_masked(caplog, monkeypatch):
    import logging

    token, host_token = "hf_" + "Abc123" * 6, "host-only-secret-123456"
    monkeypatch.setenv("HF_TOKEN", host_token)
    caplog.set_level(logging.DEBUG)
    try:
        try:
            raise ValueError(f"401 Unauthorized; headers: Authorization: Bearer {token} (env {host_token})")
        except ValueError as inner:
            raise RuntimeError(f"upload to https://hub.example/api?token={token} failed") from inner
    except RuntimeError as error:
        shown = _message(error)
    assert "RuntimeError" in caplog.text and "ValueError" in caplog.text and "Bearer hf_***" in caplog.text
    for secret in (token, host_token):
        assert secret not in caplog.text and secret not in shown
