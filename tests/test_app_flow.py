"""The app's flow without a reload (issue 30, item 4): the run lists follow the runs' states, Generate without a run
asks for one, and the status says how long a run has really been going; on a CPU the toy model's own preset, no
default class noun, class images counted while they are made, the settings check as a list with the expected time,
the photo report's warnings first, the recommended photo count from the recipe, what a stopped run really kept."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from dreambooth_helpers import app_flow as flow
from dreambooth_helpers import choices
from dreambooth_helpers.app import TrainingApp
from dreambooth_helpers.app_flow import refreshed_lists, run_lists
from dreambooth_helpers.config import PRESETS, Concept, TrainConfig
from dreambooth_helpers.errors import ConfigError
from dreambooth_helpers.jobs import JobError
from dreambooth_helpers.safe_text import plain_markdown
from dreambooth_helpers.subject import RECIPES, SUBJECT_KINDS, recipe
from tests.test_app import CHROMIUM, CHROMIUM_ARGS, ONE_THREAD, REPO, make_app, run_on_disk, sample_photos

RUN = "20240102-120000-sks-robot-abcdefabcdef1234"


@pytest.fixture(autouse=True)
def alive(monkeypatch):
    """A "running" run on disk is trained by a live process (another runner's): it stays running until told."""
    monkeypatch.setattr("dreambooth_helpers.jobs.process_alive", lambda pid, marker=None: True)


def set_state(app, job_id, **state):
    path = app.runner.jobs_dir / job_id / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **state}))


def test_a_run_that_finishes_joins_the_try_and_publish_lists_at_the_next_poll(tmp_path):
    app = make_app(tmp_path)
    run_on_disk(app, RUN, None, "running")
    shown = run_lists(app, None)  # what the page loaded with
    assert shown.runs == [(f"{RUN} (running)", RUN)] and shown.finished == [] and shown.try_run is None
    assert refreshed_lists(app, None, shown.signature, RUN) is None  # nothing changed: the lists are left alone

    set_state(app, RUN, status="finished")
    lists = refreshed_lists(app, None, shown.signature, RUN)
    assert lists is not None
    assert lists.runs == [(f"{RUN} (finished)", RUN)]  # not "(running)" any more
    assert lists.finished == [(f"{RUN} (finished)", RUN)] and lists.try_run == lists.publish_run == RUN
    assert refreshed_lists(app, None, lists.signature, RUN, RUN, RUN) is None


def test_the_chosen_runs_stay_chosen_when_the_lists_change(tmp_path):
    app = make_app(tmp_path)
    older = "20240101-120000-sks-robot-000000000000aaaa"
    run_on_disk(app, older, None, "finished")
    run_on_disk(app, RUN, None, "running")
    set_state(app, RUN, created=2.0)
    set_state(app, older, created=1.0)
    shown = run_lists(app, None, older, older, older)
    set_state(app, RUN, status="finished")
    lists = refreshed_lists(app, None, shown.signature, older, older, older)
    assert [job_id for _, job_id in lists.finished] == [RUN, older]
    assert (lists.run, lists.try_run, lists.publish_run) == (older, older, older)


def test_generate_without_a_run_asks_for_a_finished_run_first(tmp_path):
    app = make_app(tmp_path)
    for prompt in ("", "a photo of sks robot"):
        with pytest.raises(JobError, match="Choose a finished run first"):
            app.generate(None, None, prompt)


def test_the_status_counts_the_time_elapsed_while_the_run_goes(tmp_path):
    app = make_app(tmp_path)
    now = time.time()
    run_on_disk(app, RUN, None, "running", started=now - 125, pid=None)
    assert "125 s elapsed" in app.job_view(None, RUN).text or "126 s elapsed" in app.job_view(None, RUN).text
    progress = {"step": 3, "total_steps": 10, "loss": 0.5, "lr": 1e-6, "seconds_per_step": 2.0,
                "history": [{"step": 3, "loss": 0.5, "time": 7.0}]}
    (app.runner.jobs_dir / RUN / "progress.json").write_text(json.dumps(progress))
    text = app.job_view(None, RUN).text
    assert "step 3/10" in text and " 0 s elapsed" not in text and ("125 s elapsed" in text or "126 s elapsed" in text)

    set_state(app, RUN, status="finished", finished=now - 25)  # stopped: the time it ran, not a growing count
    text = app.job_view(None, RUN).text
    assert "100 s elapsed" in text and "Finished: try it in the next tab." in text


def page_action(ui, trigger: str, name: str):
    """The page's handler `name` for `trigger` ("tick", "load"), and the elem_ids of what it updates."""
    for function in ui.fns.values():
        if function.name == name and trigger in [target[1] for target in function.targets]:
            return function.fn, [getattr(output, "elem_id", None) for output in function.outputs]
    raise AssertionError(f"no {name} on {trigger}")


