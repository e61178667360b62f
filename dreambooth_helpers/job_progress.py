"""The training process's side of a job's progress.json (jobs.py's run_job): the class images counted while training
makes them, then each step's loss, time and samples; and what a stopped run keeps, as the page and the log say it.

Training (prior.py) draws the class images before its first step, with no callback, for minutes on a CPU: a thread
of the training process counts them on disk (each is written whole, then renamed into place) so that the page says
"Making class images: 40 of 50" instead of "Starting". From the first step on, only the steps are written.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from .checkpoints import write_json_atomically
from .config import TrainConfig
from .jobs import PROGRESS_FILE, _read_json

CLASS_IMAGES_PHASE = "class_images"  # progress.json's "phase" while training makes the class images
CLASS_IMAGES_POLL_S = 1.0  # how often their count on disk is read (one directory listing)


class ProgressWriter:
    """`on_step` for train(): progress.json after each step, with the loss history of the whole run so far."""

    def __init__(self, folder: Path, total_steps: int | None):
        self.path = folder / PROGRESS_FILE
        self.total_steps = total_steps
        previous = _read_json(self.path)  # a resumed run: the steps before its checkpoint are known already
        self.history: list[dict[str, Any]] = previous.get("history") or []
        self.samples: list[str] = previous.get("samples") or []
        self.started = time.time()
        self._lock = threading.Lock()  # the class images' watch writes the same file from its own thread
        self._stepped = False

    def class_images(self, made: int, total: int) -> None:
        """The class images made so far, before the first step (a later call is ignored): the page says "Making
        class images: 40 of 50" instead of "Starting" for the minutes they take. A resumed run keeps its history."""
        with self._lock:
            if self._stepped:
                return
            write_json_atomically(self.path, {**_read_json(self.path), "phase": CLASS_IMAGES_PHASE,
                                              "class_images": {"made": made, "total": total},
                                              "total_steps": self.total_steps, "updated": time.time()})

    def __call__(self, step: int, logs: dict[str, Any]) -> None:
        with self._lock:
            self._stepped = True
            self._write_step(step, logs)

    def _write_step(self, step: int, logs: dict[str, Any]) -> None:
        from .notebook.monitor import median_step_seconds

        if self.history and self.history[-1]["step"] >= step:  # resumed from an earlier checkpoint: redo from there
            self.history = [h for h in self.history if h["step"] < step]
            self.samples = [s for s in self.samples if _sample_step(s) < step]
        self.history.append({"step": step, "loss": logs.get("loss"), "instance_loss": logs.get("instance_loss"),
                             "prior_loss": logs.get("prior_loss"), "time": logs.get("time")})
        self.samples += [str(path) for path in logs.get("samples") or []]
        per_step = median_step_seconds(self.history[-50:])
        left = (self.total_steps - step) * per_step if per_step and self.total_steps else None
        write_json_atomically(self.path, {"step": step, "total_steps": self.total_steps, "loss": logs.get("loss"),
                                          "lr": logs.get("lr"), "seconds_per_step": per_step, "seconds_left": left,
                                          "updated": time.time(), "samples": self.samples, "history": self.history})


def _sample_step(path: str) -> int:
    from .notebook.monitor import sample_step

    return sample_step(path)


def class_images_on_disk(config: TrainConfig) -> tuple[int, int]:
    """(made, wanted) class images of the run, every concept together: the files in each class folder (prior.py
    writes each whole, then renames it into place), at most the number wanted. (0, 0) without prior preservation."""
    from .data import IMAGE_EXTENSIONS
    from .prior import class_dir_for

    wanted = config.effective_num_class_images
    made = 0
    for concept in config.concepts if wanted else []:
        if not (concept.class_dir or concept.class_prompt):  # no class images to make (training says why)
            continue
        with contextlib.suppress(OSError):  # not made yet
            names = os.listdir(class_dir_for(config, concept))
            made += min(wanted, sum(1 for name in names if not name.startswith(".")
                                    and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS))
    return made, wanted * len(config.concepts)


class ClassImagesWatch:
    """The class images' progress while training makes them: prior.py draws them before the first step, with no
    callback, so a thread counts them on disk and tells the progress writer whenever the count grows."""

    def __init__(self, config: TrainConfig, writer: ProgressWriter, every: float = CLASS_IMAGES_POLL_S):
        self.config, self.writer, self.every = config, writer, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="class-images-progress", daemon=True)

    def __enter__(self) -> ClassImagesWatch:
        made, wanted = class_images_on_disk(self.config)
        if made < wanted:  # some are still to make
            self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        made, total = class_images_on_disk(self.config)  # said once the first new one is on disk
        while not self._stop.wait(self.every):
            now, total = class_images_on_disk(self.config)
            if now != made:
                made = now
                with contextlib.suppress(OSError):  # a full disk: the runner finds out from the disk itself
                    self.writer.class_images(made, total)
            if made >= total:
                return


def kept_when_stopped(config: TrainConfig) -> str:
    """What a stopped run keeps, as it is on disk (the same fact as the CLI's Ctrl+C message: the checkpoints
    listed): the newest checkpoint Resume continues from, or that none was saved yet, so Resume starts again at
    step 0; and the class images made so far, which the next start reuses."""
    from .checkpoints import checkpoint_step, list_checkpoints

    saved = list_checkpoints(config.output_dir)
    if saved:
        kept = f"The checkpoint of step {checkpoint_step(saved[-1])} is kept: Resume continues from it"
    else:
        how = (f"this run saves one every {config.checkpoint_every} steps" if config.checkpoint_every
               else "this run saves none")
        kept = f"No checkpoint was saved yet ({how}): Resume starts again from step 0"
    made, _ = class_images_on_disk(config)
    return kept + (f"; the {made} class image(s) made so far are kept and reused." if made else ".")
