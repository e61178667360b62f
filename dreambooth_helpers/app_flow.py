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


# The class noun has no default: a kind's usual noun ("dog" for an object) would train robot photos as a dog.
CLASS_NOUN_EXAMPLE = "what the photos show, e.g. dog, robot"
CLASS_NOUN_MISSING = f"Write the class noun: {CLASS_NOUN_EXAMPLE}."

# The Train form's explanations (the notebook's, in one line each).
TOKEN_INFO = ("A rare word that will name your subject: prompts then say \"a photo of sks dog\". Keep it rare, "
              "so it carries no meaning of its own.")
CLASS_NOUN_INFO = ("What the subject is, in a word or two (robot, man, backpack). Prior preservation: the model "
                   "also trains on images of this class it draws itself, so it keeps knowing other robots.")
STEPS_LABEL = "Training steps (0: chosen for you)"
STEPS_INFO = ("0 lets the recipe choose: a number of steps per photo for what the photos show, within set "
              "bounds; \"Check settings and memory\" says how many.")


def preset_description(name: str | None, model: str | None = None) -> str:
    """The preset's one-line description, as the CLI and the notebook show it; for a `model` of the base-model
    choices, then what the preset becomes on this machine (choices.on_this_machine: on a CPU, fp32 and plain
    AdamW at the model's own size)."""
    from .choices import choice_for_model, on_this_machine
    from .config import PRESETS
    from .safe_text import plain_markdown

    preset = PRESETS.get(name or "")
    if not preset:
        return ""
    choice = choice_for_model(model) if model else None
    here = on_this_machine(choice, name) if choice else ""
    return f"**{name}**: {preset['description']}" + (f"\n\n{plain_markdown(here)}" if here else "")


def settings_markdown(rows: list[tuple[str, str]], memory: str, public: Any) -> str:
    """The answer of "Check settings and memory": the run's settings (notebook.forms.summary_rows), the expected
    time among them, and the memory plan, as a Markdown list; `public(text)` takes server paths out of each value."""
    from .safe_text import plain_markdown

    lines = [f"- **{name}**: {plain_markdown(public(value))}" for name, value in [*rows, ("memory", memory)]]
    return "**What this run will be**\n\n" + "\n".join(lines)


def photo_report(photos: Any, doctor: Any, upload: Any = None) -> str:
    """The Photos tab's report: the warnings first (files the upload skipped, then the dataset doctor's findings,
    worst first), then each photo training will use, once, as saved (the names the findings use), with what reading
    its upload changed. `photos`: the saved photos' DatasetReport; `doctor`: their DoctorReport; `upload`: the
    DatasetReport of the upload just read (None when the page shows photos uploaded earlier)."""
    skipped = [f"skipped {item.name}: {item.reason}" for item in (upload.skipped if upload else [])]
    warnings = skipped + [*(upload.warnings if upload else []), *photos.warnings] + [f.format() for f in
                                                                                      doctor.findings]
    where = f"{doctor.kind} set, checked for {doctor.resolution} px training"
    lines = [f"Warnings ({len(warnings)}, {where}):", *(f"  - {warning}" for warning in warnings)] if warnings \
        else [f"No warnings ({where}): the dataset doctor found no problems."]
    notes = {index: record.notes for index, record in enumerate(upload.images)} if upload else {}
    lines += ["", f"{len(photos.images)} usable image(s) to train on:"]  # check-images' words
    for record in photos.images:
        index = int(record.name[:2]) if record.name[:2].isdigit() and record.name[2:3] == "_" else None
        changed = notes.get(index) or record.notes  # saved as NN_name.png from the upload's photo NN
        width, height = record.original_size
        lines.append(f"  {record.name}  {width}x{height}" + (f"  ({'; '.join(changed)})" if changed else ""))
    return "\n".join(lines)


def class_images_line(made: int, total: int, elapsed: float) -> str:
    """The status while training makes the class images (jobs.py counts them into progress.json)."""
    if made >= total:
        return f"Class images made: {total} of {total}; training starts. {elapsed:.0f} s elapsed."
    return f"Making class images: {made} of {total}, {elapsed:.0f} s elapsed."


def no_photos_text(kind: str) -> str:
    """What the Photos tab says before any upload: the kind's photo count (subject.py's recipe)."""
    from .subject import photo_range

    return f"No photos yet: upload {photo_range(kind)} photos of your subject (or a zip)."


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
