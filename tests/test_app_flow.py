"""The app's flow without a reload (issue 30, item 4): the run lists follow the runs' states, Generate without a run
asks for one, and the status says how long a run has really been going."""

from __future__ import annotations

import json
import time

import pytest

from dreambooth_helpers.app_flow import refreshed_lists, run_lists
from dreambooth_helpers.jobs import JobError
from tests.test_app import make_app, run_on_disk

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