def test_the_pages_status_poll_updates_the_run_lists_once_the_run_finishes(tmp_path):
    from types import SimpleNamespace

    from dreambooth_helpers.app_page import build_ui

    app = make_app(tmp_path)
    run_on_disk(app, RUN, None, "running")
    ui = build_ui(app)
    request = SimpleNamespace(username=None)
    loaded, _ = page_action(ui, "load", "on_load")
    run, try_run, publish_run, shown = loaded(request)[2:6]
    assert run.value == RUN and try_run.choices == [] and publish_run.choices == []

    tick, outputs = page_action(ui, "tick", "on_tick")
    assert outputs[:7] == ["run-status", "samples", "losses", "run", "try-run", "publish-run", None]
    unchanged = tick(RUN, None, None, shown, request)
    assert "running" in unchanged[0]
    set_state(app, RUN, status="finished")
    status, _, _, run, try_run, publish_run, shown = tick(RUN, None, None, shown, request)
    assert "Finished: try it in the next tab." in status
    finished = [(f"{RUN} (finished)", RUN)]
    assert run.choices == finished and run.value == RUN  # its label no longer says "(running)"
    assert try_run.choices == publish_run.choices == finished and try_run.value == publish_run.value == RUN
    assert shown == f"{RUN} (finished)"


def test_the_train_form_explains_its_fields_and_shows_the_chosen_presets_description(tmp_path):
    from dreambooth_helpers.app_page import build_ui
    from dreambooth_helpers.config import DEFAULT_PRESET, PRESETS

    ui = build_ui(make_app(tmp_path))
    shown = {block.elem_id: block for block in ui.blocks.values() if getattr(block, "elem_id", None)}
    assert PRESETS[DEFAULT_PRESET]["description"] in shown["preset-description"].value
    for name in ("token", "class-noun", "steps"):
        assert shown[name].info, name  # a one-line explanation under the field
    assert "rare word" in shown["token"].info and "Prior preservation" in shown["class-noun"].info
    assert "(0: the recipe's)" not in shown["steps"].label and "0" in shown["steps"].info

    describe, outputs = page_action(ui, "change", "preset_description")
    assert outputs == ["preset-description"]
    for name, preset in PRESETS.items():
        assert describe(name) == f"**{name}**: {preset['description']}"


def test_after_a_reload_the_form_shows_the_settings_of_the_run_that_trains(tmp_path):
    from types import SimpleNamespace

    from dreambooth_helpers.app_page import build_ui
    from dreambooth_helpers.jobs import FINISHED
    from tests.test_app import sample_photos

    app = make_app(tmp_path)
    app.runner.poll = lambda: None  # nothing starts: the run stays queued, as behind another one
    app.upload(None, sample_photos()[:3], "object")
    job = app.start(None, kind="object", token="zwx", class_noun="robot", model="tiny", preset="t4-lora", steps=7)
    ui = build_ui(app)
    loaded, outputs = page_action(ui, "load", "on_load")
    values = dict(zip(outputs, loaded(SimpleNamespace(username=None))))
    assert (values["kind"], values["token"], values["class-noun"], values["model"], values["preset"],
            values["steps"]) == ("object", "zwx", "robot", "tiny", "t4-lora", 7)

    set_state(app, job.job_id, status=FINISHED)  # nothing trains: the form is left as the user had it
    values = dict(zip(outputs, loaded(SimpleNamespace(username=None))))
    assert all(not isinstance(values[name], (str, int)) for name in ("token", "class-noun", "steps")), values


def blocks_of(ui) -> dict:
    return {block.elem_id: block for block in ui.blocks.values() if getattr(block, "elem_id", None)}


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)


def test_on_a_cpu_the_form_starts_with_the_toy_models_preset_and_says_what_it_becomes(tmp_path, no_gpu):
    from dreambooth_helpers.app_page import build_ui

    app = TrainingApp(tmp_path / "work", environment=ONE_THREAD)  # no --model, no GPU: the toy model
    shown = blocks_of(build_ui(app))
    assert app.model == "toy" and shown["base-model"].value == "toy"
    assert shown["preset"].value == choices.base_model_choice("toy").preset == choices.preset_for_model("toy")
    assert plain_markdown(choices.on_this_machine("toy")) in shown["preset-description"].value  # fp32, 32 px
    app.upload(None, sample_photos()[:3], "object")
    assert app.make_config(None, class_noun="robot").preset == choices.preset_for_model("toy")  # what is used

    sdxl = TrainingApp(tmp_path / "sdxl", model="tiny-sdxl", environment=ONE_THREAD)
    shown = blocks_of(build_ui(sdxl))  # the preset goes with the model: SDXL trains LoRA
    assert (shown["base-model"].value, shown["preset"].value) == ("tiny-sdxl", "t4-sdxl")
    assert "at 64 px" in shown["preset-description"].value
    describe = next(fn.fn for fn in build_ui(sdxl).fns.values() if fn.name == "preset_description")
    assert describe("t4-sdxl", "someone/unknown-model") == f"**t4-sdxl**: {PRESETS['t4-sdxl']['description']}"


