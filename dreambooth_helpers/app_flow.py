"""The page's run lists, kept in step with the runs on disk (the Train tab's, Try it's and Publish's).

The status poll (every two seconds) calls `refreshed_lists`: when a run starts, finishes or fails, the labels
("(running)", "(finished)") change and a run that has just finished joins the Try it and Publish lists, without a
reload; when nothing changed the lists are left alone (the user's choice and prompt stay as they are).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .jobs import FINISHED

Choices = list[tuple[str, str]]


def run_choices(app: Any, user: str | None, finished_only: bool = False) -> Choices:
    """(label, job id) of the user's runs, newest first: the label says the run's state now."""
    return [(f"{job.job_id} ({job.status})", job.job_id) for job in reversed(app.jobs(user))
            if job.status == FINISHED or not finished_only]


@dataclass
class RunLists:
    """The three lists' choices and values: the Train tab's run (every run), Try it's and Publish's (finished)."""

    runs: Choices
    finished: Choices
    run: str | None
    try_run: str | None
    publish_run: str | None

    @property
    def signature(self) -> str:
        """What the page last showed: the labels of every run (a change of state changes a label)."""
        return "\n".join(label for label, _ in self.runs)


def run_lists(app: Any, user: str | None, run: str | None = None, try_run: str | None = None,
              publish_run: str | None = None) -> RunLists:
    """The lists now, keeping each chosen run that is still in its list, else choosing the newest one."""
    runs, finished = run_choices(app, user), run_choices(app, user, finished_only=True)

    def kept(value: str | None, choices: Choices) -> str | None:
        ids = [job_id for _, job_id in choices]
        return value if value in ids else (ids[0] if ids else None)

    return RunLists(runs, finished, kept(run, runs), kept(try_run, finished), kept(publish_run, finished))


def refreshed_lists(app: Any, user: str | None, shown: str | None, run: str | None = None,
                    try_run: str | None = None, publish_run: str | None = None) -> RunLists | None:
    """The lists when they differ from what the page shows (`shown`: the signature it last got), else None."""
    lists = run_lists(app, user, run, try_run, publish_run)
    return None if lists.signature == (shown or "") else lists


# The Train form's explanations (the notebook's, in one line each).
TOKEN_INFO = ("A rare word that will name your subject: prompts then say \"a photo of sks dog\". Keep it rare, "
              "so it carries no meaning of its own.")
CLASS_NOUN_INFO = ("What the subject is, in a word or two (robot, man, backpack). Prior preservation: the model "
                   "also trains on images of this class it draws itself, so it keeps knowing other robots.")
STEPS_LABEL = "Training steps (0: chosen for you)"
STEPS_INFO = ("0 lets the recipe choose: a number of steps per photo for what the photos show, within set "
              "bounds; \"Check settings and memory\" says how many.")


def preset_description(name: str | None) -> str:
    """The preset's one-line description, as the CLI and the notebook show it."""
    from .config import PRESETS

    preset = PRESETS.get(name or "")
    return f"**{name}**: {preset['description']}" if preset else ""


# The Train form's settings of each run the page starts, so that a reload shows the run that trains.
FORM_FILE = "form.json"
FORM_FIELDS = ("kind", "token", "class_noun", "model", "preset", "steps")


def save_form(folder: Path, settings: dict[str, Any]) -> None:
    from .checkpoints import write_json_atomically

    write_json_atomically(folder / FORM_FILE, {name: settings.get(name) for name in FORM_FIELDS})


def form_of_active_run(app: Any, user: str | None) -> dict[str, Any] | None:
    """The form's settings of the user's newest running or queued run (None without one, or for a run started
    elsewhere, e.g. by the CLI): on a reload the form shows what trains, so Start does not train another subject."""
    from .jobs import QUEUED, RUNNING

    for job in reversed(app.jobs(user)):
        if job.status in (RUNNING, QUEUED):
            try:
                saved = json.loads((job.folder / FORM_FILE).read_text())
            except (OSError, ValueError):
                return None
            return {name: saved[name] for name in FORM_FIELDS if saved.get(name) is not None} or None
    return None


def choice_of_form(form: dict[str, Any]) -> str | None:
    """The base-model choice that trains the form's model with its preset, if one does (choosing one sets both)."""
    from .choices import base_model_choice, choice_for_model

    choice = choice_for_model(form["model"], form.get("preset")) if form.get("model") else None
    return choice if choice and base_model_choice(choice).preset == form.get("preset") else None


def form_values(app: Any, user: str | None, skip: Any) -> list[Any]:
    """On page load: the form's fields (FORM_FIELDS, then the base-model choice) from the run that trains, each
    `skip` (left as it is) without one."""
    form = form_of_active_run(app, user) or {}
    return [*(form.get(name, skip) for name in FORM_FIELDS), choice_of_form(form) or skip]
