"""Training from the notebook: reuse a finished run or train, show progress and samples while it runs, then
plot the loss history from training_summary.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import DreamBoothError
from ..files import SUMMARY_FILE
from ..grids import labelled_grid
from .runtime import in_notebook_words

PRECISION_NAMES = {"no": "fp32", "fp16": "fp16 mixed", "bf16": "bf16 mixed"}  # the summary records accelerate's names


def run_training(config: TrainConfig, num_images: int, train_again: bool = False):
    """The trained run for `config`: the finished model already in its output folder (a cell re-run after a
    disconnect, say), or a new training run while a TrainingMonitor shows its progress.

    `train_again` trains from step 0 even when a finished model or checkpoints exist (the model is replaced
    only once the new one is complete).
    """
    from ..run_identity import find_finished_run
    from ..threads import use_one_thread_for
    from ..training import train

    use_one_thread_for(config.model)
    if not train_again:
        finished = find_finished_run(config, max_steps=config.steps_for(num_images))
        if finished is not None:
            print(f"{finished.output_dir} already holds this model, trained for {finished.global_step} steps: using "
                  "it. Tick TRAIN_AGAIN and run this cell again to train it anew.")
            return finished
    else:
        config = config.replace(resume=None)
    monitor = TrainingMonitor(config.steps_for(num_images))
    return train(config, on_step=monitor, on_notice=lambda text: print(in_notebook_words(text)))


def progress_line(step: int, total: int, logs: dict[str, Any], seconds_per_step: float | None = None) -> str:
    elapsed = float(logs.get("time") or 0.0)
    rate = f", {seconds_per_step:.2f} s/step" if seconds_per_step else ""
    left = f", about {(total - step) * seconds_per_step / 60:.0f} min left" if seconds_per_step and step < total else ""
    prior = logs.get("prior_loss")
    prior_text = f", prior loss {prior:.4f}" if isinstance(prior, float) else ""
    return (f"step {step}/{total}: loss {logs.get('loss', float('nan')):.4f}{prior_text}, "
            f"lr {logs.get('lr', 0.0):.2e}, {elapsed:.0f} s elapsed{rate}{left}")


def median_step_seconds(history: Sequence[dict[str, Any]]) -> float | None:
    """The typical time of one step, from the history's timestamps.

    The median skips the steps that also drew samples or saved a checkpoint, and the first step,
    whose time includes loading the model and making class images.
    """
    times = [float(h["time"]) for h in history if h.get("time") is not None]
    gaps = sorted(b - a for a, b in zip(times, times[1:]) if b >= a)
    return gaps[len(gaps) // 2] if gaps else None


def sample_step(path: str | Path) -> int:
    """The training step a sample file was drawn at (samples/step-000150-0.png -> 150)."""
    name = Path(path).name
    digits = name.removeprefix("step-").split("-")[0]
    return int(digits) if name.startswith("step-") and digits.isdigit() else -1


def sample_grid(paths: Sequence[str | Path], cell: int = 192):
    """The samples as a grid: one row per step ("step N" above it), one column per sample prompt, each image
    captioned with its prompt; small images enlarged sharply (nearest neighbour) to the cell."""
    from PIL import Image

    from ..run_outputs import sample_prompt

    by_step: dict[int, list[Any]] = {}
    prompts: dict[int, list[str]] = {}
    for path in sorted(paths, key=lambda p: (sample_step(p), Path(p).name)):
        with Image.open(path) as image:
            by_step.setdefault(sample_step(path), []).append(image.convert("RGB"))
            prompts.setdefault(sample_step(path), []).append(sample_prompt(path, image))
    return labelled_grid([(f"step {step}", images) for step, images in by_step.items()], cell=cell,
                         captions=list(prompts.values()))


@dataclass
class TrainingMonitor:
    """`on_step` for `train()`: shows progress text and each new round of samples as training draws them.

    It updates two display areas in place (IPython display handles), so the cell's output stays short.
    Text goes out as plain text (`Pretty`), not as a Python string's repr with its quotes.
    """

    total_steps: int
    refresh_every: int = 10
    shown_samples: list[str] = field(default_factory=list)
    recent: list[dict[str, Any]] = field(default_factory=list)
    _text: Any = None
    _images: Any = None

    def __post_init__(self) -> None:
        from IPython.display import Pretty, display

        self._text = display(Pretty(f"Preparing: loading the model and reading the class images "
                                    f"({self.total_steps} training steps next)"), display_id=True)
        self._images = display(Pretty("Samples appear here as training draws them."), display_id=True)

    def __call__(self, step: int, logs: dict[str, Any]) -> None:
        from IPython.display import Pretty

        self.recent.append(logs)
        del self.recent[:-50]  # the recent steps are enough for the speed
        if step == 1 or step % self.refresh_every == 0 or step == self.total_steps:
            self._text.update(Pretty(progress_line(step, self.total_steps, logs, median_step_seconds(self.recent))))
        fresh = [str(path) for path in logs.get("samples") or []]
        if fresh:
            self.shown_samples += fresh
            self._images.update(sample_grid(self.shown_samples[-8:]))


def read_summary(output_dir: str | Path) -> dict[str, Any]:
    """The run's training_summary.json."""
    path = Path(output_dir) / SUMMARY_FILE
    if not path.is_file():
        raise DreamBoothError(f"No training summary in {str(output_dir)!r}: training has not finished there. Run the "
                              "training cell first.")
    return json.loads(path.read_text())


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the loss is noisy: each step sees one random timestep)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(summary: dict[str, Any], window: int | None = None):
    """A matplotlib Figure of the loss per step: raw (faint), smoothed, and subject vs prior parts."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    history = summary.get("history") or []
    if not history:
        raise DreamBoothError("The training summary has no per-step history to plot.")
    steps = [h["step"] for h in history]
    window = window or max(1, len(history) // 20)
    # Made through pyplot so notebooks know how to show it; closed at once so it is shown only where displayed.
    figure, axes = plt.subplots(figsize=(8, 3.5))
    plt.close(figure)
    axes.plot(steps, [h["loss"] for h in history], color="#bbb", linewidth=0.8, label="loss (each step)")
    axes.plot(steps, moving_average([h["loss"] for h in history], window), color="black",
              label=f"loss (mean of {window})")
    axes.plot(steps, moving_average([h["instance_loss"] for h in history], window), color="tab:blue",
              label="your photos")
    prior = [h.get("prior_loss") for h in history]
    if all(isinstance(p, (int, float)) for p in prior):
        axes.plot(steps, moving_average(prior, window), color="tab:orange", label="class images (prior)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, also in a 4-step run
    axes.set_xlabel("step")
    axes.set_ylabel("MSE of the predicted noise")
    axes.set_title("Training loss")
    axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    return figure


def training_facts(summary: dict[str, Any]) -> str:
    """One paragraph: steps, time, speed, peak GPU memory, precision, optimizer and any notices."""
    steps = summary.get("steps", 0)
    seconds = float(summary.get("wall_time_s") or 0.0)
    per_step = median_step_seconds(summary.get("history") or [])
    speed = f" ({per_step:.2f} s per training step, median)" if per_step is not None else ""
    peak = summary.get("peak_gpu_memory_gib")
    precision = summary.get("mixed_precision")
    memory = f"peak GPU memory {peak:.2f} GiB" if isinstance(peak, (int, float)) else "no GPU used"
    lines = [f"{steps} steps in {seconds / 60:.1f} min{speed}; {memory}; device {summary.get('device')}, "
             f"precision {PRECISION_NAMES.get(precision, precision)}, optimizer {summary.get('optimizer')}, "
             f"{'LoRA' if summary.get('lora') else 'full fine-tune'}, {summary.get('resolution')} px, "
             f"{summary.get('num_instance_images')} photos + {summary.get('num_class_images')} class images."]
    lines += [f"Note: {in_notebook_words(notice)}" for notice in summary.get("notices") or []]
    return "\n".join(lines)