def test_the_class_noun_has_no_default_and_check_and_start_ask_for_it(tmp_path):
    from dreambooth_helpers.app_page import build_ui

    app = make_app(tmp_path)
    noun = blocks_of(build_ui(app))["class-noun"]
    assert noun.value == "" and noun.placeholder == flow.CLASS_NOUN_EXAMPLE == "what the photos show, e.g. dog, robot"
    app.upload(None, sample_photos()[:3], "object")
    for action in (app.outlook, app.start):
        for missing in ({}, {"class_noun": ""}, {"class_noun": "   "}):
            with pytest.raises(ConfigError, match=re.escape("Write the class noun: what the photos show, e.g. dog, "
                                                            "robot.")):
                action(None, token="sks", **missing)
    assert app.jobs(None) == []  # nothing was queued: no "dog" trained on robot photos
    assert app.make_config(None, class_noun="robot").concepts[0].instance_prompt == "a photo of sks robot"


def test_while_the_class_images_are_made_the_status_counts_them(tmp_path):
    app = make_app(tmp_path)
    folder = run_on_disk(app, RUN, None, "running", started=time.time() - 30, pid=None)
    (folder / "progress.json").write_text(json.dumps({"phase": "class_images", "class_images": {"made": 40,
                                                                                               "total": 50}}))
    text = app.job_view(None, RUN).text
    assert "Making class images: 40 of 50" in text and "Starting" not in text and "30 s elapsed" in text
    (folder / "progress.json").write_text(json.dumps({"phase": "class_images", "class_images": {"made": 50,
                                                                                               "total": 50}}))
    assert "Class images made: 50 of 50; training starts." in app.job_view(None, RUN).text


def test_a_stopped_run_says_what_it_really_kept(tmp_path):
    from dreambooth_helpers import checkpoints as ckpt

    app = make_app(tmp_path)
    folder = run_on_disk(app, RUN, None, "cancelled")
    config = TrainConfig(concepts=[Concept("photos", "a photo of sks robot", "a photo of robot")],
                         output_dir=str(folder / "output"), num_class_images=50)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    text = app.job_view(None, RUN).text
    assert "checkpoints saved so far" not in text and "Resume continues" not in text
    assert text.endswith("Cancelled. No checkpoint was saved yet (this run saves none): Resume starts again from "
                         "step 0.")
    class_dir = folder / "output" / "class_images" / "a-photo-of-robot"
    class_dir.mkdir(parents=True)
    for index in range(12):
        (class_dir / f"class-{index:05d}.png").write_bytes(b"png")
    assert text.split("Cancelled. ")[1] != app.job_view(None, RUN).text.split("Cancelled. ")[1]
    assert "the 12 class image(s) made so far are kept and reused." in app.job_view(None, RUN).text
    ckpt.checkpoint_dir(folder / "output", 30).mkdir(parents=True)
    (ckpt.checkpoint_dir(folder / "output", 30) / "state.json").write_text(json.dumps({"step": 30}))
    set_state(app, RUN, status="interrupted")
    assert ("Interrupted (the app or the machine stopped while it trained). The checkpoint of step 30 is kept: "
            "Resume continues from it;") in app.job_view(None, RUN).text


def test_the_photo_report_puts_the_warnings_first_and_lists_each_photo_once(tmp_path):
    app = make_app(tmp_path)
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"<?php echo 1; ?>")
    lines = app.upload(None, [*sample_photos()[:2], fake], "object").report.splitlines()
    assert lines[0].startswith("Warnings (2, object set")
    assert lines[1].startswith("  - skipped fake.jpg: ") and lines[2].startswith("  - [warning] Only 2 photo(s)")
    listed = lines.index("2 usable image(s) to train on:")
    assert listed > 2 and lines[listed + 1:] == ["  00_robot_1.png  512x512", "  01_robot_2.png  512x512"]
    report = "\n".join(lines)
    assert report.count("robot_1.png") == report.count("robot_2.png") == 1  # once each, not read and re-read
    reloaded = app.photos_view(None, "object").report  # a reload: the photos kept, the same order
    assert reloaded.startswith("Warnings (1, object set") and reloaded.count("robot_1.png") == 1
    five = app.upload(None, sample_photos(), "object").report
    assert five.startswith("No warnings (object set") and "5 usable image(s) to train on:" in five


def test_the_recommended_photo_count_is_the_recipes_on_the_page_and_in_the_readme(tmp_path):
    app = make_app(tmp_path)
    for kind in SUBJECT_KINDS:
        fewest, most = recipe(kind).recommended_photos
        assert app.photos_view(None, kind).report == (f"No photos yet: upload {fewest}-{most} photos of your subject "
                                                      "(or a zip).")
    ranges = {kind: "{}-{}".format(*r.recommended_photos) for kind, r in RECIPES.items()}
    opening = " ".join((REPO / "README.md").read_text().split("\n\n")[1].split())
    assert (f"({ranges['object']} of a thing or pet, {ranges['person']} of a face, {ranges['style']} for a style)"
            in opening), opening


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_in_a_browser_on_a_cpu_the_train_form_the_photo_report_the_check_and_the_class_images(tmp_path, no_gpu):
    """The page as a newcomer without a GPU sees it: the toy model's preset and what it becomes here, an empty
    class noun that Check and Start ask for, the photo report's warnings on top, the settings check as a list with
    the expected time, and a run making its class images counted."""
    from playwright.sync_api import expect, sync_playwright

    from dreambooth_helpers.app_launch import launch_app

    running = launch_app(tmp_path / "work", port=0, quiet=True, environment=ONE_THREAD)
    folder = run_on_disk(running.app, RUN, None, "running", started=time.time() - 30, pid=None)
    (folder / "progress.json").write_text(json.dumps({"phase": "class_images", "class_images": {"made": 40,
                                                                                               "total": 50}}))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(running.url.rstrip("/") + "/", timeout=60_000)
                expect(page.locator("#photo-report textarea")).to_have_value(re.compile("No photos yet: upload 3-20"),
                                                                             timeout=60_000)
                page.locator("#upload input[type=file]").set_input_files([str(p) for p in sample_photos()[:2]])
                page.locator("#use-photos").click()
                report = page.locator("#photo-report textarea")
                expect(report).to_have_value(re.compile(r"^Warnings \(1, object set"), timeout=60_000)
                assert report.input_value().count("robot_1.png") == 1

                page.get_by_role("tab", name="2. Train").click()
                expect(page.locator("#preset input")).to_have_value(choices.preset_for_model("toy"), timeout=30_000)
                expect(page.locator("#preset-description")).to_contain_text(
                    "Without a GPU (as here), this preset trains the Toy model in fp32 instead of fp16")
                noun = page.locator("#class-noun textarea, #class-noun input").first
                assert noun.input_value() == "" and noun.get_attribute("placeholder") == flow.CLASS_NOUN_EXAMPLE
                page.locator("#check").click()
                expect(page.locator("#outlook")).to_contain_text(flow.CLASS_NOUN_MISSING, timeout=30_000)
                page.locator("#start").click()
                expect(page.locator("#outlook")).to_contain_text(flow.CLASS_NOUN_MISSING, timeout=30_000)
                assert [job.job_id for job in running.app.jobs(None)] == [RUN]  # nothing was queued

                noun.fill("robot")
                page.locator("#check").click()
                expected = page.locator("#outlook li", has_text="expected time")
                expect(expected).to_contain_text("about", timeout=60_000)
                expect(expected).to_contain_text("400 steps at 0.18-0.25 s/step and 50 class images")
                assert page.locator("#outlook li").count() >= 9  # one item per setting, not one paragraph
                expect(page.locator("#outlook li", has_text="memory")).to_contain_text("On a T4")

                expect(page.locator("#run-status")).to_contain_text("Making class images: 40 of 50", timeout=30_000)
            finally:
                browser.close()
    finally:
        running.close()


def test_a_url_in_a_page_message_is_its_own_link_and_nothing_in_it_loads():
    """The Publish tab's "no token" message linked to .../tokens%5C: the escape of the ")" after the URL was taken
    into the link. A URL is now an autolink that ends where the URL ends; Markdown and HTML around it stay text."""
    text = plain_markdown("paste a token (https://huggingface.co/settings/tokens). ![x](https://evil.example/i.png)"
                          " <img src=x> https://a.example/b?c=1&d=2.")
    assert text == ("paste a token \\(<https://huggingface.co/settings/tokens>\\). \\!\\[x\\]\\(<https://evil.example"
                    "/i.png>\\) &lt;img src=x&gt; <https://a.example/b?c=1&d=2>.")
